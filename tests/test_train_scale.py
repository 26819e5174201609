"""`reenact train` at scale: torchrun DDP, bf16 autocast, channels-last, torch.compile,
TensorBoard events, and resuming after a real SIGKILL of the training process."""
import functools
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from model_fixtures import single_thread  # noqa: F401  (autouse: one intra-op thread)
from reenact import cli, training
from reenact.model import Reenactor, build_discriminator
from reenact.training import precision as precision_module
from train_support import (
    checkpoint_steps,
    cli_args,
    log_entries,
    losses_of,
    make_dataset,
    options,
    requires_dali,
    subprocess_env,
)

#: 20 steps of global batch 2 on 4 clips: 10 epochs, every pair of the schedule seen by both runs.
DDP_STEPS = 20
#: Relative tolerance of the 2-process loss curve against the 1-process one, after step 1.
#: The two runs compute the same global-batch gradients in another summation order (per-rank
#: batch 1 + a gloo all-reduce against batch 2 in one process); Adam's m / sqrt(v) turns the
#: last-bit differences of near-zero gradients into whole-step differences, and the GAN feeds
#: them back. Measured over 20 steps on this machine: G/total 0.6%, D/total 0.2% (batch 2);
#: 0.8% and 0.6% at batch 4, where one process on 1 vs 2 threads already differs by 0.8% and
#: 0.5%. The step-to-step change of the curve is >= 0.6%, the losses move by 20% over the run.
CURVE_RTOL = 0.02
#: Absolute tolerance of the discriminator's logits and the adversarial term, which sit near 0.
LOGIT_ATOL = 0.06
#: G/feature_matching is read off the discriminator's features, so it parts like them: up to 2.2%
#: (0.0009 on 0.042) at step 15 after a 1e-7 change of the warp input (issue 13's restructured
#: reenact.warp), while D/total, G/reconstruction and G/warp stayed within 0.1%.
FEATURE_MATCHING_RTOL = 0.05


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train_scale_data"), clips=4)


def _torchrun(args, processes=2, timeout=300):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "reenact"] + args
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _relative(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-3)


