"""Where the subcommands' results go: the output folder, checked before any work, atomic writes, and
a run's results written as one unit (``RunOutputs``)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from . import CommandError

STAGING = "sharelora-run"  # a run's temporary folders in --out: .sharelora-run.<pid>-<random>[.old].tmp
KEPT = "sharelora-kept"  # where the results of a run that could not move them in are kept: sharelora-kept-<time>


def check_out_dir(out: str | os.PathLike, outputs: Iterable[str], option: str = "--out") -> Path:
    """``out`` as a Path, once it is known that the results can be written there; nothing is created yet.

    outputs: the names the command writes inside ``out``, a trailing "/" marking a folder
    ("plan.json", "adapter/"). CommandError naming ``option`` if ``out`` is an existing file, if the
    folder it would be made in (or ``out`` itself, if it exists) is not a folder or no folder can be
    created in it (tried: a temporary folder is made there and removed, since permissions do not tell,
    e.g. for root or in /proc), if an output exists there as the other kind (a folder where a file
    goes, or the reverse), or if an output folder there cannot be replaced (no write permission in
    it). Results already there will be replaced: a note on stdout names them now, before the run.
    """
    path = Path(out)
    if path.is_symlink() and not path.exists():
        raise CommandError(f"{option} {path} is a link to {os.readlink(path)}, which does not exist")
    if path.exists() and not path.is_dir():
        raise CommandError(f"{option} {path} is an existing file, not a folder")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CommandError(f"{option} {path} cannot be made: {ancestor} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sharelora-check.", dir=ancestor))
    except PermissionError:
        raise CommandError(f"{option} {path} cannot be written: no write permission in {ancestor}") from None
    except OSError as err:
        raise CommandError(f"{option} {path} cannot be written: no folder can be created in {ancestor} "
                           f"({err.strerror or err})") from None
    existing = []
    for name in outputs:
        target = path / name.rstrip("/")
        if not target.exists():
            continue
        if target.is_dir() != name.endswith("/"):
            kind = "a folder" if target.is_dir() else "a file"
            raise CommandError(f"{option} {path}: {target} is {kind}, but this command writes a "
                               f"{'folder' if name.endswith('/') else 'file'} there")
        if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
            raise CommandError(f"{option} {path}: {target} cannot be replaced: no write permission in it")
        existing.append(name)
    if existing:
        print(f"note: {option} {path} already holds {', '.join(existing)}: they will be replaced")
    return path


def numbered_dir(parent: Path, name: str, option: str = "--out") -> Path:
    """Create and return the first free folder of ``parent/name``, ``parent/name-2``, ``parent/name-3``, ...

    Never an existing one, so no earlier result is overwritten. CommandError naming ``option`` (whose
    default this is) if ``parent`` cannot hold a new folder.
    """
    check_out_dir(parent, (), option)
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        path = parent / (name if k == 1 else f"{name}-{k}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise CommandError(f"{parent} already holds {name} and 9,999 numbered copies of it: pass {option}")


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename; returns ``path``."""
    from ..files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def write_json(path: Path, data, indent: int | None = 1) -> Path:
    """``data`` as JSON (one trailing newline) to ``path``, atomically; returns ``path``."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")


class OutputError(CommandError):
    """The results could not be written (a full disk, a folder gone read-only); the message says what was kept where."""

    exit_code = 1


class RunOutputs:
    """A command's results in ``out`` written as one unit: into a hidden temporary folder inside
    ``out`` (``.sharelora-run.<pid>-<random>.tmp``; inside, so it needs no more than ``check_out_dir``
    checked and lies on ``out``'s file system), then moved in together, the previous run's results
    moved out first, so ``out`` never holds the results of two runs (other files stay).

    outputs: the names a run writes (as for ``check_out_dir``). A command may ``write`` more than
    once (after each finished part): each write replaces the last.
    """

    def __init__(self, out: Path, outputs: Iterable[str]):
        self.out, self.outputs = out, tuple(n.rstrip("/") for n in outputs)

    def check_space(self, nbytes: int) -> None:
        """CommandError if the file system of ``out`` has less than ``nbytes`` (plus 1 MiB) free."""
        ancestor = self.out
        while not ancestor.exists():
            ancestor = ancestor.parent
        free = shutil.disk_usage(ancestor).free
        if free < nbytes + 2**20:
            raise CommandError(f"not enough free space for the results in {self.out}: they need about "
                               f"{_mib(nbytes + 2**20)}, {ancestor} has {_mib(free)} free")

    def write(self, parts: Sequence[tuple[str, Callable[[Path], object]]]) -> None:
        """Write each ``(name, write(path))`` part, in order, into a new temporary folder, then move
        them all into ``out``. The first part is the one never lost: if a write or the move fails
        (OSError: a full disk, a folder that cannot be moved; ``files`` raises the writers' I/O errors
        as OSError), OutputError says where it is kept: if its write finished, with the other finished
        parts in a visible folder of ``out`` (``_set_aside``: the temporary folder renamed, the parts
        that did not finish removed from it), else written again into a new folder of the system's
        temporary directory. ``out`` keeps the previous results."""
        from ..files import remove_orphans

        created = not self.out.exists()
        staging, done = None, []
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_orphans(self.out / STAGING)  # the temporary folders of a writer killed midway
            staging = Path(tempfile.mkdtemp(prefix=f".{STAGING}.{os.getpid()}-", suffix=".tmp", dir=self.out))
            for name, write in parts:
                write(staging / name.rstrip("/"))
                done.append(name)
            self._move_in(staging)
        except OSError as err:
            name, write = parts[0]
            if done:
                for part, _ in parts[len(done):]:
                    _remove(staging / part.rstrip("/"))
                aside = self._set_aside(staging)
                kept = aside / name.rstrip("/") if aside else self._rescue(name, write, staging)
            else:
                kept = self._rescue(name, write, staging)
                if created:
                    with contextlib.suppress(OSError):  # not empty: something else was written there
                        self.out.rmdir()
            where = f"{name} is kept in {kept}" if kept else f"{name} could not be kept anywhere"
            previous = getattr(err, "previous_results", None)
            where += f"; the previous results are in {previous}" if previous else ""
            raise OutputError(f"could not write the results into {self.out} ({_reason(err)}); {where}") from err
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise

    def _move_in(self, staging: Path) -> None:
        """Old results out (into a second temporary folder, then deleted), the new ones in, by renames.
        If a rename fails, or a Ctrl-C arrives between two, those done are undone (``out`` holds the
        previous results, ``staging`` the new ones) and the error raised; if undoing fails too, an
        OSError's ``previous_results`` names the folder left holding the previous results."""
        old = Path(tempfile.mkdtemp(prefix=f".{STAGING}.{os.getpid()}-", suffix=".old.tmp", dir=self.out))
        moves = [(self.out / name, old / name) for name in self.outputs if os.path.lexists(self.out / name)]
        moves += [(staging / name, self.out / name) for name in self.outputs if os.path.lexists(staging / name)]
        done = []
        try:
            for source, target in moves:
                os.replace(source, target)
                done.append((source, target))
        except BaseException as err:
            try:
                for source, target in reversed(done):
                    os.replace(target, source)
            except OSError:
                if isinstance(err, OSError):
                    err.previous_results = old
                raise err from None
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)

    def _set_aside(self, staging: Path) -> Path | None:
        """The temporary folder renamed to a visible one of ``out`` that no later run removes
        (``sharelora-kept-<date>-<time>[-k]``, where a later run's clean-up of temporary folders
        left by killed writers does not look); None if the rename fails."""
        stem = f"{KEPT}-{time.strftime('%Y%m%d-%H%M%S')}"
        target, k = self.out / stem, 1
        while os.path.lexists(target):
            k += 1
            target = self.out / f"{stem}-{k}"
        try:
            os.rename(staging, target)
        except OSError:
            return None
        return target

    def _rescue(self, name: str, write: Callable[[Path], object], staging: Path | None) -> Path | None:
        """``name`` written by ``write`` into a new folder of the system's temporary directory (the
        temporary folder in ``out`` removed); None if that fails too."""
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            path = Path(tempfile.mkdtemp(prefix=f"sharelora-{self.out.absolute().name}-")) / name.rstrip("/")
            write(path)
        except OSError:
            return None
        return path


def _remove(path: Path) -> None:
    """Delete the file or folder ``path`` if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _reason(err: OSError) -> str:
    return f"{err.strerror}: {err.filename}" if err.strerror and err.filename else (err.strerror or str(err))


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"
