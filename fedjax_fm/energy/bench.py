"""``fedjax-fm bench``: the hardware micro-benchmark (``step``) and the matmul peak (``peak``).

``bench step`` sweeps model preset x {full, lora} x batch size x source length x
compute dtype on the current device. For each point it builds the model with random
weights (no download), compiles one training step (forward, backward, AdamW update),
runs ``--warmup`` steps, then meters ``--steps`` steps one by one and reports

    step seconds (mean), tokens/step, TPS, model FLOPs/step (analytic), MFU,
    mean/peak watts, joules/step, η_e = TPS / W, peak device memory,

as CSV plus a PNG plot. Energy columns are empty (null) without a power source,
and marked estimates with ``--power-backend constant``. This is the paper's
micro-level hardware benchmark; run it on a GPU or a Jetson.

``bench peak`` measures the device's dense matmul FLOP/s per dtype and caches it
for MFU where the device is not in the peak table (CPUs, unlisted GPUs).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_fm.energy.base import PowerBackend
from fedjax_fm.energy.detect import detect_backend
from fedjax_fm.energy.meter import Meter, sum_records
from fedjax_fm.energy.peaks import (
    default_cache_path,
    dtype_name,
    lookup_peak,
    measure_matmul_peak,
    resolve_peak,
    save_measured_peak,
)
from fedjax_fm.models.config import LoraConfig, preset
from fedjax_fm.models.flops import train_step_flops

CSV_COLUMNS = (
    "preset", "mode", "batch_size", "source_len", "target_len", "dtype", "steps", "step_seconds",
    "tokens_per_step", "tps", "model_flops_per_step", "mfu", "peak_flops", "peak_flops_source",
    "mean_watts", "peak_watts", "joules_per_step", "eta_e", "energy_source", "is_estimate",
    "peak_memory_bytes", "sampler_overhead", "device", "error",
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def make_train_step(model: Any, lora: LoraConfig | None, optimizer: optax.GradientTransformation) -> Callable:
    """One jitted training step: ``(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss)``.

    Full fine-tuning trains ``params`` (``frozen`` is an empty dict); LoRA trains the
    ``lora`` collection with ``params`` frozen, so XLA computes no base-weight gradients.
    """
    from fedjax_fm.models.loss import batch_loss

    def variables(trainable, frozen):
        return {"params": frozen, "lora": trainable} if lora is not None else {"params": trainable}

    def step(trainable, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(lambda t: batch_loss(model, variables(t, frozen), batch)[0])(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def synthetic_batch(rng: np.random.Generator, vocab_size: int, batch_size: int, source_len: int,
                    target_len: int) -> dict[str, jax.Array]:
    """A full batch (no padding) of random token ids in the project's batch format."""
    labels = rng.integers(2, vocab_size, (batch_size, target_len), dtype=np.int32)
    decoder_input_ids = np.concatenate([np.zeros((batch_size, 1), np.int32), labels[:, :-1]], axis=1)
    return {
        "input_ids": jnp.asarray(rng.integers(2, vocab_size, (batch_size, source_len), dtype=np.int32)),
        "attention_mask": jnp.ones((batch_size, source_len), jnp.int32),
        "decoder_input_ids": jnp.asarray(decoder_input_ids),
        "labels": jnp.asarray(labels),
        "decoder_attention_mask": jnp.ones((batch_size, target_len), jnp.int32),
        "example_weight": jnp.ones((batch_size,), jnp.float32),
    }


def _peak_memory_bytes(device: jax.Device) -> int | None:
    stats = device.memory_stats()  # None on CPU
    if not stats:
        return None
    value = stats.get("peak_bytes_in_use")
    return int(value) if value is not None else None


def benchmark_point(
    *, preset_name: str, mode: str, batch_size: int, source_len: int, target_len: int, dtype: str,
    steps: int, warmup: int, meter: Meter, lora_config: LoraConfig, seed: int = 0,
) -> dict[str, Any]:
    """Measures one sweep point; returns a CSV row (dict over ``CSV_COLUMNS``)."""
    from fedjax_fm.models.lora import init_lora
    from fedjax_fm.models.t5 import T5, init_params

    config = preset(preset_name, dtype=DTYPES[dtype], dropout_rate=0.0)
    lora = lora_config if mode == "lora" else None
    model = T5(config, lora=lora)
    key_params, key_lora = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(config, key_params)
    if lora is not None:
        trainable, frozen = init_lora(params, lora, key_lora), params
    else:
        trainable, frozen = params, {}
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(trainable)
    step = make_train_step(model, lora, optimizer)
    batch = synthetic_batch(np.random.default_rng(seed), config.vocab_size, batch_size, source_len, target_len)
    tokens = batch_size * (source_len + target_len)
    flops = train_step_flops(config, batch_size, source_len, target_len, lora=lora).total
    for _ in range(warmup):  # the first call compiles; never metered
        trainable, opt_state, loss = step(trainable, opt_state, frozen, batch)
    jax.block_until_ready(loss)
    records = []
    for _ in range(steps):
        (trainable, opt_state, loss), record = meter.measure(
            "train_step", step, trainable, opt_state, frozen, batch, tokens=tokens, flops=flops
        )
        records.append(record)
    if not math.isfinite(float(loss)):
        raise FloatingPointError(f"training loss is {float(loss)} after {warmup + steps} steps")
    total = sum_records(records, "train_step")
    device = jax.devices()[0]
    return {
        "preset": preset_name, "mode": mode, "batch_size": batch_size, "source_len": source_len,
        "target_len": target_len, "dtype": dtype, "steps": steps, "step_seconds": total.wall_s / steps,
        "tokens_per_step": tokens, "tps": total.tps, "model_flops_per_step": flops, "mfu": total.mfu,
        "peak_flops": meter.peak_flops, "mean_watts": total.mean_watts, "peak_watts": total.peak_watts,
        "joules_per_step": None if total.joules is None else total.joules / steps, "eta_e": total.eta_e,
        "energy_source": total.energy_source, "is_estimate": total.is_estimate,
        "peak_memory_bytes": _peak_memory_bytes(device), "sampler_overhead": total.sampler_overhead,
        "device": device.device_kind, "error": None,
    }


