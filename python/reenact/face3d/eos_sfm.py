"""The Surrey Face Model in the eos project's own files (github.com/patrikhuber/eos, ``share/``).

- ``sfm_shape_3448.bin``: an eos ``MorphableModel`` in a cereal binary archive (class versions
  1-4): a uint32 class version, then the shape ``PcaModel`` (mean as an Eigen vector, the
  orthonormal basis as a column-major Eigen matrix, eigenvalues, triangles), a colour
  ``PcaModel`` (empty for the shape-only SFM) and, from version 2 on, an optional expression
  model. Eigen matrices are int32 rows, int32 cols, then float32 data; container sizes are
  uint64; booleans one byte; everything little-endian.
- ``expression_blendshapes_3448.bin``: a cereal ``std::vector<Blendshape>`` (name, offsets).
- ``ibug_to_sfm.txt``: a Boost INFO file; ``landmarkMappings { <ibug 1-68> <vertex> }``.
- ``sfm_model_contours.json``: ``{"model_contour": {"right_contour": [...], "left_contour": [...]}}``.

Read with numpy only (no eos, no pickle); every size is checked against the bytes left before
anything is allocated, so a truncated or hostile file fails with a ValueError naming it.
Identity coefficients are made ~N(0, 1) by scaling each basis vector by the square root of its
eigenvalue, as eos does.
"""
import json
import os
import pathlib
import re
import struct

import numpy as np

from .morphable import NUM_LANDMARKS, MorphableModel

#: File names in eos's share/ folder (the 3448-vertex resolution, the one eos publishes).
SHAPE_FILE = "sfm_shape_3448.bin"
BLENDSHAPES_FILE = "expression_blendshapes_3448.bin"
MAPPING_FILE = "ibug_to_sfm.txt"
CONTOURS_FILE = "sfm_model_contours.json"
EOS_FILES = (SHAPE_FILE, BLENDSHAPES_FILE, MAPPING_FILE, CONTOURS_FILE)


class _Reader:
    """Little-endian cereal binary reader over bytes, with bounds checks."""

    def __init__(self, data, source):
        self.data, self.offset, self.source = data, 0, source

    def fail(self, what):
        raise ValueError(f"cannot read {self.source}: {what} at byte {self.offset} of {len(self.data)}")

    def take(self, count):
        if count < 0 or self.offset + count > len(self.data):
            self.fail(f"needs {count} more bytes (truncated or not an eos file)")
        chunk = self.data[self.offset:self.offset + count]
        self.offset += count
        return chunk

    def scalar(self, fmt):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def size(self):
        return self.scalar("Q")

    def boolean(self):
        value = self.scalar("B")
        if value > 1:
            self.fail(f"a boolean is {value}")
        return bool(value)

    def string(self):
        return self.take(self.size()).decode("utf-8", errors="replace")

    def eigen(self):
        """An Eigen float matrix -> (rows, cols) float32, from its column-major data."""
        rows, cols = self.scalar("i"), self.scalar("i")
        if rows < 0 or cols < 0:
            self.fail(f"a matrix has shape {rows} x {cols}")
        values = np.frombuffer(self.take(4 * rows * cols), dtype="<f4")
        return values.reshape(cols, rows).T.astype(np.float32)

    def triangles(self):
        count = self.size()
        if count * 12 > len(self.data) - self.offset:
            self.fail(f"{count} triangles do not fit in the file")
        return np.frombuffer(self.take(12 * count), dtype="<i4").reshape(count, 3).astype(np.int64)

    def pca_model(self):
        mean, basis, eigenvalues = self.eigen(), self.eigen(), self.eigen()
        return {"mean": mean.reshape(-1), "basis": basis, "eigenvalues": eigenvalues.reshape(-1),
                "triangles": self.triangles()}

    def blendshapes(self):
        count = self.size()
        if count > len(self.data) - self.offset:
            self.fail(f"{count} blendshapes do not fit in the file")
        return [(self.string(), self.eigen().reshape(-1)) for _ in range(count)]


def _read_bytes(path, what):
    path = pathlib.Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path.read_bytes()


