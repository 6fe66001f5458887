"""A run in N processes on ``jax.distributed``: joining, who writes, and agreeing on host values.

Every process runs the same ``fedjax-fm run`` (``docs/distributed.md``)::

    start(cfg)                       jax.distributed.initialize, before anything touches a device
    rounds: the same code on every process; fl.Sharded feeds each process's own clients
            and brings results back with fl.to_host (collectives, in the same order everywhere)
    process 0 alone writes the run folder; the others work in a scratch folder

Host-side decisions that only process 0 can make (the run folder's checks, the
checkpoint it resumes from) are made there and sent to the others with
:func:`broadcast_text` / :func:`broadcast_tree`, so that every process takes the same
branch: a process that took another one would wait in a collective until a timeout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from fedjax_fm.config import ConfigError, DistributedSection, ExperimentConfig
from fedjax_fm.energy.meter import CallRecord, safe_div


class DistributedError(RuntimeError):
    """The processes of a distributed run could not join (or agree); the message says what to check."""


def section(cfg: ExperimentConfig) -> Optional[DistributedSection]:
    """The run's ``distributed`` section (``auto`` is every key left to JAX's cluster detection)."""
    if cfg.distributed is None:
        return None
    return DistributedSection() if cfg.distributed == "auto" else cfg.distributed


def check_config(cfg: ExperimentConfig) -> None:
    """Refuses what a distributed run does not support (before anything is started)."""
    if cfg.distributed is None:
        return
    if cfg.federated.backend != "sharded":
        raise ConfigError("distributed runs need federated.backend: sharded (clients on a mesh across the "
                          f"processes), got {cfg.federated.backend!r}")
    for key, value in (("federated.dp", cfg.federated.dp), ("federated.compression", cfg.federated.compression)):
        if value is not None:
            raise ConfigError(f"{key} is not supported in a distributed run yet (it works on the whole round's "
                              "batches and outputs in one process); run it in one process")


def start(cfg: ExperimentConfig) -> None:
    """``jax.distributed.initialize`` from the config; nothing when ``distributed`` is null.

    When the processes do not all join within ``initialization_timeout_s``, this process
    prints what to check and exits with status 2 (JAX's own client would abort a few
    seconds later with a bare ``DEADLINE_EXCEEDED``, which no Python code can catch).
    Other failures to start raise :class:`DistributedError`.
    """
    spec = section(cfg)
    if spec is None:
        return
    check_config(cfg)
    message = _join_failure(spec)
    watchdog = threading.Timer(spec.initialization_timeout_s, _give_up, args=(message,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
            process_id=spec.process_id, initialization_timeout=spec.initialization_timeout_s + _NATIVE_GRACE_S,
            heartbeat_timeout_seconds=spec.heartbeat_timeout_s,
        )
    except Exception as error:  # jax raises RuntimeError / ValueError for a bad address or missing keys
        detail = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise DistributedError(f"{message} ({detail})") from None
    finally:
        watchdog.cancel()


# JAX's client aborts the process when its own init timeout passes; ours fires first.
_NATIVE_GRACE_S = 10


def _join_failure(spec: DistributedSection) -> str:
    where = spec.coordinator_address or "the coordinator address JAX's cluster detection found"
    expected = spec.num_processes if spec.num_processes is not None else "all"
    who = spec.process_id if spec.process_id is not None else "?"
    return (f"distributed: process {who} could not join {expected} processes at {where} within "
            f"distributed.initialization_timeout_s={spec.initialization_timeout_s}. Check that every process was "
            "started (process ids 0 .. num_processes-1, the same num_processes and coordinator_address in each) "
            "and that process 0's host and port are reachable")


def _give_up(message: str) -> None:
    print(f"fedjax-fm run: error: {message}", file=sys.stderr, flush=True)
    os._exit(2)  # the main thread is blocked in JAX's native connect: no exception can reach it


def multi_process() -> bool:
    """More than one process takes part in this run."""
    return jax.process_count() > 1


def is_primary() -> bool:
    """Process 0: the one that writes the run folder, evaluates and checkpoints."""
    return jax.process_index() == 0


def broadcast_text(text: Optional[str]) -> Optional[str]:
    """Process 0's ``text`` (or None) on every process (the others' argument is ignored)."""
    if not multi_process():
        return text
    data = np.frombuffer(json.dumps(text).encode(), np.uint8) if is_primary() else np.zeros([0], np.uint8)
    length = int(multihost_utils.broadcast_one_to_all(np.asarray([data.size], np.int32))[0])
    buffer = np.zeros([length], np.uint8)
    if is_primary():
        buffer[:] = data
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
    return json.loads(received.tobytes().decode())


def broadcast_tree(tree: Any) -> Any:
    """Process 0's host arrays on every process (every process passes a tree of the same shapes)."""
    if not multi_process():
        return tree
    host = jax.tree.map(np.asarray, tree)
    received = multihost_utils.broadcast_one_to_all(host)
    return jax.tree.map(lambda new, old: np.asarray(new, dtype=old.dtype), received, host)


def agree(error: Optional[str]) -> None:
    """After a step only process 0 takes: raise its error (a message, or None) on every process."""
    message = broadcast_text(error)
    if message is not None:
        if is_primary():
            return  # process 0 raises its own, original exception
        raise DistributedError(f"process 0 stopped the run: {message}")


def sum_over_processes(values: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Each value summed over the processes (None if any process has None): a collective."""
    if not multi_process():
        return list(values)
    local = np.asarray([np.nan if v is None else float(v) for v in values], np.float64)
    # Sent as uint32 pairs: without jax_enable_x64 a float64 would travel as float32.
    bits = np.asarray(multihost_utils.process_allgather(local.view(np.uint32)), np.uint32)
    gathered = bits.reshape(bits.shape[0], -1).view(np.float64)  # [processes, len(values)]
    return [None if np.isnan(column).any() else float(column.sum()) for column in gathered.T]


def gather_rows(local: np.ndarray) -> np.ndarray:
    """``[processes, *local.shape]``: every process's int32 ``local`` (the same shape on each), on every process.

    A collective; in one process ``local[None]``."""
    local = np.asarray(local, np.int32)
    if not multi_process():
        return local[None]
    return np.asarray(multihost_utils.process_allgather(local), np.int32).reshape(-1, *local.shape)


def sum_energy(record: CallRecord) -> CallRecord:
    """A metered call's record with the joules of every process's own meter summed (a collective).

    Wall time, tokens and FLOPs are already the round's (the same call on every process,
    totals gathered); the watts become ``Σ joules / wall`` and η_e follows from them. A
    process without a power reading makes the sum null, as one process without one would.
    """
    (joules,) = sum_over_processes([record.joules])
    watts = safe_div(joules, record.wall_s)
    return dataclasses.replace(record, joules=joules, joules_by_rail=None, mean_watts=watts, peak_watts=None,
                               eta_e=safe_div(record.tps, watts))
