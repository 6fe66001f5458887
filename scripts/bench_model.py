"""Benchmark one FLAN-T5 training step: fedjax_fm (Flax, jit) against transformers (PyTorch).

A step is forward + backward + AdamW update on one random batch (random init, dropout
on, as in fine-tuning). Each framework runs in its own subprocess so that neither's
allocations, thread pools or imports skew the other's memory or speed.

Memory method: peak resident set size of the worker process (``ru_maxrss``) minus its
resident size right after importing the framework (``VmRSS``): the memory the model,
optimiser state, activations, and (for JAX) compilation add on top of the imports.

Usage::

    python scripts/bench_model.py                      # flan-t5-small, batch 8, 512 -> 96
    python scripts/bench_model.py --framework jax --steps 5 --remat
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _synthetic_batch(args, vocab_size: int, seed: int = 0):
    """Random ids with realistic padding: sources 75-100% full, targets 50-100% full."""
    import numpy as np

    rng = np.random.default_rng(seed)
    src_lens = rng.integers(int(0.75 * args.src_len), args.src_len + 1, size=args.batch)
    tgt_lens = rng.integers(max(1, args.tgt_len // 2), args.tgt_len + 1, size=args.batch)
    attention_mask = (np.arange(args.src_len)[None] < src_lens[:, None]).astype(np.int32)
    decoder_attention_mask = (np.arange(args.tgt_len)[None] < tgt_lens[:, None]).astype(np.int32)
    input_ids = rng.integers(2, vocab_size, size=(args.batch, args.src_len)).astype(np.int32) * attention_mask
    labels = rng.integers(2, vocab_size, size=(args.batch, args.tgt_len)).astype(np.int32) * decoder_attention_mask
    decoder_input_ids = np.concatenate([np.zeros((args.batch, 1), np.int32), labels[:, :-1]], axis=1)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids,
        labels=labels,
        decoder_attention_mask=decoder_attention_mask,
        example_weight=np.ones((args.batch,), np.float32),
    )


def _worker_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from fedjax_fm.models import T5, batch_loss, init_params, preset

    baseline = _rss_now_mib()
    config = preset(args.preset, remat=args.remat)
    model = T5(config)
    batch = {k: jnp.asarray(v) for k, v in _synthetic_batch(args, config.vocab_size).items()}
    params = init_params(config, jax.random.PRNGKey(0))
    optimizer = optax.adamw(1e-4, weight_decay=0.01)
    opt_state = optimizer.init(params)

    # Params and optimiser state are donated: XLA updates them in place instead of
    # holding old and new copies at once.
    def train_step(params, opt_state, batch, rng):
        def loss_fn(p):
            return batch_loss(model, {"params": p}, batch, dropout_rng=rng)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, batch, jax.random.PRNGKey(1)).compile()
    compile_s = time.perf_counter() - t0

    rng = jax.random.PRNGKey(1)
    times = []
    for i in range(args.warmup + args.steps):
        rng, step_rng = jax.random.split(rng)
        t0 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, batch, step_rng)
        loss = float(loss)  # blocks until the step is done
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return dict(
        framework="jax", step_s=times, loss=loss, compile_s=compile_s, params=int(n_params),
        baseline_rss_mib=baseline, peak_rss_mib=_peak_rss_mib(), threads=os.cpu_count(),
        version=f"jax {jax.__version__}",
    )


def _worker_torch(args) -> dict:
    import torch
    import transformers

    from fedjax_fm.models import preset

    baseline = _rss_now_mib()
    config = preset(args.preset)
    torch.manual_seed(0)
    hf_config = transformers.T5Config(**config.to_hf_dict())
    model = transformers.T5ForConditionalGeneration(hf_config)
    if not config.tie_word_embeddings:
        # FLAN-T5 has its own LM head; transformers 5 would tie it to the embedding.
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    batch = {k: torch.from_numpy(v).long() for k, v in _synthetic_batch(args, config.vocab_size).items()}
    labels = torch.where(batch["decoder_attention_mask"] > 0, batch["labels"], torch.tensor(-100))

    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
            decoder_attention_mask=batch["decoder_attention_mask"],
            labels=labels,
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    return dict(
        framework="torch", step_s=times, loss=loss, compile_s=None, params=int(n_params),
        baseline_rss_mib=baseline, peak_rss_mib=_peak_rss_mib(), threads=torch.get_num_threads(),
        version=f"torch {torch.__version__}, transformers {transformers.__version__} "
        f"(attn: {model.config._attn_implementation})",
    )


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def _run_worker(framework: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", framework, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--preset", default="flan-t5-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--src-len", type=int, default=512)
    parser.add_argument("--tgt-len", type=int, default=96)
    parser.add_argument("--framework", choices=("both", "jax", "torch"), default="both")
    parser.add_argument("--remat", action="store_true", help="fedjax_fm: rematerialise each block")
    parser.add_argument("--_worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        if args._worker == "jax":
            from fedjax_fm.host_allocator import keep_freed_memory

            keep_freed_memory()  # as the fedjax-fm command does at start-up (since 2026-11-30)
        result = _worker_jax(args) if args._worker == "jax" else _worker_torch(args)
        print(json.dumps(result))
        return 0

    worker_argv = [
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--preset", args.preset,
        "--batch", str(args.batch), "--src-len", str(args.src_len), "--tgt-len", str(args.tgt_len),
    ] + (["--remat"] if args.remat else [])
    frameworks = ["jax", "torch"] if args.framework == "both" else [args.framework]
    batch = _synthetic_batch(args, 32128)
    tokens = int(batch["attention_mask"].sum() + batch["decoder_attention_mask"].sum())

    print(f"machine: {os.cpu_count()}-core {_cpu_name()}, python {platform.python_version()}")
    print(f"step: {args.preset}, random init, forward+backward+AdamW, dropout on, batch {args.batch}, "
          f"source {args.src_len}, target {args.tgt_len} ({tokens} non-padding tokens/step), "
          f"{args.warmup} warm-up + {args.steps} timed steps{', remat' if args.remat else ''}")
    print("memory: peak RSS (ru_maxrss) of the framework's own subprocess minus its RSS right after imports")
    results = {}
    for fw in frameworks:
        r = _run_worker(fw, worker_argv)
        r["median_s"] = sorted(r["step_s"])[len(r["step_s"]) // 2]
        results[fw] = r
        print(f"  [{fw}] {r['version']}; threads {r['threads']}; params {r['params']:,}")

    header = f"{'framework':<10}{'steps/s':>9}{'tokens/s':>10}{'median s':>10}{'min s':>8}{'peak MiB':>10}{'compile s':>11}{'loss':>8}"
    print(header)
    print("-" * len(header))
    for fw, r in results.items():
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        peak = r["peak_rss_mib"] - r["baseline_rss_mib"]
        print(f"{fw:<10}{1 / r['median_s']:>9.3f}{tokens / r['median_s']:>10.0f}{r['median_s']:>10.2f}"
              f"{min(r['step_s']):>8.2f}{peak:>10.0f}{compile_s:>11}{r['loss']:>8.3f}")
    if len(results) == 2:
        speed = results["torch"]["median_s"] / results["jax"]["median_s"]
        mem_j = results["jax"]["peak_rss_mib"] - results["jax"]["baseline_rss_mib"]
        mem_t = results["torch"]["peak_rss_mib"] - results["torch"]["baseline_rss_mib"]
        print(f"ratio jax/torch: {speed:.2f}x steps/s, {mem_j / mem_t:.2f}x peak memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
