"""Overfit through the training loop (issues 6 and 13): ``train(TrainOptions(...))`` on a tiny
synthetic dataset must beat copying the source frame, and the training-free geometric warp, on held
frames by a clear margin.

Held frames: 3 synthetic toy-head clips of 16 frames at 64 px are rendered; frames 4, 9 and 14 of
every clip are *held out*: the training dataset is a copy of the clips without them (re-encoded,
parameters sliced), so no training pair ever shows them. The held-frame L1 is measured on the
fixed pairs (clip c, source frame 0, driving frame t) for t in 4, 9, 14: 9 pairs, the source frame
being a training frame, the driving frame an unseen one. It is ``reenact.eval``'s L1 (images in
[0, 1], the generator in eval mode, no gradients) of the model before training (the run's initial
weights) and after it (the last checkpoint), and of the two baselines on the same pairs: "copy
source" (the source frame itself) and "geometric warp" (reenact.warp along the stored parameters).

Training: `reenact train`'s default config at 64 px (the small preset with ``geometric_input``: the generator sees the warped
source and its hole mask), L1 and warp losses (the GAN terms off, as in the demo recipe: over 200
steps they only add noise), lr 1e-3, batch 8, 200 steps, seed 0, the fallback loader, 1 intra-op
thread.

Measured on the 2-core workplace machine (AMD EPYC, load average 7-9 from other jobs, 2026-12-07):
held-frame L1 0.042 -> 0.0140, against 0.0268 for copy source and 0.0259 for the geometric warp
(the model 48% below copy source); 457 s under that load. Before issue 13 (no warp input, GAN
terms on, lr 1e-4) the same 200 steps reached 0.044: worse than copying the source (0.027).
"""
import dataclasses
import time

import pytest
import torch

from reenact import eval as evaluate, training
from reenact.data import format as fmt, synth
from reenact.data.pairs import PairSpec
from reenact.data.video import encode_video, iter_frames
from reenact.face3d.toy import make_toy_head

pytestmark = pytest.mark.slow

CLIPS, FRAMES, SIZE = 3, 16, 64
HELD = (4, 9, 14)
STEPS, BATCH, LR = 200, 8, 1e-3
REQUIRED_DROP = 0.5
#: The trained model's held-frame L1 must be below this fraction of copy source's (measured 0.52).
COPY_SOURCE_MARGIN = 0.75


def without_frames(source, target, held):
    """Copy a prepared dataset without the ``held`` frames of each clip (videos re-encoded)."""
    keep = [t for t in range(FRAMES) if t not in held]
    (target / "clips").mkdir(parents=True)
    records = []
    for record in fmt.read_manifest(source):
        frames = list(iter_frames(source / record.clip))
        encode_video(target / record.clip, [frames[t] for t in keep], fps=record.fps, codec=record.codec)
        params = fmt.load_params(source / record.params)
        fmt.save_params(target / record.params, **{key: params[key][keep] for key in fmt.FRAME_KEYS},
                        alpha=params["alpha"], identity=str(params["identity"]),
                        model_name=str(params["model_name"]), image_size=int(params["image_size"]))
        records.append(dataclasses.replace(record, frames=len(keep)))
    fmt.write_manifest(target, records)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared machine two threads mostly wait on each other (the demo's
    measurement: 10x faster with one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_training_loop_beats_copy_source_and_the_warp_on_held_frames(tmp_path, one_thread):
    full, train_data = tmp_path / "full", tmp_path / "train"
    synth.synth_dataset(full, CLIPS, frames=FRAMES, size=SIZE, seed=0)
    without_frames(full, train_data, HELD)
    assert [r.frames for r in fmt.read_manifest(train_data)] == [FRAMES - len(HELD)] * CLIPS

    options = training.TrainOptions(
        data=str(train_data), out=str(tmp_path / "run"), steps=STEPS, batch_size=BATCH, lr_g=LR, resolution=SIZE,
        perceptual=False, gan=False, checkpoint_every=STEPS, loader="fallback", device="cpu", seed=0,
        progress=False)
    config = training.build_config(options)
    assert config.model.geometric_input  # `reenact train`'s default is what this test measures
    assert config.loss.adversarial == config.loss.feature_matching == 0.0  # --no-gan
    held_pairs = [PairSpec(clip, 0, t, False, (1.0, 1.0, 1.0), 0.0, False) for clip in range(CLIPS) for t in HELD]
    face_model = make_toy_head()

    def held_l1(generator):
        """{method: mean held-frame L1} for the model and the two baselines, on the same pairs."""
        scores = {name: [] for name in evaluate.METHODS}
        for batch in evaluate.generate(generator, face_model, full, held_pairs):
            for name, output in evaluate.method_outputs(face_model, batch, SIZE).items():
                scores[name].append(evaluate.image_metrics(output, batch["driving"])["l1"])
        return {name: float(torch.cat(values).mean()) for name, values in scores.items()}

    before = held_l1(training.Trainer(options).generator)  # the run's initial weights (same seed)
    started = time.perf_counter()
    checkpoint = training.train(options)
    seconds = time.perf_counter() - started
    after = held_l1(training.load_generator(checkpoint)[0])
    model, copy, warp = after[evaluate.MODEL], after[evaluate.COPY_SOURCE], after[evaluate.GEOMETRIC]
    report = (f"held-frame L1 {before[evaluate.MODEL]:.4f} -> {model:.4f} after {STEPS} steps ({seconds:.0f} s); "
              f"copy source {copy:.4f}, geometric warp {warp:.4f}")
    assert model <= (1 - REQUIRED_DROP) * before[evaluate.MODEL], report
    assert model < COPY_SOURCE_MARGIN * copy, report
    assert model < warp, report
