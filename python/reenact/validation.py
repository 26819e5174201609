"""One validation layer for everything ``reenact`` reads from a file (RELIABILITY.md items 18-19).

Every size that comes from a file (a JSON document's nesting, an ``.npz`` member's header shape,
a safetensors header, an image header, what a pickle asks to construct) is checked against a
documented limit *before* anything of that size is allocated, and every refusal is an
:class:`InputError` (a ValueError) whose message names the file and the problem in one line.

The limits (module constants below) are far above any real input of this project:

==========================  ===================  ==================================================
limit                       value                a real input of this project
==========================  ===================  ==================================================
MAX_JSON_BYTES              16 MiB               config, checkpoint metadata: a few KiB
MAX_JSON_DEPTH              32                   configs nest 3 deep
MAX_MANIFEST_LINE_BYTES     64 KiB               one manifest line: ~300 bytes
MAX_NPZ_BYTES               2 GiB                BFM 2009 bases: ~200 MB; a clip's parameters: KiB
MAX_COMPRESSION_RATIO       200                  float arrays compress 1-3x (zeros ~1000x: a bomb)
MAX_SAFETENSORS_HEADER      64 MiB               a checkpoint's header: ~100 KiB
MAX_WEIGHTS_BYTES           8 GiB                IResNet-100: 260 MB, Inception-v3: 100 MB
MAX_PICKLE_BYTES            2 GiB                3DDFA_V2's bfm_noneck_v3.pkl: ~100 MB
MAX_IMAGE_PIXELS            64 Mpx (8192^2)      a 4K frame: 8.3 Mpx
MIN_IMAGE_SIDE              16 px                a face crop needs more than a pixel
==========================  ===================  ==================================================
"""
import io
import json
import math
import os
import pathlib
import pickle
import struct
import zipfile

import numpy as np

MiB = 1 << 20
MAX_JSON_BYTES = 16 * MiB
MAX_JSON_DEPTH = 32
MAX_MANIFEST_LINE_BYTES = 64 * 1024
MAX_NPZ_BYTES = 2048 * MiB
MAX_COMPRESSION_RATIO = 200
#: Members below this size may compress better than MAX_COMPRESSION_RATIO (masks of zeros).
_SMALL_MEMBER_BYTES = MiB
MAX_SAFETENSORS_HEADER = 64 * MiB
MAX_WEIGHTS_BYTES = 8192 * MiB
MAX_PICKLE_BYTES = 2048 * MiB
MAX_IMAGE_PIXELS = 8192 * 8192
MIN_IMAGE_SIDE = 16
#: Longest file name component and path that a file may name (Linux's NAME_MAX and PATH_MAX).
MAX_NAME_BYTES, MAX_PATH_BYTES = 255, 4096


class InputError(ValueError):
    """A file (or a field in one) that is malformed, out of range or too large; the message names
    the file and the problem."""


def one_line(text):
    """``text`` as one line (messages quoted from libraries may span several)."""
    return " ".join(str(text).split()) or "no details"


# -- JSON ------------------------------------------------------------------------------------------

def _depth(value, limit, level=1):
    if level > limit:
        return level
    if isinstance(value, dict):
        return max([level] + [_depth(v, limit, level + 1) for v in value.values()])
    if isinstance(value, list):
        return max([level] + [_depth(v, limit, level + 1) for v in value])
    return level


