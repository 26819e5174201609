"""Run `reenact` command lines one after another in this process and report, per command line,
its exit status, its stderr and by how much it raised the process's peak memory.

    python hostile_runner.py CASES.json RESULTS.json

CASES.json is a list of argument lists. The peak is the kernel's high-water mark of resident
memory (ru_maxrss), so a command that allocated a gigabyte and freed it still shows. The parser
is built (importing every command's modules) before the first case, so imports count for none.
"""
import contextlib
import io
import json
import resource
import sys


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(cases_path, results_path):
    from reenact import cli

    cli.build_parser()
    with open(cases_path, encoding="utf-8") as handle:
        cases = json.load(handle)
    results = []
    for argv in cases:
        before = peak_mib()
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
