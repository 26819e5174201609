"""Pure-PyTorch references of every pncc op.

Slow, obviously correct, float64-capable and differentiable through plain autograd. They are the
test oracle, the benchmark baseline and the executable definition of each op's semantics.
"""
import torch

# ---------------------------------------------------------------------------------------------
# Rasterizer: rasterize, interpolate, render_pncc
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Correspondence: corr_warp
# ---------------------------------------------------------------------------------------------
