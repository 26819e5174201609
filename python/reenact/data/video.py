"""Video files through PyAV: encoding clips, probing and decoding frames.

PyAV (``av==18.1.0``) bundles libvpx and libx264 in its wheels, so encoding needs no system
FFmpeg. Clips use a short GOP so that random access (two frames per clip) decodes few frames.
"""
import contextlib
import fractions
import io
import os
import pathlib

import numpy as np

#: Codec name of the CLI -> (PyAV encoder, container suffix, encoder options). VP9 realtime speed 6,
#: not 8: at 64x64 speed 8 skips nearly static frames outright (the decoder repeats the previous
#: frame: 41 of 107 frames of a real 64x64 clip), so a clip's frame no longer shows what its stored
#: parameters were fitted on, and a driving frame can equal its source frame bit for bit.
CODECS = {
    "vp9": ("libvpx-vp9", ".webm", {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "6",
                                    "row-mt": "1", "lag-in-frames": "0"}),
    "h264": ("libx264", ".mp4", {"crf": "18", "preset": "veryfast", "tune": "fastdecode"}),
}
DEFAULT_GOP = 8


class MediaError(ValueError):
    """A media file cannot be opened, has no video stream, or does not decode."""


def _av():
    try:
        import av  # optional dependency (PyAV): named with its install command when missing
    except ImportError as err:
        raise ImportError("video I/O needs PyAV (`pip install av==18.1.0`)") from err
    return av


def check_codec(codec):
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    return CODECS[codec]


def encode_video(path, frames, fps=25.0, codec="vp9", gop=DEFAULT_GOP):
    """Encode (T, H, W, 3) uint8 RGB frames (an array or an iterable of arrays) to ``path``.

    Even sizes are required by 4:2:0 chroma. Writes to a temporary name, then renames, so an
    interrupted run never leaves a half-written clip under the final name. Returns the frame count.
    """
    with VideoWriter(path, fps=fps, codec=codec, gop=gop) as writer:
        for frame in frames:
            writer.write(frame)
    return writer.count


