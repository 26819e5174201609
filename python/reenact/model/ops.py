"""The one place that chooses between the fused pncc_cuda ops and their pure-PyTorch references.

Every module of the model and the training code gets its ops from `get_ops(name)`, so the
`--ops reference` switch (ModelConfig.ops) swaps all of them at once for A/B comparisons:

    ops = get_ops("reference")
    out = ops.corr_warp(query, key, value, temperature)
    pncc, mask = ops.render_pncc(vertices, faces, ncc, height, width)

`pncc_cuda` is imported by `get_ops`, not when this package is imported, so a config can be read
and validated without the compiled extension.
"""
import importlib

from ..face3d.pncc import BUILD_HINT
from .config import OPS_CHOICES

__all__ = ["Ops", "get_ops", "OPS_CHOICES"]

# Op name -> (attribute of pncc_cuda, attribute of pncc_cuda.reference).
_OP_NAMES = {
    "corr_warp": ("corr_warp", "corr_warp_reference"),
    "render_pncc": ("render_pncc", "render_pncc_reference"),
    # The geometric warp (reenact.warp, ModelConfig.geometric_input) rasterizes and interpolates.
    "rasterize": ("rasterize", "rasterize_reference"),
    "interpolate": ("interpolate", "interpolate_reference"),
}


def _resolve(ops_name, op):
    try:
        package = importlib.import_module("pncc_cuda")
    except ImportError as error:
        raise ImportError(
            f"the {ops_name!r} ops need the pncc_cuda package and its compiled extension "
            f"({BUILD_HINT}): {error}"
        ) from error
    fused_name, reference_name = _OP_NAMES[op]
    if ops_name == "fused":
        return getattr(package, fused_name)
    return getattr(package.reference, reference_name)


class Ops:
    """The ops of one implementation ("fused" or "reference"), with the pncc_cuda signatures.

    The functions are looked up once, here, so that calls made inside `torch.compile` see plain
    function attributes.
    """

    def __init__(self, name):
        if name not in OPS_CHOICES:
            raise ValueError(f"ops must be one of {OPS_CHOICES}, got {name!r}")
        self.name = name
        self._functions = {op: _resolve(name, op) for op in _OP_NAMES}

    def corr_warp(self, query, key, value, temperature, normalize=True, eps=1e-6):
        """softmax(q^ k^T / temperature) @ value; (B,Nq,C), (B,Nk,C), (B,Nk,Cv) -> (B,Nq,Cv)."""
        return self._functions["corr_warp"](query, key, value, temperature, normalize, eps)

    def render_pncc(self, vertices, faces, ncc, height, width):
        """PNCC image (B,3,H,W) and coverage mask (B,1,H,W) of image-space vertices (B,V,3)."""
        return self._functions["render_pncc"](vertices, faces, ncc, height, width)

    def rasterize(self, vertices, faces, height, width):
        """Per-pixel face index (B,H,W), barycentrics (B,H,W,3) and depth (B,H,W) of a z-buffer."""
        return self._functions["rasterize"](vertices, faces, height, width)

    def interpolate(self, attributes, faces, face_index, bary):
        """Per-vertex attributes (B,V,A) interpolated over rasterized pixels -> (B,H,W,A)."""
        return self._functions["interpolate"](attributes, faces, face_index, bary)

    def __repr__(self):
        return f"Ops({self.name!r})"


def get_ops(name):
    """The ops of implementation `name`: "fused" (pncc_cuda kernels) or "reference"."""
    return Ops(name)
