"""Canonical naming of pytree leaves and the SHA-256 fingerprint of parameters.

Canonical order: every leaf is named by its key path joined with ``/`` (dict keys
as written, sequence indices as decimal numbers, named-tuple / dataclass fields by
name), and leaves are taken in ascending order of that name (Python string order).

``params_sha256`` hashes, for each leaf in canonical order, the UTF-8 bytes of::

    "{name}\\n{dtype name, e.g. float32}\\n{shape as comma-separated ints}\\n"

followed by the leaf's raw bytes in C order (little-endian as NumPy stores them on
every supported machine). Two parameter trees have the same fingerprint iff they
have the same names, dtypes, shapes and bit-identical values — so a reproduced run
can be checked with one string, and the order in which a library happens to build
its dicts does not matter.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np


def key_path_name(path: tuple[Any, ...]) -> str:
    """A jax key path as a ``/``-joined name (``params/encoder/block_0/...``)."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            parts.append(str(entry.key))
        else:  # pragma: no cover - future key kinds
            parts.append(str(entry))
    return "/".join(parts)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(name, leaf)`` pairs of a pytree in canonical (sorted-name) order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    named = [(key_path_name(path), leaf) for path, leaf in flat]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError("pytree has two leaves with the same '/'-joined name; cannot name them canonically")
    return sorted(named, key=lambda item: item[0])


def params_sha256(tree: Any) -> str:
    """SHA-256 (hex) over a parameter pytree in the canonical order described above."""
    digest = hashlib.sha256()
    for name, leaf in named_leaves(tree):
        if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)  # typed PRNG keys hash as their raw words
        array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        shape = ",".join(str(d) for d in array.shape)
        digest.update(f"{name}\n{array.dtype.name}\n{shape}\n".encode())
        digest.update(array.tobytes(order="C"))
    return digest.hexdigest()
