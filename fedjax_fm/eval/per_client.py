"""Per-client quality: how the model serves each client, not only the pooled average.

Given one metric value ``v_c`` and example count ``n_c`` per client (``m`` clients)::

    mean            = (1/m) Σ_c v_c                 every client counts once
    weighted_mean   = Σ_c n_c v_c / Σ_c n_c          every example counts once (≈ the pooled figure)
    std             = sqrt((1/m) Σ_c (v_c − mean)²)  population std (ddof 0): 0 for one client
    worst_decile    = mean of the worst ⌈m/10⌉ clients   (at least one client)
    p10             = the 10th percentile of v_c toward "worse" (NumPy's linear interpolation):
                      the 10th percentile when higher is better (ROUGE), the 90th for losses

``worst_decile`` is a *mean of the worst 10 %* (a tail average, stable for small m);
``p10`` is the *percentile* itself. With one client all of them equal its value.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import numpy as np


class PerClientSummary(NamedTuple):
    """Fairness view of one metric over clients (see the module docstring)."""

    metric: str
    higher_is_better: bool
    num_clients: int
    mean: float
    weighted_mean: float
    std: float
    worst_decile: float
    worst_decile_clients: list[Any]  # ids of the clients averaged in worst_decile, worst first
    p10: float
    table: list[dict[str, Any]]  # [{"client", "value", "num_examples"}], worst first

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


def per_client_summary(
    values: Mapping[Any, float],
    num_examples: Mapping[Any, float] | None = None,
    *,
    metric: str = "metric",
    higher_is_better: bool = True,
) -> PerClientSummary:
    """Summarise ``values[client]`` (e.g. ROUGE-L or loss per client) over clients.

    ``num_examples[client]`` weights ``weighted_mean`` (all 1 when not given). Clients
    whose value is not finite are refused: a silently dropped client would flatter
    the worst decile.
    """
    if not values:
        raise ValueError("per_client_summary needs at least one client")
    clients = list(values)
    v = np.asarray([float(values[c]) for c in clients], np.float64)
    if not np.all(np.isfinite(v)):
        bad = [c for c, x in zip(clients, v) if not math.isfinite(x)]
        raise ValueError(f"{metric}: non-finite values for clients {bad}")
    if num_examples is None:
        n = np.ones_like(v)
    else:
        missing = [c for c in clients if c not in num_examples]
        if missing:
            raise ValueError(f"num_examples lacks clients {missing}")
        n = np.asarray([float(num_examples[c]) for c in clients], np.float64)
        if np.any(n < 0) or not n.sum() > 0:
            raise ValueError("num_examples must be >= 0 with a positive total")
    # Worst first; ties broken by client order (stable sort), so the table is deterministic.
    order = np.argsort(-v if not higher_is_better else v, kind="stable")
    k = max(1, math.ceil(len(v) / 10))
    worst = order[:k]
    p10 = float(np.percentile(v, 10.0 if higher_is_better else 90.0))
    table = [{"client": clients[i], "value": float(v[i]), "num_examples": float(n[i])} for i in order]
    return PerClientSummary(
        metric=metric,
        higher_is_better=higher_is_better,
        num_clients=len(v),
        mean=float(v.mean()),
        weighted_mean=float(np.sum(n * v) / np.sum(n)),
        std=float(v.std()),
        worst_decile=float(v[worst].mean()),
        worst_decile_clients=[clients[i] for i in worst],
        p10=p10,
        table=table,
    )
