"""Benchmark: one federated LoRA round, fedjax_fm (sequential and vmapped) vs PyTorch + PEFT.

The work (defaults = the issue's setting): flan-t5-small dimensions (random
weights, no hub access: a PyTorch ``T5ForConditionalGeneration`` is initialised
once, saved as a Hugging Face checkpoint, and both frameworks load that same
checkpoint, so their first-round losses agree), LoRA r=8, α=16, dropout 0.05 on q and v (PEFT's T5
default), model dropout 0.1 as in FLAN-T5's config; 4 clients × 5 local AdamW steps
(lr 1e-4, weight decay 0.01, fresh each round) × batch 4 × 256 source / 64 target
tokens (all real tokens); FedAvg on the adapters. The PyTorch reference runs the
same work the usual way: ``transformers.T5ForConditionalGeneration`` +
``peft.get_peft_model``, clients one after another, ``torch.optim.AdamW``, the
adapters averaged on the host.

Ours runs three ways: ``sequential`` (one compiled call per client), ``vmapped``
(the 4 clients in one call sharing the frozen base) and ``vmapped remat`` (the
same with each T5 block rematerialised in the backward pass: less activation
memory for some recomputation).

Each framework runs in its own subprocess (so one's memory and threads do not
affect the other): ``--rounds`` measured rounds after one warm-up round. The
per-round time excludes compilation (JAX) and first-call allocation (PyTorch): it
is the median of the measured rounds; the warm-up round's time is printed too.

Peak memory: the process's peak resident set size (``VmHWM`` from
``/proc/self/status``, i.e. the high-water mark of physical memory the OS gave the
process, framework + model + activations + data), read at the end of the worker;
``RSS after import`` is the framework's own footprint before any model exists. On
a GPU the device's peak allocation is reported as well.

Usage: ``python scripts/bench_round.py [--rounds 2] [--model flan-t5-small|tiny]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLIENTS, STEPS, BATCH, SRC, TGT = 4, 5, 4, 256, 64
RANK, ALPHA, LORA_DROPOUT, TARGETS = 8, 16.0, 0.05, ("q", "v")
LR, WEIGHT_DECAY, MODEL_DROPOUT = 1e-4, 0.01, 0.1


def memory_kib() -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident set size of this process, KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def make_data(vocab: int, seed: int = 0):
    """Random token batches ``[clients, steps, batch, len]`` in docs/architecture.md's format."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (CLIENTS, STEPS, BATCH)
    labels = rng.integers(2, vocab, size=shape + (TGT,)).astype(np.int32)
    return {
        "input_ids": rng.integers(2, vocab, size=shape + (SRC,)).astype(np.int32),
        "attention_mask": np.ones(shape + (SRC,), np.int32),
        "decoder_input_ids": np.concatenate([np.zeros(shape + (1,), np.int32), labels[..., :-1]], axis=-1),
        "labels": labels,
        "decoder_attention_mask": np.ones(shape + (TGT,), np.int32),
        "example_weight": np.ones(shape, np.float32),
    }


def tokens_per_round() -> int:
    return CLIENTS * STEPS * BATCH * (SRC + TGT)


# ------------------------------------------------------------------------------ workers


def worker_prepare(model_name: str, out_dir: str) -> dict:
    """Initialises the PyTorch T5 once and saves it as the checkpoint both frameworks load."""
    import torch
    import transformers

    sys.path.insert(0, REPO)
    from fedjax_fm.models.config import preset  # dimensions only

    c = preset(model_name)
    torch.manual_seed(0)
    hf_config = transformers.T5Config(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
        num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance, dropout_rate=MODEL_DROPOUT,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
    )
    transformers.T5ForConditionalGeneration(hf_config).save_pretrained(out_dir)
    return {"checkpoint": out_dir}


def worker_jax(backend: str, checkpoint: str, rounds: int) -> dict:
    import jax
    import numpy as np
    import optax

    mem_import = memory_kib()["VmRSS"]
    sys.path.insert(0, REPO)
    from fedjax_fm import fl
    from fedjax_fm.fl.t5_task import t5_loss_fn, t5_partition
    from fedjax_fm.models import LoraConfig, from_pretrained

    lora = LoraConfig(rank=RANK, alpha=ALPHA, dropout=LORA_DROPOUT, target_modules=TARGETS)
    model, params = from_pretrained(checkpoint, lora=lora, remat=backend.endswith("remat"))
    config = model.config
    trainable, frozen = t5_partition(params, lora, jax.random.PRNGKey(1))
    update = fl.make_client_update(t5_loss_fn(model), optax.adamw(LR, weight_decay=WEIGHT_DECAY))
    executor = fl.Sequential() if backend == "sequential" else fl.Vmapped()
    algorithm = fl.FederatedAlgorithm(update, fl.fedavg(), executor=executor)
    state = algorithm.init(trainable, 0)
    data = make_data(config.vocab_size)
    ids = np.arange(CLIENTS)

    times, losses = [], []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        state, metrics = algorithm.round(state, frozen, data, ids)
        metrics = jax.device_get(metrics)  # the one host transfer of the round
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - t0)
        losses.append(float(np.mean(metrics["client_loss"])))
    out = {"framework": f"fedjax_fm {backend.replace('-', ' ')}", "device": str(jax.devices()[0].platform)}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    out.update(_summary(times, losses, mem_import))
    return out