# -- DDP -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_two_processes_follow_the_one_process_curve_and_resume_exactly(dataset, tmp_path, caplog):
    two = tmp_path / "two"
    result = _torchrun(cli_args(dataset, two, DDP_STEPS, checkpoint_every=10))
    assert result.stdout.count("trained to step") == 1  # rank 0 alone reports (and writes)
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [
        "ckpt-00000010.safetensors", "ckpt-00000020.safetensors"]
    one = tmp_path / "one"
    training.train(options(dataset, one, steps=DDP_STEPS, checkpoint_every=10))

    a, b = log_entries(one), log_entries(two)
    assert [e["step"] for e in b] == list(range(1, DDP_STEPS + 1))
    assert losses_of(a[0]).keys() == losses_of(b[0]).keys()
    # Step 1: the same weights on the same global batch; only the summation order differs.
    for key, value in losses_of(a[0]).items():
        assert _relative(value, b[0][key]) < 1e-5, key
    for x, y in zip(a, b):
        for key in ("D/total", "G/reconstruction", "G/warp"):
            assert _relative(x[key], y[key]) < CURVE_RTOL, (x["step"], key, x[key], y[key])
        key = "G/feature_matching"
        assert _relative(x[key], y[key]) < FEATURE_MATCHING_RTOL, (x["step"], key, x[key], y[key])
        # The discriminator's logits sit near 0 (about -0.05 here), so they are compared in
        # absolute terms: by step 20 the two runs' logits part by up to 0.03 (measured with the
        # warp input on), which is 4% of G/total while every other term follows to 0.2%.
        for key in ("G/adversarial", "D/real_logit", "D/fake_logit"):
            assert abs(x[key] - y[key]) < LOGIT_ATOL, (x["step"], key, x[key], y[key])
    assert a[-1]["G/total"] < 0.9 * a[0]["G/total"]  # the curve moves far more than the tolerance

    # The DDP checkpoint: plain names, every rank's RNG state, loadable in a single process.
    path = training.checkpoint_path(two, DDP_STEPS)
    tensors, meta = training.read_checkpoint(path)
    assert not [name for name in tensors if "module." in name or "_orig_mod." in name]
    assert {"rng/torch", "rng/rank1/torch", "rng/rank1/numpy_keys"} <= set(tensors)
    assert meta["options"]["world_size"] == 2 and set(meta["rng_ranks"]) == {"1"}
    assert not torch.equal(tensors["rng/torch"], tensors["rng/rank1/torch"])  # per-rank streams
    generator, config = training.load_generator(path)
    assert config.model.resolution == 64 and not generator.training
    for name, value in generator.state_dict().items():
        assert torch.equal(value, tensors["G/" + name]), name

    # Resume under torchrun from the step-10 checkpoint: the same steps 11-20, bit for bit, and
    # the same final state (weights, Adam, both ranks' RNG states, data position).
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(training.checkpoint_path(two, 10), resumed / "checkpoints")
    _torchrun(cli_args(dataset, resumed, DDP_STEPS, checkpoint_every=10, resume=True))
    c = log_entries(resumed)
    assert [e["step"] for e in c] == list(range(11, DDP_STEPS + 1))
    for x, y in zip(b[10:], c):
        assert losses_of(x) == losses_of(y), x["step"]
    # A single process continues the 2-rank run: same data order (global batches), RNG streams
    # re-derived with a warning; the curve follows the 2-rank one.
    single = tmp_path / "single"
    (single / "checkpoints").mkdir(parents=True)
    shutil.copy(training.checkpoint_path(two, 10), single / "checkpoints")
    with caplog.at_level(logging.WARNING, logger="reenact.train"):
        training.train(options(dataset, single, steps=13, checkpoint_every=10, resume=True))
    assert "written by 2 process(es), this run has 1" in caplog.text
    for x, y in zip(b[10:13], log_entries(single)):
        assert x["step"] == y["step"] and _relative(x["G/total"], y["G/total"]) < CURVE_RTOL, x["step"]

    final, final_meta = training.read_checkpoint(training.checkpoint_path(resumed, DDP_STEPS))
    assert sorted(final) == sorted(tensors)
    for name in tensors:
        assert torch.equal(tensors[name], final[name]), name
    for key in ("step", "data", "rng", "rng_ranks", "optim_G", "optim_D"):
        assert meta[key] == final_meta[key], key


@pytest.mark.slow
@requires_dali
def test_torchrun_with_the_dali_loader_reads_one_shard_per_rank(dataset, tmp_path):
    steps = 6
    two = tmp_path / "two"
    _torchrun(cli_args(dataset, two, steps, checkpoint_every=steps, loader="dali"))
    one = tmp_path / "one"
    training.train(options(dataset, one, steps=steps, checkpoint_every=steps, loader="dali"))
    a, b = log_entries(one), log_entries(two)
    assert [e["step"] for e in b] == list(range(1, steps + 1))
    # Each rank's DALI shard holds its half of every global batch: step 1 sees the same pairs.
    for key, value in losses_of(a[0]).items():
        assert _relative(value, b[0][key]) < 1e-5, key
    for x, y in zip(a, b):
        assert _relative(x["G/total"], y["G/total"]) < CURVE_RTOL, x["step"]


@pytest.mark.parametrize("world_size, rank_batch", [(2, 1), (2, 3), (3, 2), (4, 2)])
def test_the_ranks_global_batches_are_the_one_process_batches(world_size, rank_batch):
    # What --batch-size as the global batch relies on: N ranks x b pairs see, step by step, the
    # pairs one process sees with N*b (padding included), whatever N is.
    from reenact.data.pairs import epoch_schedule

    counts = [8, 9, 10, 11, 12, 13, 14]
    for epoch in (0, 1):
        single = epoch_schedule(counts, world_size * rank_batch, seed=5, epoch=epoch)
        shards = [epoch_schedule(counts, rank_batch, seed=5, epoch=epoch, shard_id=r, num_shards=world_size)
                  for r in range(world_size)]
        assert {len(shard) for shard in shards} == {len(single)}
        for step, batch in enumerate(single):
            union = [spec for shard in shards for spec in shard[step]]
            assert sorted(union, key=repr) == sorted(batch, key=repr), (epoch, step)


