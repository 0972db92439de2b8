"""The on-disk cache of ``auto``'s choices (``dispatch``): one JSON file per device under ``cache_dir()``.

A file holds ``{"format": CACHE_FORMAT, "version": CACHE_VERSION, "device": <name>, "versions":
{package: version}, "entries": {<signature key>: <record>}}``; a record is a dict (``dispatch``
writes and reads its fields; fields it does not know are kept as they are). ``read_cache`` names
what is wrong with a file it cannot use (unreadable, not UTF-8, not JSON, another layout, device or
package versions); ``write_cache`` replaces such a file. A write holds a lock file beside the cache
(where the OS has ``fcntl``) while it reads the file, merges its records in and renames a temporary
file over it, so writers in several processes merge rather than overwrite each other's choices; the
temporary files of a writer killed midway are removed by the next write.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch

from ..files import atomic_write

CACHE_ENV = "SHARELORA_CACHE_DIR"
CACHE_FORMAT, CACHE_VERSION = "sharelora_kernels dispatch cache", 1


def cache_dir() -> Path:
    """``$SHARELORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/sharelora_kernels``, else ``~/.cache/sharelora_kernels``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sharelora_kernels"


def cache_file(device: str) -> Path:
    """The JSON file of one device name."""
    return cache_dir() / f"dispatch-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-').lower()}.json"


def versions() -> dict[str, str | None]:
    """The package versions a choice depends on; a file measured with others is not used."""
    from ..version import __version__
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"sharelora_kernels": __version__, "torch": torch.__version__, "triton": triton_version}


def read_cache(path: Path, device: str) -> tuple[dict[str, dict] | None, str | None]:
    """(entries, None) of a valid cache file, or (None, what is wrong with it); (None, None) if absent."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError as e:
        return None, f"cannot be read ({e})"
    except UnicodeDecodeError as e:
        return None, f"is not UTF-8 text ({e})"
    try:
        data = json.loads(text)
    except ValueError as e:
        return None, f"is not valid JSON ({e})"
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        return None, f"is not a sharelora_kernels dispatch cache (format {CACHE_FORMAT!r} version {CACHE_VERSION})"
    if data.get("device") != device:
        return None, f"belongs to device {data.get('device')!r}, not {device!r}"
    if data.get("versions") != versions():
        return None, f"was measured with {data.get('versions')}, this process runs {versions()}"
    entries = data.get("entries")
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        return None, "has no 'entries' table of records"
    return entries, None


def write_cache(device: str, records: dict[str, dict]) -> Path:
    """Merge ``records`` (signature key -> record) into the device's cache file, under its lock;
    returns the path. A file ``read_cache`` cannot use is replaced. OSError if it cannot be written."""
    path = cache_file(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        entries = read_cache(path, device)[0] or {}
        entries.update(records)
        data = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "device": device, "versions": versions(),
                "entries": entries}
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, sort_keys=True),
                                                            encoding="utf-8"))
    return path


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``.<name>.lock`` beside ``path`` (released when the process dies);
    without ``fcntl`` (Windows) writers are not serialised and the last one's merge wins."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
