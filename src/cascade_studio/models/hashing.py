"""Content hashes of weight files (single-file checkpoints, LoRAs): what PNG metadata records so that `reproduce`
finds the same file again, in A1111's form (the first 12 hex digits of the file's SHA-256).

Hashing a 7 GB checkpoint takes a while, so a file's hash is kept in a small cache keyed by its path, size and
modification time (`$XDG_CACHE_HOME/cascade-studio/hashes.json`, or beside ~/.cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

SHORT = 12
_lock = threading.Lock()


def _cache_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cascade-studio" / "hashes.json"


def file_hash(path: Path) -> str:
    """The full SHA-256 of a file, from the cache when the file has not changed."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = _cache_file()
    with _lock:
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _lock:
        try:
            cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
            cache[key] = value
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_path)
        except (OSError, ValueError):
            pass  # a cache that cannot be written only costs the next caller the hashing
    return value


def short_hash(path: Path) -> str:
    return file_hash(path)[:SHORT]
