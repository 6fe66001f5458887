"""The model card written with every export (``export/README.md``), from the run's summary.

It states, for a reader who has only the exported folder: the base model, the data
and its partition, the rounds, the privacy guarantee (or "none"), the energy and
communication totals with where they come from (measured by a named power backend,
estimated from a declared constant power, or modelled from a network profile), the
quality — pooled and its spread over clients — and the lineage hash that ties the
folder to the run's record. Every figure is summary.json's; none is computed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from fedjax_fm.config import ExperimentConfig
from fedjax_fm.training.builders import wants_pretrained


def _fmt(value: Any, unit: str = "", digits: int = 4) -> str:
    if value is None:
        return "not measured"
    text = f"{value:.{digits}g}" if isinstance(value, float) else str(value)
    return f"{text} {unit}" if unit else text


def model_card(cfg: ExperimentConfig, summary: dict[str, Any]) -> str:
    """The card's Markdown text."""
    data = summary.get("data") or {}
    partition = data.get("partition") or {}
    totals = summary.get("totals") or {}
    privacy: Optional[dict[str, Any]] = summary.get("privacy")
    per_client: Optional[dict[str, Any]] = summary.get("per_client")
    lineage = summary.get("lineage") or {}
    final = summary.get("final") or {}
    f = cfg.federated
    energy_kind = "estimated (a declared constant power draw)" if summary.get("energy_is_estimate") else \
        "measured" if totals.get("client_joules") is not None else "not measured (no power backend)"
    lines = [
        f"# {cfg.model.name} fine-tuned federatedly with fedjax-fm",
        "",
        "## Base model",
        f"- base model: `{cfg.model.name}` ({'pretrained weights' if wants_pretrained(cfg) else 'random initialisation'})",
        f"- fine-tuning: {summary.get('mode')}; {_fmt(summary.get('num_trainable_params'))} trainable of "
        f"{_fmt(summary.get('num_params'))} parameters",
        "",
        "## Data and partition",
        f"- source: {cfg.data.source.kind}",
        f"- partition: {partition.get('method')} over {partition.get('num_clients')} clients, "
        f"{partition.get('num_examples')} training examples (per client: min {partition.get('min')}, "
        f"max {partition.get('max')})",
        f"- pooled evaluation set: {data.get('num_eval_examples')} examples",
        "",
        "## Training",
        f"- rounds: {summary.get('rounds')} (configured {f.rounds}); clients per round: "
        f"{privacy['expected_clients'] if privacy else f.clients_per_round}"
        f"{' expected (Poisson)' if privacy and privacy.get('sampling') == 'poisson' else ''}; "
        f"local steps: {f.local_steps}; server optimiser: {summary.get('server_optimizer')}; seed {summary.get('seed')}",
        "",
        "## Privacy",
    ]
    if privacy:
        lines += [
            f"- guarantee: (ε = {privacy['epsilon']:.4g}, δ = {privacy['delta']:.3g}) — {privacy['guarantee']}",
            f"- mechanism: {privacy['mechanism']}; noise multiplier {privacy['noise_multiplier']}, clip norm "
            f"{privacy['clip_norm']}; sampling {privacy['sampling']}",
            "- not covered: per-client diagnostics in metrics.jsonl (losses, per-client quality) are exact and "
            "not part of the private release",
        ]
    else:
        lines += ["- guarantee: none (no differential privacy; updates were aggregated in the clear)"]
    lines += [
        "",
        "## Energy and communication",
        f"- compute energy: {_fmt(totals.get('compute_joules'), 'J')} (clients {_fmt(totals.get('client_joules'), 'J')}, "
        f"server {_fmt(totals.get('server_joules'), 'J')}); source: {summary.get('energy_source')}, {energy_kind}",
        f"- communication: {_fmt(totals.get('bytes_up'), 'bytes')} up, {_fmt(totals.get('bytes_down'), 'bytes')} down; "
        f"{_fmt(totals.get('comm_seconds'), 's')} and {_fmt(totals.get('comm_joules'), 'J')} modelled "
        f"(network profile `{cfg.energy.network}`, not measured)",
        f"- tokens trained on: {_fmt(totals.get('tokens'))}",
        "",
        "## Quality",
        f"- pooled ROUGE-L (round {final.get('round')}): {_fmt(final.get('rougeL'))}; eval loss {_fmt(final.get('eval_loss'))}",
    ]
    if per_client:
        lines += [
            f"- per client (round {per_client['round']}, each client's own held-out examples): ROUGE-L mean "
            f"{_fmt(per_client['client_rougeL_mean'])}, worst decile {_fmt(per_client['client_rougeL_worst_decile'])}, "
            f"std {_fmt(per_client['client_rougeL_std'])} over {len(per_client['per_client'])} clients",
        ]
    else:
        lines += ["- per client: not evaluated (set eval.per_client_every)"]
    lines += [
        "",
        "## Lineage",
        f"- params_sha256: `{summary.get('params_sha256')}`",
        f"- lineage: `{lineage.get('file')}`, last entry_hash `{lineage.get('last_entry_hash')}` "
        "(check with `fedjax-fm lineage verify RUN_DIR`)",
        f"- config_sha256: `{lineage.get('config_sha256')}`",
        "",
    ]
    return "\n".join(lines)


def write_model_card(export_dir: str | Path, cfg: ExperimentConfig, summary: dict[str, Any]) -> Path:
    path = Path(export_dir) / "README.md"
    path.write_text(model_card(cfg, summary))
    return path
