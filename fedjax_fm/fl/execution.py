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
  parameters replicated. Any single-process mesh works (several GPUs, or
  virtual CPU devices as in the tests). Multi-host meshes need each process to
  contribute its own slice of the client batches
  (``jax.make_array_from_process_local_data``) instead of the ``device_put`` of
  host arrays done here: not implemented or tested yet.

Groups that do not fill up are padded with copies of a client whose
``example_weight`` is zero; such a client skips every step (see ``client.py``)
and is sliced off before aggregation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


def _concat(parts: list[ClientOutputs], count: int) -> ClientOutputs:
    if len(parts) == 1:
        stacked = parts[0]
    else:
        stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
    if stacked.num_examples.shape[0] != count:
        stacked = jax.tree.map(lambda x: x[:count], stacked)
    return stacked


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


@dataclasses.dataclass(frozen=True)
class Sharded:
    """The vmapped call partitioned over ``mesh``'s ``clients`` axis.

    ``clients_per_device`` bounds each compiled call to ``mesh.size * clients_per_device``
    clients (``None``: all clients of the round, padded to a multiple of the mesh size).
    """

    mesh: Mesh = dataclasses.field(default_factory=client_mesh)
    clients_per_device: int | None = None

    def place(self, tree: Params) -> Params:
        """Replicates server-side pytrees (parameters, optimiser state) over the mesh."""
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def compile(self, client_update: ClientUpdate) -> RunClients:
        if "clients" not in self.mesh.axis_names:
            raise ValueError(f"Sharded needs a mesh with a 'clients' axis, got axes {self.mesh.axis_names}")
        split = NamedSharding(self.mesh, PartitionSpec("clients"))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        update = jax.jit(
            jax.vmap(client_update, in_axes=(None, None, 0, 0)),
            in_shardings=(replicated, replicated, split, split),
            out_shardings=split,
        )
        devices = self.mesh.shape["clients"]

        def run(trainable, frozen, batches, client_rngs):
            count = _num_clients(batches)
            trainable, frozen = self.place(trainable), self.place(frozen)
            if self.clients_per_device:
                group = devices * self.clients_per_device
            else:
                group = -(-count // devices) * devices
            parts = []
            for start in range(0, count, group):
                part_batches = {k: v[start : start + group] for k, v in batches.items()}
                part_batches, part_rngs = _pad_clients(part_batches, client_rngs[start : start + group], group)
                part_batches = jax.device_put(part_batches, split)
                part_rngs = jax.device_put(part_rngs, split)
                parts.append(ClientOutputs(*update(trainable, frozen, part_batches, part_rngs)))
            return _concat(parts, count)

        return run