def worker_torch(checkpoint: str, rounds: int) -> dict:
    import peft
    import torch
    import transformers

    mem_import = memory_kib()["VmRSS"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration.from_pretrained(checkpoint)
    vocab = base.config.vocab_size
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(TARGETS),
                        task_type="SEQ_2_SEQ_LM"),
    ).to(device)
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    global_adapters = {n: p.detach().clone() for n, p in trainable.items()}
    data = {k: torch.from_numpy(v).to(device) for k, v in make_data(vocab).items()}

    times, losses = [], []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        client_states, round_losses = [], []
        for k in range(CLIENTS):
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(global_adapters[n])
            opt = torch.optim.AdamW(trainable.values(), lr=LR, weight_decay=WEIGHT_DECAY)
            for s in range(STEPS):
                out = model(
                    input_ids=data["input_ids"][k, s].long(),
                    attention_mask=data["attention_mask"][k, s].long(),
                    decoder_input_ids=data["decoder_input_ids"][k, s].long(),
                    decoder_attention_mask=data["decoder_attention_mask"][k, s].long(),
                    labels=data["labels"][k, s].long(),
                )
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                round_losses.append(out.loss.detach())
            client_states.append({n: p.detach().clone() for n, p in trainable.items()})
        with torch.no_grad():  # FedAvg (equal weights: every client has the same examples)
            global_adapters = {n: torch.stack([s[n] for s in client_states]).mean(0) for n in trainable}
        losses.append(float(torch.stack(round_losses).mean()))  # syncs once per round
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result = {"framework": "pytorch+peft sequential", "device": device}
    if device == "cuda":
        result["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result.update(_summary(times, losses, mem_import))
    return result


def _summary(times: list[float], losses: list[float], mem_import_kib: int) -> dict:
    steady = times[1:]
    per_round = statistics.median(steady)
    return {
        "first_round_s": times[0],
        "round_s": per_round,
        "round_s_all": steady,
        "compile_or_warmup_s": times[0] - per_round,
        "tokens_per_s": tokens_per_round() / per_round,
        "peak_rss_mib": memory_kib()["VmHWM"] / 1024,
        "rss_after_import_mib": mem_import_kib / 1024,
        "mean_loss_per_round": losses,
    }


# ------------------------------------------------------------------------------ driver


def run_worker(kind: str, model: str, rounds: int, checkpoint: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--model", model, "--rounds", str(rounds),
           "--checkpoint", checkpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds after one warm-up round")
    parser.add_argument("--model", default="flan-t5-small", help="model preset for the dimensions")
    workers = ["jax-sequential", "jax-vmapped", "jax-vmapped-remat", "torch"]
    parser.add_argument("--worker", choices=workers + ["prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", default=workers, choices=workers, help="which workers to run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    if args.worker:
        if args.worker == "prepare":
            result = worker_prepare(args.model, args.checkpoint)
        elif args.worker == "torch":
            result = worker_torch(args.checkpoint, args.rounds)
        else:
            result = worker_jax(args.worker.removeprefix("jax-"), args.checkpoint, args.rounds)
        print(json.dumps(result))
        return 0

    print(f"federated LoRA round: {args.model} dims, {CLIENTS} clients × {STEPS} steps × batch {BATCH} × "
          f"{SRC}/{TGT} tokens ({tokens_per_round()} tokens/round), LoRA r={RANK} on {'+'.join(TARGETS)}; "
          f"{args.rounds} measured rounds after 1 warm-up", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_round_") as tmp:
        checkpoint = os.path.join(tmp, "model")
        run_worker("prepare", args.model, args.rounds, checkpoint)
        for kind in args.only:
            print(f"  running {kind} ...", flush=True)
            results.append(run_worker(kind, args.model, args.rounds, checkpoint))
    torch_result = next((r for r in results if r["framework"].startswith("pytorch")), None)
    header = f"{'framework':<26}{'device':>7}{'s/round':>10}{'tokens/s':>10}{'warm-up s':>11}{'compile≈':>10}{'peak RSS MiB':>14}{'RSS import':>12}{'speed-up':>10}{'mem ratio':>10}"
    print(header)
    for r in results:
        speed = mem = ""
        if torch_result is not None:
            speed = f"{torch_result['round_s'] / r['round_s']:.2f}x"
            mem = f"{r['peak_rss_mib'] / torch_result['peak_rss_mib']:.2f}"
        print(f"{r['framework']:<26}{r['device']:>7}{r['round_s']:>10.2f}{r['tokens_per_s']:>10.0f}"
              f"{r['first_round_s']:>11.2f}{r['compile_or_warmup_s']:>10.1f}{r['peak_rss_mib']:>14.0f}{r['rss_after_import_mib']:>12.0f}{speed:>10}{mem:>10}")
    print("speed-up = PyTorch s/round ÷ this s/round; mem ratio = this peak RSS ÷ PyTorch peak RSS; "
          "warm-up = the first round (JAX: includes compilation); compile≈ = warm-up − s/round")
    for r in results:
        print(f"  {r['framework']}: rounds {[round(t, 2) for t in r['round_s_all']]} s, "
              f"mean loss per round {[round(x, 4) for x in r['mean_loss_per_round']]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
