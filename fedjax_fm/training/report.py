"""Plots of one run and ``fedjax-fm report``: several runs overlaid, plus a Markdown table.

A run directory holds ``metrics.jsonl`` (one row per round; ``null`` where a value
was not measured or not evaluated that round) and ``summary.json``. Plots are
drawn from the rows only, skipping nulls, so a run without a power meter simply
has no energy curve rather than a curve of zeros.

Per-run plots (``DIR/plots/``):

* ``loss.png`` — train loss (mean over the round's clients) and eval loss;
* ``rouge.png`` — ROUGE-1/2/L/Lsum on the evaluation rounds;
* ``energy.png`` — joules per round by component (client compute, server, communication);
* ``efficiency.png`` — η_e = TPS per watt;  ``mfu.png`` — model FLOP utilisation;
* ``granularity.png`` — G = T_comp / T_comm;
* ``per_client.png`` — ROUGE-L per client on each client's own held-out examples: mean and
  worst decile over clients, next to the pooled score (``eval.per_client_every``);
* ``privacy.png`` — ε spent so far at the run's δ (``federated.dp``).

(The last two only when the run has those figures.)

``fedjax-fm report DIR [DIR ...] --out OUT`` draws the same panels with one line
per run (e.g. an optimiser comparison) into ``OUT/*.png`` and writes ``OUT/report.md``,
a table of each run's final and best scores, totals and fingerprint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedjax_fm.training.checks import fault_counts  # noqa: E402

# (file stem, title, y label, [(metric key, legend label)])
PANELS: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", "Loss", "cross-entropy", (("train_loss", "train"), ("eval_loss", "eval"))),
    ("rouge", "ROUGE (eval)", "F-measure × 100",
     (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("rougeLsum", "ROUGE-Lsum"))),
    ("energy", "Energy per round", "joules",
     (("client_joules", "clients (compute)"), ("server_joules", "server"), ("comm_joules", "communication (network model)"))),
    ("efficiency", "Energy efficiency η_e", "tokens / s / W", (("tps_per_watt", "η_e"),)),
    ("mfu", "Model FLOP utilisation", "MFU", (("mfu", "MFU"),)),
    ("granularity", "Granularity G = T_comp / T_comm", "G", (("granularity", "G"),)),
    ("per_client", "ROUGE-L per client (own held-out examples)", "F-measure × 100",
     (("client_rougeL_mean", "mean over clients"), ("client_rougeL_worst_decile", "worst decile of clients"),
      ("rougeL", "pooled eval set"))),
    ("privacy", "Privacy spent (DP-FedAvg)", "ε at the run's δ", (("dp_epsilon", "ε"),)),
)

# Panels drawn only when the run has their figures (features switched on in the config).
OPTIONAL_PANELS = ("per_client", "privacy")

# Panels of the overlay report: one metric each, one line per run.
REPORT_METRICS: tuple[tuple[str, str], ...] = (
    ("train_loss", "train loss"),
    ("eval_loss", "eval loss"),
    ("rouge1", "ROUGE-1"),
    ("rouge2", "ROUGE-2"),
    ("rougeL", "ROUGE-L"),
    ("rougeLsum", "ROUGE-Lsum"),
    ("client_joules", "client joules per round"),
    ("tps_per_watt", "η_e (tokens/s/W)"),
    ("mfu", "MFU"),
    ("granularity", "G = T_comp / T_comm"),
    ("client_rougeL_worst_decile", "ROUGE-L, worst decile of clients"),
    ("dp_epsilon", "ε (DP)"),
)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (a clear error if it is missing or damaged)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a fedjax-fm run directory?")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from error
    return rows


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _series(rows: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(int(row["round"]))
            ys.append(float(value))
    return xs, ys


# Panels of quantities whose zero means something (joules, rates): their y axis starts at 0.
ZERO_BASED = ("energy", "efficiency", "mfu", "granularity")


def why_not_measured(stem: str, rows: Sequence[dict[str, Any]]) -> str:
    """The reason a per-run panel has no value at all, for the text drawn in its place."""
    sources = {str(r.get("energy_source")) for r in rows if r.get("energy_source") is not None}
    no_meter = not sources or sources == {"none"}
    if stem in ("energy", "efficiency") and no_meter:
        return ("no power meter was found on this machine (energy_source none);\nset energy.backend "
                "(nvml, jetson, rapl) or declare energy.backend constant + energy.watts")
    if stem == "mfu":
        return ("the device's peak FLOP/s is unknown;\nset energy.peak_flops or measure it once with "
                "`fedjax-fm bench peak`")
    if stem in ("loss", "rouge") and not any(r.get("round", 0) > 0 for r in rows):
        return "no training round has run yet"
    if stem == "rouge":
        return "no evaluation has run (eval.every / eval.at_start)"
    return "no round reported this figure"


def plot_run(run_dir: str | Path, rows: Optional[list[dict[str, Any]]] = None) -> list[Path]:
    """Writes ``run_dir/plots/*.png`` from the run's rows; returns the files written.

    A panel with no measured value at all (e.g. energy without a power meter) is
    still drawn, with a note saying so, so the set of files is always the same —
    except ``OPTIONAL_PANELS``, drawn when the run switched their feature on.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir) if rows is None else rows
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, ylabel, series in PANELS:
        if stem in OPTIONAL_PANELS and not any(_series(rows, key)[0] for key, _ in series[:2]):
            continue  # a feature the run did not switch on (per-client evaluation, DP)
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn, missing = False, []
        for key, label in series:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
                drawn = True
            else:
                missing.append(label)
        if drawn:
            ax.legend()
            if missing:  # say what is absent rather than let it read as zero
                reason = why_not_measured(stem, rows).split(";")[0]
                ax.text(0.01, 0.01, "not measured: " + ", ".join(missing) + f"\n({reason})", fontsize="small",
                        transform=ax.transAxes, va="bottom")
            if stem in ZERO_BASED:
                ax.set_ylim(bottom=0)  # a near-constant series is not magnified into a slope
        else:
            ax.text(0.5, 0.5, "not measured in this run:\n" + why_not_measured(stem, rows), ha="center",
                    va="center", transform=ax.transAxes, wrap=True, fontsize="small")
        ax.set_ylabel(ylabel)
        written.append(_save_round_plot(fig, ax, title, out / f"{stem}.png"))
    return written


def _save_round_plot(fig: Any, ax: Any, title: str, path: Path) -> Path:
    """Titles a per-round panel (integer round ticks, light grid), saves it, closes it."""
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def format_value(value: Any, digits: int = 2) -> str:
    """A figure for a table or a console line: ``–`` when unknown, ``digits`` decimals, 3 significant
    digits when very large or small."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
            return f"{value:.3g}"
        return f"{value:.{digits}f}"
    return str(value)


def _run_label(run_dir: Path, labels: dict[str, int]) -> str:
    """A short unique label: the directory name, made unique with its parent if needed."""
    label = run_dir.name or str(run_dir)
    if labels.get(label):
        label = f"{run_dir.parent.name}/{label}"
    labels[label] = labels.get(label, 0) + 1
    return label


def markdown_table(runs: Sequence[tuple[str, list[dict[str, Any]], dict[str, Any]]]) -> str:
    """One row per run: final ROUGE and loss, best ROUGE-L, totals, fingerprint."""
    header = (
        "| run | rounds | final ROUGE-1 | final ROUGE-2 | final ROUGE-L | final ROUGE-Lsum | best ROUGE-L (round) "
        "| final eval loss | compute J | comm J (model) | total s | MB up | MB down "
        "| rejected clients | skipped rounds | params_sha256 "
        "| ε (δ) | per-client ROUGE-L mean / worst decile / std |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for label, rows, summary in runs:
        evaluated = [r for r in rows if r.get("rougeL") is not None]
        final = evaluated[-1] if evaluated else {}
        best = max(evaluated, key=lambda r: r["rougeL"]) if evaluated else None
        totals = summary.get("totals", {})
        rounds = rows[-1]["round"] if rows else 0
        up = totals.get("bytes_up")
        down = totals.get("bytes_down")
        fingerprint = summary.get("params_sha256")
        faults = fault_counts(rows)  # from the rows: also for runs recorded before these totals
        cells = [
            label,
            str(rounds),
            format_value(final.get("rouge1")),
            format_value(final.get("rouge2")),
            format_value(final.get("rougeL")),
            format_value(final.get("rougeLsum")),
            f"{format_value(best['rougeL'])} ({best['round']})" if best else "–",
            format_value(final.get("eval_loss"), 3),
            format_value(totals.get("compute_joules", totals.get("joules"))),
            format_value(totals.get("comm_joules")),
            format_value(totals.get("seconds")),
            format_value(up / 1e6 if up is not None else None, 3),
            format_value(down / 1e6 if down is not None else None, 3),
            str(faults["rejected_clients"]),
            str(faults["skipped_rounds"]),
            f"`{fingerprint[:12]}…`" if fingerprint else "–",
            _privacy_cell(summary.get("privacy")),
            _per_client_cell(summary.get("per_client")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _privacy_cell(privacy: Optional[dict[str, Any]]) -> str:
    if not privacy:
        return "none"
    return f"{format_value(privacy['epsilon'])} ({privacy['delta']:.2g})"


def _per_client_cell(per_client: Optional[dict[str, Any]]) -> str:
    if not per_client:
        return "–"
    return " / ".join(format_value(per_client[k]) for k in
                      ("client_rougeL_mean", "client_rougeL_worst_decile", "client_rougeL_std"))


# Overlays of ROUGE-L on cost axes (cumulated over rounds, fedjax_fm.training.cost):
# (file stem, x key, x scale, x label).
COST_AXES: tuple[tuple[str, str, float, str], ...] = (
    ("rougeL_vs_bytes_up", "bytes_up", 1e6, "uplink MB (cumulated)"),
    ("rougeL_vs_bytes", "bytes", 1e6, "MB up + down (cumulated)"),
    ("rougeL_vs_comm_joules", "comm_joules", 1.0, "communication joules (network model, cumulated)"),
    ("rougeL_vs_joules", "joules", 1.0, "joules: clients + server + communication (cumulated)"),
    ("rougeL_vs_modelled_seconds", "modelled_seconds", 1.0, "modelled wall seconds (cumulated)"),
)


def plot_cost_axes(runs: Sequence[tuple[str, list[dict[str, Any]], dict[str, Any]]], out_dir: Path,
                   target: Optional[float] = None) -> list[Path]:
    """ROUGE-L against cumulated bytes, joules and modelled seconds, one line per run (a panel
    is skipped when no run has the figure, e.g. joules without a power meter)."""
    from fedjax_fm.training.cost import cumulative

    written = []
    for stem, key, scale, xlabel in COST_AXES:
        lines = []
        for label, rows, _ in runs:
            points = [p for p in cumulative(rows) if p["rougeL"] is not None and p[key] is not None]
            if any(p["round"] > 0 for p in points):  # not just round 0's zero cost
                lines.append((label, [p[key] / scale for p in points], [p["rougeL"] for p in points]))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"target {target:.2f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ROUGE-L")
        ax.set_title(f"ROUGE-L vs {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def cost_table(runs: Sequence[tuple[str, list[dict[str, Any]], dict[str, Any]]], *,
               target_rougeL: Optional[float] = None, budget_bytes: Optional[float] = None,
               budget_joules: Optional[float] = None) -> tuple[str, float]:
    """Markdown: each run's cost to one common target, and its quality within one budget.

    Defaults: target = 0.9 × the best ROUGE-L of any run; byte budget = the smallest total
    (up + down) bytes any run spent. Returns the text and the target used.
    """
    from fedjax_fm.training.cost import cost_to_target, cumulative, quality_within_budget

    bests = [max((r["rougeL"] for r in rows if r.get("rougeL") is not None), default=None) for _, rows, _ in runs]
    bests = [b for b in bests if b is not None]
    target = target_rougeL if target_rougeL is not None else (0.9 * max(bests) if bests else 0.0)
    rule = "given" if target_rougeL is not None else "0.9 × the best ROUGE-L of these runs"
    if budget_bytes is None and budget_joules is None:
        spent = [cumulative(rows)[-1]["bytes"] for _, rows, _ in runs if rows]
        spent = [b for b in spent if b]
        budget_bytes = min(spent) if spent else None
    lines = [
        f"Cost to reach ROUGE-L ≥ {target:.2f} ({rule}); quality within a budget of "
        + " and ".join(x for x in (f"{format_value(budget_bytes / 1e6, 3)} MB" if budget_bytes else "",
                                   f"{format_value(budget_joules)} J" if budget_joules else "") if x)
        + " (bytes: up + down; joules: clients + server + communication).",
        "",
        "| run | round reached | MB up | MB up + down | client J | comm J (model) | modelled s "
        "| ROUGE-L within budget (round) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rows, _ in runs:
        cost = cost_to_target(rows, target) or {"reached": False}
        within = quality_within_budget(rows, budget_bytes=budget_bytes, budget_joules=budget_joules) or {}
        mb = lambda v: format_value(v / 1e6 if v is not None else None, 3)  # noqa: E731
        reached = cost.get("reached")
        cells = [
            label,
            str(cost["round"]) if reached else "not reached",
            mb(cost.get("bytes_up")) if reached else "–",
            mb(cost.get("bytes")) if reached else "–",
            format_value(cost.get("client_joules")) if reached else "–",
            format_value(cost.get("comm_joules"), 4) if reached else "–",
            format_value(cost.get("modelled_seconds")) if reached else "–",
            f"{format_value(within.get('rougeL'))} ({within.get('round')})" if within.get("rougeL") is not None
            else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", target


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, target_rougeL: Optional[float] = None,
                 budget_bytes: Optional[float] = None, budget_joules: Optional[float] = None) -> Path:
    """Overlay plots of ``run_dirs`` and ``report.md`` into ``out_dir``; returns the Markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels: dict[str, int] = {}
    runs = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        runs.append((_run_label(run_dir, labels), read_metrics(run_dir), read_summary(run_dir)))
    images = []
    for key, title in REPORT_METRICS:
        if not any(_series(rows, key)[0] for _, rows, _ in runs):
            continue  # measured by none of the runs: no empty panel in the report
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, rows, _ in runs:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.legend(fontsize="small")
        images.append(_save_round_plot(fig, ax, title, out_dir / f"{key}.png"))
    text = ["# fedjax-fm report", "", "Runs: " + ", ".join(f"`{Path(d)}`" for d in run_dirs), ""]
    text.append(markdown_table(runs))
    text.append("")
    table, target = cost_table(runs, target_rougeL=target_rougeL, budget_bytes=budget_bytes,
                               budget_joules=budget_joules)
    text.append(table)
    images += plot_cost_axes(runs, out_dir, target)
    for path in images:
        text.append(f"![{path.stem}]({path.name})")
    report = out_dir / "report.md"
    report.write_text("\n".join(text) + "\n")
    return report


def _report_command(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.runs[0]).parent / "report"
    try:
        report = write_report(args.runs, out, target_rougeL=args.target_rougeL, budget_bytes=args.budget_bytes,
                              budget_joules=args.budget_joules)
    except (FileNotFoundError, ValueError) as error:
        print(f"fedjax-fm report: {error}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"report written to {report}", file=sys.stderr)
    return 0


def add_report_command(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``fedjax-fm report DIR [DIR ...] [--out OUT]``."""
    parser = subparsers.add_parser(
        "report",
        help="overlay several runs as plots plus a Markdown table",
        description="Overlay runs (e.g. an optimiser comparison): one plot per metric with a line per run, "
        "and report.md with each run's final/best ROUGE, loss, energy, bytes and params_sha256.",
    )
    parser.add_argument("runs", nargs="+", metavar="DIR", help="run directories written by `fedjax-fm run`")
    parser.add_argument("--out", default=None, help="where to write report.md and the plots (default: <first DIR>/../report)")
    parser.add_argument("--target-rougeL", dest="target_rougeL", type=float, default=None,
                        help="ROUGE-L whose cost each run is charged (default: 0.9 x the best of these runs)")
    parser.add_argument("--budget-bytes", type=float, default=None,
                        help="byte budget (up + down) for quality-within-budget (default: the smallest run's total)")
    parser.add_argument("--budget-joules", type=float, default=None,
                        help="joule budget (clients + server + communication) for quality-within-budget")
    parser.set_defaults(func=_report_command)
