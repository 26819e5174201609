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


def corr_warp_normalize(x, normalize=True, eps=1e-6):
    """Channel-mean centring and L2 normalisation of the rows of x (..., C), as corr_warp does."""
    if not normalize:
        return x
    c = x - x.mean(dim=-1, keepdim=True)
    return c / (torch.linalg.vector_norm(c, dim=-1, keepdim=True) + eps)


def corr_warp_reference(query, key, value, temperature, normalize=True, eps=1e-6):
    """Unfused corr_warp: normalise, matmul, softmax, matmul, in the dtype of the inputs.

    Args:
        query: (B, Nq, C); key: (B, Nk, C); value: (B, Nk, Cv); any floating dtype, float64 too.
        temperature: softmax temperature (> 0).
        normalize: centre and L2-normalise query/key rows over C; eps is added to the norms.

    Returns:
        (B, Nq, Cv): softmax(q^ k^T / temperature, dim=-1) @ value. Materialises (B, Nq, Nk).
    """
    q = corr_warp_normalize(query, normalize, eps)
    k = corr_warp_normalize(key, normalize, eps)
    scores = torch.matmul(q, k.transpose(-1, -2)) / temperature
    return torch.matmul(torch.softmax(scores, dim=-1), value)