def run_step_benchmark(
    *, presets: Sequence[str], modes: Sequence[str], batch_sizes: Sequence[int], source_lens: Sequence[int],
    target_len: int | None, dtypes: Sequence[str], steps: int, warmup: int, backend: PowerBackend,
    interval_s: float, peak_flops: float | None = None, lora_config: LoraConfig | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """The sweep; a point that fails (e.g. out of memory) gets a row with ``error`` set."""
    lora_config = lora_config or LoraConfig(rank=8, alpha=16.0, dropout=0.0, target_modules=("q", "v"))
    rows = []
    for name, mode, batch_size, source_len, dtype in itertools.product(presets, modes, batch_sizes, source_lens, dtypes):
        peak = resolve_peak(DTYPES[dtype], explicit=peak_flops)
        meter = Meter(backend, interval_s=interval_s, peak_flops=peak.flops_per_s if peak else None)
        tlen = target_len or max(1, source_len // 4)
        point = dict(preset_name=name, mode=mode, batch_size=batch_size, source_len=source_len,
                     target_len=tlen, dtype=dtype)
        try:
            row = benchmark_point(**point, steps=steps, warmup=warmup, meter=meter, lora_config=lora_config)
        except Exception as why:  # noqa: BLE001  (one failed point must not lose the sweep)
            row = {**{c: None for c in CSV_COLUMNS}, "preset": name, "mode": mode, "batch_size": batch_size,
                   "source_len": source_len, "target_len": tlen, "dtype": dtype,
                   "error": f"{type(why).__name__}: {why}".splitlines()[0][:300]}
        row["peak_flops_source"] = peak.source if peak else None
        rows.append(row)
        log(format_row(row))
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_row(row: dict[str, Any]) -> str:
    point = f"{row['preset']:>14} {row['mode']:>4} B={row['batch_size']:<3} S={row['source_len']:<4} " \
            f"T={row['target_len']:<4} {row['dtype']:>8}"
    if row.get("error"):
        return f"{point}  FAILED: {row['error']}"
    watts = _fmt(row["mean_watts"], ".1f") + ("*" if row["is_estimate"] else "")
    return (f"{point}  step {row['step_seconds'] * 1e3:8.2f} ms  TPS {row['tps']:10.1f}  "
            f"MFU {_fmt(row['mfu'], '.3f')}  W {watts}  η_e {_fmt(row['eta_e'], '.2f')} tok/J  "
            f"mem {_fmt(row['peak_memory_bytes'] and row['peak_memory_bytes'] / 2**20, '.0f')} MiB")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in CSV_COLUMNS})


