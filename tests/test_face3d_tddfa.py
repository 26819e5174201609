"""3DDFA_V2 compatibility: safe pickles, BFM files, 62-parameter decoding, the MobileNet regressor.

All 3DDFA_V2 files are written by the tests in that format; nothing is downloaded.
"""
import os
import pickle

import numpy as np
import pytest
import torch

from reenact.face3d.loading import load_model
from reenact.face3d.tddfa import (
    MobileNetV1, TDDFARegressor, crop_image, decode_params, load_regressor, load_tddfa_bfm,
    roi_box_from_bbox, roi_box_from_landmarks, safe_load_pickle,
)

NUM_VERTICES = 300


def reference_3ddfa_vertices(bfm, params, roi_box, size=120):
    """3DDFA_V2's dense reconstruction, restated from its recon_vers + similar_transform."""
    pose = params[:12].reshape(3, 4)
    shape = params[12:52, None]
    expression = params[52:, None]
    flat = bfm["u"] + bfm["w_shp"][:, :40] @ shape + bfm["w_exp"][:, :10] @ expression
    points = pose[:, :3] @ flat.reshape(3, -1, order="F") + pose[:, 3:]
    points[0] -= 1
    points[2] -= 1
    points[1] = size - points[1]
    sx, sy, ex, ey = roi_box
    scale_x, scale_y = (ex - sx) / size, (ey - sy) / size
    points[0] = points[0] * scale_x + sx
    points[1] = points[1] * scale_y + sy
    points[2] *= (scale_x + scale_y) / 2
    points[2] -= points[2].min()
    return points.T


@pytest.fixture(scope="module")
def tddfa_files(tmp_path_factory):
    """A small BFM-like model and parameter statistics, pickled as 3DDFA_V2 pickles them."""
    directory = tmp_path_factory.mktemp("3ddfa configs")
    rng = np.random.default_rng(0)
    theta = rng.uniform(0, np.pi, NUM_VERTICES)
    phi = rng.uniform(-np.pi / 2, np.pi / 2, NUM_VERTICES)
    mean = 8e4 * np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)], 1)
    bfm = {
        "u": mean.reshape(-1, 1).astype(np.float32),
        "w_shp": (rng.standard_normal((3 * NUM_VERTICES, 50)) * 1e3).astype(np.float32),
        "w_exp": (rng.standard_normal((3 * NUM_VERTICES, 12)) * 1e3).astype(np.float32),
        "tri": rng.integers(0, NUM_VERTICES, (3, 500)).astype(np.int32),  # (3, F), as 3DDFA stores it
        "keypoints": (3 * np.arange(68)[:, None] * 4 + np.arange(3)).reshape(-1).astype(np.int64),
    }
    stats = {"mean": rng.standard_normal(62).astype(np.float32),
             "std": rng.uniform(0.5, 2.0, 62).astype(np.float32)}
    bfm_path, stats_path = directory / "bfm_noneck_v3.pkl", directory / "param_mean_std_62d_120x120.pkl"
    with open(bfm_path, "wb") as f:
        pickle.dump(bfm, f, protocol=2)
    with open(stats_path, "wb") as f:
        pickle.dump(stats, f)
    return bfm, stats, bfm_path, stats_path


