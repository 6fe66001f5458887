"""Federated algorithms assembled from swappable pieces (fedjax's ``init`` / ``round``).

An algorithm is three pure pieces and a backend::

    client_update(trainable, frozen, batches, rng) -> (delta, num_examples, metrics)
    aggregator(deltas, num_examples, rng)          -> AggregateResult
    server_optimizer: optax.GradientTransformation  on the pseudo-gradient
    executor: Sequential() | Vmapped() | Sharded()  how the clients run

One round ``t`` with sampled client ids ``c_1..c_K``::

    round_key = fold_in(state.rng, t);   rng_k = fold_in(round_key, c_k)
    delta_k, n_k, m_k = client_update(x_t, frozen, batches_k, rng_k)      (executor)
    g, ... = aggregator(delta, n, fold_in(round_key, SERVER_STREAM))
    u, s_{t+1} = server_optimizer.update(g, s_t, x_t);  x_{t+1} = x_t + u   (if applied)

To change an algorithm, wrap a piece in plain Python and build a new
:class:`FederatedAlgorithm` (``docs/federated.md`` shows FedProx and update
clipping; DP-FedAvg with its accountant is in ``fl/privacy.py`` and ``fl/accountant.py``).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_fm.fl.aggregation import AggregateResult, Weighting, aggregate
from fedjax_fm.fl.client import ClientUpdate, Params
from fedjax_fm.fl.execution import ClientOutputs, Sequential

Aggregator = Callable[[Params, jax.Array, jax.Array], AggregateResult]

# fold_in data for the server's random stream within a round; client ids are
# folded into the same round key, so this value is reserved (no client has it).
SERVER_STREAM = 0xFFFFFFFF


@flax.struct.dataclass
class ServerState:
    """Everything the server carries between rounds: one checkpointable pytree.

    ``params``: trainable parameters (LoRA: the adapters only; the frozen base is
    a constant of the run). ``opt_state``: the server optimiser's state.
    ``round``: int32 rounds completed. ``rng``: the run's base key ``PRNGKey(seed)``
    (raw uint32 ``[2]``, so orbax stores it as a plain array).
    """

    params: Params
    opt_state: optax.OptState
    round: jax.Array
    rng: jax.Array


def make_aggregator(weighting: Weighting = "examples", min_clients: int = 1) -> Aggregator:
    """The default aggregator (see :func:`fedjax_fm.fl.aggregation.aggregate`); ignores its rng."""

    def aggregator(deltas: Params, num_examples: jax.Array, rng: jax.Array) -> AggregateResult:
        del rng
        return aggregate(deltas, num_examples, weighting=weighting, min_clients=min_clients)

    return aggregator


def apply_pseudo_gradient(server_optimizer: optax.GradientTransformation, state: ServerState,
                          pseudo_gradient: Params, applied: jax.Array) -> ServerState:
    """Pure: ``x_{t+1} = x_t + u`` with ``u, s_{t+1} = server_optimizer.update(g, s_t, x_t)`` when
    ``applied``, else the same parameters and optimiser state; the round counter always advances.

    The server half of every round after aggregation: :meth:`FederatedAlgorithm.server_update`
    calls it on its aggregate, a deployment with secure aggregation on the mean SecAgg+ reveals.
    """
    updates, new_opt_state = server_optimizer.update(pseudo_gradient, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jnp.where(applied, new, old)  # noqa: E731 - unapplied round: no change
    return state.replace(
        params=jax.tree.map(keep, new_params, state.params),
        opt_state=jax.tree.map(keep, new_opt_state, state.opt_state),
        round=state.round + 1,
    )


def client_rngs(base_rng: jax.Array, round_index: jax.Array, client_ids: jax.Array) -> jax.Array:
    """``[K, 2]`` keys ``fold_in(fold_in(base_rng, round), client_id)``."""
    round_key = jax.random.fold_in(base_rng, round_index)
    return jax.vmap(lambda c: jax.random.fold_in(round_key, c))(jnp.asarray(client_ids, jnp.uint32))


class FederatedAlgorithm:
    """``init`` and ``round`` over pure pieces (see the module docstring).

    ``round`` = ``run_clients`` (the client phase) then ``server_step`` (aggregation and
    the server optimiser, ``server_update`` compiled); a runner that meters each half
    calls the two itself, exactly as ``round`` does. Build one per run and reuse it:
    compiled functions are cached on the object.
    """

    def __init__(
        self,
        client_update: ClientUpdate,
        server_optimizer: optax.GradientTransformation,
        aggregator: Aggregator | None = None,
        executor: Any = None,
    ):
        self.client_update = client_update
        self.server_optimizer = server_optimizer
        self.aggregator = aggregator if aggregator is not None else make_aggregator()
        self.executor = executor if executor is not None else Sequential()
        self._run_clients = self.executor.compile(client_update)
        self._client_rngs = jax.jit(client_rngs)
        #: ``server_update`` compiled once for this algorithm: what ``round`` runs, and what a
        #: runner that meters the two halves of a round (or a deployment's server) calls.
        self.server_step = jax.jit(self.server_update)

    def init(self, trainable: Params, seed: int | jax.Array) -> ServerState:
        """The round-0 server state for ``trainable`` parameters and a run seed."""
        rng = jax.random.PRNGKey(int(seed)) if isinstance(seed, (int, np.integer)) else seed
        chex.assert_shape(rng, (2,))
        state = ServerState(
            params=trainable,
            opt_state=self.server_optimizer.init(trainable),
            round=jnp.zeros([], jnp.int32),
            rng=rng,
        )
        return self.executor.place(state)

    def run_clients(self, state: ServerState, frozen: Params, batches: dict, client_ids: Any) -> ClientOutputs:
        """The first half of ``round``: local training of the given clients (compiled by the executor)."""
        rngs = self._client_rngs(state.rng, state.round, jnp.asarray(client_ids))
        return self._run_clients(state.params, frozen, batches, rngs)

    def server_update(self, state: ServerState, outputs: ClientOutputs) -> tuple[ServerState, dict[str, jax.Array]]:
        """Pure: aggregate the client outputs and apply the server optimiser (compiled as ``server_step``)."""
        chex.assert_trees_all_equal_structs(outputs.deltas, state.params)
        agg_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.round), SERVER_STREAM)
        result = self.aggregator(outputs.deltas, outputs.num_examples, agg_rng)
        new_state = apply_pseudo_gradient(self.server_optimizer, state, result.pseudo_gradient, result.applied)
        metrics = {
            "num_valid_clients": result.num_valid,
            "num_nonfinite_clients": result.num_nonfinite,
            "applied": result.applied,
            "client_valid": result.valid,
            "pseudo_gradient_norm": optax.tree.norm(result.pseudo_gradient),
        }
        return new_state, metrics

    def round(
        self, state: ServerState, frozen: Params, batches: dict, client_ids: Any
    ) -> tuple[ServerState, dict[str, jax.Array]]:
        """One federated round. ``batches`` has leading ``[clients, steps]`` axes,
        ``client_ids`` the ``[clients]`` ids they belong to (for the dropout keys).

        Returns the new state and metrics as device arrays (transfer them once with
        ``jax.device_get``): per client ``client_loss``, ``client_tokens``,
        ``client_steps``, ``client_num_examples``, ``client_valid``; per round
        ``num_valid_clients``, ``num_nonfinite_clients``, ``applied``, ``pseudo_gradient_norm``.
        """
        outputs = self.run_clients(state, frozen, batches, client_ids)
        new_state, server_metrics = self.server_step(state, outputs)
        metrics = {f"client_{name}": value for name, value in outputs.metrics.items()}
        metrics["client_num_examples"] = outputs.num_examples
        metrics.update(server_metrics)
        return new_state, metrics
