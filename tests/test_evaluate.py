"""`reenact eval`: metric maths against known values, the command end to end, and its errors."""
import json
import pickle

import numpy as np
import pytest
import torch

from model_fixtures import single_thread  # noqa: F401 (autouse fixture: one intra-op thread)
from reenact import cli, eval as evaluate, training
from reenact.data import synth
from reenact.eval.networks import IResNet, InceptionV3Features, load_feature_network

SIZE = 64
CLIPS, FRAMES = 2, 4


# -- metrics ---------------------------------------------------------------------------------------

def _smooth_images(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 8, 8, generator=generator, dtype=torch.float64)
    return torch.nn.functional.interpolate(coarse, size=(40, 48), mode="bicubic", align_corners=False).clamp(0, 1)


def test_ssim_of_identical_images_is_one_and_symmetric():
    x = _smooth_images(3, 0)
    assert torch.allclose(evaluate.ssim(x, x), torch.ones(3, dtype=torch.float64), atol=1e-12)
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).clamp(0, 1)
    assert torch.allclose(evaluate.ssim(x, y), evaluate.ssim(y, x), atol=1e-12)
    z = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).clamp(0, 1)
    assert (evaluate.ssim(x, z) < evaluate.ssim(x, y)).all() and (evaluate.ssim(x, y) < 1).all()