def parse_json(text, where, max_depth=MAX_JSON_DEPTH):
    """Parse JSON text (str or UTF-8 bytes) -> its value; InputError naming ``where`` otherwise.
    Nesting deeper than ``max_depth`` is refused (the parser recurses per level)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{where}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply (the limit is {max_depth} levels)") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err})") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise InputError(f"{where}: not valid JSON ({one_line(err)})") from None
    if _depth(value, max_depth) > max_depth:
        raise InputError(f"{where}: JSON nested too deeply (the limit is {max_depth} levels)")
    return value


def read_json(path, what, max_bytes=MAX_JSON_BYTES):
    """A JSON file of at most ``max_bytes`` -> its value (InputError naming the file otherwise)."""
    path = pathlib.Path(os.fspath(path))
    data = read_bytes(path, what, max_bytes)
    return parse_json(data, f"{what} {path}")


def read_bytes(path, what, max_bytes):
    """The bytes of a file no larger than ``max_bytes``."""
    path = pathlib.Path(os.fspath(path))
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InputError(f"{what} {path}: not a file")
        if size > max_bytes:
            raise InputError(f"{what} {path}: {size} bytes is over the limit of {max_bytes}")
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as err:
        raise InputError(f"{what} {path}: cannot read it ({err.strerror or one_line(err)})") from None


# -- plain values ----------------------------------------------------------------------------------

def is_int(value):
    """Whether ``value`` is an int and not a bool (``True`` is an int to Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    """Whether ``value`` is an int or a float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(value, where, low=None, high=None):
    """``value`` as an int in [low, high] (bools and floats refused)."""
    if not is_int(value):
        raise InputError(f"{where} must be an integer, got {type(value).__name__} {_short(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{where} must be in [{low}, {high}], got {value}")
    return value


def number(value, where, low=None, high=None):
    """``value`` as a finite float in [low, high]."""
    if not is_number(value):
        raise InputError(f"{where} must be a number, got {type(value).__name__} {_short(value)}")
    if isinstance(value, int) and abs(value) > 2 ** 63:
        raise InputError(f"{where} is out of range: {_short(value)}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{where} must be a finite number in [{low}, {high}], got {_short(value)}")
    return value


def string(value, where, max_length=MAX_PATH_BYTES):
    if not isinstance(value, str):
        raise InputError(f"{where} must be a string, got {type(value).__name__} {_short(value)}")
    if len(value) > max_length:
        raise InputError(f"{where} is {len(value)} characters long (the limit is {max_length})")
    return value


def mapping(value, where):
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a JSON object, got {type(value).__name__} {_short(value)}")
    return value


def relative_path(value, where):
    """A relative POSIX path inside a folder: no '..', not absolute, every name within NAME_MAX."""
    string(value, where)
    path = pathlib.PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\x00" in value:
        raise InputError(f"{where} must be a relative path inside the dataset, got {_short(value)}")
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for part in path.parts):
        raise InputError(f"{where} has a name longer than {MAX_NAME_BYTES} bytes: {_short(value)}")
    return value


def _short(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# -- .npz ------------------------------------------------------------------------------------------

def _member_header(archive, info, where):
    """(shape, dtype, header length) of one ``.npy`` member, from its header alone."""
    with archive.open(info) as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle, max_header_size=10000)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle, max_header_size=10000)
            else:
                raise ValueError(f"unknown .npy version {version}")
        except (ValueError, TypeError, SyntaxError, EOFError) as err:
            raise InputError(f"{where}: member {info.filename!r} has a malformed .npy header "
                             f"({one_line(err)})") from None
        return shape, dtype, handle.tell()


def check_npz(path, what, max_bytes=MAX_NPZ_BYTES):
    """Check an ``.npz`` from its directory and headers alone -> {name: (shape, dtype)}.

    Refused before any array is read: object (pickled) arrays, a header whose shape and dtype do
    not account for exactly the member's stated size, members that are not ``.npy``, totals over
    ``max_bytes``, and members compressed more than MAX_COMPRESSION_RATIO (a zip bomb)."""
    path = pathlib.Path(os.fspath(path))
    where = f"{what} {path}"
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise InputError(f"cannot read {where}: not a valid .npz ({one_line(err)})") from None
    found, total = {}, 0
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise InputError(f"{where}: member {info.filename!r} is not an .npy array")
            total += info.file_size
            if total > max_bytes:
                raise InputError(f"{where}: its arrays hold over {max_bytes} bytes (the limit)")
            if info.file_size > _SMALL_MEMBER_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(
                    info.compress_size, 1):
                raise InputError(f"{where}: member {info.filename!r} expands {info.file_size // max(info.compress_size, 1)}"
                                 f"-fold (over {MAX_COMPRESSION_RATIO}): refusing a possible zip bomb")
            try:
                shape, dtype, header = _member_header(archive, info, where)
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as err:
                raise InputError(f"{where}: member {info.filename!r} cannot be read ({one_line(err)})") from None
            if dtype.hasobject:
                raise InputError(f"{where}: member {info.filename!r} holds Python objects (pickles are refused)")
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes != info.file_size - header:
                raise InputError(f"{where}: member {info.filename!r} claims shape {shape} of {dtype} "
                                 f"({nbytes} bytes) but stores {info.file_size - header} bytes")
            found[info.filename[:-len(".npy")]] = (shape, dtype)
    return found


def read_npz(path, what, max_bytes=MAX_NPZ_BYTES):
    """All arrays of an ``.npz``, checked by :func:`check_npz` first and read without pickles."""
    check_npz(path, what, max_bytes)
    path = pathlib.Path(os.fspath(path))
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"cannot read {what} {path}: not a valid .npz without pickles ({one_line(err)})") from None


# -- safetensors -----------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                       "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path, what, max_bytes=MAX_WEIGHTS_BYTES):
    """Check a ``.safetensors`` file's header against its size -> (tensor entries, metadata).

    The header length, every dtype, shape and byte range are checked so that no tensor reaches
    outside the file or overlaps another, before the safetensors library reads anything."""
    path = pathlib.Path(os.fspath(path))
    where = f"cannot read {what} {path}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InputError(f"{where}: not a safetensors file ({size} bytes, too short for its header)")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise InputError(f"{where}: not a safetensors file (its header claims {header_size} bytes; "
                                 f"the file has {size})")
            header_bytes = handle.read(header_size)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{where}: not a file") from None
    except OSError as err:
        raise InputError(f"{where}: cannot read it ({err.strerror or one_line(err)})") from None
    if size > max_bytes:
        raise InputError(f"{where}: {size} bytes is over the limit of {max_bytes}")
    header = mapping(parse_json(header_bytes, f"{where} (header)"), f"{where}: the header")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InputError(f"{where}: its __metadata__ must map strings to strings")
    data_size = size - 8 - header_size
    ranges = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise InputError(f"{where}: tensor {_short(name)} has a malformed entry")
        itemsize = _SAFETENSORS_DTYPES.get(entry["dtype"])
        shape, offsets = entry["shape"], entry["data_offsets"]
        if itemsize is None:
            raise InputError(f"{where}: tensor {_short(name)} has an unknown dtype {_short(entry['dtype'])}")
        if not isinstance(shape, list) or not all(is_int(n) and n >= 0
                                                  for n in shape):
            raise InputError(f"{where}: tensor {_short(name)} has a malformed shape {_short(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                is_int(n) for n in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise InputError(f"{where}: tensor {_short(name)} reaches outside the file ({_short(offsets)})")
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise InputError(f"{where}: tensor {_short(name)} of shape {shape} does not fill its "
                             f"{offsets[1] - offsets[0]} bytes")
        ranges.append(offsets)
    ranges.sort()
    if any(previous[1] > current[0] for previous, current in zip(ranges, ranges[1:])):
        raise InputError(f"{where}: tensors overlap in the file")
    return header, metadata


def check_finite(tensors, where):
    """Refuse NaN or infinite values in any floating-point tensor of a {name: tensor} mapping."""
    import torch  # start-up time: the file checks above need numpy only

    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise InputError(f"{where}: tensor {name} has NaN or infinite values")


# -- images ----------------------------------------------------------------------------------------

def open_image(path, what="image", min_side=MIN_IMAGE_SIDE):
    """Read an image as (H, W, 3) uint8 RGB after checking its header's size: no side under
    ``min_side`` and no more than MAX_IMAGE_PIXELS pixels (a 30000x30000 PNG header is refused
    before its pixels are decoded)."""
    from PIL import Image, UnidentifiedImageError  # optional dependency (pillow): only images need it

    path = pathlib.Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} {path}: not a file")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(f"{what} {path}: {width}x{height} pixels is over the limit of "
                                 f"{MAX_IMAGE_PIXELS} pixels")
            if min(width, height) < min_side:
                raise InputError(f"{what} {path}: {width}x{height} is too small (each side needs at least "
                                 f"{min_side} pixels)")
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError:  # Pillow's own (higher) limit, checked when it opens the header
        raise InputError(f"{what} {path}: its header claims more than the limit of {MAX_IMAGE_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"cannot read {what} {path}: {one_line(err)}") from None


# -- pickles ---------------------------------------------------------------------------------------

class _ArrayClass:
    """What ``numpy.ndarray`` unpickles to: a token that ``_reconstruct`` accepts as its class and
    that cannot be called (``ndarray(shape)`` would allocate any size the file asks for)."""


def _too_large(value, limit):
    return isinstance(value, range) and len(value) > limit


def _shape_too_large(shape, limit):
    if isinstance(shape, int):
        shape = (shape,)
    return isinstance(shape, (tuple, list)) and all(isinstance(n, int) for n in shape) \
        and math.prod(abs(n) for n in shape) > limit


def _guard(function, limit, name, integer_is_size=False):
    """``function`` refusing any argument that asks for more than ``limit`` items or bytes."""
    def guarded(*args):
        for value in args:
            if (integer_is_size and is_int(value) and abs(value) > limit) \
                    or _too_large(value, limit):
                raise pickle.UnpicklingError(f"{name} asks for {_short(value)} items, over this file's size "
                                             f"({limit} bytes)")
        return function(*args)

    return guarded


def _reconstruct_guard(function, limit):
    def reconstruct(cls, shape, dtype):
        if cls is _ArrayClass:
            cls = np.ndarray
        if not (isinstance(cls, type) and issubclass(cls, np.ndarray)):
            raise pickle.UnpicklingError("numpy _reconstruct of something other than an array")
        if _shape_too_large(shape, limit):
            raise pickle.UnpicklingError(f"an array of shape {_short(shape)} is larger than this file")
        return function(cls, shape, dtype)

    return reconstruct


def _frombuffer_guard(function, limit):
    def frombuffer(buffer, dtype, shape, order):
        if _shape_too_large(shape, limit):
            raise pickle.UnpicklingError(f"an array of shape {_short(shape)} is larger than this file")
        return function(buffer, dtype, shape, order)

    return frombuffer


class RestrictedUnpickler(pickle.Unpickler):
    """Reconstructs numpy arrays, numpy scalars and builtin containers only, and nothing larger
    than the file itself: every size a pickle passes to what it may construct (``bytearray(n)``,
    ``list(range(n))``, an array's shape) is capped at ``limit``, the file's size in bytes."""

    _NUMPY = {"_reconstruct", "scalar", "_frombuffer"}
    _NUMPY_MODULES = {"numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric"}
    _BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                 "bytearray", "bool", "slice", "range"}

    def __init__(self, file, limit, **kwargs):
        super().__init__(file, **kwargs)
        self.limit = limit

    def find_class(self, module, name):
        if module in self._NUMPY_MODULES and name in self._NUMPY:
            function = super().find_class(module, name)
            if name == "_reconstruct":
                return _reconstruct_guard(function, self.limit)
            if name == "_frombuffer":
                return _frombuffer_guard(function, self.limit)
            return function  # scalar(dtype, bytes): as large as the bytes in the file
        if (module, name) == ("numpy", "ndarray"):
            return _ArrayClass
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # protocol-2 pickles of Python 3 store array bytes so
            return _guard(super().find_class(module, name), self.limit, "_codecs.encode")
        if module == "builtins" and name in self._BUILTINS:
            return _guard(super().find_class(module, name), self.limit, f"builtins.{name}",
                          integer_is_size=name in ("bytes", "bytearray"))
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and builtin "
                                     f"containers are allowed")


def load_pickle(path, what="pickle", max_bytes=MAX_PICKLE_BYTES):
    """Load a pickle of numpy arrays and builtins without running code from it or building anything
    larger than it (:class:`RestrictedUnpickler`). FileNotFoundError or InputError otherwise."""
    path = pathlib.Path(os.fspath(path))
    data = read_bytes(path, what, max_bytes)
    try:
        return RestrictedUnpickler(io.BytesIO(data), limit=max(len(data), 1024), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise InputError(f"unsafe or invalid pickle {path}: {one_line(err)}") from None
    except (EOFError, AttributeError, ImportError, IndexError, KeyError, TypeError, ValueError, OverflowError,
            MemoryError, RecursionError, struct.error) as err:
        raise InputError(f"cannot read pickle {path}: {type(err).__name__}: {one_line(err)}") from None
