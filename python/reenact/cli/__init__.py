"""The ``reenact`` command line: one subcommand per task, each in its subsystem's ``commands.py``.

Add a subcommand by giving a subsystem's ``commands.py`` an ``add_parser(subparsers)`` that sets
``func`` (its ``run``) and listing the module in ``COMMANDS``. Errors a user can fix (missing
files, unreadable media, missing extras) are reported as one line on stderr with exit status 1
(2 for a bad option value, :class:`UsageError`), never as a traceback; ``reenact --debug COMMAND
...`` shows it. Only this package and the ``commands.py`` modules import ``reenact.cli``.

Paths that start with '-' must follow ``--``:  ``reenact pncc --out out -- -face.png``.
"""
import argparse
import sys

from ..data import commands as data_commands
from ..demo import commands as demo_commands
from ..eval import commands as eval_commands
from ..face3d import commands as face3d_commands
from ..inference import commands as inference_commands
from ..progress import progress_bar
from ..training import commands as training_commands
from ..validation import InputError
from .errors import CommandError, UsageError, output_path, report

__all__ = ["COMMANDS", "CommandError", "UsageError", "build_parser", "main", "output_path", "progress_bar"]

#: The subsystems' command modules, in the order of `reenact --help`.
COMMANDS = [face3d_commands, data_commands, training_commands, inference_commands, eval_commands, demo_commands]


def build_parser():
    parser = argparse.ArgumentParser(prog="reenact", description="Identity-matched PNCC face reenactment.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv=None):
    """Entry point of the ``reenact`` script; returns the exit status.

    Every failure ends in one ``reenact: error:`` line (RELIABILITY.md item 19): status 2 for a
    usage error, 1 for anything at run time, and a traceback only with ``reenact --debug``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CommandError as err:
        if args.debug:
            raise
        report(err)
        return err.exit_status
    except KeyboardInterrupt:
        print("reenact: interrupted", file=sys.stderr)
        return 130
    except InputError as err:  # a file that the validation layer refused, where no command reworded it
        if args.debug:
            raise
        report(err)
        return 1
    except OSError as err:  # e.g. an unwritable output, a name the file system refuses
        if args.debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        report(f"{args.command}: {where}{err.strerror or err}")
        return 1
    except MemoryError:
        if args.debug:
            raise
        report(f"{args.command}: out of memory (rerun with --debug for the traceback)")
        return 1
    except Exception as err:  # noqa: BLE001 - the last line of defence: no traceback for users
        if args.debug:
            raise
        report(f"{args.command}: unexpected {type(err).__name__}: {err} (rerun with `reenact --debug "
               f"{args.command} ...` for the traceback, and please report it)")
        return 1
