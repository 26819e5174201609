"""Shared helpers of the data tests: small synthetic datasets, a corrupt-media corpus, bad decoders."""
import faulthandler
import os
import pathlib
import shutil
import time

import numpy as np

from reenact.data import synth
from reenact.data.video import iter_frames

#: Clip size and length of most data tests (small: the suite must stay fast on 2 cores).
SIZE = 64
FRAMES = 20


def make_dataset(root, clips=6, size=SIZE, frames=FRAMES, codec="vp9", seed=0):
    synth.synth_dataset(root, clips, frames=frames, size=size, codec=codec, seed=seed, identities=max(1, clips // 2))
    return pathlib.Path(root)


def psnr(a, b, peak=255.0):
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


def hanging_or_crashing_decoder(path):
    """A decoder stand-in: hangs on names containing 'hang', dies natively on 'crash'."""
    name = pathlib.Path(path).name
    if "hang" in name:
        time.sleep(3600)
    if "crash" in name:
        faulthandler.disable()  # pytest's handler would print this process's stack on the abort
        os.abort()
    return iter_frames(path)


def _write_audio_only(path):
    import av

    with av.open(os.fspath(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_h264_faststart(path, frames):
    """H.264 MP4 with the index (moov) first, so a truncated copy still announces every frame."""
    import av

    with av.open(os.fspath(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_corrupt_corpus(raw_dir, good_video, landmarks):
    """Write RELIABILITY item 11's corpus next to copies of a good raw video.

    Returns (good names, bad names -> what is wrong). ``good_video`` is a raw synthetic video,
    ``landmarks`` its (T, 68, 2) landmarks (copied for every name, for --landmarks-from).
    """
    raw_dir = pathlib.Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    data = pathlib.Path(good_video).read_bytes()
    good = ["with space.webm", "ünïcødé 顔.webm", "-leading dash.webm", "plain.webm"]
    for name in good:
        (raw_dir / name).write_bytes(data)
    bad = {
        "zero bytes.webm": b"",
        "header cut.webm": data[:60],
        "unknown codec.webm": data.replace(b"V_VP9", b"V_QQ9"),
    }
    for name, content in bad.items():
        (raw_dir / name).write_bytes(content)
    _write_audio_only(raw_dir / "audio only.mp4")
    frames = np.stack(list(iter_frames(good_video)))
    _write_h264_faststart(raw_dir / "count lies.mp4", frames)
    full = (raw_dir / "count lies.mp4").read_bytes()
    (raw_dir / "count lies.mp4").write_bytes(full[:len(full) // 2])
    (raw_dir / "half.webm").write_bytes(data[:len(data) // 2])
    (raw_dir / "hang.webm").write_bytes(data)
    (raw_dir / "crash.webm").write_bytes(data)
    for path in raw_dir.iterdir():
        if path.suffix in (".webm", ".mp4"):
            np.save(raw_dir / f"{path.stem}.landmarks.npy", landmarks)
    # Truncated files may still yield their first frames; the rest must be skipped.
    must_skip = ["zero bytes.webm", "header cut.webm", "unknown codec.webm", "audio only.mp4", "hang.webm", "crash.webm"]
    may_skip = ["count lies.mp4", "half.webm"]
    return good, must_skip, may_skip


def copy_dataset(source, target):
    shutil.copytree(source, target)
    return pathlib.Path(target)


def noisy_decoder(path):
    """A decoder that, like mediapipe's TFLite, writes straight to file descriptor 2."""
    os.write(2, b"NATIVE-NOISE from the decoder\n")
    yield from iter_frames(path)
