"""Helpers of the hostile-input tests: checksums of the files around a target, adversarial files,
and `reenact` command lines run in a subprocess whose peak memory is measured per command line."""
import hashlib
import json
import os
import pathlib
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np

from train_support import subprocess_env

HERE = pathlib.Path(__file__).resolve().parent
#: How far one refused command line may raise the peak memory of the process that runs it (the
#: refused payloads below would take 1.5 GB or more; a command's own first-use costs stay below).
GROWTH_BOUND_MIB = 400
#: The peak of a whole table, imports and all (torch alone is ~300 MiB).
PEAK_BOUND_MIB = 1500


def tree_digest(root, skip=()):
    """{relative path: sha256, link target or 'dir'} of everything under ``root``, links not
    followed, leaving out the paths in ``skip`` (outputs) and what lies under them."""
    root = pathlib.Path(root)
    skip = {pathlib.Path(s) for s in skip}
    digest = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = pathlib.Path(folder) / name
            if any(path == s or s in path.parents for s in skip):
                continue
            key = str(path.relative_to(root))
            if path.is_symlink():
                digest[key] = "-> " + os.readlink(path)
            elif path.is_file():
                digest[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                digest[key] = "dir"
    return digest


def run_cases(argvs, scratch):
    """Run each argument list through ``reenact`` in one subprocess (tests/hostile_runner.py)
    -> one dict per case: status, stderr, grew_mib, peak_mib."""
    scratch = pathlib.Path(scratch)
    scratch.mkdir(exist_ok=True)
    cases, results = scratch / "cases.json", scratch / "results.json"
    cases.write_text(json.dumps([[str(a) for a in argv] for argv in argvs]), encoding="utf-8")
    env = dict(subprocess_env(), PYTHONPATH=subprocess_env()["PYTHONPATH"] + os.pathsep + str(HERE))
    process = subprocess.run([sys.executable, str(HERE / "hostile_runner.py"), str(cases), str(results)],
                             capture_output=True, text=True, env=env, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(results.read_text(encoding="utf-8"))


def check_case(result, status, fragment):
    """The case's exit status, one `reenact: error:` line holding ``fragment`` and ending stderr
    (warnings logged before it, e.g. a skipped clip's, may precede it), no traceback, bounded memory."""
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    label = f"{result['argv'][:1]} -> {result['status']}: {result['stderr'][-600:]!r}"
    assert result["status"] == status, label
    errors = [line for line in lines if line.startswith("reenact: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result["stderr"], label
    assert fragment in errors[0], label
    assert result["grew_mib"] < GROWTH_BOUND_MIB and result["peak_mib"] < PEAK_BOUND_MIB, \
        f"{label}: peak grew {result['grew_mib']:.0f} MiB to {result['peak_mib']:.0f} MiB"


# -- adversarial files -----------------------------------------------------------------------------

def png_header(path, width, height):
    """A PNG whose header claims ``width`` x ``height`` (one tiny, wrong-sized data chunk)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def npz_with_header(path, name, shape, dtype="<f8"):
    """An .npz whose member's header claims ``shape`` but that stores a few bytes."""
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    member = pathlib.Path(path).with_suffix(".npy.tmp")
    with open(member, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(b"\0" * 64)
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(member, name + ".npy")
    member.unlink()
    return path


def zip_bomb_npz(path, name, megabytes):
    """An .npz of one all-zero float64 array of ``megabytes`` MiB, deflated to about 1/1000."""
    count = megabytes * (1 << 20) // 8
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open(name + ".npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "<f8", "fortran_order": False, "shape": (count,)})
            block = bytes(1 << 20)
            for _ in range(megabytes):
                handle.write(block)
    return path


def pickle_allocating(path, count):
    """A pickle that calls only the allowed ``builtins.bytearray`` with ``count``."""
    path.write_bytes(b"cbuiltins\nbytearray\n(I" + str(count).encode() + b"\ntR.")
    return path


def pickle_payload(path, marker):
    """A pickle that would create ``marker`` through os.system if it were ever unpickled."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    path.write_bytes(pickle.dumps({"payload": Payload()}))
    return path
