"""Cost to a target and quality within a budget (the Cost-to-Target and Quality-under-Budget protocols).

From a run's rows (``metrics.jsonl``), cumulated over the training rounds up to and
including round ``t``:

* ``bytes_up``, ``bytes_down``, ``bytes`` (= up + down): exact payload bytes (after any codec);
* ``client_joules`` (measured, or null), ``comm_joules`` (network model), ``joules`` =
  client + server + comm (null if any part is unmeasured);
* ``modelled_seconds``: per round ``client_seconds / clients + codec_seconds + server_seconds
  + comm_seconds`` -- real clients train in parallel (the simulation runs them one after
  another, so the mean client's compute time is the round's), then the codec (counted
  whole: an upper bound, as encode runs on the devices in parallel), the server step and
  the modelled communication.

**Cost to target**: the first evaluated round whose ROUGE-L reaches the target, and the
cumulated figures at that round. The target is ``cost.target_rougeL`` when set, else
``cost.target_fraction`` (0.9) of the best ROUGE-L the run reached (so every run reaches
its own default target; compare runs with one explicit target, as ``fedjax-fm report``
does). Round 0 (before training) costs nothing.

**Quality within budget**: the best ROUGE-L among evaluated rounds whose cumulated
``bytes`` (or ``joules``) stay within the budget.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

CUMULATED = ("bytes_up", "bytes_down", "client_joules", "server_joules", "comm_joules", "codec_seconds")


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _add(total: Optional[float], value: Any) -> Optional[float]:
    value = _num(value)
    return None if total is None or value is None else total + value


def round_modelled_seconds(row: dict[str, Any]) -> Optional[float]:
    """``client_seconds / clients + codec_seconds + server_seconds + comm_seconds`` of a training row."""
    clients = _num(row.get("clients")) or 0.0
    client_s, server_s, comm_s = (_num(row.get(k)) for k in ("client_seconds", "server_seconds", "comm_seconds"))
    if client_s is None or server_s is None or comm_s is None or clients <= 0:
        return None
    return client_s / clients + (_num(row.get("codec_seconds")) or 0.0) + server_s + comm_s


def cumulative(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per row (in round order): its round, ROUGE-L, and the figures cumulated so far."""
    totals: dict[str, Optional[float]] = {key: 0.0 for key in (*CUMULATED, "modelled_seconds")}
    out = []
    for row in sorted(rows, key=lambda r: r["round"]):
        if row["round"] > 0:
            for key in CUMULATED:
                value = row.get(key)
                if key == "codec_seconds" and value is None:
                    value = 0.0  # no codec: no codec time
                totals[key] = _add(totals[key], value)
            totals["modelled_seconds"] = _add(totals["modelled_seconds"], round_modelled_seconds(row))
        entry = {"round": row["round"], "rougeL": _num(row.get("rougeL")), **totals}
        entry["bytes"] = _add(entry["bytes_up"], entry["bytes_down"])
        entry["joules"] = _add(_add(entry["client_joules"], entry["server_joules"]), entry["comm_joules"])
        out.append(entry)
    return out


def cost_to_target(rows: Sequence[dict[str, Any]], target_rougeL: Optional[float] = None,
                   target_fraction: float = 0.9) -> Optional[dict[str, Any]]:
    """The cost of reaching the target ROUGE-L (module docstring), or None if nothing was evaluated.

    ``reached`` is false (and the costs null) when no evaluated round reaches the target.
    """
    points = [p for p in cumulative(rows) if p["rougeL"] is not None]
    if not points:
        return None
    best = max(p["rougeL"] for p in points)
    target = target_rougeL if target_rougeL is not None else target_fraction * best
    hit = next((p for p in points if p["rougeL"] >= target), None)
    result: dict[str, Any] = {
        "target_rougeL": target,
        "target_rule": "cost.target_rougeL" if target_rougeL is not None else f"{target_fraction:g} x best ROUGE-L",
        "best_rougeL": best,
        "reached": hit is not None,
    }
    keys = ("round", "rougeL", "bytes_up", "bytes_down", "bytes", "client_joules", "comm_joules", "joules",
            "modelled_seconds")
    result.update({key: (hit[key] if hit is not None else None) for key in keys})
    return result


def quality_within_budget(rows: Sequence[dict[str, Any]], *, budget_bytes: Optional[float] = None,
                          budget_joules: Optional[float] = None) -> Optional[dict[str, Any]]:
    """The best ROUGE-L of the evaluated rounds whose cumulated bytes (up + down) and joules
    (client + server + comm) stay within the given budgets; None if no budget is given.

    A joule budget needs measured joules: with an unmeasured client phase the answer's
    ``rougeL`` is null (a run without a power meter cannot be placed under an energy budget).
    """
    if budget_bytes is None and budget_joules is None:
        return None
    points = [p for p in cumulative(rows) if p["rougeL"] is not None]
    within = []
    for p in points:
        if budget_bytes is not None and (p["bytes"] is None or p["bytes"] > budget_bytes):
            continue
        if budget_joules is not None and (p["joules"] is None or p["joules"] > budget_joules):
            continue
        within.append(p)
    best = max(within, key=lambda p: p["rougeL"], default=None)
    return {
        "budget_bytes": budget_bytes,
        "budget_joules": budget_joules,
        "rougeL": best["rougeL"] if best else None,
        "round": best["round"] if best else None,
        "bytes": best["bytes"] if best else None,
        "joules": best["joules"] if best else None,
    }
