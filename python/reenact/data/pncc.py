"""PNCCs of a training batch, rendered on the training device (PNCCs are never stored), and the
network inputs of a batch (:func:`prepare_batch`, shared by training and evaluation)."""
import torch
import torch.nn.functional as F

from ..face3d.pncc import reconstruct_pncc
from ..warp import geometric_reenact, shade_mouth


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


def prepare_batch(batch, face_model, resolution, device, ops=None, geometric=False):
    """(source, driving, P_s, P_d', geometric) on ``device`` at ``resolution``. PNCCs are rendered
    at the dataset's crop size (the poses are in its pixels) and resized with the images, by
    ``ops.render_pncc`` (default: the fused op; ``--ops reference`` renders with the reference).
    ``geometric`` (``ModelConfig.geometric_input``): the last item is the geometric warp input
    (B, 4, R, R) of :func:`batch_geometric`, warped at ``resolution``; else None."""
    size = int(batch["source"].shape[-1])
    pncc = batch_pncc(face_model, batch, size=size, device=device, ops=ops)
    source = _resize(batch["source"].to(device), resolution, "bilinear")
    driving = _resize(batch["driving"].to(device), resolution, "bilinear")
    warp = batch_geometric(face_model, batch, source, size, ops) if geometric else None
    return (source, driving, _resize(pncc["pncc_source"], resolution, "bilinear"),
            _resize(pncc["pncc_driving"], resolution, "bilinear"), warp)


def crop_pose(pose, dataset_size, resolution):
    """Poses (B, 3, 4) in dataset-crop pixels -> in pixels of the crop resized to ``resolution``
    (pixel centres on integers in both: x_r = (x_s + 0.5) * r / s - 0.5; depth scaled alike)."""
    factor = resolution / dataset_size
    pose = pose * factor
    pose[:, :2, 3] += 0.5 * factor - 0.5
    return pose


def batch_geometric(model, batch, source, dataset_size, ops=None):
    """The geometric warp input of ``ModelConfig.geometric_input`` for a batch of pairs.

    The source image sampled along the identity-matched driving mesh
    (:func:`reenact.warp.geometric_reenact`, the pair's own poses: ``mode="absolute"``), its mouth
    interior darkened as ``reenact reenact``'s geometric mode does (:func:`reenact.warp.shade_mouth`),
    and the hole mask.

    Args:
        model: the MorphableModel of the dataset's parameters.
        batch: a dict with alpha, beta_source, pose_source, beta_driving, pose_driving (tensors or
            numpy arrays; poses in dataset-crop pixels).
        source: (B, 3, R, R) source images in [-1, 1] at the model's resolution R.
        dataset_size: the dataset's crop side (the poses' pixels).
        ops: what rasterizes (anything with pncc_cuda's ``rasterize`` and ``interpolate``); default
            the fused ops.
    Returns:
        (B, 4, R, R) float32: [warped source in [-1, 1], holes in {0, 1}].
    """

    device, resolution = source.device, int(source.shape[-1])
    model = model.to(device) if model.device != device else model

    def tensor(key):
        return torch.as_tensor(batch[key]).float().to(device)

    warp = geometric_reenact(model, (source.float() + 1) / 2, tensor("alpha"), tensor("beta_source"),
                             crop_pose(tensor("pose_source"), dataset_size, resolution), tensor("beta_driving"),
                             crop_pose(tensor("pose_driving"), dataset_size, resolution), mode="absolute", ops=ops)
    return torch.cat([shade_mouth(warp).clamp(0, 1) * 2 - 1, warp.holes], dim=1)
