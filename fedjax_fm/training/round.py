"""The two metered halves of a federated round, shared by simulation and deployment.

``FederatedAlgorithm.round`` is ``run_clients`` then ``server_step``; a run meters
each half on its own, so the host side of a round is::

    outputs, clients = metered_clients(algorithm, state, frozen, batches, ids, meter, step_flops)
    state, server, host = metered_server_step(algorithm, state, outputs, meter)

In a deployment the client half runs on the devices (each metered there, with the
same :func:`count_client_work`) and only the server half runs here. Both halves call
the algorithm's own compiled functions: nothing is jitted again.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np

from fedjax_fm import fl
from fedjax_fm.energy.meter import CallRecord, Meter


def count_client_work(metrics: dict[str, Any], step_flops: Optional[float]) -> tuple[float, Optional[float]]:
    """``(real tokens, model FLOPs)`` of client outputs' metrics (one client or a stacked group).

    Host-side sums: a ``jnp`` reduction here would compile inside the metered window.
    """
    counts = jax.device_get({"tokens": metrics["tokens"], "steps": metrics["steps"]})
    tokens = float(np.sum(counts["tokens"]))
    flops = None if step_flops is None else step_flops * float(np.sum(counts["steps"]))
    return tokens, flops


def metered_clients(algorithm: fl.FederatedAlgorithm, state: fl.ServerState, frozen: Any, batches: dict,
                    client_ids: Any, meter: Meter, step_flops: Optional[float]) -> tuple[fl.ClientOutputs, CallRecord]:
    """The client phase of a simulated round, as one metered call (tokens and FLOPs counted)."""
    with meter.section("clients") as section:
        outputs = section.block(algorithm.run_clients(state, frozen, batches, client_ids))
        section.tokens, section.flops = count_client_work(outputs.metrics, step_flops)
    return outputs, section.record


def metered_server_step(algorithm: fl.FederatedAlgorithm, state: fl.ServerState, outputs: fl.ClientOutputs,
                        meter: Meter) -> tuple[fl.ServerState, CallRecord, dict[str, Any]]:
    """Aggregation and the server optimiser, metered; returns the new state, the record and
    the server metrics on the host (``client_valid``, ``num_valid_clients``, ``applied``, ...)."""
    with meter.section("server") as section:
        new_state, metrics = section.block(algorithm.server_step(state, outputs))
    return new_state, section.record, jax.device_get(metrics)