def test_a_global_batch_the_world_size_does_not_divide_is_refused(dataset, tmp_path):
    world = training.World(rank=1, size=3, local_rank=1)
    with pytest.raises(training.TrainingError, match="--batch-size 2 is the global batch.*world size 3"):
        training.Trainer(options(dataset, tmp_path / "run", batch_size=2), world=world)
    with pytest.raises(training.TrainingError, match="under torchrun pass 'cuda' or 'cpu'"):
        training.Trainer(options(dataset, tmp_path / "run", batch_size=3, device="cuda:1"), world=world)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("environ, message", [
    ({}, None),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, None),
    ({"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"}, "RANK must be an integer"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK must be an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "not a valid process placement"),
])
def test_world_from_the_torchrun_environment(environ, message):
    if message is None:
        world = training.World.from_env(environ)
        assert (world.rank, world.size) == ((1, 2) if environ else (0, 1))
        assert world.is_main == (not environ) and world.distributed == bool(environ)
    else:
        with pytest.raises(training.TrainingError, match=message):
            training.World.from_env(environ)


# -- precision, memory format, compilation ---------------------------------------------------------

def _run_recording_outputs(dataset, out, **kwargs):
    """Train 3 steps -> (log entries, dtype and channels-last-ness of each generator output)."""
    seen = []
    original = Reenactor.forward

    def recording(self, *args):
        outputs = original(self, *args)
        image = outputs["output"]
        seen.append((image.dtype, image.is_contiguous(memory_format=torch.channels_last)))
        return outputs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Reenactor, "forward", recording)
        training.train(options(dataset, out, steps=3, checkpoint_every=3, **kwargs))
    return log_entries(out), seen


def test_bf16_autocast_and_channels_last_train_with_finite_losses_close_to_fp32(dataset, tmp_path):
    fp32, seen = _run_recording_outputs(dataset, tmp_path / "fp32")
    assert seen == [(torch.float32, False)] * 3
    nhwc, seen = _run_recording_outputs(dataset, tmp_path / "nhwc", channels_last=True)
    assert seen == [(torch.float32, True)] * 3
    bf16, seen = _run_recording_outputs(dataset, tmp_path / "bf16", precision="bf16")
    assert seen == [(torch.bfloat16, False)] * 3
    for entries in (nhwc, bf16):
        assert all(math.isfinite(v) for e in entries for v in losses_of(e).values())
    # Step 1 runs the same weights on the same batch: channels-last changes only the convolution
    # algorithms (measured 1e-7 relative), bf16 rounds activations to 8 bits (measured 8e-4).
    for key, value in losses_of(fp32[0]).items():
        assert _relative(value, nhwc[0][key]) < 1e-5, key
    for key in ("G/total", "G/reconstruction", "G/warp", "D/total"):
        assert _relative(fp32[0][key], bf16[0][key]) < 1e-2, key
    # Later steps follow (Adam amplifies the last-bit differences: measured 1e-4 and 1e-3).
    for x, y, z in zip(fp32, nhwc, bf16):
        assert _relative(x["G/total"], y["G/total"]) < 1e-3 and _relative(x["G/total"], z["G/total"]) < 2e-2
    _, meta = training.read_checkpoint(training.checkpoint_path(tmp_path / "nhwc", 3))
    assert meta["options"]["channels_last"] and meta["options"]["precision"] == "fp32"
    training.load_generator(training.checkpoint_path(tmp_path / "nhwc", 3))


