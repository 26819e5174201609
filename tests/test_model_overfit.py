"""Overfit smoke test: the small model fits a fixed synthetic batch quickly on the CPU.

It checks that the whole model trains end to end (losses, gradients through corr_warp, gates and
decoder), not that it generalises: issue 6's held-frame overfit test belongs to the training
loop.
"""
import pytest
import torch

from model_fixtures import single_thread, synthetic_batch  # noqa: F401 (autouse fixture)
from reenact.model import LossConfig, ReenactmentLoss, Reenactor, ReenactorConfig

STEPS = 100
# Measured on this 2-core machine: reconstruction L1 0.58 -> 0.08 in 20 steps (an 87% drop), but
# copying the source image already scores 0.068 on this batch, so 20 steps showed nothing the
# model could not fake by returning its input. At 80 steps it reached 0.040 (issue 13).
REQUIRED_DROP = 0.5
#: The model must beat "copy source" (the output = the source image) by this factor at the end.
COPY_SOURCE_MARGIN = 0.8


@pytest.mark.slow
def test_small_model_overfits_a_batch():
    torch.manual_seed(0)
    config = ReenactorConfig.small(64)
    model = Reenactor(config.model)
    # No GAN terms: their balance with the discriminator is not monotone over 20 steps.
    losses = ReenactmentLoss(LossConfig(perceptual=0.0, adversarial=0.0, feature_matching=0.0))
    batch = synthetic_batch(2, 64, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.999))
    history = []
    for _ in range(STEPS):
        outputs = model(batch["source_image"], batch["source_pncc"], batch["driving_pncc"])
        result = losses.generator_loss(outputs, batch["driving_image"], batch["driving_pncc"])
        optimizer.zero_grad()
        result.total.backward()
        optimizer.step()
        history.append({name: value.item() for name, value in result.terms.items()})
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    first, last = history[0]["reconstruction"], history[-1]["reconstruction"]
    assert last <= (1 - REQUIRED_DROP) * first, f"reconstruction L1 {first:.3f} -> {last:.3f}"
    copy_source = (batch["source_image"] - batch["driving_image"]).abs().mean().item()
    settled = sum(h["reconstruction"] for h in history[-5:]) / 5  # Adam's last steps jitter
    assert settled < COPY_SOURCE_MARGIN * copy_source, (
        f"after {STEPS} steps the model's L1 {settled:.4f} does not beat copying the source ({copy_source:.4f}) "
        f"by the factor {COPY_SOURCE_MARGIN}")
    assert history[-1]["warp"] < history[0]["warp"]
