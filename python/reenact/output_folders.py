"""Output folders: which folders a command may write into, and deleting that never follows a link.

RELIABILITY.md item 17. A command that writes into a folder leaves a marker file in it
(``.reenact-<command>``) when it creates or first claims the folder. It later reuses a folder
only when it finds its own marker there; a non-empty folder without one is the user's and is
refused unless they pass ``--overwrite`` (or ``--resume`` where the command has one).

Deleting goes through :func:`remove_inside`, which refuses a path that reaches its target through
a symbolic link and removes trees without following the links inside them, so a link planted in
an output folder never lets a rerun delete anything outside it.
"""
import os
import pathlib
import shutil
import stat


class OutputFolderError(ValueError):
    """An output folder the command may not write into or delete from (the message says why)."""


def unless_input(folder, name, inputs):
    """``folder / name``, refused when it is one of the ``inputs`` (a command never writes over its input)."""
    path = pathlib.Path(folder) / name
    if any(path.resolve() == pathlib.Path(i).resolve() for i in inputs):
        raise OutputFolderError(f"refusing to overwrite the input {path}")
    return path


def marker_path(folder, command):
    return pathlib.Path(folder) / f".reenact-{command}"


def owns(folder, command):
    """Whether ``folder`` holds ``command``'s marker as a regular file (a link does not count)."""
    try:
        return stat.S_ISREG(os.lstat(marker_path(folder, command)).st_mode)
    except OSError:
        return False


def is_empty_folder(folder):
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def check_claim(folder, command, *, flag="--out", overwrite=False, escape=None):
    """Raise OutputFolderError unless ``command`` may write into ``folder``: it does not exist
    yet, is empty, holds ``command``'s marker, or ``overwrite`` is set. ``escape`` is the option
    the message offers (``--overwrite``), if the command has one."""
    folder = pathlib.Path(folder)
    if not folder.exists():
        if folder.is_symlink():
            raise OutputFolderError(f"{flag} {folder} is a symbolic link to nothing")
        existing = next(parent for parent in folder.absolute().parents if parent.exists())
        if not existing.is_dir():
            raise OutputFolderError(f"{flag} {folder} cannot be created: {existing} is not a folder")
        return
    if not folder.is_dir():
        raise OutputFolderError(f"{flag} must be a directory: {folder}")
    try:
        if overwrite or owns(folder, command) or is_empty_folder(folder):
            return
    except OSError as err:
        raise OutputFolderError(f"{flag} {folder}: cannot read the folder ({err.strerror})") from None
    hint = f", or pass {escape} to write into it anyway" if escape else ""
    raise OutputFolderError(f"{flag} {folder} is a non-empty folder that `reenact {command}` did not create; "
                            f"choose a new or empty folder{hint}")


def claim(folder, command, note, **check):
    """Create ``folder`` (or reuse it, per :func:`check_claim`) and write ``command``'s marker."""
    folder = pathlib.Path(folder)
    check_claim(folder, command, **check)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_marker(folder, command, note)
    except OSError as err:
        raise OutputFolderError(f"{check.get('flag', '--out')} {folder}: cannot write there "
                                f"({err.strerror or err})") from None


def write_marker(folder, command, note):
    """Write the marker without following a link planted in its place (O_NOFOLLOW: a link there
    fails with ELOOP instead of truncating the file it points to)."""
    path = marker_path(folder, command)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(descriptor, "w") as file:
        file.write(f"written by `reenact {command}`: {note}\n")


def check_no_links(root, path):
    """Raise OutputFolderError when ``path`` (inside ``root``) or any folder between them is a
    symbolic link, or ``path`` is not inside ``root``."""
    root, path = pathlib.Path(root), pathlib.Path(path)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise OutputFolderError(f"{path} is not inside {root}") from None
    current = root
    for part in parts:
        if part in ("", ".", ".."):
            raise OutputFolderError(f"{path} is not a plain path inside {root}")
        current = current / part
        if current.is_symlink():
            raise OutputFolderError(f"{current} is a symbolic link; refusing to write or delete through it "
                                    f"(remove the link or choose another output folder)")


def remove_inside(root, path):
    """Delete ``path`` (a file or a tree inside ``root``) if it exists, never through a link:
    a link on the way from ``root`` is refused (:func:`check_no_links`) and links inside the tree
    are removed, not followed (``shutil.rmtree`` works on directory descriptors here)."""
    check_no_links(root, path)
    path = pathlib.Path(path)
    if not path.exists():
        return
    if path.is_dir():
        if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - every Linux and macOS Python has it
            raise OutputFolderError(f"refusing to delete {path}: this platform's rmtree may follow links")
        shutil.rmtree(path)
    else:
        path.unlink()


def fresh_folder(root, path):
    """``path`` inside ``root``, emptied (:func:`remove_inside`) and created anew."""
    remove_inside(root, path)
    pathlib.Path(path).mkdir(parents=True)
    return pathlib.Path(path)
