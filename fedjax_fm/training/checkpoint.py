"""Orbax checkpoints of a run: the whole server state, the round and the metrics so far.

Layout: ``DIR/checkpoints/<round>/`` managed by ``orbax.checkpoint.CheckpointManager``
(atomic: orbax writes into a temporary directory and renames it when complete, so a
kill mid-write leaves no half checkpoint that looks finished), keeping the newest
``keep``. Each checkpoint holds two items:

* ``arrays``: the state's leaves, ``leaf_00000 ...`` in canonical (sorted key-path)
  order — see :mod:`fedjax_fm.training.fingerprint` — saved bit-exactly;
* ``meta`` (JSON): the round, each leaf's name/dtype/shape, the metrics rows so far,
  and the config's fingerprint-relevant sections.

The state is any pytree (params/adapters, optimiser state, round, PRNG key);
restoring needs a *template* of the same structure (what ``init`` produced), which
is how incompatible checkpoints are caught: names, shapes and dtypes are compared
before a byte is read, and a mismatch raises :class:`CheckpointError` naming the
checkpoint directory and the first differing leaf. ``restore_latest`` walks back
from the newest checkpoint to older ones when one cannot be read, reporting each
one it skips.

Typed PRNG keys (``jax.random.key``) are stored as their raw ``key_data`` and
re-wrapped on restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedjax_fm.training.fingerprint import key_path_name, named_leaves



@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs every save and restore at INFO through absl; a run's own progress line
    is enough. Raised only around our orbax calls and restored after, so importing or
    using this module never changes the log level the rest of the program chose."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its directory."""


@dataclasses.dataclass
class Restored:
    """What :meth:`CheckpointStore.restore_latest` gives back."""

    round: int
    state: Any
    metrics: list[dict[str, Any]]
    meta: dict[str, Any]
    path: Path


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _leaf_spec(leaf: Any) -> tuple[str, list[int]]:
    if _is_key(leaf):
        data = jax.random.key_data(leaf)
        return f"key<{jax.random.key_impl(leaf)}>:{data.dtype.name}", list(data.shape)
    array = np.asarray(leaf) if not hasattr(leaf, "dtype") else leaf
    return np.dtype(array.dtype).name, list(np.shape(array))


class CheckpointStore:
    """Saves and restores a run's state every ``every`` rounds, keeping the newest ``keep``."""

    def __init__(self, directory: str | Path, *, every: int = 1, keep: int = 2) -> None:
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            create=True,
            # Synchronous saves: when save() returns the checkpoint is complete, so a
            # kill right after it loses nothing and the test of resume is meaningful.
            enable_async_checkpointing=False,
        )
        with _quiet_orbax():
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("arrays", "meta"))

    def all_rounds(self) -> list[int]:
        with _quiet_orbax():
            self._manager.reload()
            return sorted(self._manager.all_steps())

    def save(
        self,
        round_: int,
        state: Any,
        metrics: list[dict[str, Any]],
        extra_meta: Optional[dict[str, Any]] = None,
        *,
        force: bool = False,
    ) -> bool:
        """Saves if ``round_`` is on the interval (or ``force``); returns whether it saved."""
        # Our own interval rule (orbax's should_save also accepts the very first step).
        if not force and round_ % self.every != 0:
            return False
        named = named_leaves(state)
        arrays = {}
        leaves_meta = []
        for i, (name, leaf) in enumerate(named):
            value = jax.random.key_data(leaf) if _is_key(leaf) else leaf
            arrays[f"leaf_{i:05d}"] = np.asarray(jax.device_get(value))
            dtype, shape = _leaf_spec(leaf)
            leaves_meta.append({"name": name, "dtype": dtype, "shape": shape})
        meta = {"round": int(round_), "leaves": leaves_meta, "metrics": metrics, **(extra_meta or {})}
        with _quiet_orbax():
            saved = self._manager.save(
                round_,
                args=ocp.args.Composite(arrays=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
            self._manager.wait_until_finished()
        return bool(saved)

    def _step_path(self, round_: int) -> Path:
        return self.directory / str(round_)

    def restore(self, round_: int, template: Any) -> Restored:
        """Restores the checkpoint of ``round_`` into the structure of ``template``."""
        path = self._step_path(round_)
        try:
            with _quiet_orbax():
                meta = self._manager.restore(round_, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as error:  # orbax raises many kinds for a damaged directory
            raise CheckpointError(f"checkpoint {path} is unreadable (its metadata): {error}") from error
        named = named_leaves(template)
        stored = meta.get("leaves", [])
        if len(stored) != len(named):
            raise CheckpointError(
                f"checkpoint {path} is incompatible with this run: it holds {len(stored)} arrays, "
                f"the run's state has {len(named)} (different model, LoRA or optimiser?)"
            )
        for (name, leaf), entry in zip(named, stored):
            dtype, shape = _leaf_spec(leaf)
            if entry["name"] != name or entry["dtype"] != dtype or list(entry["shape"]) != shape:
                raise CheckpointError(
                    f"checkpoint {path} is incompatible with this run: it has {entry['name']} "
                    f"{entry['dtype']}{entry['shape']} where the run expects {name} {dtype}{shape}"
                )
        restore_args = {
            f"leaf_{i:05d}": ocp.RestoreArgs(restore_type=np.ndarray) for i in range(len(named))
        }
        try:
            with _quiet_orbax():
                arrays = self._manager.restore(
                    round_,
                    args=ocp.args.Composite(arrays=ocp.args.PyTreeRestore(restore_args=restore_args)),
                )["arrays"]
        except Exception as error:
            raise CheckpointError(f"checkpoint {path} is unreadable (its arrays): {error}") from error
        by_name = {}
        for i, (name, leaf) in enumerate(named):
            value = arrays.get(f"leaf_{i:05d}")
            if value is None:
                raise CheckpointError(f"checkpoint {path} is missing array {name}")
            value = np.asarray(value)
            expected_shape = _leaf_spec(leaf)[1]
            if list(value.shape) != expected_shape:
                raise CheckpointError(f"checkpoint {path}: array {name} has shape {list(value.shape)}, expected {expected_shape}")
            if _is_key(leaf):
                by_name[name] = jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(leaf))
            else:
                by_name[name] = jnp.asarray(value)
        flat, treedef = jax.tree_util.tree_flatten_with_path(template)
        leaves = [by_name[key_path_name(p)] for p, _ in flat]
        state = jax.tree_util.tree_unflatten(treedef, leaves)
        return Restored(round=int(meta["round"]), state=state, metrics=list(meta.get("metrics", [])), meta=meta, path=path)

    def restore_latest(
        self, template: Any, *, on_skip: Optional[Callable[[CheckpointError], None]] = None
    ) -> Optional[Restored]:
        """The newest checkpoint that restores, walking back past unreadable ones.

        Returns None when there are no checkpoints. An *incompatible* checkpoint (its
        arrays do not match the template) is not skipped silently: if none restores,
        the newest one's error is raised, naming it.
        """
        rounds = self.all_rounds()
        if not rounds:
            return None
        errors: list[CheckpointError] = []
        for round_ in reversed(rounds):
            try:
                return self.restore(round_, template)
            except CheckpointError as error:
                errors.append(error)
                if on_skip is not None:
                    on_skip(error)
        raise CheckpointError(
            "no checkpoint under " + str(self.directory) + " could be restored:\n  " + "\n  ".join(map(str, errors))
        )

    def close(self) -> None:
        with _quiet_orbax():
            self._manager.close()
