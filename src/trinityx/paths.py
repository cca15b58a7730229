"""Paths a command builds from names and flags: names stay plain, and outputs are checked before any work."""

import os
import re
import tempfile
from pathlib import Path

from trinityx.errors import TrinityXError

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
"""A name that becomes one folder name (an expert, a dimension): no separator, no `..`, no leading dot."""


def check_name(name: str, where: str) -> str:
    """`name` if it is a plain name, so a path built from it stays inside its folder; else an error naming `where`."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise TrinityXError(f"{where}: {name!r} is not a plain name; use letters, digits, '_' and '-' only "
                            "(a name becomes a folder name, so it may not hold '/', '..' or start with '.')")
    return name


def check_writable(path: str | Path, flag: str) -> None:
    """Fail before any work when `path` (a file or folder a command will write) cannot be created there.

    Creates and removes a temporary file in `path` when it is a folder, else in its nearest existing parent:
    permission bits alone do not tell (root ignores them; /proc and read-only mounts refuse anyway)."""
    path = Path(path).absolute()
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise TrinityXError(f"{flag} {path} cannot be written: {parent} is a file, not a folder; choose another path")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".trinityx-write-check.")
    except OSError as e:
        raise TrinityXError(f"{flag} {path} cannot be written ({e.strerror} in {parent}); choose a folder you can "
                            "write to") from None
    os.close(fd)
    os.unlink(tmp)
