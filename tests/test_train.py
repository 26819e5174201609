"""`reenact train`: checkpoints, exact resume, keep-last, non-finite losses, pickle-free loading."""
import json
import pathlib
import pickle
import random
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from model_fixtures import single_thread  # noqa: F401  (autouse: one intra-op thread)
from reenact import cli, training
from reenact.model import ReenactmentLoss
from train_support import SIZE, checkpoint_steps, log_entries, losses_of, make_dataset, options, requires_dali


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train_data"))


def test_cli_train_writes_checkpoints_log_and_grid(dataset, tmp_path):
    run = tmp_path / "run"
    status = cli.main(["train", "--data", str(dataset), "--out", str(run), "--steps", "4", "--batch-size", "2",
                       "--resolution", "64", "--checkpoint-every", "2", "--loader", "fallback",
                       "--device", "cpu", "--no-perceptual", "--quiet"])
    assert status == 0
    assert checkpoint_steps(run) == [2, 4]
    entries = log_entries(run)
    assert [e["step"] for e in entries] == [1, 2, 3, 4]
    for entry in entries:
        assert entry["it_s"] > 0 and np.isfinite(entry["G/total"]) and np.isfinite(entry["D/total"])
        assert {"G/reconstruction", "G/warp", "G/adversarial", "D/real_logit"} <= set(entry)
    with Image.open(run / "samples" / "step-00000004.png") as grid:
        assert grid.size == (5 * SIZE, 2 * SIZE)  # 5 panels per row, one row per pair
    assert json.loads((run / "config.json").read_text())["model"]["resolution"] == SIZE
    generator, config = training.load_generator(training.checkpoint_path(run, 4))
    assert config.model.resolution == SIZE and not generator.training


def test_cli_train_no_gan_drops_the_discriminator_terms(dataset, tmp_path):
    run = tmp_path / "run"
    status = cli.main(["train", "--data", str(dataset), "--out", str(run), "--steps", "2", "--batch-size", "2",
                       "--resolution", "64", "--checkpoint-every", "2", "--loader", "fallback",
                       "--device", "cpu", "--no-perceptual", "--no-gan", "--quiet"])
    assert status == 0
    loss = json.loads((run / "config.json").read_text())["loss"]
    assert loss["adversarial"] == loss["feature_matching"] == 0.0 and loss["warp"] > 0
    # Both discriminator terms off: no discriminator step is taken or logged.
    assert all("D/total" not in entry and "G/reconstruction" in entry for entry in log_entries(run))


class _Killed(Exception):
    pass