def test_ssim_of_constant_images_matches_the_closed_form():
    # Constant images have zero variance and covariance: SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.3, 0.7
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    c1 = 0.01 ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert evaluate.ssim(x, y).item() == pytest.approx(expected, rel=1e-6)


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _smooth_images(2, 3), _smooth_images(2, 4)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)).clamp(0, 1)
    for other in (y, noisy):
        ours = evaluate.ssim(x, other)
        for k in range(2):
            reference = metrics.structural_similarity(
                x[k].permute(1, 2, 0).numpy(), other[k].permute(1, 2, 0).numpy(), channel_axis=-1,
                gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
            assert ours[k].item() == pytest.approx(reference, abs=1e-7)


def test_psnr_and_l1_known_values():
    x = _smooth_images(2, 6) * 0.5
    shifted = x + 0.1
    assert torch.allclose(evaluate.psnr(x, shifted), torch.full((2,), 20.0, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(evaluate.l1(x, shifted), torch.full((2,), 0.1, dtype=torch.float64), atol=1e-12)
    assert torch.equal(evaluate.psnr(x, x), torch.full((2,), evaluate.PSNR_CAP_DB, dtype=torch.float64))
    # image_metrics maps [-1, 1] to [0, 1]: an offset of 0.2 becomes 0.1.
    scores = evaluate.image_metrics(x * 2 - 1, shifted * 2 - 1)
    assert scores["l1"] == pytest.approx([0.1, 0.1]) and scores["psnr"] == pytest.approx([20.0, 20.0])
    with pytest.raises(ValueError, match="one shape"):
        evaluate.l1(x, x[:, :2])


def test_frechet_distance_of_gaussians_closed_forms():
    generator = torch.Generator().manual_seed(0)
    mean_a, mean_b = (torch.randn(5, generator=generator, dtype=torch.float64) for _ in range(2))
    var_a, var_b = (torch.rand(5, generator=generator, dtype=torch.float64) + 0.1 for _ in range(2))
    # Diagonal covariances: sum (mu_a - mu_b)^2 + sum (sqrt(var_a) - sqrt(var_b))^2.
    expected = float(((mean_a - mean_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum())
    got = evaluate.frechet_distance(mean_a, torch.diag(var_a), mean_b, torch.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-9)
    # Full covariances: against tr(A + B - 2 (A B)^(1/2)) with scipy's general matrix square root.
    linalg = pytest.importorskip("scipy.linalg")
    root_a, root_b = torch.randn(5, 5, generator=generator, dtype=torch.float64), torch.randn(5, 5, generator=generator, dtype=torch.float64)
    cov_a, cov_b = root_a @ root_a.T, root_b @ root_b.T
    cross = np.real(linalg.sqrtm(cov_a.numpy() @ cov_b.numpy())).trace()
    expected = float(((mean_a - mean_b) ** 2).sum()) + float(cov_a.trace() + cov_b.trace()) - 2 * cross
    assert evaluate.frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-8)
    assert evaluate.frechet_distance(mean_a, cov_a, mean_a, cov_a) == pytest.approx(0.0, abs=1e-9)


def test_gaussian_statistics_match_numpy():
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    statistics = evaluate.GaussianStatistics()
    statistics.add(features[:20])
    statistics.add(features[20:])
    mean, covariance = statistics.mean_and_covariance()
    assert np.allclose(mean.numpy(), features.numpy().mean(0))
    assert np.allclose(covariance.numpy(), np.cov(features.numpy(), rowvar=False))


class PooledPixels(torch.nn.Module):
    """A stand-in feature network that sees the picture (randomly initialised Inception and ArcFace
    features barely differ between images): 4x4 average-pooled pixels, optionally projected."""

    def __init__(self, projection=None):
        super().__init__()
        self.register_buffer("projection", projection if projection is not None else torch.eye(48))

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1) @ self.projection


def test_eval_scores_identity_and_fid_of_every_method_against_the_right_frames(run, tmp_path, monkeypatch):
    from reenact.eval import networks as eval_networks

    projection = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    networks = {"identity": PooledPixels(projection), "inception": PooledPixels()}
    monkeypatch.setattr(eval_networks, "load_feature_network", lambda kind, path: networks[kind])
    root, data, checkpoint = run
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"unused: the networks are patched in")
    results = evaluate.evaluate(evaluate.EvalOptions(
        checkpoint=str(checkpoint), data=str(data), out=str(tmp_path / "out"), device="cpu", detector="none",
        id_model=str(weights), inception=str(weights), progress=False))
    model, copy = results["metrics"], results["baselines"]["copy source"]
    warp = results["baselines"]["geometric warp"]
    # Copying the source is the source: similarity exactly 1; a sign error gives -1.
    assert copy["id_similarity"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert -1 <= model["id_similarity"]["mean"] < 0.999 and warp["id_similarity"]["mean"] < 1.0
    # One source frame per clip, repeated, against all the driving frames: a clear FID.
    assert copy["fid"]["value"] > 1e-4 and model["fid"]["value"] > 1e-4 and warp["fid"]["value"] > 1e-4
    assert len({copy["fid"]["value"], model["fid"]["value"], warp["fid"]["value"]}) == 3
    table = (tmp_path / "out" / "eval.md").read_text()
    assert f"| FID (output vs driving frames) | {model['fid']['value']:.3f} | {warp['fid']['value']:.3f} | " \
           f"{copy['fid']['value']:.3f} |" in table


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_feature_networks_round_trip_and_refuse_wrong_files(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    small = IResNet(blocks=(1, 2, 1, 1), embedding=32)
    path = tmp_path / "arcface.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    loaded = load_feature_network("identity", path)
    assert IResNet.blocks_of(loaded.state_dict()) == (1, 2, 1, 1)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(images), small.eval()(images), atol=1e-5)
    with pytest.raises(ValueError, match="does not hold InceptionV3Features weights: missing keys"):
        load_feature_network("inception", path)
    pickled = tmp_path / "arcface.pth"
    pickled.write_bytes(pickle.dumps({"conv1.weight": np.zeros(3)}))
    with pytest.raises(ValueError, match="weights-only"):
        load_feature_network("identity", pickled)


# -- the command -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny synthetic dataset and a 2-step checkpoint of the small model at 64 px."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    synth.synth_dataset(data, CLIPS, frames=FRAMES, size=SIZE, seed=1)
    checkpoint = training.train(training.TrainOptions(
        data=str(data), out=str(root / "run"), steps=2, batch_size=2, resolution=SIZE, perceptual=False,
        checkpoint_every=2, loader="fallback", device="cpu", progress=False))
    return root, data, checkpoint


def _mediapipe_installed():
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_eval_writes_table_and_json(run, tmp_path, capsys):
    root, data, checkpoint = run
    out = tmp_path / "out dir"
    detector = "mediapipe" if _mediapipe_installed() else "none"
    status = cli.main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                       "--batch-size", "4", "--device", "cpu", "--detector", detector, "--quiet"])
    assert status == 0, capsys.readouterr().err
    results = json.loads((out / "eval.json").read_text())
    assert results["pairs"] == CLIPS * (FRAMES - 1) and results["clips"] == CLIPS and results["step"] == 2
    metrics = results["metrics"]
    assert 0 < metrics["l1"]["mean"] < 1 and 0 < metrics["ssim"]["mean"] < 1 and metrics["psnr"]["mean"] > 0
    assert [c["pairs"] for c in results["per_clip"]] == [FRAMES - 1] * CLIPS
    # The baselines on the same pairs. The source is never the driving frame, so copying it scores
    # above zero against the driving frame (scoring against the source would give L1 0, PSNR capped).
    copy, warp = results["baselines"]["copy source"], results["baselines"]["geometric warp"]
    assert 0.005 < copy["l1"]["mean"] < 0.5 and copy["psnr"]["mean"] < 60 and copy["ssim"]["mean"] < 0.99
    assert copy["l1"]["count"] == warp["l1"]["count"] == metrics["l1"]["count"] == CLIPS * (FRAMES - 1)
    # The warp moves the source along the known geometry: closer to the driving frame than a copy.
    assert warp["ssim"]["mean"] > copy["ssim"]["mean"] and warp["psnr"]["mean"] > copy["psnr"]["mean"]
    table = (out / "eval.md").read_text()
    assert results["pairs_repeating_the_source"] == 0 and "warning" not in table
    assert "| metric | model | geometric warp | copy source | notes |" in table
    assert table.count("not computed (no weights given)") == 2
    assert "| L1 (lower is better) | " in table and "[synthetic]" in table
    if detector == "mediapipe":
        for method in (copy, warp):  # re-fit errors for the baselines too
            assert "output_vs_params" in method["pose"] or method["pose"]["detection_rate_output"] == 0
        pose = metrics["pose"]
        assert 0 <= pose["detection_rate_output"] <= 1
        # The real driving frames are found, so the floor of the re-fit is always reported.
        assert pose["detection_rate_driving_frame"] == 1.0
        assert pose["driving_frame_vs_params"]["frames"] == CLIPS * (FRAMES - 1)
        assert 0 <= pose["driving_frame_vs_params"]["rotation_deg"] < 20
        assert "landmark detection rate" in table
    else:
        assert metrics["pose"]["status"].startswith("not computed")


def test_driving_frames_that_repeat_the_source_are_counted_and_reported(run, tmp_path):
    # A clip whose encoder repeated a near-static frame pairs the source with a bit-identical
    # "driving" frame: copy source then scores the PSNR cap, and the report must say so.
    source = torch.rand(3, 3, 8, 8)
    driving = source.clone()
    driving[1, 0, 4, 4] = torch.nextafter(driving[1, 0, 4, 4], torch.tensor(2.0))  # one ulp: not a repeat
    driving[2] = torch.rand(3, 8, 8)
    assert evaluate.repeats_of_the_source({"source": source, "driving": driving}) == 1
    root, data, checkpoint = run
    out = tmp_path / "out"
    results = evaluate.evaluate(evaluate.EvalOptions(checkpoint=str(checkpoint), data=str(data), out=str(out),
                                                     batch_size=4, device="cpu", detector="none", progress=False))
    results["pairs_repeating_the_source"] = 2
    table = evaluate.markdown_table(results)
    assert f"warning: 2 of {results['pairs']} pairs drive with a frame bit-identical to the source" in table


def test_eval_with_user_weights_computes_identity_and_fid(run, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    # Inception's smallest valid input: the wiring is the same, the test 16x cheaper than at 299.
    monkeypatch.setattr(InceptionV3Features, "input_size", 75)
    root, data, checkpoint = run
    torch.manual_seed(0)
    weights = {}
    for name, network in (("id", IResNet(blocks=(1, 1, 1, 1))), ("inception", InceptionV3Features())):
        weights[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights[name]))
    results = evaluate.evaluate(evaluate.EvalOptions(
        checkpoint=str(checkpoint), data=str(data), out=str(tmp_path / "out"), max_clips=1, device="cpu",
        detector="none", id_model=str(weights["id"]), inception=str(weights["inception"]), progress=False))
    metrics = results["metrics"]
    assert results["pairs"] == FRAMES - 1
    assert -1 <= metrics["id_similarity"]["mean"] <= 1 and metrics["id_similarity"]["count"] == FRAMES - 1
    assert metrics["fid"]["value"] >= 0 and metrics["fid"]["samples"] == FRAMES - 1
    copy = results["baselines"]["copy source"]
    # Copying the source is the source: identity similarity exactly 1 (a sign error would give -1).
    assert copy["id_similarity"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert copy["id_similarity"]["driving_frame"] == metrics["id_similarity"]["driving_frame"]

    assert "not computed (no weights given)" not in (tmp_path / "out" / "eval.md").read_text()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("case, message", [
    ("missing checkpoint", "--checkpoint: no such file"),
    ("pickle checkpoint", "refusing to read"),
    ("foreign safetensors", "not a reenact training checkpoint"),
    ("no dataset", "no manifest.jsonl"),
    ("data not a directory", "--data is not a directory"),
    ("pickled id weights", "eval never unpickles"),
    ("wrong id weights", "no layer1..layer4 blocks found"),
    ("source frame past the end", "no pairs to evaluate"),
    ("batch size 0", "--batch-size must be an integer >= 1"),
])
def test_eval_errors_are_one_line(run, tmp_path, capsys, case, message):
    from safetensors.torch import save_file

    root, data, checkpoint = run
    args = {"--checkpoint": str(checkpoint), "--data": str(data), "--out": str(tmp_path / "out")}
    extra = ["--detector", "none", "--quiet"]
    if case == "missing checkpoint":
        args["--checkpoint"] = str(tmp_path / "nope.safetensors")
    elif case == "pickle checkpoint":
        args["--checkpoint"] = str(tmp_path / "model.pt")
        (tmp_path / "model.pt").write_bytes(pickle.dumps({"a": 1}))
    elif case == "foreign safetensors":
        args["--checkpoint"] = str(tmp_path / "other.safetensors")
        save_file({"x": torch.zeros(2)}, args["--checkpoint"])
    elif case == "no dataset":
        args["--data"] = str(tmp_path)
    elif case == "data not a directory":
        args["--data"] = str(checkpoint)
    elif case == "pickled id weights":
        (tmp_path / "id.pth").write_bytes(pickle.dumps({"conv1.weight": 1}))
        extra += ["--id-model", str(tmp_path / "id.pth")]
    elif case == "wrong id weights":
        save_file({"conv1.weight": torch.zeros(2)}, str(tmp_path / "id.safetensors"))
        extra += ["--id-model", str(tmp_path / "id.safetensors")]
    elif case == "source frame past the end":
        extra += ["--source-frame", str(FRAMES)]
    elif case == "batch size 0":
        extra += ["--batch-size", "0"]
    argv = ["eval"] + [item for pair in args.items() for item in pair] + extra
    usage = case in ("missing checkpoint", "data not a directory", "batch size 0")  # a bad command line: status 2
    assert cli.main(argv) == (2 if usage else 1)
    err = capsys.readouterr().err
    assert err.startswith("reenact: error: ") and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "eval.json").exists()


def test_default_out_dir_is_in_the_run_directory(run):
    root, data, checkpoint = run
    options = evaluate.EvalOptions(checkpoint=str(checkpoint), data=str(data))
    assert options.out_dir() == checkpoint.parent.parent / f"eval-{checkpoint.stem}"
