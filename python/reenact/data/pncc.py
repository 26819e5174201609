"""PNCCs of a training batch, rendered on the training device (PNCCs are never stored), and the
network inputs of a batch (:func:`prepare_batch`, shared by training and evaluation)."""
import torch
import torch.nn.functional as F

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


def _resize(images, size, mode):
    if images.shape[-1] == size:
        return images
    if images.shape[-1] > size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=False)


def prepare_batch(batch, face_model, resolution, device, ops=None):
    """(source, driving, P_s, P_d') on ``device`` at ``resolution``. PNCCs are rendered at the
    dataset's crop size (the poses are in its pixels) and resized with the images, by
    ``ops.render_pncc`` (default: the fused op; ``--ops reference`` renders with the reference)."""
    size = int(batch["source"].shape[-1])
    pncc = batch_pncc(face_model, batch, size=size, device=device, ops=ops)
    source = _resize(batch["source"].to(device), resolution, "bilinear")
    driving = _resize(batch["driving"].to(device), resolution, "bilinear")
    return (source, driving, _resize(pncc["pncc_source"], resolution, "bilinear"),
            _resize(pncc["pncc_driving"], resolution, "bilinear"))
