"""Every key in one place: content hashes, file identities, the code version, result-group names.

A cached result is valid exactly as long as its key is unchanged, so every key is built from the same few
parts: the store's content version (a hash of what is ingested), the parameters, the identity of each
input file (absolute path, mtime, size) and :func:`code_version` (the science's source). Never from a hash
of a big array.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "code_version",
    "digest",
    "file_identity",
    "file_key",
    "fit_key",
    "hash_arrays",
    "prf_fit_task_key",
    "prf_model_key",
    "prf_model_task_key",
    "statistics_key",
]


def digest(*parts) -> str:
    """Short stable hash of JSON-able parts (used for result names and cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(path: str) -> tuple[int, int]:
    """(mtime in ns, size) of a file: a frame whose identity is unchanged needs no new ingestion."""
    st = os.stat(path)
    return int(st.st_mtime_ns), int(st.st_size)


def file_key(path) -> list:
    """The identity of an input file as it enters cache keys: ``[absolute path, mtime_ns, size]``
    (``[path, None, None]`` for a file that cannot be stat'ed, so the key still exists and changes when the
    file appears)."""
    try:
        st = os.stat(path)
    except OSError:
        return [os.fspath(path), None, None]
    return [os.path.abspath(path), st.st_mtime_ns, st.st_size]


def hash_arrays(group, names: Sequence[str], extra: str = "") -> str:
    """A short hash of a group's arrays ``names`` (and ``extra`` text): a content version."""
    h = hashlib.sha256()
    for name in names:
        values = group[name][:]
        h.update(name.encode())
        if values.dtype.kind in "OTU":
            h.update("\0".join(map(str, values)).encode())
        else:
            h.update(np.ascontiguousarray(values).tobytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


_CORE = Path(__file__).resolve().parent


def code_version() -> str:
    """Hash of every photref_core source file, subpackages included: a change of the science
    invalidates every cached result.

    Hashed again only when a source file's name, mtime or size changes (every cache key asks for it, so
    a cached re-run would otherwise read and hash the whole package several times).
    """
    files = sorted(_CORE.rglob("*.py"))
    return _hash_sources(tuple((path, path.stat().st_mtime_ns, path.stat().st_size) for path in files))


@functools.lru_cache(maxsize=4)
def _hash_sources(files: tuple[tuple[Path, int, int], ...]) -> str:
    h = hashlib.sha256()
    for path, _, _ in files:
        h.update(path.relative_to(_CORE).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def statistics_key(content_version: str, params) -> str:
    """Name of the statistics group for a store content and the statistics' parameters."""
    return digest(content_version, {k: getattr(params, k) for k in params.STATISTICS_FIELDS})


def fit_key(statistics_group: str, content_version, params, catalog_path) -> str:
    """Name of the scatter-fit group: its statistics group, their content, the parameters and the catalog."""
    return digest(statistics_group, content_version, params.as_dict(), file_key(catalog_path))


def prf_model_key(content_version: str, params, catalog_path) -> str:
    """Key of a PRF shape model: the images ingested (their content version), the parameters and the
    catalog file."""
    return digest("prf-model", content_version, params.to_dict(), file_key(catalog_path))


def prf_model_task_key(model_key: str) -> str:
    """Prefect cache key of the shape-model task: the model's key and the code version."""
    return f"prf-model-{code_version()}-{model_key}"


def prf_fit_task_key(flux_group: str, slots: Sequence[int]) -> str:
    """Prefect cache key of one frame chunk's flux fit: the flux group (it names the model) and the chunk."""
    return f"prf-fit-{code_version()}-{flux_group}-{slots[0]}-{slots[-1]}-{len(slots)}"
