"""The user-facing errors of the command layer, and the one place that turns domain errors into them."""
import contextlib
import sys

from ..data.format import DatasetError
from ..data.video import MediaError
from ..eval.options import EvalError
from ..output_folders import OutputFolderError, unless_input
from ..training.errors import TrainingError
from ..validation import InputError


class CommandError(Exception):
    """A user-facing error: printed as ``reenact: error: <message>``, exit status 1."""

    exit_status = 1


class UsageError(CommandError):
    """A command line that asks for something impossible (a bad option value): exit status 2,
    like argparse's own usage errors."""

    exit_status = 2


#: The errors that domain code raises for a problem the user can fix; ``reported()`` maps them.
DOMAIN_ERRORS = (TrainingError, EvalError, MediaError, DatasetError, OutputFolderError, InputError)

#: What loading a user's file or model raises when it is missing, malformed or needs an extra.
INPUT_ERRORS = (FileNotFoundError, ValueError, ImportError)


@contextlib.contextmanager
def reported(*errors, prefix="", usage=False):
    """Re-raise ``errors`` (default :data:`DOMAIN_ERRORS`) raised inside the block as a one-line
    :class:`CommandError` (a :class:`UsageError`, exit status 2, with ``usage``), its message
    after ``prefix``."""
    try:
        yield
    except (errors or DOMAIN_ERRORS) as err:
        raise (UsageError if usage else CommandError)(f"{prefix}{err}") from None


def output_path(out_dir, name, inputs):
    """``out_dir / name``, refused with a CommandError when it is one of the ``inputs``."""
    with reported(OutputFolderError):
        return unless_input(out_dir, name, inputs)


def report(message):
    """One line on stderr, whatever the message holds (newlines, text quoted from a library)."""
    print("reenact: error: " + " ".join(str(message).split()), file=sys.stderr)
