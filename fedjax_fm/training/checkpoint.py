"""Orbax checkpoints of a run: the whole server state, the round and the metrics so far.

Layout: ``DIR/checkpoints/<round>/``, keeping the newest ``keep``. Each holds

* ``arrays/``: the state's leaves, ``leaf_00000 ...`` in canonical (sorted key-path)
  order — see :mod:`fedjax_fm.training.fingerprint` — saved bit-exactly by orbax;
* ``meta.json``: the round, each leaf's name/dtype/shape, the metrics rows so far,
  and the config's fingerprint-relevant sections;
* ``manifest.json``: the size and SHA-256 of every other file of the checkpoint.

**Saves are atomic.** A checkpoint is written into ``checkpoints/.tmp-<round>/``
(arrays, then meta, then the manifest, each flushed to disk) and only then renamed
to ``checkpoints/<round>/``; a rename within a directory is atomic, so a kill at any
point of a save leaves either no ``<round>/`` at all or a complete one. Leftover
``.tmp-*`` folders are never read and are removed by the next store.

**Damage is found before orbax reads a byte.** Restoring first checks the manifest
(sizes, then hashes): a truncated or overwritten file, a missing file or a missing
manifest makes the checkpoint *damaged* (:class:`CheckpointDamaged`). That check is
also why a damaged checkpoint costs no asyncio noise: tensorstore, failing half-way
through a read, prints dozens of ``RuntimeError: Event loop is closed`` tracebacks
from its threads. (A checkpoint written before manifests existed, an orbax
``CheckpointManager`` layout with ``meta/metadata``, is still restored, unverified.)

**Recovery.** :meth:`CheckpointStore.restore_latest` walks back from the newest
checkpoint; each damaged one newer than the one it restores is moved aside to
``checkpoints/corrupt-<round>/`` (kept for inspection, never deleted), so the run can
retrain and save that round again. When none restores, nothing is moved and the
error says what to do.

The state is any pytree (params/adapters, optimiser state, round, PRNG key);
restoring needs a *template* of the same structure (what ``init`` produced), which
is how incompatible checkpoints are caught: names, shapes and dtypes are compared
before a byte is read, and a mismatch raises :class:`CheckpointError` naming the
checkpoint directory and the first differing leaf.

Typed PRNG keys (``jax.random.key``) are stored as their raw ``key_data`` and
re-wrapped on restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedjax_fm.fl.execution import to_host
from fedjax_fm.training.fingerprint import key_path_name, named_leaves

MANIFEST = "manifest.json"
META = "meta.json"
_TMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = "corrupt-"

# Fault injection for tests (tests/test_faults.py): ``FEDJAX_FM_KILL_AT=<point>:<round>``
# makes the process SIGKILL itself at that point of that round's save. The points, in
# order: ``arrays`` (arrays written), ``meta`` (meta written), ``manifest`` (manifest
# written, not yet renamed), ``renamed`` (in place, older ones not yet pruned).
_KILL_ENV = "FEDJAX_FM_KILL_AT"
SAVE_POINTS = ("arrays", "meta", "manifest", "renamed")


def _fault_point(point: str, round_: int) -> None:
    if os.environ.get(_KILL_ENV) == f"{point}:{round_}":
        os.kill(os.getpid(), signal.SIGKILL)


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


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are missing, truncated or altered since it was saved."""


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_durably(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def verify_manifest(path: Path) -> None:
    """Raises :class:`CheckpointDamaged` unless every file ``path/manifest.json`` lists has
    its recorded size and SHA-256 (sizes first: a truncation is found without hashing)."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointDamaged(f"checkpoint {path} is unreadable: its {MANIFEST} cannot be read ({error})") from None
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointDamaged(f"checkpoint {path} is unreadable: {name} is missing")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointDamaged(
                f"checkpoint {path} is unreadable: {name} has {size} bytes, {entry['size']} were saved (truncated?)")
    for name, entry in files.items():
        if _sha256(path / name) != entry["sha256"]:
            raise CheckpointDamaged(f"checkpoint {path} is unreadable: {name} differs from what was saved (SHA-256)")


class CheckpointStore:
    """Saves and restores a run's state every ``every`` rounds, keeping the newest ``keep``."""

    def __init__(self, directory: str | Path, *, every: int = 1, keep: int = 2) -> None:
        self.directory = Path(directory).absolute()
        self.every = every
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(_TMP_PREFIX + "*"):  # a save that was killed: never valid
            shutil.rmtree(stale, ignore_errors=True)
        with _quiet_orbax():
            if jax.process_count() > 1:
                # A distributed run: the server state is replicated, so one process (the run's
                # process 0) writes and reads it alone; orbax must not wait for the others.
                alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                           active_processes={jax.process_index()})
                self._checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone),
                                                      multiprocessing_options=alone)
            else:
                self._checkpointer = ocp.PyTreeCheckpointer()

    def all_rounds(self) -> list[int]:
        """The rounds with a checkpoint folder (``corrupt-*`` and ``.tmp-*`` are not checkpoints)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit())

    def _step_path(self, round_: int) -> Path:
        return self.directory / str(round_)

    def save(
        self,
        round_: int,
        state: Any,
        metrics: list[dict[str, Any]],
        extra_meta: Optional[dict[str, Any]] = None,
        *,
        force: bool = False,
    ) -> bool:
        """Saves if ``round_`` is on the interval (or ``force``); returns whether it saved.

        Atomic (module docstring): written under ``.tmp-<round>/``, renamed when complete.
        A checkpoint of the same round already in place (a round retrained after a resume
        from an older one) is replaced only once the new one is complete.
        """
        if not force and round_ % self.every != 0:
            return False
        named = named_leaves(state)
        arrays = {}
        leaves_meta = []
        for i, (name, leaf) in enumerate(named):
            value = jax.random.key_data(leaf) if _is_key(leaf) else leaf
            arrays[f"leaf_{i:05d}"] = np.asarray(to_host(value))  # replicated across processes too
            dtype, shape = _leaf_spec(leaf)
            leaves_meta.append({"name": name, "dtype": dtype, "shape": shape})
        meta = {"round": int(round_), "leaves": leaves_meta, "metrics": metrics, **(extra_meta or {})}

        tmp = self.directory / f"{_TMP_PREFIX}{round_}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        with _quiet_orbax():
            self._checkpointer.save(tmp / "arrays", args=ocp.args.PyTreeSave(arrays))
        _fault_point("arrays", round_)
        _write_durably(tmp / META, json.dumps(meta))
        _fault_point("meta", round_)
        files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(tmp)}
        _write_durably(tmp / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))
        _fsync_dir(tmp)
        _fault_point("manifest", round_)
        final = self._step_path(round_)
        if final.exists():
            old = self.directory / f"{_TMP_PREFIX}{round_}-replaced"
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.directory)
        _fault_point("renamed", round_)
        for stale in self.all_rounds()[: -self.keep]:
            shutil.rmtree(self._step_path(stale), ignore_errors=True)
        return True

    def _read_meta(self, path: Path) -> dict[str, Any]:
        for name in (META, "meta/metadata"):  # the second: checkpoints of orbax's CheckpointManager layout
            file = path / name
            if file.is_file():
                try:
                    return json.loads(file.read_text())
                except (OSError, ValueError) as error:
                    raise CheckpointDamaged(f"checkpoint {path} is unreadable (its metadata): {error}") from None
        raise CheckpointDamaged(f"checkpoint {path} is unreadable: it has no {META}")

    def restore(self, round_: int, template: Any) -> Restored:
        """Restores the checkpoint of ``round_`` into the structure of ``template``."""
        path = self._step_path(round_)
        legacy = not (path / MANIFEST).exists() and (path / "meta" / "metadata").is_file()
        if not legacy:
            verify_manifest(path)
        meta = self._read_meta(path)
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
                arrays = self._checkpointer.restore(
                    path / "arrays", args=ocp.args.PyTreeRestore(restore_args=restore_args))
        except Exception as error:  # orbax raises many kinds for a damaged directory
            raise CheckpointDamaged(f"checkpoint {path} is unreadable (its arrays): {error}") from error
        by_name = {}
        for i, (name, leaf) in enumerate(named):
            value = arrays.get(f"leaf_{i:05d}")
            if value is None:
                raise CheckpointDamaged(f"checkpoint {path} is missing array {name}")
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

    def set_aside(self, round_: int) -> Path:
        """Moves checkpoint ``round_`` to ``corrupt-<round>/`` (``-2``, ``-3`` ... if taken); returns where."""
        target = self.directory / f"{CORRUPT_PREFIX}{round_}"
        n = 2
        while target.exists():
            target = self.directory / f"{CORRUPT_PREFIX}{round_}-{n}"
            n += 1
        os.rename(self._step_path(round_), target)
        return target

    def restore_latest(
        self, template: Any, *, on_skip: Optional[Callable[[CheckpointError], None]] = None
    ) -> Optional[Restored]:
        """The newest checkpoint that restores, walking back past unusable ones.

        Returns None when there are no checkpoints. Once one restores, the *damaged*
        ones newer than it are moved aside (:meth:`set_aside`), so that their rounds
        can be trained and saved again; each skipped one is reported to ``on_skip``.
        If none restores, nothing is moved and :class:`CheckpointError` lists them all
        and says what to do. An *incompatible* checkpoint is never moved.
        """
        rounds = self.all_rounds()
        if not rounds:
            return None
        errors: list[tuple[int, CheckpointError]] = []
        for round_ in reversed(rounds):
            try:
                restored = self.restore(round_, template)
            except CheckpointError as error:
                errors.append((round_, error))
                continue
            for skipped, error in errors:
                if isinstance(error, CheckpointDamaged):
                    moved = self.set_aside(skipped)
                    error = CheckpointDamaged(f"{error}; moved aside to {moved}")
                if on_skip is not None:
                    on_skip(error)
            return restored
        if on_skip is not None:
            for _, error in errors:
                on_skip(error)
        damaged = all(isinstance(e, CheckpointDamaged) for _, e in errors)
        advice = (
            f"nothing was changed. To train this run again from round 0, move the folder aside "
            f"(mv {self.directory} {self.directory}.damaged) and rerun with --resume; "
            "or start a new run with another --out"
            if damaged else
            "was the run started with another model, LoRA or optimiser? Resume it with its own config "
            "(DIR/config.yaml), or start a new run with another --out"
        )
        raise CheckpointError(
            f"no checkpoint under {self.directory} could be restored:\n  "
            + "\n  ".join(str(e) for _, e in errors) + f"\nWhat to do: {advice}"
        )

    def close(self) -> None:
        with _quiet_orbax():
            self._checkpointer.close()
