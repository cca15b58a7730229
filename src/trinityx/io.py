"""Atomic artifact writes: a reader never sees a half-written file or folder."""

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
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


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as JSON to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    On an exception the temporary folder is removed and `path` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
