"""68-point (iBUG) landmark detectors behind one interface, each an optional extra.

- :class:`MediapipeDetector`: mediapipe==0.10.21 face mesh (478 points, bundled models),
  mapped to iBUG 68 with :data:`MEDIAPIPE_TO_IBUG68`.
- :class:`DlibDetector`: dlib's HOG face detector and 68-point shape predictor, with the model file
  of the ``face-recognition-models`` package (non-commercial licence) or a user-supplied one.
- :class:`FileLandmarks`: landmarks read from a file (.npy, .npz, .txt/.csv, iBUG .pts).

``detect(image)`` takes an (H, W, 3) uint8 RGB image and returns a :class:`Detection` or None
when no face is found. Coordinates follow the project convention: pixel (row i, col j) is the
point (x=j, y=i).
"""
import abc
import dataclasses
import os
import pathlib

import numpy as np

# mediapipe face-mesh vertex for each iBUG-68 point. Derived from the face-mesh topology: each
# iBUG group is taken from the matching mediapipe contour (FACEMESH_FACE_OVAL, _RIGHT/_LEFT_EYEBROW,
# _NOSE, _RIGHT/_LEFT_EYE, _LIPS), walking the contour in iBUG order and picking the vertices at
# the iBUG points' relative positions along it (eye corners and mouth corners are the contours'
# extreme vertices; outline points are spaced from the ear-level vertex 234/454 to the chin 152).
MEDIAPIPE_TO_IBUG68 = (
    # 0-16 outline: subject's right ear level -> chin -> left ear level
    234, 93, 132, 58, 172, 136, 150, 176, 152, 400, 379, 365, 397, 288, 361, 323, 454,
    # 17-21 right brow (outer -> inner), 22-26 left brow (inner -> outer), upper brow edge
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    # 27-30 nose bridge top -> tip, 31-35 nostril base right -> left
    168, 197, 5, 4, 98, 97, 2, 326, 327,
    # 36-41 right eye: outer corner, upper lid x2, inner corner, lower lid x2
    33, 160, 158, 133, 153, 144,
    # 42-47 left eye: inner corner, upper lid x2, outer corner, lower lid x2
    362, 385, 387, 263, 373, 380,
    # 48-59 outer lips: right corner, upper lip -> left corner, lower lip back
    61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91,
    # 60-67 inner lips: right corner, upper, left corner, lower
    78, 82, 13, 312, 308, 317, 14, 87,
)


@dataclasses.dataclass
class Detection:
    """One face: landmarks (68, 2) float64 pixels, confidence (68,), box (4,) x0, y0, x1, y1;
    dense: the detector's full mesh (478, 3) when it has one (mediapipe), else None."""

    landmarks: np.ndarray
    confidence: np.ndarray
    box: np.ndarray
    detector: str
    dense: np.ndarray = None


def _box_of(points):
    return np.concatenate([points.min(0), points.max(0)])


class DetectorUnavailable(ImportError):
    """A detector's optional dependency is missing; the message says what to install."""


