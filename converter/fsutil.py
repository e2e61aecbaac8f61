"""Output files appear whole or not at all: write to a temp file beside the target, then rename."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import AtdError


def check_output_path(path: Path, force: bool) -> Path:
    """Refuse an existing output (unless force), a directory, or a missing parent directory."""
    path = Path(path)
    if path.is_dir():
        raise AtdError(f"{path} is a directory")
    if path.exists() and not force:
        raise AtdError(f"{path} exists (use --force to overwrite)")
    if not path.parent.is_dir():
        raise AtdError(f"{path.parent}: no such directory for the output")
    return path


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_output(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it onto `path` on success, delete it on any failure."""
    path = check_output_path(path, force)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode())  # mkstemp made it 0600; a plain new file honours the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
