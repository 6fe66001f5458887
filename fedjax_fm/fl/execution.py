"""Execution backends: how one round's client updates are run. Equal results.

Every backend turns a pure ``client_update`` into::

    run_clients(trainable, frozen, batches, client_rngs) -> ClientOutputs

where ``batches`` has leading ``[clients, steps]`` axes and ``client_rngs`` is
``[clients, 2]``. The outputs are stacked over ``[clients]`` and stay on device
(no host synchronisation per client; the caller transfers metrics once).

* :class:`Sequential` -- one compiled call per client. Lowest memory; the call a
  device-by-device deployment makes.
* :class:`Vmapped` -- ``vmap`` over a group of clients in one compiled call. The
  server parameters and the frozen base are *broadcast* (``in_axes=None``), not
  replicated per client: with LoRA the group shares one copy of the base model
  and only the adapters and optimiser states are per client.
* :class:`Sharded` -- the vmapped call ``jit``-ted over a ``jax.sharding.Mesh``
  with a ``clients`` axis: client batches and outputs are split across devices,
  parameters replicated. The mesh may span several processes (``jax.distributed``,
  one process per host): each process then feeds only the clients its own devices
  hold (:meth:`Sharded.client_slots`; ``jax.make_array_from_process_local_data``),
  parameters and the frozen base are placed with ``jax.make_array_from_callback``,
  and results come back to the host with :func:`to_host`
  (``multihost_utils.process_allgather``), never ``jax.device_get``.

Placed once: :meth:`place` keeps a leaf that already has the target sharding, so a
runner that places the frozen base once (``frozen = executor.place(frozen)``) pays
nothing for it in later rounds (see ``docs/distributed.md``).

Groups that do not fill up are padded with copies of a client whose
``example_weight`` is zero; such a client skips every step (see ``client.py``)
and is sliced off before aggregation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_fm.fl.client import ClientUpdate, Params


class ClientOutputs(NamedTuple):
    deltas: Params  # leaves [clients, ...]
    num_examples: jax.Array  # [clients]
    metrics: dict[str, jax.Array]  # each [clients]


RunClients = Callable[[Params, Params, dict, jax.Array], ClientOutputs]


def _num_clients(batches: dict) -> int:
    if "example_weight" not in batches:
        raise KeyError("batches lack 'example_weight' (see docs/architecture.md, Batches)")
    weight = batches["example_weight"]
    if weight.ndim != 3:
        raise ValueError(
            f"client batches need leading [clients, steps] axes: example_weight has shape {weight.shape}, "
            "expected [clients, steps, batch]"
        )
    return int(weight.shape[0])


def _pad_clients(batches: dict, rngs: jax.Array, size: int) -> tuple[dict, jax.Array]:
    """Pads the client axis to ``size`` with zero-weight copies of client 0."""
    have = rngs.shape[0]
    if have == size:
        return batches, rngs

    def pad(x):
        xp = jnp if isinstance(x, jax.Array) else np
        filler = xp.repeat(x[:1], size - have, axis=0)
        return xp.concatenate([x, filler], axis=0)

    padded = {k: pad(v) for k, v in batches.items()}
    xp = jnp if isinstance(padded["example_weight"], jax.Array) else np
    weight = padded["example_weight"]
    if xp is np:
        weight = weight.copy()
        weight[have:] = 0.0
    else:
        weight = weight.at[have:].set(0.0)
    padded["example_weight"] = weight
    return padded, jnp.concatenate([rngs, jnp.repeat(rngs[:1], size - have, axis=0)], axis=0)


@functools.partial(jax.jit, static_argnames="count")
def _concat_and_trim(parts: list[ClientOutputs], count: int) -> ClientOutputs:
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
    return jax.tree.map(lambda x: x[:count], stacked)


def _concat(parts: list[ClientOutputs], count: int) -> ClientOutputs:
    """The groups' outputs as one ``[count, ...]`` tree (padding slots sliced off).

    One compiled program, not an eager op per leaf: across processes every op on a
    split array is a program with collectives, and several such programs queued at
    once can reach gloo in different orders on a process's two device threads and
    wait on each other forever (seen as a hang of the two-process test in ``x[:count]``).
    """
    if len(parts) == 1 and parts[0].num_examples.shape[0] == count:
        return parts[0]
    return _concat_and_trim(parts, count=count)


@dataclasses.dataclass(frozen=True)
class Sequential:
    """One compiled ``client_update`` call per client, dispatched back to back."""

    def place(self, tree: Params) -> Params:
        """Puts server-side pytrees where this backend wants them (here: as they are)."""
        return tree

    def compile(self, client_update: ClientUpdate) -> RunClients:
        update = jax.jit(client_update)

        def run(trainable, frozen, batches, client_rngs):
            count = _num_clients(batches)
            outs = [update(trainable, frozen, {k: v[i] for k, v in batches.items()}, client_rngs[i]) for i in range(count)]
            deltas, num_examples, metrics = zip(*outs)
            stack = lambda *xs: jnp.stack(xs, axis=0)  # noqa: E731
            return ClientOutputs(
                jax.tree.map(stack, *deltas), jnp.stack(num_examples), jax.tree.map(stack, *metrics)
            )

        return run


@dataclasses.dataclass(frozen=True)
class Vmapped:
    """Groups of ``group_size`` clients per compiled call (``None``: all clients at once)."""

    group_size: int | None = None

    def place(self, tree: Params) -> Params:
        """Puts server-side pytrees where this backend wants them (here: as they are)."""
        return tree

    def compile(self, client_update: ClientUpdate) -> RunClients:
        update = jax.jit(jax.vmap(client_update, in_axes=(None, None, 0, 0)))

        def run(trainable, frozen, batches, client_rngs):
            count = _num_clients(batches)
            group = self.group_size or count
            parts = []
            for start in range(0, count, group):
                part_batches = {k: v[start : start + group] for k, v in batches.items()}
                part_batches, part_rngs = _pad_clients(part_batches, client_rngs[start : start + group], group)
                parts.append(ClientOutputs(*update(trainable, frozen, part_batches, part_rngs)))
            return _concat(parts, count)

        return run


def client_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with the axis name ``clients``."""
    devs = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devs.reshape(-1), ("clients",))


