"""pncc_cuda: fused PyTorch ops for identity-matched PNCC face reenactment.

Ops (all registered with torch.library in the `pncc` namespace, CPU and CUDA kernels, fake
kernels for torch.compile, autograd):

- rasterize(vertices, faces, height, width) -> (face_index, bary, depth)
- interpolate(attributes, faces, face_index, bary) -> (B, H, W, C)
- render_pncc(vertices, faces, ncc, height, width) -> (pncc, mask)
- corr_warp(query, key, value, temperature, normalize=True, eps=1e-6) -> out

`pncc_cuda.reference` holds a pure-PyTorch implementation of each op: the test oracle and the
benchmark baseline.
"""
# torch first: it loads libc10/libtorch, which the extension links against. Then the shared
# library, before any Python-side registration refers to its schemas.
import torch  # noqa: F401

from . import _C  # noqa: F401
from . import reference  # noqa: F401
from .corr import corr_warp
from .raster import interpolate, rasterize, render_pncc

__all__ = ["rasterize", "interpolate", "render_pncc", "corr_warp", "reference"]
__version__ = "0.1.0"
