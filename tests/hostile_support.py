"""Helpers of the hostile-input tests: checksums of the files around a target, and a `reenact`
subprocess whose exit code, stderr and peak memory (RSS high-water mark) are measured."""
import hashlib
import os
import pathlib
import subprocess
import sys

from train_support import subprocess_env

#: Prints the child's peak RSS (ru_maxrss of the waited-for child, in KiB on Linux) after running
#: `reenact` with the given arguments, so memory is measured in a process of its own.
_MEASURE = """
import resource, subprocess, sys
child = subprocess.run([sys.executable, "-m", "reenact"] + sys.argv[1:], capture_output=True)
sys.stdout.buffer.write(child.stdout)
sys.stderr.buffer.write(child.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(child.returncode)
"""


def tree_digest(root):
    """{relative path: sha256 or link target} of everything under ``root``, links not followed."""
    root = pathlib.Path(root)
    digest = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = pathlib.Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                digest[key] = "-> " + os.readlink(path)
            elif path.is_file():
                digest[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                digest[key] = "dir"
    return digest


class Result:
    def __init__(self, code, stdout, stderr, peak_mib):
        self.code, self.stdout, self.stderr, self.peak_mib = code, stdout, stderr, peak_mib

    def one_line_error(self):
        """Whether stderr is exactly one `reenact: error:` line (no traceback)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return len(lines) == 1 and lines[0].startswith("reenact: error: ")


def run_reenact(args, cwd=None, timeout=300):
    """Run ``python -m reenact ARGS`` in a subprocess -> Result with its peak RSS in MiB."""
    process = subprocess.run([sys.executable, "-c", _MEASURE] + [str(a) for a in args], capture_output=True,
                             text=True, errors="replace", env=subprocess_env(), cwd=cwd, timeout=timeout)
    *stderr, peak = process.stderr.rstrip("\n").split("\n")
    return Result(process.returncode, process.stdout, "\n".join(stderr), int(peak) / 1024)
