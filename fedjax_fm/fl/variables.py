"""Variable trees: the trainable / frozen partition, and their exact size in bytes.

Variables are Flax-style collections: ``{"params": base}`` for full fine-tuning,
``{"params": base, "lora": adapters}`` with LoRA. The partition is by collection:
full fine-tuning trains ``params``; LoRA trains ``lora`` and freezes ``params``
(which is then never differentiated nor communicated). The same client code runs
both: only this split differs.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np

Variables = dict[str, Any]


def split_variables(variables: Variables, trainable_collections: Iterable[str]) -> tuple[Variables, Variables]:
    """``(trainable, frozen)``: the named collections vs the rest."""
    names = tuple(trainable_collections)
    missing = [n for n in names if n not in variables]
    if missing:
        raise KeyError(f"trainable collection(s) {missing} not in variables (have {sorted(variables)})")
    trainable = {k: v for k, v in variables.items() if k in names}
    frozen = {k: v for k, v in variables.items() if k not in names}
    return trainable, frozen


def join_variables(trainable: Variables, frozen: Variables) -> Variables:
    """The full variables again (collections are disjoint by construction)."""
    overlap = set(trainable) & set(frozen)
    if overlap:
        raise ValueError(f"collections {sorted(overlap)} are both trainable and frozen")
    return {**frozen, **trainable}


def trainable_collections(lora: bool) -> tuple[str, ...]:
    """``("lora",)`` for LoRA, ``("params",)`` for full fine-tuning."""
    return ("lora",) if lora else ("params",)


def tree_nbytes(tree: Any) -> int:
    """Exact size of a pytree in bytes, ``Σ size · itemsize`` over its leaves, a host integer.

    This is what a payload costs on the wire (with LoRA only the adapters travel), so
    the communication model and every codec count bytes with it. Only shapes and
    dtypes are read: nothing is transferred from a device.
    """
    return int(sum(np.dtype(leaf.dtype).itemsize * int(np.prod(np.shape(leaf))) if hasattr(leaf, "dtype")
                   else np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(tree)))
