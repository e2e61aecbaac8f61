"""Output files appear whole or not at all: write to a temp file beside the target, then rename.

The temp file is `.NAME.XXXXXXXX.tmp` (tempfile.mkstemp), flock'ed by its writer for as long as
it is written: a later run for the same output removes such files only when nobody holds the
lock (their writer died, e.g. by SIGKILL). The final rename never replaces a file that appeared
meanwhile (another conversion to the same path) unless --force.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import AtdError

# temp files older than this process are candidates for stale-temp removal; younger ones may
# belong to a writer that has not locked its file yet
_PROCESS_START = time.time()


def check_output_path(path: Path, force: bool) -> Path:
    """Refuse an existing output (unless force), anything but a regular file even with force (a
    device, a FIFO, a socket), a directory, or a missing parent directory."""
    path = Path(path)
    if path.is_dir():
        raise AtdError(f"{path} is a directory")
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        existing = None
    except OSError as e:
        raise AtdError(f"{path}: cannot use as output ({e.strerror})") from None
    if existing is not None:
        if not force:
            raise AtdError(f"{path} exists (use --force to overwrite)")
        if not stat.S_ISREG(existing.st_mode):
            raise AtdError(f"{path} is not a regular file; --force only replaces regular files")
    if not path.parent.is_dir():
        raise AtdError(f"{path.parent}: no such directory for the output")
    return path


def refuse_inputs_as_output(output: Path, inputs: Iterable[Path]) -> None:
    """The output must not be (a link to) any file the command reads."""
    output = Path(output)
    if not output.exists():
        return
    for source in inputs:
        try:
            same = os.path.samefile(output, source)
        except OSError:
            continue
        if same:
            raise AtdError(f"{output}: the output is the input file {source}; choose another output")


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_name_pattern(path: Path) -> re.Pattern:
    # exactly what tempfile.mkstemp(prefix=".NAME.", suffix=".tmp") makes: 8 chars of [a-z0-9_]
    return re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")


def remove_stale_temps(path: Path) -> list[str]:
    """Delete our temp files for `path` whose writer is gone: regular files of this user, named
    by our exact pattern, older than this process and not flock'ed. Returns the names removed."""
    pattern = _temp_name_pattern(path)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            before = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if (not stat.S_ISREG(before.st_mode) or before.st_uid != os.geteuid()
                or before.st_mtime >= _PROCESS_START):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is alive
            now = os.lstat(entry.path)
            if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Linux renameat2(RENAME_NOREPLACE): True when renamed; False when the kernel, the C library
    or the file system lacks it. FileExistsError when dst exists."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_noreplace = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _publish(tmp: Path, path: Path, force: bool) -> None:
    """Move the finished temp file onto `path`: replacing only with force, and then only a regular file."""
    if force:
        check_output_path(path, force=True)
        os.replace(tmp, path)
        return
    appeared = AtdError(f"{path} was created by another process while this one wrote it; "
                        "left it as it is (use --force to overwrite)")
    try:
        if _rename_noreplace(tmp, path):
            return
        os.link(tmp, path)  # fails if path exists; then the temp name goes
    except FileExistsError:
        raise appeared from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        # a file system without hard links: the narrowest check-then-rename available
        if os.path.lexists(path):
            raise appeared from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename itself has happened
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: Path, force: bool, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success make it `path` (synced to disk), delete it on any
    failure. `inputs`: files the caller reads, which the output must not be."""
    path = check_output_path(path, force)
    refuse_inputs_as_output(path, inputs)
    remove_stale_temps(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # "in use" for remove_stale_temps of other processes
        os.fchmod(fd, _new_file_mode())  # mkstemp made it 0600; a plain new file honours the umask
        yield tmp
        named, ours = os.lstat(tmp), os.fstat(fd)
        if (named.st_dev, named.st_ino) != (ours.st_dev, ours.st_ino):
            raise AtdError(f"{tmp}: the temp file was replaced by another file while writing; output not written")
        os.fsync(fd)
        _publish(tmp, path, force)
        _fsync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
