"""Argument checks of the store's public entry points, and of the settings a saved store carries.

Every public entry point checks all its arguments before it changes anything, so a failed call stores nothing:
TypeError for a value of the wrong type, ValueError for one out of range, each naming the argument. Types are
strict on purpose: a flag is True or False and nothing else (a truth test would take `shared="false"` as True and
publish a private prompt into the shared namespace), and a count is an integer (3.0 or "3" pass a comparison and
fail somewhere later, or never). Integers of other types (numpy's) are taken and turned into int, so that a
setting always saves as JSON.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

from ..engine.engine import check_count
from .retrieval import EMBEDDINGS

# The store's settings (`KVStore.config()`, saved in the index): the integer ones with their minimum, then the rest.
COUNTS = {"capacity_bytes": 1, "candidates": 1, "max_depth": 0, "offload_bytes": 0, "min_reuse_tokens": 1}
SETTINGS = (*COUNTS, "embedding", "checksums")


check_int = check_count  # the engine's: one integer check for every entry point


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return value


def check_tenant(tenant) -> str:
    if not isinstance(tenant, str):
        raise TypeError(f"tenant: expected a non-empty str, got {type(tenant).__name__} {tenant!r}")
    if not tenant:
        raise ValueError("tenant: expected a non-empty str, got ''")
    return tenant


def check_entry_id(entry_id) -> str:
    if not isinstance(entry_id, str):
        raise TypeError(f"entry_id: expected a str, got {type(entry_id).__name__} {entry_id!r}")
    return entry_id


def check_directory(directory) -> Path:
    try:  # a PathLike's __fspath__ may itself return bytes or another type
        path = os.fspath(directory) if isinstance(directory, (str, os.PathLike)) else None
    except TypeError:
        path = None
    if not isinstance(path, str) or not path:
        raise TypeError(f"directory: expected a non-empty str or os.PathLike of a str, got {type(directory).__name__} "
                        f"{directory!r}")
    if "\0" in path:
        raise ValueError(f"directory: a path with a NUL character: {path!r}")
    return Path(path)


def check_settings(settings: Dict, prefix: str = "") -> Dict:
    """The store settings in `settings` (any subset of SETTINGS), checked and normalised; `prefix` goes before
    each name in a message (the loader passes "config.")."""
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown:
        raise TypeError(f"{prefix}{unknown[0]}: not a KVStore setting (expected one of {', '.join(SETTINGS)})")
    out = {}
    for name, value in settings.items():
        if name in COUNTS:
            out[name] = check_int(prefix + name, value, COUNTS[name])
        elif name == "checksums":
            out[name] = check_bool(prefix + name, value)
        else:
            if not isinstance(value, str):
                raise TypeError(f"{prefix}{name}: expected a str, got {type(value).__name__} {value!r}")
            if value not in EMBEDDINGS:
                raise ValueError(f"{prefix}{name}: expected one of {', '.join(map(repr, EMBEDDINGS))}, "
                                 f"got {value!r}")
            out[name] = value
    return out
