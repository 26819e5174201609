"""PNCCs of a training batch, rendered on the training device (PNCCs are never stored)."""
import torch

from ..face3d.pncc import reconstruct_pncc


def batch_pncc(model, batch, size=None, device=None, ops=None):
    """Render ``P_s`` and ``P_d'`` for a loader batch.

    ``P_s`` is the source frame's PNCC (its identity, expression and pose). ``P_d'`` is the
    reconstructed driving PNCC: the *source* identity with the driving expression and pose.
    Pairs come from one clip, whose frames share one identity and one crop, so the driving pose
    is used as it is (``mode="absolute"``).

    Args:
        model: the :class:`~reenact.face3d.morphable.MorphableModel` the dataset was fitted with.
        batch: a dict from a loader (keys alpha, beta_source, pose_source, beta_driving, pose_driving).
        size: output size (default: the batch images' size).
        device: where to render (default: the device of ``batch["source"]``).
        ops: what renders (see :func:`~reenact.face3d.pncc.reconstruct_pncc`); default the fused op.
    Returns:
        dict with pncc_source, pncc_driving (B, 3, S, S) in [0, 1] and mask_source, mask_driving
        (B, 1, S, S).
    """
    missing = [k for k in ("alpha", "beta_source", "pose_source", "beta_driving", "pose_driving") if k not in batch]
    if missing:
        raise ValueError(f"batch lacks the parameter keys {missing}")
    device = torch.device(device) if device is not None else batch["source"].device
    size = int(size if size is not None else batch["source"].shape[-1])
    model = model.to(device) if model.device != device else model
    alpha = batch["alpha"].to(device)
    pncc_s, mask_s = reconstruct_pncc(model, alpha, batch["beta_source"].to(device),
                                      batch["pose_source"].to(device), size=size, ops=ops)
    pncc_d, mask_d = reconstruct_pncc(model, alpha, batch["beta_driving"].to(device),
                                      batch["pose_driving"].to(device), size=size, ops=ops)
    return {"pncc_source": pncc_s, "mask_source": mask_s, "pncc_driving": pncc_d, "mask_driving": mask_d}