class VideoWriter:
    """Encode frames one at a time (``write``), so a long video never sits in memory.

    A context manager: leaving it normally finishes the file under its final name (written to a
    temporary name until then); leaving it by an exception removes the partial file. Raises
    ValueError for frames that are not (H, W, 3) uint8 of one even size, or when none was written.
    """

    def __init__(self, path, fps=25.0, codec="vp9", gop=DEFAULT_GOP):
        self._av = _av()
        self._encoder, _, self._options = check_codec(codec)
        if not (isinstance(gop, int) and gop >= 1):
            raise ValueError(f"gop must be a positive int, got {gop!r}")
        self.path = pathlib.Path(os.fspath(path))
        self._rate, self._codec, self._gop = _rate(fps), codec, gop
        self._temporary = self.path.with_name(".partial-" + self.path.name)
        self._container = self._av.open(os.fspath(self._temporary), "w",
                                        format="webm" if self.path.suffix == ".webm" else "mp4")
        self._stream = None
        self.count = 0

    def write(self, frame):
        frame = np.ascontiguousarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frames must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
        height, width = frame.shape[:2]
        if self._stream is None:
            if height % 2 or width % 2:
                raise ValueError(f"frame size must be even for 4:2:0 video, got {width}x{height}")
            stream = self._container.add_stream(self._encoder, rate=self._rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.gop_size = self._gop
            options = dict(self._options, g=str(self._gop))
            stream.options = dict(options, keyint_min=str(self._gop)) if self._codec == "h264" else options
            self._stream = stream
        elif (height, width) != (self._stream.height, self._stream.width):
            raise ValueError(f"frame {self.count} is {width}x{height}, expected "
                             f"{self._stream.width}x{self._stream.height}")
        for packet in self._stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._container.mux(packet)
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        finish = kind is None and self._stream is not None
        try:
            if finish:
                for packet in self._stream.encode():
                    self._container.mux(packet)
            self._container.close()
            if finish:
                os.replace(self._temporary, self.path)
        finally:
            if self._temporary.exists():
                self._temporary.unlink()
        if kind is None and self._stream is None:
            raise ValueError("no frames to encode")
        return False


def _rate(fps):
    if not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be positive, got {fps!r}")
    return fractions.Fraction(fps).limit_denominator(1001)


def _upsample2(plane):
    """Centre-aligned bilinear 2x upsampling of a chroma plane (edges replicated), float32."""
    plane = plane.astype(np.float32)
    for axis in (0, 1):
        before = np.concatenate([np.take(plane, [0], axis), np.take(plane, np.arange(plane.shape[axis] - 1), axis)], axis)
        after = np.concatenate([np.take(plane, np.arange(1, plane.shape[axis]), axis), np.take(plane, [-1], axis)], axis)
        even, odd = 0.75 * plane + 0.25 * before, 0.75 * plane + 0.25 * after
        shape = list(plane.shape)
        shape[axis] *= 2
        plane = np.stack([even, odd], axis + 1).reshape(shape)
    return plane


def to_rgb(frame):
    """An ``av.VideoFrame`` -> (H, W, 3) uint8 RGB.

    4:2:0 frames (what we encode) are converted here, not by swscale: BT.601 limited range with
    centre-aligned bilinear chroma upsampling, rounded, which is what DALI's decoders do, so the
    fallback loader and DALI agree to rounding (swscale's default path differs by up to ~1.5
    levels on average and by much more at sharp chroma edges). Other pixel formats go through
    swscale.
    """
    if frame.format.name != "yuv420p" or frame.width % 2 or frame.height % 2:
        return frame.to_ndarray(format="rgb24")
    height, width = frame.height, frame.width
    planes = frame.to_ndarray()  # (3H/2, W): Y, then U and V quarter planes
    luma = (planes[:height].astype(np.float32) - 16.0) * (255.0 / 219.0)
    chroma = planes[height:].reshape(2, height // 2, width // 2)
    cb = (_upsample2(chroma[0]) - 128.0) * (255.0 / 224.0)
    cr = (_upsample2(chroma[1]) - 128.0) * (255.0 / 224.0)
    red = luma + 1.402 * cr
    green = luma - 0.344136 * cb - 0.714136 * cr
    blue = luma + 1.772 * cb
    return np.clip(np.rint(np.stack([red, green, blue], -1)), 0, 255).astype(np.uint8)


@contextlib.contextmanager
def open_video(path):
    """Open a file's first video stream -> (container, stream); MediaError when there is none,
    its codec has no decoder, or FFmpeg fails (also while the caller reads it)."""
    av = _av()
    path = pathlib.Path(os.fspath(path))
    if not path.is_file():
        raise MediaError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise MediaError(f"empty file (0 bytes): {path}")
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise MediaError(f"no video stream (audio-only or data file): {path}")
            stream = container.streams.video[0]
            if stream.codec_context is None:
                raise MediaError(f"unknown or unsupported video codec (no decoder) in {path}")
            yield container, stream
    except av.error.FFmpegError as err:
        raise MediaError(f"cannot read {path}: {err}") from None


def probe(path):
    """(packets, fps, codec name, width, height) of the first video stream, without decoding.

    ``packets`` counts the video packets actually present, which (for the codecs we write: no
    B-frame reordering across a packet, one frame per packet) is the number of frames that can
    decode; a header that claims more frames than the file holds is thereby caught.
    Raises MediaError when the file is not a readable video.
    """
    with open_video(path) as (container, stream):
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        packets = sum(1 for packet in container.demux(stream) if packet.size > 0)
    if packets == 0:
        raise MediaError(f"no video frames in {path}")
    return packets, fps, codec, width, height


def iter_frames(path, max_frames=None, exact_colour=True):
    """Yield (H, W, 3) uint8 RGB frames in order. Raises MediaError on an unreadable file.

    ``exact_colour``: convert YUV as DALI does (:func:`to_rgb`, what the training loaders need);
    False uses FFmpeg's swscale, several times faster and within ~2 levels, which is enough to
    find faces and cut crops (``prepare``).
    """
    with open_video(path) as (container, stream):
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if max_frames is not None and index >= max_frames:
                return
            yield to_rgb(frame) if exact_colour else frame.to_ndarray(format="rgb24")


class FrameIndex:
    """Presentation timestamps of a video's frames in display order, and which are key frames.

    Built once per file by demuxing (no decoding); lets :func:`read_frames` seek to the key frame
    before a wanted frame instead of decoding from the start.
    """

    def __init__(self, path):
        self.path = pathlib.Path(os.fspath(path))
        with open_video(self.path) as (container, stream):
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size > 0 and p.pts is not None]
        packets.sort()
        self.pts = np.array([p for p, _ in packets], dtype=np.int64)
        keyframes = np.array([k for _, k in packets], dtype=bool)
        if keyframes.size:
            keyframes[0] = True
        # For each frame, the display index of the last key frame at or before it.
        positions = np.where(keyframes, np.arange(keyframes.size), 0)
        self.keyframe_before = np.maximum.accumulate(positions) if keyframes.size else positions

    def __len__(self):
        return int(self.pts.size)


def keyframe_suffixes(path):
    """The clip re-muxed (no re-encoding) into one in-memory Matroska stream per key frame, each
    starting at that key frame -> ({display index of the key frame: uint8 array}, keyframe_before).

    ``keyframe_before[i]`` is the key frame at or before frame i. Frame i is frame
    ``i - keyframe_before[i]`` of that key frame's stream. Our encoders write closed GOPs, so every
    suffix decodes on its own. DALI's decoder reads a stream from its start, so handing it the
    suffix decodes at most one GOP per frame instead of the clip's whole head.
    """
    av = _av()
    index = FrameIndex(path)
    suffixes = {}
    with open_video(path) as (container, stream):
        packets = sorted((p for p in container.demux(stream) if p.size > 0 and p.dts is not None),
                         key=lambda p: p.dts)
        for start, packet in enumerate(packets):
            if not packet.is_keyframe and start != 0:
                continue
            display = int(np.searchsorted(index.pts, packet.pts))
            buffer = io.BytesIO()
            with av.open(buffer, "w", format="matroska") as output:
                target = output.add_stream_from_template(stream)
                base = packet.dts
                for item in packets[start:]:
                    pts, dts = item.pts, item.dts
                    item.pts, item.dts, item.stream = pts - base, dts - base, target
                    output.mux(item)
                    item.pts, item.dts = pts, dts
            suffixes[display] = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    keys = np.array(sorted(suffixes))
    keyframe_before = keys[np.searchsorted(keys, np.arange(len(index)), side="right") - 1]
    return suffixes, keyframe_before


def read_frames(path, indices, index=None):
    """Decode the frames of the given indices (any order, repeats allowed) -> list of arrays.

    Seeks to the key frame before each group of wanted frames (clips have a short GOP), using
    ``index`` (a :class:`FrameIndex`, built when not given). Raises MediaError when an index is
    past the frames that decode.
    """
    indices = [int(i) for i in indices]
    if not indices:
        return []
    if min(indices) < 0:
        raise ValueError(f"frame indices must be >= 0, got {indices}")
    index = index if index is not None else FrameIndex(path)
    if max(indices) >= len(index):
        raise MediaError(f"{path}: frame {max(indices)} requested but only {len(index)} frames exist")
    found = {}
    with open_video(path) as (container, stream):
        for target in sorted(set(indices)):
            if target in found:
                continue
            container.seek(int(index.pts[index.keyframe_before[target]]), stream=stream, backward=True)
            for frame in container.decode(stream):
                position = int(np.searchsorted(index.pts, frame.pts)) if frame.pts is not None else -1
                if 0 <= position < len(index) and index.pts[position] == frame.pts and position in indices:
                    found.setdefault(position, to_rgb(frame))
                if frame.pts is not None and frame.pts >= index.pts[target]:
                    break
    missing = sorted(set(indices) - set(found))
    if missing:
        raise MediaError(f"{path}: frames {missing[:5]} do not decode")
    return [found[i] for i in indices]
