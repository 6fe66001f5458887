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

import numpy as np

from fedjax_fm import fl
from fedjax_fm.data.packing import example_lengths, padding_efficiency
from fedjax_fm.energy.meter import CallRecord, Meter
from fedjax_fm.models.flops import ExampleFlops


def count_client_work(metrics: dict[str, Any], step_flops: Optional[float],
                      useful_flops: Optional[float] = None) -> tuple[float, Optional[float]]:
    """``(real tokens, model FLOPs)`` of client outputs' metrics (one client or a stacked group).

    ``useful_flops`` (from :func:`useful_train_flops` of the batches) is the model FLOPs
    of the real examples at their own lengths, MFU's numerator; without it, the FLOPs
    are ``step_flops`` per active step (the padded shapes' work).
    Host-side sums: a ``jnp`` reduction here would compile inside the metered window.
    """
    counts = fl.to_host({"tokens": metrics["tokens"], "steps": metrics["steps"]})  # across processes too
    tokens = float(np.sum(counts["tokens"]))
    if useful_flops is not None:
        return tokens, float(useful_flops)
    flops = None if step_flops is None else step_flops * float(np.sum(counts["steps"]))
    return tokens, flops


def useful_train_flops(example_flops: ExampleFlops, batches: dict) -> float:
    """Model FLOPs of a round's real examples, each at its own lengths (packed or not):
    the useful work of PaLM's MFU, computed on the host from the batches before they run."""
    return float(example_flops(*example_lengths(batches)))


def round_padding_efficiency(batches: dict) -> float:
    """``padding_efficiency`` of a round's batches: real token slots / all slots."""
    return padding_efficiency(batches)


def metered_clients(algorithm: fl.FederatedAlgorithm, state: fl.ServerState, frozen: Any, batches: dict,
                    client_ids: Any, meter: Meter, step_flops: Optional[float],
                    useful_flops: Optional[float] = None) -> tuple[fl.ClientOutputs, CallRecord]:
    """The client phase of a simulated round, as one metered call (tokens and FLOPs counted)."""
    with meter.section("clients") as section:
        outputs = section.block(algorithm.run_clients(state, frozen, batches, client_ids))
        section.tokens, section.flops = count_client_work(outputs.metrics, step_flops, useful_flops)
    return outputs, section.record


def metered_server_step(algorithm: fl.FederatedAlgorithm, state: fl.ServerState, outputs: fl.ClientOutputs,
                        meter: Meter) -> tuple[fl.ServerState, CallRecord, dict[str, Any]]:
    """Aggregation and the server optimiser, metered; returns the new state, the record and
    the server metrics on the host (``client_valid``, ``num_valid_clients``, ``applied``, ...)."""
    with meter.section("server") as section:
        new_state, metrics = section.block(algorithm.server_step(state, outputs))
    return new_state, section.record, fl.to_host(metrics)
