"""Things a run must not do silently: heavy truncation, rejected clients, skipped rounds,
and a ``--resume`` whose only change would go unused.

Each check returns the warning (or the figures) for the caller to print or record;
nothing here prints or raises on its own, so the same checks serve the simulation
(``training/experiment.py``), the deployment and ``fedjax-fm report``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

# Above this fraction of truncated inputs (or targets) a run says so on the console.
TRUNCATION_WARN_FRACTION = 0.05


def truncation_warnings(reports: Mapping[str, Any], threshold: float = TRUNCATION_WARN_FRACTION) -> list[str]:
    """One line per split and side cut in more than ``threshold`` of its examples.

    ``reports``: split name -> :class:`fedjax_fm.data.tokenize.TruncationReport` (or its dict).
    """
    lines = []
    for split, report in reports.items():
        r = report if isinstance(report, Mapping) else report.as_dict()
        n = r["num_examples"]
        if not n:
            continue
        for side, key, limit, longest in (
            ("inputs", "inputs_truncated", "max_input_length", "input_length_max"),
            ("targets", "targets_truncated", "max_target_length", "target_length_max"),
        ):
            cut = r[key]
            if cut / n > threshold:
                lines.append(
                    f"warning: data.{limit}={r[limit]} truncates {cut} of {n} {split} {side} "
                    f"({100 * cut / n:.0f}%; the longest has {r[longest]} tokens): the model "
                    f"{'never sees their ends' if side == 'inputs' else 'learns and is scored on cut summaries'}; "
                    f"raise data.{limit}"
                )
    return lines


def fault_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """``rejected_clients``: client updates the server rejected (non-finite) over the training
    rounds; ``skipped_rounds``: rounds whose update was not applied (too few valid clients)."""
    rejected = skipped = 0
    for row in rows:
        if row.get("round", 0) <= 0:
            continue
        clients, valid = row.get("clients"), row.get("valid_clients")
        if clients is not None and valid is not None:
            rejected += max(0, int(clients) - int(valid))
        if row.get("applied") is False:
            skipped += 1
    return {"rejected_clients": rejected, "skipped_rounds": skipped}


def round_warning(row: Mapping[str, Any], min_clients: Optional[int] = None) -> Optional[str]:
    """The console line for a round that rejected clients or applied no update (None if clean)."""
    counts = fault_counts([row])
    if not counts["rejected_clients"] and not counts["skipped_rounds"]:
        return None
    parts = []
    if counts["rejected_clients"]:
        parts.append(f"{counts['rejected_clients']} of {row['clients']} client updates rejected (non-finite)")
    if counts["skipped_rounds"]:
        need = f" < federated.min_clients={min_clients}" if min_clients is not None else ""
        parts.append(f"no update applied ({row.get('valid_clients')} valid{need}): the model is unchanged")
    return f"warning: round {row['round']}: " + "; ".join(parts)


def unused_resume_changes(saved: Mapping[str, Any], current: Mapping[str, Any],
                          sections: Sequence[str] = ("eval",)) -> list[str]:
    """Dotted keys of ``sections`` that differ between a run's saved config and this one."""
    changed = []
    for section in sections:
        old, new = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                changed.append(f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changed
