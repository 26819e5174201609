"""Helpers shared by the training tests: a tiny synthetic dataset, run options, log reading, and
the environment of `python -m reenact` / torchrun subprocesses."""
import json
import os
import pathlib

import pytest

from reenact import training
from reenact.data import synth
from reenact.data.loaders import dali_available

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 64
# Runs that use the DALI loader need nvidia-dali (absent on some platforms, e.g. aarch64 wheels).
requires_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")


def make_dataset(root, clips=3):
    synth.synth_dataset(root, clips, frames=8, size=SIZE, codec="vp9", seed=0, identities=2)
    return root


def options(dataset, out, **kwargs):
    values = dict(data=str(dataset), out=str(out), steps=4, batch_size=2, resolution=SIZE,
                  checkpoint_every=2, keep_last=10, seed=3, loader="fallback", device="cpu",
                  perceptual=False, progress=False)
    values.update(kwargs)
    return training.TrainOptions(**values)


def cli_args(dataset, out, steps, **flags):
    """`reenact train` arguments equal to :func:`options` (flags: name=value, True for a switch)."""
    values = {"batch_size": 2, "resolution": SIZE, "checkpoint_every": 2, "keep_last": 10, "seed": 3,
              "loader": "fallback", "device": "cpu", "no_perceptual": True, "quiet": True}
    values.update(flags)
    args = ["train", "--data", str(dataset), "--out", str(out), "--steps", str(steps)]
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


def subprocess_env():
    """This checkout first on the path, one intra-op thread per process (as the in-process runs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "python")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def log_entries(run_dir):
    return [json.loads(line) for line in (pathlib.Path(run_dir) / "log.jsonl").read_text().splitlines()]


def losses_of(entry):
    return {k: v for k, v in entry.items() if k.startswith(("G/", "D/"))}


def checkpoint_steps(run_dir):
    return [step for step, _ in training.list_checkpoints(run_dir)]
