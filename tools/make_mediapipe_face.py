"""Regenerate python/reenact/face3d/data/mediapipe_face.npz, the built-in face model's mean shape.

mediapipe 0.10.21's pip package ships the face-mesh tessellation (as edges) but not the canonical
face model file, so the mean shape is measured: the face mesh of the two public-domain portraits
that ship offline (skimage's astronaut, matplotlib's Grace Hopper) and of their mirror images,
aligned by similarity Procrustes, averaged and made left-right symmetric. Run:

    python tools/make_mediapipe_face.py
"""
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from reenact.face3d import mediapipe_face as mf  # noqa: E402
from reenact.face3d.detectors import MediapipeDetector  # noqa: E402

#: Distance between the outer eye corners of the mean shape, in model units (millimetres).
OUTER_EYE_CORNERS_MM = 90.0


def portraits():
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        hopper = np.asarray(Image.open(handle).convert("RGB"))
    return [skimage.data.astronaut(), hopper]


def mirror_map(shape, shape_of_mirror_image):
    """Index of each vertex's left-right counterpart. Vertex i of a mirror image's mesh, mapped
    back into the original image, lies on the face's counterpart of i: its nearest vertex there."""
    distance = ((shape_of_mirror_image[:, None] - shape[None]) ** 2).sum(-1)
    return distance.argmin(1)


def symmetric(shape, mirror):
    """Turn ``shape`` to face the z axis (half the rotation that maps it onto its mirror image),
    then average it with its mirror image."""
    import torch

    from reenact.face3d.pose import axis_angle_to_matrix, matrix_to_axis_angle

    flip = np.array([-1.0, 1.0, 1.0])
    shape = shape - shape.mean(0)
    _, rotation, _ = mf.similarity_procrustes(shape, (shape * flip)[mirror], np.ones(len(shape)))
    half = axis_angle_to_matrix(matrix_to_axis_angle(torch.from_numpy(rotation)) / 2).numpy()
    shape = shape @ half.T
    return (shape + (shape * flip)[mirror]) / 2


def main():
    faces, mirror = [], None
    with MediapipeDetector() as detector:
        for image in portraits():
            dense = detector.detect_dense(image)[:mf.NUM_VERTICES]
            # The mirror image is a face of its own (vertex i is still the point i of a face).
            mirrored = detector.detect_dense(np.ascontiguousarray(image[:, ::-1]))[:mf.NUM_VERTICES]
            faces += [mf.image_to_model_space(dense), mf.image_to_model_space(mirrored)]
            if mirror is None:
                back = mirrored.copy()
                back[:, 0] = image.shape[1] - 1 - back[:, 0]
                mirror = mirror_map(dense, back)
    reference = faces[0] - faces[0].mean(0)
    aligned = []
    for shape in faces:
        scale, rotation, translation = mf.similarity_procrustes(shape, reference, np.ones(len(shape)))
        aligned.append(scale * shape @ rotation.T + translation)
    mean = symmetric(np.mean(aligned, 0), mirror)
    eye_span = np.linalg.norm(mean[mf.OUTER_EYE_CORNERS[0]] - mean[mf.OUTER_EYE_CORNERS[1]])
    mean *= OUTER_EYE_CORNERS_MM / eye_span
    path = ROOT / "python" / "reenact" / "face3d" / "data" / "mediapipe_face.npz"
    np.savez(path, mean=mean.astype(np.float32), mirror=mirror.astype(np.int16),
             source=np.array("mediapipe 0.10.21 face mesh of skimage astronaut and matplotlib "
                             "grace_hopper, and their mirror images; Procrustes mean"))
    print(f"wrote {path}: {len(mean)} vertices, mirror pairs {int((mirror != np.arange(len(mirror))).sum())}")


if __name__ == "__main__":
    main()
