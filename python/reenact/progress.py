"""The one progress bar of the package: tqdm on stderr when it is installed, else a silent stand-in.

It sits at the bottom of the package (it imports nothing from ``reenact``) because the long loops
that show it, ``prepare``, ``train`` and ``eval``, live below the command layer and take a plain
``progress=True`` in their public APIs; ``reenact.cli`` re-exports it for the commands."""
import sys


class _Silent:
    def update(self, n=1):
        """No display."""

    def set_postfix(self, *args, **kwargs):
        """No display."""

    def close(self):
        """Nothing to close."""


def progress_bar(total, description, unit="frame", enabled=True, initial=0):
    """A bar counting ``unit``s up to ``total`` (None: unknown), or a stand-in with the same
    ``update``/``close`` when ``enabled`` is false or tqdm is missing."""
    if not enabled:
        return _Silent()
    try:
        from tqdm import tqdm  # optional dependency: the bar is a convenience
    except ImportError:
        return _Silent()
    return tqdm(total=total, initial=initial, desc=description, unit=unit, file=sys.stderr)
