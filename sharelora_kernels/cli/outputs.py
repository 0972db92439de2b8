"""Where the subcommands' results go: the output folder, checked before any work, and atomic writes."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from . import CommandError


def check_out_dir(out: str | os.PathLike, outputs: Iterable[str], option: str = "--out") -> Path:
    """``out`` as a Path, once it is known that the results can be written there; nothing is created yet.

    outputs: the names the command writes inside ``out``, a trailing "/" marking a folder
    ("plan.json", "adapter/"). CommandError naming ``option`` if ``out`` is an existing file, if the
    folder it would be made in is not a writable folder, or if an output exists there as the other
    kind (a folder where a file goes, or the reverse). Results already there will be replaced: a
    note on stdout names them now, before the run.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CommandError(f"{option} {path} is an existing file, not a folder")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CommandError(f"{option} {path} cannot be made: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {path} cannot be written: no write permission in {ancestor}")
    existing = []
    for name in outputs:
        target = path / name.rstrip("/")
        if not target.exists():
            continue
        if target.is_dir() != name.endswith("/"):
            kind = "a folder" if target.is_dir() else "a file"
            raise CommandError(f"{option} {path}: {target} is {kind}, but this command writes a "
                               f"{'folder' if name.endswith('/') else 'file'} there")
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