def read_shape_model(path):
    """``sfm_shape_3448.bin`` -> dict: mean (V, 3), id_basis (V, 3, K) scaled to N(0, 1)
    coefficients, faces (F, 3), blendshapes (list of (name, (3V,)) embedded in the file, or [])."""
    reader = _Reader(_read_bytes(path, "eos model"), str(path))
    version = reader.scalar("I")
    if version not in (1, 2, 3, 4):
        reader.fail(f"unknown eos MorphableModel version {version} (this loader reads 1-4)")
    shape = reader.pca_model()
    reader.pca_model()  # colour model: empty in the shape-only SFM, not used here
    embedded = []
    if version >= 2 and not reader.boolean():  # cereal writes "nullopt" first
        kind = reader.scalar("i")  # variant index: 0 PcaModel, 1 Blendshapes
        if kind == 1:
            embedded = reader.blendshapes()
        elif kind != 0:
            reader.fail(f"unknown expression model kind {kind}")
    mean, basis, eigenvalues = shape["mean"], shape["basis"], shape["eigenvalues"]
    if mean.size % 3 or basis.shape[0] != mean.size or eigenvalues.size != basis.shape[1]:
        raise ValueError(f"cannot read {path}: shape model sizes disagree (mean {mean.size}, basis "
                         f"{basis.shape}, eigenvalues {eigenvalues.size})")
    if not np.isfinite(basis).all() or not np.isfinite(mean).all() or (eigenvalues < 0).any():
        raise ValueError(f"cannot read {path}: non-finite values or negative eigenvalues")
    vertices = mean.size // 3
    id_basis = (basis * np.sqrt(eigenvalues)[None]).reshape(vertices, 3, -1)
    return {"mean": mean.reshape(vertices, 3), "id_basis": id_basis, "faces": shape["triangles"],
            "blendshapes": embedded}


def read_blendshapes(path):
    """``expression_blendshapes_3448.bin`` -> (names, (V, 3, Ke) offsets)."""
    reader = _Reader(_read_bytes(path, "eos blendshapes"), str(path))
    shapes = reader.blendshapes()
    return _stack_blendshapes(shapes, str(path))


def _stack_blendshapes(shapes, source):
    if not shapes:
        raise ValueError(f"{source} holds no blendshapes")
    sizes = {offsets.size for _, offsets in shapes}
    if len(sizes) != 1 or sizes.pop() % 3:
        raise ValueError(f"{source}: blendshapes of different or non-3D sizes")
    offsets = np.stack([o for _, o in shapes], -1)
    return [name for name, _ in shapes], offsets.reshape(-1, 3, len(shapes))


