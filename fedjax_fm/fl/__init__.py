"""Federated core: client update, aggregation, server optimisers, update codecs, sampling, algorithms, execution backends.

Differential privacy (DP-FedAvg, adaptive clipping, Poisson sampling, the
accountant) lives in ``privacy.py``, ``sampling.py`` and ``accountant.py``.

Typical use (see ``docs/federated.md``)::

    from fedjax_fm import fl
    client_update = fl.make_client_update(loss_fn, fl.client_optimizer("adamw", learning_rate=5e-4))
    algorithm = fl.FederatedAlgorithm(
        client_update,
        fl.server_optimizer("fedadam", learning_rate=1e-2, variant="reddi"),
        fl.make_aggregator("examples", min_clients=1),
        fl.Vmapped(),
    )
    state = algorithm.init(trainable, seed)
    ids = fl.sample_clients(seed, round_index, population, clients_per_round)
    state, metrics = algorithm.round(state, frozen, batches_for(ids), ids)
"""

from fedjax_fm.fl.accountant import (
    DPConfigError,
    PrivacyLedger,
    epsilon,
    make_accountant,
    max_rounds_within,
    round_event,
    validate_dp_config,
)
from fedjax_fm.fl.aggregation import AggregateResult, aggregate, client_is_finite
from fedjax_fm.fl.algorithm import (
    SERVER_STREAM,
    FederatedAlgorithm,
    ServerState,
    apply_pseudo_gradient,
    client_rngs,
    make_aggregator,
)
from fedjax_fm.fl.client import batch_counts, client_optimizer, make_client_update
from fedjax_fm.fl.codecs import (
    Codec,
    bf16,
    chain,
    downlink_bytes,
    encoded_bytes,
    ffa_lora,
    freeze_lora_a,
    identity,
    init_client_states,
    lora_a_mask,
    make_codec,
    put_client_states,
    quantize,
    roundtrip,
    take_client_states,
    topk,
)
from fedjax_fm.fl.execution import (
    ClientOutputs,
    ClientSlots,
    Sequential,
    Sharded,
    Vmapped,
    all_slots,
    client_mesh,
    client_slots,
    to_host,
)
from fedjax_fm.fl.variables import join_variables, split_variables, trainable_collections, tree_nbytes
from fedjax_fm.fl.privacy import (
    AdaptiveClipping,
    DPAggregateResult,
    DPAggregator,
    DPClipState,
    clip_deltas,
    client_norms,
    dp_aggregate,
    dp_fedavg_aggregator,
    effective_noise_multiplier,
    make_dp_aggregator,
    noisy_mean_of_sum,
    update_noise_multiplier,
)
from fedjax_fm.fl.sampling import PoissonSample, poisson_max_clients, poisson_sample_clients, sample_clients
from fedjax_fm.fl.server_optimizers import (
    SERVER_OPTIMIZERS,
    fedadagrad,
    fedadam,
    fedadamw,
    fedavg,
    fedavgm,
    fedyogi,
    scale_by_reddi_adaptive,
    server_learning_rate,
    server_optimizer,
)

__all__ = [
    "SERVER_OPTIMIZERS",
    "SERVER_STREAM",
    "AdaptiveClipping",
    "AggregateResult",
    "ClientOutputs",
    "ClientSlots",
    "Codec",
    "DPAggregateResult",
    "DPAggregator",
    "DPClipState",
    "DPConfigError",
    "FederatedAlgorithm",
    "PoissonSample",
    "PrivacyLedger",
    "Sequential",
    "ServerState",
    "Sharded",
    "Vmapped",
    "aggregate",
    "apply_pseudo_gradient",
    "all_slots",
    "batch_counts",
    "bf16",
    "chain",
    "client_is_finite",
    "client_mesh",
    "client_norms",
    "client_optimizer",
    "client_rngs",
    "client_slots",
    "clip_deltas",
    "downlink_bytes",
    "dp_aggregate",
    "dp_fedavg_aggregator",
    "effective_noise_multiplier",
    "encoded_bytes",
    "epsilon",
    "fedadagrad",
    "fedadam",
    "fedadamw",
    "fedavg",
    "fedavgm",
    "fedyogi",
    "ffa_lora",
    "freeze_lora_a",
    "identity",
    "init_client_states",
    "join_variables",
    "lora_a_mask",
    "make_accountant",
    "make_aggregator",
    "make_client_update",
    "make_codec",
    "make_dp_aggregator",
    "max_rounds_within",
    "noisy_mean_of_sum",
    "poisson_max_clients",
    "poisson_sample_clients",
    "put_client_states",
    "quantize",
    "round_event",
    "roundtrip",
    "sample_clients",
    "scale_by_reddi_adaptive",
    "server_learning_rate",
    "server_optimizer",
    "split_variables",
    "take_client_states",
    "to_host",
    "topk",
    "trainable_collections",
    "tree_nbytes",
    "update_noise_multiplier",
    "validate_dp_config",
]
