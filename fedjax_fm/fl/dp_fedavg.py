"""DP-FedAvg as a :class:`~fedjax_fm.fl.FederatedAlgorithm`: the clip state rides in the server state.

:func:`fedjax_fm.fl.privacy.dp_fedavg_aggregator` is a stateful ``(init, update)``
pair (adaptive clipping moves ``C`` every round). :class:`DPFedAvg` carries that
state in :class:`DPServerState` — ``ServerState`` plus ``clip`` — so it is part of
the one checkpointable pytree: a killed and resumed run continues from the same
``C`` and adds the same noise (the noise key is the round's server key).

Client training, the executor and the server optimiser are unchanged; only the
aggregation differs (clipped, uniform, noised; always applied). The extra server
metrics are ``clip_norm`` (the ``C`` used this round), ``next_clip_norm``,
``noise_stddev`` (of the noise on the pseudo-gradient, ``z_Δ·C/K``) and
``noisy_quantile`` (NaN without adaptive clipping).
"""

from __future__ import annotations

import flax.struct
import jax
import optax

from fedjax_fm.fl.algorithm import SERVER_STREAM, FederatedAlgorithm, ServerState
from fedjax_fm.fl.client import ClientUpdate, Params
from fedjax_fm.fl.execution import ClientOutputs
from fedjax_fm.fl.privacy import DPAggregator, DPClipState


@flax.struct.dataclass
class DPServerState(ServerState):
    """:class:`ServerState` plus the DP aggregator's state (the clip norm ``C``)."""

    clip: DPClipState


class DPFedAvg(FederatedAlgorithm):
    """A federated algorithm whose aggregation is ``dp`` (``fl.dp_fedavg_aggregator(...)``)."""

    def __init__(self, client_update: ClientUpdate, server_optimizer: optax.GradientTransformation,
                 dp: DPAggregator, executor=None):
        self.dp = dp
        super().__init__(client_update, server_optimizer, aggregator=None, executor=executor)

    def init(self, trainable: Params, seed) -> DPServerState:
        state = super().init(trainable, seed)
        return self.executor.place(DPServerState(params=state.params, opt_state=state.opt_state, round=state.round,
                                                 rng=state.rng, clip=self.dp.init()))

    def server_update(self, state: DPServerState, outputs: ClientOutputs) -> tuple[DPServerState, dict]:
        """Pure: DP aggregation with the carried clip state, then the server optimiser (always applied)."""
        agg_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.round), SERVER_STREAM)
        result, clip = self.dp.update(outputs.deltas, outputs.num_examples, agg_rng, state.clip)
        updates, new_opt_state = self.server_optimizer.update(result.pseudo_gradient, state.opt_state, state.params)
        new_state = state.replace(
            params=optax.apply_updates(state.params, updates),
            opt_state=new_opt_state,
            round=state.round + 1,
            clip=clip,
        )
        metrics = {
            "num_valid_clients": result.num_valid,
            "num_nonfinite_clients": result.num_nonfinite,
            "applied": result.applied,
            "client_valid": result.valid,
            "pseudo_gradient_norm": optax.tree.norm(result.pseudo_gradient),
            "clip_norm": result.clip_norm,
            "next_clip_norm": result.next_clip_norm,
            "noise_stddev": result.noise_stddev,
            "noisy_quantile": result.noisy_quantile,
        }
        return new_state, metrics