@pytest.mark.parametrize("every, killed_after, steps, loader", [
    (2, 3, 4, "fallback"), (3, 4, 5, "fallback"), pytest.param(2, 3, 4, "dali", marks=requires_dali),
])
def test_resume_after_a_kill_matches_an_uninterrupted_run(dataset, tmp_path, monkeypatch, every, killed_after, steps, loader):
    # 3 clips, batch 2: 2 batches per epoch, so (2, 3, 4) resumes at an epoch boundary and
    # (3, 4, 5) in the middle of epoch 1.
    stepping = training.Trainer.train_step

    def draws_random_numbers(self):  # every RNG is used, so each must be restored exactly
        torch.rand(1), np.random.rand(), random.random()
        return stepping(self)

    monkeypatch.setattr(training.Trainer, "train_step", draws_random_numbers)
    straight = tmp_path / "straight"
    training.train(options(dataset, straight, steps=steps, checkpoint_every=every, loader=loader))

    original = training.Trainer.train_step

    def dies_after(self):
        if self.step == killed_after:  # step `killed_after` is logged, its checkpoint is not due
            raise _Killed
        return original(self)

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(training.Trainer, "train_step", dies_after)
        with pytest.raises(_Killed):
            training.train(options(dataset, interrupted, steps=steps, checkpoint_every=every, loader=loader))
    assert checkpoint_steps(interrupted) == [every]
    assert len(log_entries(interrupted)) == killed_after
    training.train(options(dataset, interrupted, steps=steps, checkpoint_every=every, resume=True,
                           loader=loader))

    a, b = log_entries(straight), log_entries(interrupted)
    assert [e["step"] for e in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert losses_of(x) == losses_of(y), f"step {x['step']}"
    tensors_a, meta_a = training.read_checkpoint(training.checkpoint_path(straight, steps))
    tensors_b, meta_b = training.read_checkpoint(training.checkpoint_path(interrupted, steps))
    assert sorted(tensors_a) == sorted(tensors_b)
    assert any(k.startswith("optim_G/state/") for k in tensors_a) and "rng/torch" in tensors_a
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name
    for key in ("step", "data", "optim_G", "optim_D", "rng", "config"):
        assert meta_a[key] == meta_b[key], key


def test_resume_refuses_a_changed_data_order_or_missing_checkpoint(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--data", str(dataset), "--out", str(run), "--steps", "2", "--resolution", "64",
            "--loader", "fallback", "--device", "cpu", "--quiet"]
    assert cli.main(base + ["--batch-size", "2", "--resume"]) == 1
    assert "--resume: no checkpoint" in capsys.readouterr().err
    assert cli.main(base + ["--batch-size", "2"]) == 0
    assert cli.main(base + ["--batch-size", "2"]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    assert cli.main(base + ["--batch-size", "3", "--steps", "3", "--resume"]) == 1
    assert "--batch-size 3 differs" in capsys.readouterr().err
    assert cli.main(base + ["--batch-size", "2", "--keep-last", "0"]) == 2  # a usage error
    assert "--keep-last must be" in capsys.readouterr().err


def test_keep_last_keeps_the_newest_k_checkpoints(dataset, tmp_path):
    run = tmp_path / "run"
    training.train(options(dataset, run, steps=5, checkpoint_every=1, keep_last=2))
    assert checkpoint_steps(run) == [4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt-00000004.safetensors", "ckpt-00000005.safetensors"]  # no temporary files left


def test_checkpoints_record_the_datasets_face_framing(dataset, tmp_path):
    run = tmp_path / "run"
    last = training.train(options(dataset, run, steps=1, checkpoint_every=1))
    framing = training.read_checkpoint_meta(last)["data"]["crop_scale"]
    # reenact synth draws heads of 0.7 of the frame (x 0.9-1.05); the landmark box is a bit smaller.
    assert 1.3 < framing < 2.5, framing
    landmarks = np.concatenate([clip.params["landmarks"] for clip in
                                training.Trainer(options(dataset, tmp_path / "other")).stream.loader.dataset.clips])
    sides = (landmarks.max(1) - landmarks.min(1)).max(1)
    assert framing == pytest.approx(float(np.median(SIZE / sides)), rel=1e-3)


def test_without_gan_terms_the_discriminator_is_not_trained(dataset, tmp_path):
    from reenact.model import ReenactorConfig

    config = ReenactorConfig.small(SIZE).to_dict()
    config["loss"].update(adversarial=0.0, feature_matching=0.0, perceptual=0.0)
    path = tmp_path / "config.json"
    ReenactorConfig.from_dict(config).to_json(path)
    run = tmp_path / "run"
    trainer = training.Trainer(options(dataset, run, config=str(path)))
    before = {name: value.clone() for name, value in trainer.discriminator.state_dict().items()}
    generator_before = next(trainer.generator.parameters()).clone()
    entry, _ = trainer.train_step()
    assert not any(key.startswith("D/") for key in entry), entry
    assert all(torch.equal(before[name], value) for name, value in trainer.discriminator.state_dict().items())
    assert not torch.equal(generator_before, next(trainer.generator.parameters()))
    assert trainer.optimizer_d.state_dict()["state"] == {}


def test_ops_reference_swaps_every_op_including_the_training_pnccs(dataset, tmp_path, monkeypatch):
    import pncc_cuda
    import pncc_cuda.reference as reference

    calls = {"fused": 0, "reference": 0}
    # The geometric warp input rasterizes too: with the run's ops, never the other ones.
    rasterized = {"fused": 0, "reference": 0}

    def counting(counts, name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(pncc_cuda, "render_pncc", counting(calls, "fused", pncc_cuda.render_pncc))
    monkeypatch.setattr(reference, "render_pncc_reference",
                        counting(calls, "reference", reference.render_pncc_reference))
    monkeypatch.setattr(pncc_cuda, "rasterize", counting(rasterized, "fused", pncc_cuda.rasterize))
    monkeypatch.setattr(reference, "rasterize_reference",
                        counting(rasterized, "reference", reference.rasterize_reference))
    entries = {}
    for ops in ("fused", "reference"):
        trainer = training.Trainer(options(dataset, tmp_path / ops, ops=ops))
        try:
            before, raster_before = dict(calls), dict(rasterized)
            entries[ops], _ = trainer.train_step()
            assert trainer.generator.ops == ops
            other = "reference" if ops == "fused" else "fused"
            assert calls[ops] - before[ops] == 2 and calls[other] == before[other], calls  # P_s and P_d'
            if trainer.config.model.geometric_input:
                assert rasterized[ops] - raster_before[ops] > 0 and rasterized[other] == raster_before[other], rasterized
        finally:
            trainer.close()
    # Same data, same initial weights: the two implementations give the same step-1 losses.
    assert entries["fused"]["G/total"] == pytest.approx(entries["reference"]["G/total"], rel=1e-4)


@pytest.mark.parametrize("method, term", [("generator_loss", "G/warp"), ("discriminator_loss", "D/total")])
def test_non_finite_loss_stops_naming_step_and_term(dataset, tmp_path, monkeypatch, method, term):
    original = getattr(ReenactmentLoss, method)
    calls = []

    def poisoned(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            nan = torch.tensor(float("nan"))
            if method == "generator_loss":
                return result._replace(total=result.total * nan, terms=dict(result.terms, warp=nan))
            return result._replace(total=result.total * nan)
        return result

    monkeypatch.setattr(ReenactmentLoss, method, poisoned)
    run = tmp_path / "run"
    with pytest.raises(training.NonFiniteLoss, match=f"step 3: {term} = nan") as error:
        training.train(options(dataset, run, steps=5, checkpoint_every=1))
    assert (error.value.step, error.value.term) == (3, term)
    assert checkpoint_steps(run) == [1, 2]  # the broken state of step 3 was not written
    assert [e["step"] for e in log_entries(run)] == [1, 2]


class _Payload:
    """Unpickling this creates the marker file: the proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_are_safetensors_and_loading_never_unpickles(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    training.train(options(dataset, run, steps=2, checkpoint_every=2))
    path = training.checkpoint_path(run, 2)
    raw = path.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_size])
    assert json.loads(header["__metadata__"]["reenact_train"])["step"] == 2
    groups = {name.split("/")[0] for name in header if name != "__metadata__"}
    assert groups == {"G", "D", "optim_G", "optim_D", "rng"}

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    for name in ("ckpt-00000099.pt", "latest.pt", "ckpt-00000099.safetensors.pt", "ckpt-00000099.pth"):
        (run / "checkpoints" / name).write_bytes(payload)

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading unpickled something")

    with monkeypatch.context() as patch:
        for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
            patch.setattr(module, name, refuse)
        training.train(options(dataset, run, steps=3, checkpoint_every=1, resume=True))
        with pytest.raises(training.TrainingError, match="refusing to read"):
            training.read_checkpoint(run / "checkpoints" / "latest.pt")
        forged = run / "checkpoints" / "ckpt-00000100.safetensors"
        forged.write_bytes(payload)
        with pytest.raises(training.TrainingError, match="cannot read checkpoint"):
            training.train(options(dataset, run, steps=101, resume=True))
    assert not marker.exists()
    assert checkpoint_steps(run) == [2, 3, 100]
    assert [e["step"] for e in log_entries(run)] == [1, 2, 3]
    assert pathlib.Path(run / "checkpoints" / "latest.pt").read_bytes() == payload