def test_non_finite_losses_are_still_caught_under_bf16(dataset, tmp_path, monkeypatch):
    from reenact.model import ReenactmentLoss

    original = ReenactmentLoss.generator_loss

    def overflowing(self, outputs, *args, **kwargs):
        outputs = dict(outputs, output=outputs["output"] * float("inf"))
        return original(self, outputs, *args, **kwargs)

    monkeypatch.setattr(ReenactmentLoss, "generator_loss", overflowing)
    with pytest.raises(training.NonFiniteLoss, match="step 1: G/reconstruction"):
        training.train(options(dataset, tmp_path / "run", steps=2, precision="bf16"))


def test_bf16_where_it_cannot_run_is_a_clear_error(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision_module, "cpu_bf16_autocast_works", lambda: False)
    args = cli_args(dataset, tmp_path / "run", 2, precision="bf16")
    assert cli.main(args) == 1
    assert "--precision bf16: this torch build cannot autocast to bfloat16 on the CPU" in capsys.readouterr().err
    with pytest.raises(training.TrainingError, match="--precision must be one of"):
        training.Trainer(options(dataset, tmp_path / "run", precision="fp16"))


def test_compile_without_inductor_is_a_clear_error(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch._inductor.cpp_builder", None)  # import fails
    assert cli.main(cli_args(dataset, tmp_path / "run", 2, compile=True)) == 1
    assert "--compile: this torch has no TorchInductor" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_failing_compiler_is_a_clear_error(dataset, tmp_path, monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no code generator here")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken_backend))
    torch._dynamo.reset()
    with pytest.raises(training.TrainingError, match="--compile: torch.compile failed.*no code generator here"):
        training.train(options(dataset, tmp_path / "run", steps=1, compile=True))
    torch._dynamo.reset()
    assert training.list_checkpoints(tmp_path / "run") == []


def _expected_names(prefix, module):
    return {f"{prefix}/{name}" for name in module.state_dict()}


@pytest.mark.parametrize("backend", [
    # aot_eager traces G and D with Dynamo and AOT autograd (through the ops' fake kernels) in
    # seconds; TorchInductor's C++ code generation takes ~2.5 minutes of this 2-core machine.
    "aot_eager",
    pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.skipif(
        not os.environ.get("REENACT_TEST_INDUCTOR"),
        reason="TorchInductor compiles for minutes on a CPU; set REENACT_TEST_INDUCTOR=1 to run it")]),
])
def test_compiled_training_keeps_checkpoints_plain_and_resumes(dataset, tmp_path, monkeypatch, backend):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    torch._dynamo.reset()
    run = tmp_path / "compiled"
    training.train(options(dataset, run, steps=2, checkpoint_every=2, compile=True))
    tensors, meta = training.read_checkpoint(training.checkpoint_path(run, 2))
    config = training.build_config(options(dataset, run))
    expected = _expected_names("G", Reenactor(config.model)) | _expected_names("D", build_discriminator(config.model))
    assert {name for name in tensors if name.startswith(("G/", "D/"))} == expected  # no _orig_mod.
    assert meta["options"]["compile"]
    training.load_generator(training.checkpoint_path(run, 2))
    training.train(options(dataset, run, steps=3, checkpoint_every=3, compile=True, resume=True))
    plain = tmp_path / "plain"
    training.train(options(dataset, plain, steps=3, checkpoint_every=3))
    torch._dynamo.reset()
    compiled, eager = log_entries(run), log_entries(plain)
    assert [e["step"] for e in compiled] == [1, 2, 3]
    for x, y in zip(eager, compiled):
        assert _relative(x["G/total"], y["G/total"]) < 1e-3, x["step"]
        assert _relative(x["D/total"], y["D/total"]) < 1e-3, x["step"]


# -- TensorBoard -----------------------------------------------------------------------------------