class _Exploit:
    """Creates a marker file if unpickled (a payload that leaves no trace would prove nothing)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_safe_pickle_loads_arrays_and_refuses_code(tmp_path, tddfa_files):
    bfm, _, bfm_path, _ = tddfa_files
    loaded = safe_load_pickle(bfm_path)
    np.testing.assert_array_equal(loaded["w_shp"], bfm["w_shp"])
    malicious = tmp_path / "evil.pkl"
    marker = tmp_path / "payload-ran"
    malicious.write_bytes(pickle.dumps({"u": _Exploit(marker)}))
    with pytest.raises(ValueError, match=r"unsafe or invalid pickle.*(posix|os)\.system"):
        safe_load_pickle(malicious)
    assert not marker.exists()
    eval_pickle = tmp_path / "eval.pkl"
    eval_pickle.write_bytes(f"cbuiltins\neval\n(S\"open('{marker}', 'w')\"\ntR.".encode())  # creates the marker if run
    with pytest.raises(ValueError, match="builtins.eval"):
        safe_load_pickle(eval_pickle)
    assert not marker.exists()
    (tmp_path / "truncated.pkl").write_bytes(pickle.dumps(bfm)[:100])
    with pytest.raises(ValueError, match="truncated"):
        safe_load_pickle(tmp_path / "truncated.pkl")


def test_bfm_loader_reads_the_3ddfa_layout(tddfa_files):
    bfm, stats, bfm_path, stats_path = tddfa_files
    model = load_model(bfm_path)  # the statistics file is found next to the BFM file
    assert model.num_vertices == NUM_VERTICES and model.num_id == 40 and model.num_exp == 10
    assert model.faces.shape == (500, 3)
    assert model.landmarks68.tolist() == [4 * k for k in range(68)]
    torch.testing.assert_close(model.mean, torch.from_numpy(bfm["u"].reshape(-1, 3)))
    # Bases are 3DDFA's, scaled by the parameter std (so coefficients are ~unit-scaled).
    torch.testing.assert_close(model.id_basis[7, 1, 3], torch.tensor(bfm["w_shp"][3 * 7 + 1, 3] * stats["std"][12 + 3]))
    assert 0 <= model.ncc.min() and model.ncc.max() <= 1
    lonely = stats_path.parent / "lonely" / "bfm_noneck_v3.pkl"
    lonely.parent.mkdir()
    lonely.write_bytes(bfm_path.read_bytes())
    with pytest.raises(FileNotFoundError, match="param_mean_std_62d_120x120.pkl"):
        load_model(lonely)


def test_decoded_params_give_3ddfa_vertices(tddfa_files):
    bfm, stats, bfm_path, stats_path = tddfa_files
    model = load_tddfa_bfm(bfm_path, stats_path)
    rng = np.random.default_rng(1)
    rotation = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    rotation *= np.sign(np.linalg.det(rotation))
    params = np.concatenate([
        np.concatenate([6e-4 * rotation, [[60.0], [60.0], [0.0]]], 1).reshape(-1),
        rng.standard_normal(40) * 2, rng.standard_normal(10),
    ])
    roi_box = np.array([100.0, 50.0, 340.0, 290.0])
    alpha, beta, pose = decode_params(params, roi_box, model=model)
    ours = model.image_vertices(alpha, beta, pose)[0].double().numpy()
    expected = reference_3ddfa_vertices({k: v.astype(np.float64) for k, v in bfm.items()}, params, roi_box)
    np.testing.assert_allclose(ours, expected, atol=0.05, rtol=0)  # pixels; float32 model
    with pytest.raises(ValueError, match="params"):
        decode_params(params[:61], roi_box, model=model)
    with pytest.raises(ValueError, match="roi_box"):
        decode_params(params, roi_box[:3], model=model)


def make_checkpoint(path, network, prefix="module.", wrap=True):
    state = {prefix + key: value for key, value in network.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 50} if wrap else state, path)


@pytest.mark.parametrize("prefix, wrap", [("module.", True), ("", False)])
def test_regressor_checkpoint_roundtrip(tmp_path, prefix, wrap):
    torch.manual_seed(0)
    reference = MobileNetV1().eval()
    for module in reference.modules():  # non-trivial running statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "mb1_120x120.pth"
    make_checkpoint(path, reference, prefix, wrap)
    loaded = load_regressor(path)
    image = torch.randn(2, 3, 120, 120)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), reference(image))
    assert loaded(image).shape == (2, 62)
    assert "dw5_6.conv_sep.weight" in reference.state_dict()
    assert reference.state_dict()["fc.weight"].shape == (62, 1024)


def test_regressor_refuses_mismatched_or_unsafe_checkpoints(tmp_path):
    small = MobileNetV1(widen_factor=0.5)
    make_checkpoint(tmp_path / "half.pth", small)
    with pytest.raises(ValueError, match="does not match"):
        load_regressor(tmp_path / "half.pth")
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": _Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_regressor(tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_regressor(tmp_path / "absent.pth")


def test_regressor_end_to_end_decodes_params(tmp_path, tddfa_files):
    _, stats, bfm_path, stats_path = tddfa_files
    model = load_tddfa_bfm(bfm_path, stats_path)
    torch.manual_seed(1)
    make_checkpoint(tmp_path / "mb1.pth", MobileNetV1())
    regressor = TDDFARegressor(tmp_path / "mb1.pth", model)
    image = np.random.default_rng(2).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    params, rois = regressor(image, boxes=[[100, 60, 200, 170]])
    assert params.shape == (1, 62) and rois.shape == (1, 4)
    crop = regressor.preprocess(image, rois[0])
    assert crop.shape == (3, 120, 120) and crop.abs().max() <= 1.0
    alpha, beta, pose = regressor.reconstruct(image, boxes=[[100, 60, 200, 170]])
    assert alpha.shape == (1, 40) and beta.shape == (1, 10) and pose.shape == (1, 3, 4)
    assert torch.isfinite(pose).all()


def test_crop_geometry_matches_3ddfa():
    roi = roi_box_from_bbox([100, 100, 200, 220])
    assert roi[2] - roi[0] == pytest.approx(int(110 * 1.58))
    assert (roi[1] + roi[3]) / 2 == pytest.approx(160 + 110 * 0.14)
    roi = roi_box_from_landmarks(np.array([[0.0, 0.0], [100.0, 50.0]]))
    assert roi[2] - roi[0] == pytest.approx(100 * np.sqrt(2))
    image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    crop = crop_image(image, [-2, -1, 4, 3])
    assert crop.shape == (4, 6, 3)
    assert (crop[0] == 0).all() and (crop[:, :2] == 0).all()
    np.testing.assert_array_equal(crop[1:, 2:], image[:3, :4])
