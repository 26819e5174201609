"""The real-face stage of ``reenact demo``: offline, fast, moves the face where the script says,
keeps the astronaut's identity."""
import time

import numpy as np
import pytest
import torch

pytest.importorskip("pncc_cuda", reason="pncc_cuda's extension is not built")
pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 is not installed (optional extra)")
pytest.importorskip("skimage.data", reason="scikit-image provides the astronaut photo")
pytest.importorskip("matplotlib.cbook", reason="matplotlib provides grace_hopper.jpg")

from reenact.demo import real_face as real_demo  # noqa: E402
from reenact.face3d import load_model  # noqa: E402
from reenact.face3d.detectors import MediapipeDetector  # noqa: E402
from reenact.face3d.expressions import expression_offsets  # noqa: E402

#: A pixel "changed" when a channel moved by more than this (of 255).
CHANGED = 24


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("real_face")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        result = real_demo.write_real_face(out)
        result["seconds"] = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return result


def test_it_runs_offline_in_under_a_minute_and_writes_the_video_and_grid(written):
    assert written["seconds"] < 60
    assert written["real_video"].stat().st_size > 10_000
    from PIL import Image

    with Image.open(written["real_grid"]) as grid:
        picks = real_demo.grid_frames(written["demo"].labels)
        assert len(picks) == 8
        rows = -(-len(picks) // real_demo.GRID_BLOCKS)
        assert grid.size == (real_demo.GRID_BLOCKS * 3 * real_demo.SIZE, rows * real_demo.SIZE + real_demo.CAPTION)
    from reenact.data.video import iter_frames

    assert sum(1 for _ in iter_frames(written["real_video"])) == len(written["demo"].labels)


def _moved_region(demo, offsets, threshold_mm=0.75, margin=4):
    """Where an expression may change the picture: the parts of the source face it moves (by
    > threshold_mm), in the source and the driven view, grown by ``margin`` pixels; and off the
    face, where the warp extends the face's displacement smoothly (reenact.warp.FILL_SIGMA), the
    same parts grown by that reach."""
    import pncc_cuda
    import torch.nn.functional as F

    from reenact.warp import FILL_SIGMA

    model = load_model("mediapipe")
    moved = torch.from_numpy((np.linalg.norm(offsets, axis=1) > threshold_mm).astype(np.float32))
    region = torch.zeros(1, 1, real_demo.SIZE, real_demo.SIZE)
    face = torch.zeros(1, 1, real_demo.SIZE, real_demo.SIZE, dtype=torch.bool)
    fit = demo.fit
    for beta in (fit.beta, fit.beta + torch.from_numpy(offsets).reshape(1, -1)):
        vertices = model.image_vertices(fit.alpha, beta, fit.pose)
        face_index, bary, _ = pncc_cuda.rasterize(vertices, model.faces, real_demo.SIZE, real_demo.SIZE)
        value = pncc_cuda.interpolate(moved[None, :, None], model.faces, face_index, bary)
        region = torch.maximum(region, (value[..., 0] > 0.01).float()[:, None])
        face |= (face_index >= 0)[:, None]
    reach = int(2.5 * FILL_SIGMA * real_demo.SIZE)
    near = F.max_pool2d(region, 2 * margin + 1, stride=1, padding=margin) > 0
    extended = (F.max_pool2d(region, 2 * reach + 1, stride=1, padding=reach) > 0) & ~face
    return (near | extended)[0, 0].numpy()


def test_frames_differ_from_the_source_exactly_where_the_script_moves_the_face(written):
    demo = written["demo"]
    first = demo.results[0].astype(int)
    assert np.abs(first - demo.source.astype(int)).max() <= 1  # frame 0 is the neutral source
    offsets = expression_offsets(load_model("mediapipe"))
    for label, name in (("smile", "smile"), ("open mouth", "open_mouth"), ("raise brows", "raise_brows"),
                        ("blink", "blink")):
        index = max(i for i, x in enumerate(demo.labels) if x == label)
        changed = (np.abs(demo.results[index].astype(int) - demo.source.astype(int)).max(-1) > CHANGED)
        region = _moved_region(demo, offsets[name])
        assert changed.sum() > 30, (label, changed.sum())
        outside = (changed & ~region).sum() / changed.sum()
        assert outside < 0.02, f"{label}: {outside:.1%} of the changed pixels lie outside the moved region"


def test_the_astronauts_identity_is_kept(written):
    """Re-fit the mesh on the results of the expression frames: the identity (mean model-frame
    mesh) stays far closer to the astronaut's than Grace Hopper's is."""
    demo = written["demo"]
    model = load_model("mediapipe")
    picks = [max(i for i, x in enumerate(demo.labels) if x == label)
             for label in ("smile", "raise brows", "nod down", "turn left")]
    with MediapipeDetector() as detector:
        points = [detector.detect_dense(demo.results[i]) for i in picks]
        hopper = detector.detect_dense(real_demo.grace_hopper())
    assert all(p is not None for p in points)
    refit = model.fit_dense(np.stack(points))
    source = demo.fit.clip_alpha[0]
    other = model.fit_dense(hopper[None]).clip_alpha[0]
    error = (refit.clip_alpha[0] - source).reshape(-1, 3).norm(dim=-1).mean()
    between_people = (other - source).reshape(-1, 3).norm(dim=-1).mean()
    assert error < 0.35 * between_people, (error.item(), between_people.item())