def read_ibug_mapping(path):
    """``ibug_to_sfm.txt`` -> (68,) int64 vertex of each iBUG point (0-based order), -1 if none."""
    text = _read_bytes(path, "landmark mapping").decode("utf-8", errors="replace")
    match = re.search(r"landmarkMappings[^{]*\{(.*?)\}", text, re.S)
    if not match:
        raise ValueError(f"cannot read {path}: no 'landmarkMappings {{ ... }}' block")
    mapping = np.full(NUM_LANDMARKS, -1, dtype=np.int64)
    for line in match.group(1).splitlines():
        fields = line.split(";", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise ValueError(f"cannot read {path}: expected '<ibug point> <vertex>', got {line.strip()!r}")
        point, vertex = int(fields[0]), int(fields[1])
        if not 1 <= point <= NUM_LANDMARKS:
            raise ValueError(f"cannot read {path}: iBUG point {point} is outside 1-68")
        mapping[point - 1] = vertex
    return mapping


def read_contours(path):
    """``sfm_model_contours.json`` -> (right, left) int64 candidate vertices."""
    try:
        data = json.loads(_read_bytes(path, "model contours").decode("utf-8"))
        contour = data["model_contour"]
        right, left = (np.asarray(contour[key], dtype=np.int64) for key in ("right_contour", "left_contour"))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read {path}: expected model_contour.right_contour/left_contour ({err})") from None
    if right.ndim != 1 or left.ndim != 1:
        raise ValueError(f"cannot read {path}: contours must be lists of vertex indices")
    return right, left


def load_eos_sfm(folder, name="sfm_3448"):
    """The Surrey Face Model from a folder holding eos's four files (see :data:`EOS_FILES`)."""
    folder = pathlib.Path(os.fspath(folder))
    missing = [f for f in EOS_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the eos file(s) {missing}; see README 'Face models'")
    shape = read_shape_model(folder / SHAPE_FILE)
    names, exp_basis = read_blendshapes(folder / BLENDSHAPES_FILE)
    if exp_basis.shape[0] != shape["mean"].shape[0]:
        raise ValueError(f"{folder / BLENDSHAPES_FILE} has {exp_basis.shape[0]} vertices, the model "
                         f"{shape['mean'].shape[0]}")
    right, left = read_contours(folder / CONTOURS_FILE)
    mapping = read_ibug_mapping(folder / MAPPING_FILE)
    if right.size and left.size:
        # Outline points slide along the contours (eos's contour fitting); the chin stays fixed.
        mapping[[k for k in range(17) if k != 8]] = -1
    else:
        right = left = None
    return MorphableModel(mean=shape["mean"], id_basis=shape["id_basis"], exp_basis=exp_basis,
                          faces=shape["faces"], landmarks68=mapping, contour_right=right,
                          contour_left=left, name=name, exp_names=names)


# -- writing (tests, and converting models you own to the layout eos reads) ----------------------

def _pack_eigen(matrix):
    matrix = np.asarray(matrix, dtype="<f4")
    matrix = matrix.reshape(-1, 1) if matrix.ndim == 1 else matrix
    return struct.pack("<ii", *matrix.shape) + np.asfortranarray(matrix).tobytes(order="F")


def write_eos_files(model, folder, version=4):
    """Write ``model`` as eos's four files (orthonormal basis + eigenvalues, blendshapes, the
    iBUG mapping, contours); :func:`load_eos_sfm` reads them back."""
    folder = pathlib.Path(os.fspath(folder))
    folder.mkdir(parents=True, exist_ok=True)
    vertices = model.num_vertices
    basis = model.id_basis.cpu().double().numpy().reshape(3 * vertices, -1)
    eigenvalues = (basis ** 2).sum(0)
    orthonormal = basis / np.sqrt(eigenvalues)[None]
    faces = model.faces.cpu().numpy().astype("<i4")
    shape = (_pack_eigen(model.mean.cpu().numpy().reshape(-1)) + _pack_eigen(orthonormal)
             + _pack_eigen(eigenvalues) + struct.pack("<Q", len(faces)) + faces.tobytes())
    empty = _pack_eigen(np.zeros((0, 1))) * 3 + struct.pack("<Q", 0)
    tail = b""
    if version >= 2:
        tail += struct.pack("<B", 1)  # no embedded expression model
    if version >= 3:
        tail += struct.pack("<B", 1)  # no landmark definitions
    tail += struct.pack("<Q", 0)  # texture coordinates
    if version >= 4:
        tail += struct.pack("<Q", 0)  # texture triangles
    (folder / SHAPE_FILE).write_bytes(struct.pack("<I", version) + shape + empty + tail)
    exp = model.exp_basis.cpu().numpy().reshape(3 * vertices, -1)
    blend = struct.pack("<Q", exp.shape[1])
    for k, name in enumerate(model.exp_names):
        encoded = name.encode("utf-8")
        blend += struct.pack("<Q", len(encoded)) + encoded + _pack_eigen(exp[:, k])
    (folder / BLENDSHAPES_FILE).write_bytes(blend)
    lines = [f"\t{k + 1} {int(v)}" for k, v in enumerate(model.landmarks68.tolist()) if v >= 0]
    (folder / MAPPING_FILE).write_text("; iBUG 68 -> vertex\nlandmarkMappings\n{\n" + "\n".join(lines) + "\n}\n",
                                       encoding="utf-8")
    contours = {"model_contour": {side: [] if contour is None else contour.tolist() for side, contour in
                                  (("right_contour", model.contour_right), ("left_contour", model.contour_left))}}
    (folder / CONTOURS_FILE).write_text(json.dumps(contours), encoding="utf-8")