def plot_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Bar charts of TPS, MFU and η_e per sweep point (panels without data say so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("error")]
    labels = [f"{r['preset']}\n{r['mode']} B{r['batch_size']} S{r['source_len']}\n{r['dtype']}" for r in ok]
    panels = (("tps", "tokens / s"), ("mfu", "MFU"), ("eta_e", "η_e (tokens / s / W)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.1 * len(ok) + 2), 9), squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels):
        values = [r[key] for r in ok]
        if ok and all(v is not None for v in values):
            ax.bar(range(len(ok)), values, color="tab:blue")
            if min(values) > 0 and max(values) / min(values) > 30:
                ax.set_yscale("log")  # presets differ by orders of magnitude
            ax.set_xticks(range(len(ok)), labels, fontsize=7)
        else:
            reason = {"mfu": "no peak FLOP/s known (run 'fedjax-fm bench peak')",
                      "eta_e": "no power source (energy is null)"}.get(key, "no data")
            ax.text(0.5, 0.5, f"{title}: {reason}", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
        ax.set_ylabel(title)
    estimate = any(r.get("is_estimate") for r in ok)
    fig.suptitle(f"fedjax-fm bench step on {ok[0]['device'] if ok else '?'}"
                 + (" (energy: constant-power estimate)" if estimate else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _csv_list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError as why:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list: {why}") from None
    return parse


def _detect(args: argparse.Namespace) -> PowerBackend:
    return detect_backend(args.power_backend, constant_watts=args.constant_watts).backend


def _step_command(args: argparse.Namespace) -> int:
    bad = [d for d in args.dtype if d not in DTYPES]
    if bad:
        print(f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)}", file=sys.stderr)
        return 2
    bad = [m for m in args.mode if m not in ("full", "lora")]
    if bad:
        print(f"unknown mode(s) {bad}; choose 'full' and/or 'lora'", file=sys.stderr)
        return 2
    backend = _detect(args)
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
    start = time.perf_counter()
    rows = run_step_benchmark(
        presets=args.preset, modes=args.mode, batch_sizes=args.batch_size, source_lens=args.seq_len,
        target_len=args.target_len, dtypes=args.dtype, steps=args.steps, warmup=args.warmup, backend=backend,
        interval_s=args.interval, peak_flops=args.peak_flops,
        lora_config=LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, dropout=0.0,
                               target_modules=tuple(args.lora_targets)),
    )
    backend.close()
    out = Path(args.out)
    write_csv(rows, out / "bench_step.csv")
    plot_rows(rows, out / "bench_step.png")
    print(f"wrote {out / 'bench_step.csv'} and {out / 'bench_step.png'} in {time.perf_counter() - start:.1f} s")
    return 1 if all(r.get("error") for r in rows) else 0


def _peak_command(args: argparse.Namespace) -> int:
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform})")
    for name in args.dtype:
        if name not in DTYPES:
            print(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}", file=sys.stderr)
            return 2
        measured = measure_matmul_peak(DTYPES[name], size=args.size, min_seconds=args.seconds, device=device)
        table = lookup_peak(device.device_kind, DTYPES[name], core_count=getattr(device, "core_count", None))
        line = f"{dtype_name(DTYPES[name]):>9}: measured {measured / 1e12:.4f} TFLOP/s"
        if table:
            line += f" ({measured / table.flops_per_s:.1%} of the table's {table.flops_per_s / 1e12:.1f} TFLOP/s)"
        if not args.no_save:
            path = save_measured_peak(measured, DTYPES[name], device=device, path=args.cache, size=args.size)
            line += f"; cached in {path}"
        print(line)
    return 0


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``fedjax-fm bench {step,peak}``."""
    bench = subparsers.add_parser("bench", help="hardware micro-benchmarks (training step sweep, matmul peak)")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])

    step = sub.add_parser("step", help="sweep preset x full/LoRA x batch x length x dtype: TPS, W, η_e, MFU, memory")
    step.add_argument("--preset", type=_csv_list(str), default=["tiny"],
                      help="model presets, comma-separated (tiny, flan-t5-small, flan-t5-base, ...)")
    step.add_argument("--mode", type=_csv_list(str), default=["full", "lora"], help="full and/or lora")
    step.add_argument("--batch-size", type=_csv_list(int), default=[4])
    step.add_argument("--seq-len", type=_csv_list(int), default=[64], help="source lengths")
    step.add_argument("--target-len", type=int, default=None, help="target length (default: seq-len / 4)")
    step.add_argument("--dtype", type=_csv_list(str), default=["float32"], help="compute dtypes: float32, bfloat16")
    step.add_argument("--steps", type=int, default=5, help="metered steps per point")
    step.add_argument("--warmup", type=int, default=2, help="unmetered steps first (compilation)")
    step.add_argument("--lora-rank", type=int, default=8)
    step.add_argument("--lora-targets", type=_csv_list(str), default=["q", "v"])
    step.add_argument("--power-backend", default="auto", help="auto, nvml, jetson, rapl, constant, none")
    step.add_argument("--constant-watts", type=float, default=None, help="declared watts (constant backend; estimate)")
    step.add_argument("--interval", type=float, default=0.05, help="power sampling interval, seconds")
    step.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s for MFU (default: table or cache)")
    step.add_argument("--out", default="bench_out", help="directory for bench_step.csv and bench_step.png")
    step.set_defaults(func=_step_command)

    peak = sub.add_parser("peak", help="measure dense matmul FLOP/s per dtype and cache it for MFU")
    peak.add_argument("--dtype", type=_csv_list(str), default=["float32"])
    peak.add_argument("--size", type=int, default=None, help="matrix size n (default 1024 on CPU, 8192 otherwise)")
    peak.add_argument("--seconds", type=float, default=1.0, help="minimum seconds per trial")
    peak.add_argument("--cache", type=Path, default=None, help=f"cache file (default {default_cache_path()})")
    peak.add_argument("--no-save", action="store_true", help="print only, do not cache")
    peak.set_defaults(func=_peak_command)
