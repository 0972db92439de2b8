"""Writing files atomically: a temporary file beside the target, renamed over it, so a reader sees
the old file or the new one, never half of one; the temporary files of a writer killed midway are
removed by the next write of the same file.

A temporary file is named ``.<name>.<pid>-<random>.tmp``: the writer's process id tells the next
writer whether it is still running (its file is left alone) or gone (its file is an orphan).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path`` (same directory, which
    must exist). The file gets the permissions a plain ``open(path, "w")`` would (mkstemp's are
    owner-only). Orphaned temporary files of ``path`` are removed first."""
    path = Path(path)
    remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def remove_orphans(path: Path) -> list[Path]:
    """Remove the temporary files that a writer of ``path`` killed midway left beside it (those whose
    writer process no longer runs on this machine); returns them."""
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
                os.unlink(path.parent / name)
                removed.append(path.parent / name)
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
