"""Writing files atomically: a temporary file beside the target, renamed over it, so a reader sees
the old file or the new one, never half of one; the temporary files of a writer killed midway are
removed by the next write of the same file. ``atomic_write_files`` writes several files of a folder
(and removes others) as one unit.

A temporary file is named ``.<name>.<pid>-<random>.tmp``: the writer's process id tells the next
writer whether it is still running (its file is left alone) or gone (its file is an orphan).

A failed write raises OSError whatever the writer raised on I/O (safetensors reports a full disk as
a SafetensorError "... (os error 28)"; here it is ``OSError(ENOSPC, ..., path)``).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from safetensors import SafetensorError


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path`` (same directory, which
    must exist). The file gets the permissions a plain ``open(path, "w")`` would (mkstemp's are
    owner-only). Orphaned temporary files of ``path`` are removed first."""
    path = Path(path)
    tmp = _written_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_files(writes: Mapping[Path, Callable[[str], None]], remove: Iterable[Path] = ()) -> None:
    """Write the files ``writes`` (path -> ``write(tmp_path)``, as for ``atomic_write``) and delete
    the files ``remove`` (those that exist) as one unit: the folder holds all the old files or all
    the new ones.

    Every new file is written in full to its temporary name first, so a failing write (a full disk)
    changes nothing. Then each old file keeps a second name (a hard link; a rename where the file
    system has none) while the new files are renamed in and those of ``remove`` deleted; if one of
    these steps fails, the old files are put back, and the error is raised. (Only a process killed
    in the instant between two of these renames can leave the files mixed.)
    """
    for path in remove:
        _check_not_a_folder(Path(path))
    temps: dict[Path, str] = {}
    try:
        for path, write in writes.items():
            temps[Path(path)] = _written_temp(Path(path), write)
        _commit(temps, [Path(p) for p in remove if Path(p) not in temps])
    finally:
        for tmp in temps.values():  # those not renamed in
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _commit(temps: dict[Path, str], remove: list[Path]) -> None:
    """Rename each temporary file of ``temps`` over its path and delete ``remove``; on a failure, every
    path back as it was, then the error raised."""
    kept: dict[Path, Path] = {}  # path -> the second name of its old file
    try:
        for path in [*remove, *temps]:
            if os.path.lexists(path):
                kept[path] = _keep_aside(path)
        for path in remove:
            with contextlib.suppress(FileNotFoundError):  # gone already where _keep_aside renamed it
                os.unlink(path)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except BaseException:
        for path in [*remove, *temps]:
            if path in kept:
                os.replace(kept[path], path)  # does nothing where both still name one file (a hard link)
            elif path in temps and not os.path.lexists(temps[path]):  # renamed in, nothing before
                os.unlink(path)
        _discard(kept.values())
        raise
    _discard(kept.values())


def _discard(paths: Iterable[Path]) -> None:
    """Delete the files ``paths`` where they still exist (one left is an orphan the next write removes)."""
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _keep_aside(path: Path) -> Path:
    """A second name for the file ``path`` (a temporary name beside it): a hard link, or where the
    file system has none, ``path`` renamed to it."""
    aside = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        os.link(path, aside)
    except OSError:
        os.replace(path, aside)
    return aside


def _check_not_a_folder(path: Path) -> None:
    """IsADirectoryError naming ``path`` if a folder is where its file goes (nothing is moved aside)."""
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(errno.EISDIR, "a folder is where this file goes", str(path))


def _written_temp(path: Path, write: Callable[[str], None]) -> str:
    """A temporary file beside ``path`` filled by ``write(tmp_path)``, with the permissions of a plain
    ``open(path, "w")``; removed if ``write`` fails (an I/O failure raised as OSError naming ``path``).
    Orphaned temporary files of ``path`` are removed first."""
    _check_not_a_folder(path)
    remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
        except SafetensorError as err:
            code = re.search(r"\(os error (\d+)\)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def remove_orphans(path: Path) -> list[Path]:
    """Remove the temporary files and folders (``.<name of path>.<pid>-<random>...tmp``) that a writer
    of ``path`` killed midway left beside it (those whose writer process no longer runs on this
    machine); returns them."""
    removed = []
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix):].partition("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            try:
                orphan = path.parent / name
                if orphan.is_dir() and not orphan.is_symlink():
                    shutil.rmtree(orphan)
                else:
                    os.unlink(orphan)
                removed.append(orphan)
            except OSError:
                pass  # another writer removed it first, or the folder is read-only: the write reports that
    return removed


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True
