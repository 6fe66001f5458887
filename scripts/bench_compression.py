"""Benchmark: uplink bytes and communication joules to reach one ROUGE-L target, per update codec.

The run is the offline demo (``configs/default.yaml``: LoRA r=16 on every projection of
the shipped pretrained ``demo-base``, synthetic dialogues over 8 clients, FedAdam), for
more rounds with an evaluation every ``--eval-every`` rounds, once per codec. The figures
in docs/benchmarks.md were measured on the earlier demo, a tiny model trained from
scratch; to repeat them add ``--set model.name=tiny --set model.init=random --set
model.tokenizer=train-sentencepiece --set model.vocab_size=512 --set
federated.local_steps=8 --set federated.local_optimizer.learning_rate=6e-3 --set
federated.server_optimizer.learning_rate=0.05``. Codecs:

    none | bf16 | 8-bit (blocks of 256) | 4-bit | 2-bit after a Hadamard rotation (per tensor)
    | top-k 1 % + error feedback | FFA-LoRA | FFA-LoRA + 4-bit

All runs share the seed, data, sampling and model initialisation; only
``federated.compression`` differs. The target is ``--target-fraction`` (0.9) of the best
ROUGE-L the uncompressed run reached (or ``--target``). For each codec the script
reports the first evaluated round at or above the target and, cumulated up to it, the
uplink bytes (exact payload sizes from ``metrics.jsonl``) and the communication joules
(the ``energy.network`` profile's model, wifi5 by default); plus the best ROUGE-L
reached, and the share of the round's compute time spent in encode + decode
(``Σ codec_seconds / Σ (client_seconds + codec_seconds + server_seconds)`` over the
training rounds).

It writes ``OUT/<codec>/`` (each a normal run directory), ``OUT/bench_compression.json``,
a Markdown table on stdout and the bytes-vs-ROUGE-L plot ``--plot`` (default
``docs/bench_compression.png``).

Usage: ``python scripts/bench_compression.py --out /tmp/bench_compression [--rounds 30]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CODECS: tuple[tuple[str, str, dict | None], ...] = (
    ("none", "none (float32)", None),
    ("bf16", "bf16", {"name": "bf16"}),
    ("q8", "8-bit", {"name": "quantize", "bits": 8, "block_size": 256}),
    ("q4", "4-bit", {"name": "quantize", "bits": 4}),
    ("q2h", "2-bit + Hadamard", {"name": "quantize", "bits": 2, "rotation": "hadamard"}),
    ("topk1", "top-k 1 % + EF", {"name": "topk", "fraction": 0.01, "error_feedback": True}),
    ("ffa", "FFA-LoRA", {"name": "ffa_lora"}),
    ("ffa_q4", "FFA-LoRA + 4-bit", {"name": "chain", "codecs": [{"name": "ffa_lora"},
                                                                 {"name": "quantize", "bits": 4}]}),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--target", type=float, default=None, help="ROUGE-L target (default: fraction x none's best)")
    parser.add_argument("--target-fraction", type=float, default=0.9)
    parser.add_argument("--tolerance", type=float, default=1.0,
                        help="'within one ROUGE-L point': codecs are also charged to reach target - tolerance")
    parser.add_argument("--codecs", default=",".join(c[0] for c in CODECS), help="comma-separated subset")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    parser.add_argument("--plot", default=str(REPO / "docs" / "bench_compression.png"))
    args = parser.parse_args()

    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(args.out) / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from fedjax_fm.config import load_config
    from fedjax_fm.training.cost import cost_to_target, cumulative
    from fedjax_fm.training.experiment import run_experiment
    from fedjax_fm.training.report import read_metrics

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = args.codecs.split(",")
    if wanted[0] != "none":
        raise SystemExit("--codecs must start with none (the target is taken from it)")
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
               "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
               "load_average_start": os.getloadavg(), "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    results = []
    for key, label, spec in CODECS:
        if key not in wanted:
            continue
        overrides = [f"federated.rounds={args.rounds}", f"eval.every={args.eval_every}", "output.export=false",
                     "output.plots=false", "output.progress=false", "checkpoint.enabled=false", *args.set]
        if spec is not None:
            overrides.append("federated.compression=" + json.dumps(spec))
        cfg = load_config(args.config, overrides)
        run_dir = out / key
        t0 = time.perf_counter()
        summary = run_experiment(cfg, run_dir) if not (run_dir / "summary.json").is_file() else \
            json.loads((run_dir / "summary.json").read_text())
        rows = read_metrics(run_dir)
        train = [r for r in rows if r["round"] > 0]
        compute = sum(r["client_seconds"] + (r["codec_seconds"] or 0.0) + r["server_seconds"] for r in train)
        codec_s = sum(r["codec_seconds"] or 0.0 for r in train)
        results.append({
            "key": key, "codec": label, "spec": spec, "rows": rows,
            "bytes_up_per_client_round": train[0]["bytes_up"] // train[0]["clients"],
            "compression_ratio": train[0]["compression_ratio"],
            "best_rougeL": summary["best_rougeL"], "final_rougeL": (summary["final"] or {}).get("rougeL"),
            "codec_share": codec_s / compute if compute else None, "codec_seconds_per_round": codec_s / len(train),
            "round_compute_seconds": compute / len(train), "params_sha256": summary["params_sha256"],
            "run_seconds": time.perf_counter() - t0,
        })
        print(f"{label}: best ROUGE-L {summary['best_rougeL']:.2f}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    machine["load_average_end"] = os.getloadavg()

    base_best = results[0]["best_rougeL"]
    target = args.target if args.target is not None else args.target_fraction * base_best
    for result in results:
        result["cost"] = cost_to_target(result["rows"], target)
        result["cost_tolerant"] = cost_to_target(result["rows"], target - args.tolerance)
    base = results[0]["cost"]
    lines = [
        f"Target ROUGE-L ≥ {target:.2f} ({'given' if args.target is not None else f'{args.target_fraction:g} × none best {base_best:.2f}'}); "
        f"{args.rounds} rounds, evaluation every {args.eval_every}.",
        "",
        "| codec | bytes up / client / round | ratio | round ≥ T | uplink MB to T | comm J to T "
        f"| uplink bytes vs none | round ≥ T − {args.tolerance:g} | uplink MB | comm J | vs none (to T) "
        "| best ROUGE-L | encode + decode, share of round compute |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        cost = result["cost"]
        reached = cost["reached"]
        fewer = (base["bytes_up"] / cost["bytes_up"]) if reached and base["reached"] and cost["bytes_up"] else None
        lines.append("| " + " | ".join([
            result["codec"], f"{result['bytes_up_per_client_round']:,}", f"{result['compression_ratio']:.1f}×",
            str(cost["round"]) if reached else "not reached",
            f"{cost['bytes_up'] / 1e6:.3f}" if reached else "–",
            f"{cost['comm_joules']:.4f}" if reached else "–",
            f"{fewer:.1f}× fewer" if fewer else "–",
            *_tolerant_cells(result["cost_tolerant"], base),
            f"{result['best_rougeL']:.2f}",
            "–" if result["key"] == "none" else f"{100 * result['codec_share']:.2f} % "
            f"({1000 * result['codec_seconds_per_round']:.1f} ms of {result['round_compute_seconds']:.2f} s)",
        ]) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"\nmachine: {machine}")

    _plot(results, target, Path(args.plot), cumulative)
    (out / "bench_compression.json").write_text(json.dumps({
        "machine": machine, "target_rougeL": target, "tolerance": args.tolerance, "rounds": args.rounds, "eval_every": args.eval_every,
        "results": [{k: v for k, v in r.items() if k != "rows"} for r in results], "table": table,
    }, indent=2))
    return 0


def _tolerant_cells(cost: dict, base: dict) -> list[str]:
    if not cost["reached"]:
        return ["not reached", "–", "–", "–"]
    fewer = base["bytes_up"] / cost["bytes_up"] if base["reached"] and cost["bytes_up"] else None
    return [str(cost["round"]), f"{cost['bytes_up'] / 1e6:.3f}", f"{cost['comm_joules']:.4f}",
            f"{fewer:.1f}× fewer" if fewer else "–"]


def _plot(results: list[dict], target: float, path: Path, cumulative) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        points = [p for p in cumulative(result["rows"]) if p["rougeL"] is not None and p["round"] > 0]
        ax.plot([p["bytes_up"] / 1e6 for p in points], [p["rougeL"] for p in points], marker="o", markersize=3,
                label=result["codec"])
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"target {target:.1f}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulated uplink MB (all clients; log scale)")
    ax.set_ylabel("ROUGE-L (eval)")
    ax.set_title("ROUGE-L vs uplink bytes, per update codec")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