class ClientSlots(NamedTuple):
    """Which of a round's clients this process feeds to a :class:`Sharded` executor.

    The round's ``count`` clients are padded to ``padded`` slots (groups of
    ``group`` slots, a multiple of the mesh size); ``positions`` are the slots this
    process's devices hold, in the order its local batches must come. ``sources``
    names, for each of them, the round position whose batches fill it: itself for
    a real client; for a padding slot the first real client this process holds (0
    if it holds none), whose data it has anyway (the executor zeroes its ``example_weight``,
    so it skips every step and is sliced off before aggregation).
    """

    count: int
    group: int
    padded: int
    positions: np.ndarray  # [local slots] int, slot indices in [0, padded)
    sources: np.ndarray  # [local slots] int, round positions in [0, count)

    @property
    def real(self) -> np.ndarray:
        """``[local slots]`` bool: the slot holds a real client (not padding)."""
        return self.positions < self.count


def all_slots(count: int) -> ClientSlots:
    """The slots of a backend that runs every client in this process (no padding)."""
    positions = np.arange(count)
    return ClientSlots(count, count, count, positions, positions)


def client_slots(executor: Any, count: int) -> ClientSlots:
    """``executor.client_slots(count)`` where it has one (:class:`Sharded`), else :func:`all_slots`."""
    slots = getattr(executor, "client_slots", None)
    return slots(count) if slots is not None else all_slots(count)


def to_host(tree: Any) -> Any:
    """``jax.device_get`` that also takes arrays spanning several processes.

    A replicated array is read from a local shard; one split across processes is
    gathered with ``multihost_utils.process_allgather``, a collective: every process
    must call ``to_host`` on the same arrays in the same order (they all run the
    same round code, so they do).
    """

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.device_get(jax.tree.map(get, tree))


