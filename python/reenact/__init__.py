"""reenact: one-shot face reenactment driven by identity-matched PNCC, built on pncc_cuda.

Follows "High-Fidelity Face Reenactment Via Identity-Matched Correspondence Learning"
(ACM TOMM 2023): 3D face reconstruction -> identity-matched PNCC reconstruction ->
feature correspondence (pncc_cuda.corr_warp) -> generator with geometry-aware skips.
"""
__version__ = "0.1.0"
