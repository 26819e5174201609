"""Run `reenact` command lines one after another in this process and report, per command line,
its exit status, its stderr and by how much it raised the process's peak memory.

    python hostile_runner.py CASES.json RESULTS.json

CASES.json is a list of argument lists. The peak is the kernel's high-water mark of resident
memory, so a command that allocated a gigabyte and freed it still shows. It is read from
/proc/self/status (VmHWM) after resetting it for each case (`5` to /proc/self/clear_refs), not
from ru_maxrss: a process started by fork and exec inherits its parent's ru_maxrss, which, from a
pytest process that has run the rest of the suite, is already about 2 GB, hiding every payload
below it. The parser is built (importing every command's modules) before the first case, so
imports count for none.
"""
import contextlib
import io
import json
import sys


def _status_mib(field):
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def start_case():
    """Resets the high-water mark to the current resident size -> that size in MiB."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")
    return _status_mib("VmRSS")


def peak_mib():
    return _status_mib("VmHWM")


def main(cases_path, results_path):
    from reenact import cli

    cli.build_parser()
    with open(cases_path, encoding="utf-8") as handle:
        cases = json.load(handle)
    results = []
    for argv in cases:
        before = start_case()
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = cli.main(argv)
            except SystemExit as exit_:  # argparse's usage errors
                status = exit_.code
            except BaseException as err:  # noqa: BLE001 - reported, so the test names the case
                status = f"raised {type(err).__name__}: {err}"
        results.append({"argv": argv, "status": status, "stderr": stderr.getvalue(),
                        "grew_mib": peak_mib() - before, "peak_mib": peak_mib()})
    with open(results_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