class LandmarkDetector(abc.ABC):
    """Interface: ``detect(image_rgb) -> Detection | None``; ``close()`` frees resources."""

    name = "detector"

    @abc.abstractmethod
    def detect(self, image_rgb):
        """68 landmarks of the most prominent face of an RGB image, or None when there is none."""

    def close(self):
        """Release native resources (no-op by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_image(image, name="image"):
    """Validate an (H, W, 3) uint8 RGB image; raise TypeError/ValueError naming ``name``."""
    if image is None:
        raise ValueError(f"{name} is None (was the file readable?)")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name} must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    return np.ascontiguousarray(image)


#: Second pass for small faces: a face-mesh miss is retried on a square region of this many face
#: box sides around a face found by mediapipe's full-range detector (or around the previous
#: frame's small face), resampled to SMALL_FACE_CROP pixels.
SMALL_FACE_REGION = 2.0
SMALL_FACE_CROP = 256
#: Video mode: while no small face is tracked, the (costly) search for one runs on every this
#: many-th frame only, so faceless stretches of a video cost little more than the face mesh.
SMALL_FACE_SEARCH_EVERY = 25


class MediapipeDetector(LandmarkDetector):
    """mediapipe 0.10.21 face mesh, 478 points mapped to iBUG 68.

    The face mesh's own detector (short range) misses faces narrower than about an eighth of the
    image's shorter side (full-body shots). Where it finds nothing, a second pass looks for the
    face with the full-range detector that the mediapipe wheel ships (``model_selection=1``) on
    the whole image, then on overlapping tiles of half its shorter side (faces down to about 40 px
    wide in a 720x1080 frame), upscales a region around it and runs the face mesh on that
    (``small_faces``). In video mode the next frames start from the previous small face's region
    (no detector run), and while none is tracked the search runs on every
    :data:`SMALL_FACE_SEARCH_EVERY`-th frame only.

    Args:
        video: track across frames (mediapipe's non-static mode) instead of detecting each image.
        min_confidence: detection confidence threshold.
        dense: keep the full 478-point mesh in each Detection (``Detection.dense``); False reads
            only the 68 points (faster, for callers that need no mesh).
        small_faces: run the second pass for small faces.
    """

    name = "mediapipe"

    def __init__(self, video=False, min_confidence=0.5, dense=True, small_faces=True):
        try:
            from mediapipe.python.solutions import face_mesh  # optional dependency (mediapipe)
        except ImportError as err:
            raise DetectorUnavailable(
                "the mediapipe detector needs `pip install mediapipe==0.10.21` (numpy<2, protobuf<5)"
            ) from err
        self._mesh = face_mesh.FaceMesh(static_image_mode=not video, max_num_faces=1,
                                        refine_landmarks=True, min_detection_confidence=min_confidence)
        self._index = np.array(MEDIAPIPE_TO_IBUG68)
        self.dense, self.small_faces, self._video = dense, small_faces, video
        self._min_confidence = min_confidence
        self._small = None  # (full-range detector, static face mesh), built on the first miss
        self._small_box = None  # video mode: (centre x, centre y, side) of the last small face
        self._misses = 0  # video mode: frames since the last search for a small face

    @staticmethod
    def _read(result, width, height, index=None):
        """Face-mesh result -> (N, 3) points (all 478, or ``index``): x, y in pixels, z in
        mediapipe's relative units scaled like x; None without a face."""
        if not result.multi_face_landmarks:
            return None
        landmark = result.multi_face_landmarks[0].landmark
        chosen = landmark if index is None else [landmark[i] for i in index]
        points = np.array([(p.x, p.y, p.z) for p in chosen])
        # mediapipe's normalised coordinates put 0 on the image edge; ours on the first centre.
        points[:, 0] = points[:, 0] * width - 0.5
        points[:, 1] = points[:, 1] * height - 0.5
        points[:, 2] *= width
        return points

    def _points(self, image_rgb, index=None):
        image_rgb = check_image(image_rgb)
        height, width = image_rgb.shape[:2]
        points = self._read(self._mesh.process(image_rgb), width, height, index)
        if points is None and self.small_faces:
            points = self._small_face(image_rgb, index)
        return points

    def _small_face(self, image, index):
        """The second pass (see the class docstring): points in image pixels, or None."""
        import cv2
        from mediapipe.python.solutions import face_detection, face_mesh

        if self._small is None:
            self._small = (face_detection.FaceDetection(model_selection=1, min_detection_confidence=self._min_confidence),
                           face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                                              min_detection_confidence=self._min_confidence))
        box = self._small_box
        if box is None:
            if self._video:
                self._misses += 1
                if (self._misses - 1) % SMALL_FACE_SEARCH_EVERY:
                    return None
            box = self._find_small_face(image)
            if box is None:
                return None
        centre_x, centre_y, side = box
        region = SMALL_FACE_REGION * side
        step = region / SMALL_FACE_CROP  # image pixels per crop pixel
        x0, y0 = centre_x - region / 2, centre_y - region / 2
        to_image = np.array([[step, 0.0, x0 + 0.5 * step - 0.5], [0.0, step, y0 + 0.5 * step - 0.5]])
        crop = cv2.warpAffine(image, to_image, (SMALL_FACE_CROP, SMALL_FACE_CROP),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
        points = self._read(self._small[1].process(crop), SMALL_FACE_CROP, SMALL_FACE_CROP, index)
        if points is None:
            self._small_box = None
            return None
        points[:, :2] = points[:, :2] * step + to_image[:, 2]
        points[:, 2] *= step
        if self._video:  # the next frame starts from this face's landmark box
            low, high = points[:, :2].min(0), points[:, :2].max(0)
            self._small_box = (*((low + high) / 2), float((high - low).max()))
            self._misses = 0
        return points

    def _find_small_face(self, image):
        """(centre x, centre y, side) in pixels of the full-range detector's best face on the
        whole image, else on overlapping tiles of half its shorter side; None if none."""
        height, width = image.shape[:2]
        tile = min(height, width) // 2
        windows = [(0, 0, width, height)]
        if tile >= 64:
            ys = np.linspace(0, height - tile, max(1, -(-2 * (height - tile) // tile) + 1)).round().astype(int)
            xs = np.linspace(0, width - tile, max(1, -(-2 * (width - tile) // tile) + 1)).round().astype(int)
            windows += [(x, y, tile, tile) for y in ys for x in xs]
        for x0, y0, w, h in windows:
            part = image if (w, h) == (width, height) else np.ascontiguousarray(image[y0:y0 + h, x0:x0 + w])
            found = self._small[0].process(part)
            if found.detections:
                best = max(found.detections, key=lambda d: d.score[0])
                rel = best.location_data.relative_bounding_box
                return (x0 + (rel.xmin + rel.width / 2) * w, y0 + (rel.ymin + rel.height / 2) * h,
                        max(rel.width * w, rel.height * h))
        return None

    def detect_dense(self, image_rgb):
        """All 478 face-mesh points (478, 3): x, y in pixels, z in mediapipe's relative units."""
        return self._points(image_rgb)

    def detect(self, image_rgb):
        if self.dense:
            dense = self._points(image_rgb)
            landmarks = None if dense is None else dense[self._index, :2]
        else:
            dense, points = None, self._points(image_rgb, self._index)
            landmarks = None if points is None else points[:, :2]
        if landmarks is None:
            return None
        return Detection(landmarks, np.ones(68), _box_of(landmarks), self.name, dense=dense)

    def close(self):
        self._mesh.close()
        if self._small is not None:
            for graph in self._small:
                graph.close()


class DlibDetector(LandmarkDetector):
    """dlib's frontal face detector + 68-point shape predictor.

    Args:
        predictor_path: ``shape_predictor_68_face_landmarks.dat``; default: the file of the
            ``face-recognition-models`` package (non-commercial licence).
    """

    name = "dlib"

    def __init__(self, predictor_path=None):
        try:
            import dlib  # optional dependency (dlib): imported when the detector is made
        except ImportError as err:
            raise DetectorUnavailable(
                "the dlib detector needs `pip install dlib` (builds from source, ~7 min) and "
                "`pip install face-recognition-models` or a shape_predictor_68_face_landmarks.dat"
            ) from err
        if predictor_path is None:
            try:
                import face_recognition_models  # optional dependency (its predictor file)
            except ImportError as err:
                raise DetectorUnavailable(
                    "no predictor_path given and face-recognition-models is not installed "
                    "(`pip install face-recognition-models`)"
                ) from err
            predictor_path = face_recognition_models.pose_predictor_model_location()
        if not pathlib.Path(predictor_path).is_file():
            raise FileNotFoundError(f"dlib shape predictor not found: {predictor_path}")
        self._faces = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(os.fspath(predictor_path))

    def detect(self, image_rgb):
        image_rgb = check_image(image_rgb)
        faces = self._faces(image_rgb, 1)
        if len(faces) == 0:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self._shape(image_rgb, face)
        landmarks = np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=np.float64)
        box = np.array([face.left(), face.top(), face.right(), face.bottom()], dtype=np.float64)
        return Detection(landmarks, np.ones(68), box, self.name)


def load_landmarks_file(path):
    """Read landmarks from a file -> (N, 68, 2) float64.

    Formats: ``.npy`` (68, 2) or (N, 68, 2); ``.npz`` with key ``landmarks``; ``.txt``/``.csv``
    with 68 rows of "x y" (or "x,y") per frame, frames stacked; iBUG ``.pts``. NaN rows mark frames
    without a face.
    """
    path = pathlib.Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"landmark file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            points = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "landmarks" not in data.files:
                    raise ValueError(f"{path} has no 'landmarks' array (keys: {data.files})")
                points = data["landmarks"]
        elif suffix == ".pts":
            text = path.read_text(encoding="utf-8")
            body = text[text.index("{") + 1:text.index("}")]
            points = np.array([[float(v) for v in line.split()] for line in body.strip().splitlines()])
        else:
            text = path.read_text(encoding="utf-8").replace(",", " ")
            points = np.array([[float(v) for v in line.split()] for line in text.splitlines() if line.strip()])
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read landmarks from {path}: {err}") from None
    points = np.asarray(points, dtype=np.float64)
    if points.ndim == 2 and points.shape[1] == 2 and points.shape[0] % 68 == 0:
        points = points.reshape(-1, 68, 2)
    if points.ndim != 3 or points.shape[1:] != (68, 2):
        raise ValueError(f"landmarks in {path} must be (N, 68, 2), got {points.shape}")
    return points


class FileLandmarks(LandmarkDetector):
    """Landmarks from a file, returned frame by frame (one call of ``detect`` per frame)."""

    name = "file"

    def __init__(self, path):
        self._points = load_landmarks_file(path)
        self._next = 0

    def __len__(self):
        return len(self._points)

    def detect(self, image_rgb=None):
        if self._next >= len(self._points):
            raise ValueError(f"the landmark file has {len(self._points)} frames; more were requested")
        landmarks = self._points[self._next]
        self._next += 1
        if not np.isfinite(landmarks).all():
            return None
        return Detection(landmarks, np.ones(68), _box_of(landmarks), self.name)


DETECTORS = {"mediapipe": MediapipeDetector, "dlib": DlibDetector}


def make_detector(name, video=False, dense=True):
    """Build a detector by name ('mediapipe' or 'dlib'); raises DetectorUnavailable if not installed.
    ``dense``: keep mediapipe's full mesh in each Detection (False is faster)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {sorted(DETECTORS)}")
    if name == "mediapipe":
        return MediapipeDetector(video=video, dense=dense)
    return DlibDetector()
