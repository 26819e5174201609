"""A progress bar on stderr (tqdm when installed), or a silent stand-in."""
import sys


class _Silent:
    def update(self, n=1):
        """No display."""

    def close(self):
        """Nothing to close."""


def progress_bar(total, description, unit, enabled=True):
    if not enabled:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr)