def test_tensorboard_events_hold_the_logged_scalars_and_the_sample_grid(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    training.train(options(dataset, run, steps=2, checkpoint_every=2))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    logged = log_entries(run)
    for key in ("G/total", "G/reconstruction", "G/warp", "D/total", "D/real_logit", "it_s"):
        assert key in tags["scalars"], key
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2]
        for scalar, entry in zip(scalars, logged):
            assert scalar.value == pytest.approx(entry[key], rel=1e-6)  # stored as float32
    assert tags["images"] == ["preview"]
    (image,) = events.Images("preview")
    assert image.step == 2
    with Image.open(io.BytesIO(image.encoded_image_string)) as grid:
        assert grid.size == (image.width, image.height)
        pixels = torch.from_numpy(np.asarray(grid.convert("RGB"), dtype=np.float32))
    assert image.width >= 5 * 64 and image.height >= 64  # the 5 panels of a row, 64 px each
    assert pixels.std() > 10  # a picture, not a blank


# -- a real kill -----------------------------------------------------------------------------------

def test_a_run_pins_one_corr_cpu_path_records_it_and_a_resume_pins_the_record(dataset, tmp_path, corr_path_mode):
    corr_path_mode("recalibrate")
    run = tmp_path / "run"
    training.train(options(dataset, run, steps=2, checkpoint_every=2))
    assert corr_path_mode("") == "auto"  # unpinned when the run ends
    _, meta = training.read_checkpoint(training.checkpoint_path(run, 2))
    assert meta["corr_cpu_path"] in ("simd", "aten", "bf16")
    # A resume takes the recorded path, whatever its own timing would choose: "aten" runs on
    # every CPU, so record it and watch the tile-product counter of that path move.
    path = training.checkpoint_path(run, 2)
    tensors, meta = training.read_checkpoint(path)
    meta["corr_cpu_path"] = "aten"
    path.write_bytes(safetensors.torch.save(tensors, metadata={training.checkpoints.METADATA_KEY: json.dumps(meta)}))
    aten_before = torch.ops.pncc._corr_cpu_path_stats()[3]
    trainer = training.Trainer(options(dataset, run, steps=3, checkpoint_every=3, resume=True))
    try:
        assert trainer.corr_cpu_path == "aten" and corr_path_mode("") == "aten"
        trainer.train_step()
        assert torch.ops.pncc._corr_cpu_path_stats()[3] > aten_before
        assert trainer._meta()["corr_cpu_path"] == "aten"
    finally:
        trainer.close()
    assert corr_path_mode("") == "auto"


def test_sigkill_during_training_then_resume_gives_the_uninterrupted_losses(dataset, tmp_path, corr_path_mode):
    # The straight run below is a run of its own, which may time corr_warp's CPU paths otherwise
    # than the killed one and pin another (the test above covers what a resume pins): one path
    # for all three processes.
    corr_path_mode("aten")
    env = dict(subprocess_env(), PNCC_CORR_SIMD="0")
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "reenact"] + cli_args(dataset, run, 10_000, checkpoint_every=3, keep_last=100)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not checkpoint_steps(run) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert checkpoint_steps(run), "no checkpoint within 240 s"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    last = checkpoint_steps(run)[-1]
    assert last % 3 == 0 and len(log_entries(run)) >= last
    steps = last + 4  # the resume crosses one more checkpoint (and, with 2 batches an epoch, epochs)

    resumed = subprocess.run([sys.executable, "-m", "reenact"]
                             + cli_args(dataset, run, steps, checkpoint_every=3, keep_last=100, resume=True),
                             env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = tmp_path / "straight"
    training.train(options(dataset, straight, steps=steps, checkpoint_every=3, keep_last=100))

    a, b = log_entries(straight), log_entries(run)
    assert [e["step"] for e in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert losses_of(x) == losses_of(y), x["step"]
    tensors_a, _ = training.read_checkpoint(training.checkpoint_path(straight, steps))
    tensors_b, _ = training.read_checkpoint(training.checkpoint_path(run, steps))
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name