@dataclasses.dataclass(frozen=True)
class Sharded:
    """The vmapped call partitioned over ``mesh``'s ``clients`` axis.

    ``clients_per_device`` bounds each compiled call to ``mesh.size * clients_per_device``
    clients (``None``: all clients of the round, padded to a multiple of the mesh size).

    ``run_clients(trainable, frozen, batches, client_rngs)``: ``client_rngs`` are the
    round's ``[count, 2]`` keys (the same on every process); ``batches`` are either the
    whole round's ``[count, steps, ...]`` (one process only) or this process's
    ``[len(slots.positions), steps, ...]`` for ``slots = client_slots(count)``, the
    batches of the round positions ``slots.sources`` (a runner in several processes
    builds only these).
    """

    mesh: Mesh = dataclasses.field(default_factory=client_mesh)
    clients_per_device: int | None = None

    @property
    def multi_process(self) -> bool:
        """The mesh spans devices of other processes (``jax.distributed``)."""
        return any(d.process_index != jax.process_index() for d in self.mesh.devices.flat)

    def _sharding(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def place(self, tree: Params) -> Params:
        """Replicates server-side pytrees (parameters, optimiser state, frozen base) over the mesh.

        Leaves that already are replicated over the mesh are returned as they are: a
        tree placed once is never copied again. Host values (or arrays on one local
        device) are placed with ``jax.make_array_from_callback`` when the mesh spans
        processes (every process must hold the same value), with ``jax.device_put``
        otherwise; arrays spanning processes with another sharding are resharded by
        a compiled identity.
        """
        target = self._sharding(PartitionSpec())
        multi = self.multi_process

        def put(x):
            if isinstance(x, jax.Array):
                if x.sharding.is_equivalent_to(target, x.ndim):
                    return x
                if not x.is_fully_addressable:
                    return jax.jit(lambda a: a, out_shardings=target)(x)
            if not multi:
                return jax.device_put(x, target)
            value = np.asarray(x)
            return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

        return jax.tree.map(put, tree)

    def _group(self, count: int) -> int:
        devices = self.mesh.shape["clients"]
        if self.clients_per_device:
            return devices * self.clients_per_device
        return max(1, -(-count // devices)) * devices

    def client_slots(self, count: int) -> ClientSlots:
        """The slots of a round of ``count`` clients that this process feeds (see :class:`ClientSlots`).

        Each group of ``group`` slots is split over the mesh's ``clients`` axis; this
        process holds the rows its own devices hold in every group, a contiguous block
        when the mesh lists each process's devices together (as :func:`client_mesh`
        does, from ``jax.devices()``).
        """
        group = self._group(count)
        padded = -(-count // group) * group
        index_map = self._sharding(PartitionSpec("clients")).addressable_devices_indices_map((group,))
        rows = sorted({r for index in index_map.values() for r in range(*index[0].indices(group))})
        if rows != list(range(rows[0], rows[0] + len(rows))):
            raise ValueError(
                f"this process's devices hold rows {rows} of the clients axis, not one block: build the mesh "
                "with each process's devices together (fl.client_mesh() does)"
            )
        positions = np.asarray([start + r for start in range(0, padded, group) for r in rows], np.int64)
        # A padding slot repeats one of this process's own real clients (weight 0), so a
        # process never needs another process's client data (each tokenises only its own).
        own = positions[positions < count]
        sources = np.where(positions < count, positions, own[0] if own.size else 0)
        return ClientSlots(count, group, padded, positions, sources)

    def compile(self, client_update: ClientUpdate) -> RunClients:
        if "clients" not in self.mesh.axis_names:
            raise ValueError(f"Sharded needs a mesh with a 'clients' axis, got axes {self.mesh.axis_names}")
        split = self._sharding(PartitionSpec("clients"))
        replicated = self._sharding(PartitionSpec())
        update = jax.jit(
            jax.vmap(client_update, in_axes=(None, None, 0, 0)),
            in_shardings=(replicated, replicated, split, split),
            out_shardings=split,
        )

        def run(trainable, frozen, batches, client_rngs):
            count = int(client_rngs.shape[0])
            slots = self.client_slots(count)
            local = len(slots.positions)
            have = _num_clients(batches)
            if have == count and have != local and not self.multi_process:
                batches = {k: v[slots.sources] for k, v in batches.items()}  # the whole round: take the slots
            elif have != local:
                raise ValueError(
                    f"Sharded: got batches for {have} clients; this process feeds {local} slots of the round's "
                    f"{count} clients (executor.client_slots({count}).sources)"
                )
            weight = np.array(batches["example_weight"], dtype=np.float32, copy=True)
            weight[~slots.real] = 0.0  # padding slots: zero weight, every step skipped
            batches = dict(batches, example_weight=weight)
            rngs = to_host(client_rngs)[slots.sources]
            trainable, frozen = self.place(trainable), self.place(frozen)
            per_group = local * slots.group // slots.padded  # this process's slots in each group
            parts = []
            for g in range(slots.padded // slots.group):
                part = slice(g * per_group, (g + 1) * per_group)
                feed = lambda x: jax.make_array_from_process_local_data(  # noqa: E731
                    split, np.asarray(x[part]), (slots.group,) + tuple(x.shape[1:]))
                parts.append(ClientOutputs(*update(trainable, frozen, {k: feed(v) for k, v in batches.items()},
                                                   feed(rngs))))
                if self.multi_process:
                    # One program with cross-process collectives in flight at a time: XLA:CPU runs
                    # each local device's part of a program on its own thread, so two queued programs
                    # can reach gloo's collectives in different orders on the two devices of a
                    # process and wait on each other across processes (seen as an intermittent hang
                    # of the two-process test). Waiting here keeps the order the same everywhere.
                    jax.block_until_ready(parts[-1])
            outputs = _concat(parts, count)
            return jax.block_until_ready(outputs) if self.multi_process else outputs

        return run
