"""Real tokens per second on real-length data: fedjax_fm (unpacked, packed) against PyTorch + PEFT.

One federated LoRA round's local work -- ``clients`` clients x ``steps`` local steps of
batch ``batch`` -- on flan-t5-small dimensions (random init, no download), LoRA r=8 on
q and v, AdamW, float32 on the CPU, the paper's truncation limits (source 512, target
95). Example lengths are drawn (seeded) from SAMSum's shape with FLAN-T5's tokenizer:
the prompted source log-normal with median 115 and 85th percentile 255 tokens, the
summary log-normal with median 24 and 90th percentile 50 (clipped to the limits).

Rows, each in its own subprocess (as ``scripts/bench_model.py``), all in one run:

* ``fedjax_fm unpacked``: every example padded to 512 / 96 (the static shapes of a run
  without packing), ``batch`` examples per step;
* ``fedjax_fm packed``: ``--pack-rows`` rows per step of ``--pack-src`` / ``--pack-tgt``
  slots (default 6 rows of 512 / 128: see "Row geometry" below), filled by
  ``fedjax_fm.data.packing`` (first-fit over shuffled windows) with the segment-aware
  model -- the run layer's ``data.packing``;
* ``torch dynamic``: transformers + PEFT, each batch padded to its own longest
  example (``DataCollatorForSeq2Seq``'s default), examples in random order;
* ``torch grouped``: the same with length-grouped batches (``Trainer``'s
  ``group_by_length``: mega-batches of 50 batches sorted by length, then shuffled).

Each row trains a stream of examples drawn from the same distribution and counts
only real tokens (source + target, no padding); the clients run one after another
and the time is the sum of the timed local updates (compilation / first batch
excluded). Memory: peak RSS of the worker minus its RSS right after the imports.

Every row also reports its *executed* model FLOPs (``models.flops.train_step_flops`` of
the shapes that ran: ``[rows, S] -> [rows, T]`` per step, padding included) next to the
useful ones, so the ratio of two rows' real tokens/s splits exactly into

    (real tokens / executed FLOP)  x  (executed FLOP/s)
     = what the layout wastes        x  how fast the machine runs it

and a ceiling for packing at equal speed per executed FLOP can be read off.

**Row geometry.** With the limits 512 / 96 a packed row of 512 / 96 slots is bound by
its *target* slots on SAMSum-like lengths (source mean ~150, target ~28: 96 target
slots fill before 512 source slots; measured fill 0.76 source, 0.87 target). 128 target
slots balance the two (0.92 / 0.80, 0.90 of all slots real) and give 1.13x more real
tokens per executed FLOP (``models.flops``; 160 or more target slots, or longer source
rows, give less: the quadratic attention of longer rows and emptier target slots).
Rows per step only set memory on this CPU (the matmuls are as fast at 6 x 512 rows as
at 8 x 512): 6 rows keep the peak below PyTorch's.

**Ceiling rows.** ``fedjax_fm packed - attn core`` (run only when named in ``--rows``)
trains the same packed batches with the attention core -- scores, softmax, weighted
sum -- replaced by one elementwise product that keeps q, k and v live: not a model, a
lower bound on the step time of any attention scheme. With it and the packed row in
the same run, the bench prints how much of the step the attention core takes and what
*exact* block-diagonal attention (each example attending only within itself: the
examples' own attention FLOPs, ``ExampleFlops.attention``) could give, at today's
attention speed and at the dense layers' speed (the ceiling).

**Host allocator.** The JAX workers call ``fedjax_fm.host_allocator.keep_freed_memory``
first, as the ``fedjax-fm`` command does (glibc keeps freed blocks for reuse instead of
unmapping them; ``FEDJAX_FM_HOST_ALLOCATOR=system`` turns it off). The torch rows run
with glibc's defaults, as a PyTorch user's script does; ``torch grouped + malloc kept``
(run only when named) gives PyTorch the same setting, to show what it is worth there.

Usage::

    python scripts/bench_real_lengths.py              # 3 clients x 4 steps (batch 8; packed: 6 rows)
    python scripts/bench_real_lengths.py --quick      # a smoke test of a few minutes
    python scripts/bench_real_lengths.py --rows "fedjax_fm packed,fedjax_fm packed - attn core,torch grouped"
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

VOCAB = 32128
SRC_MEDIAN, SRC_P85 = 115.0, 255.0
TGT_MEDIAN, TGT_P90 = 24.0, 50.0
Z85, Z90 = 1.0364333894937898, 1.2815515655446004


def _rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def draw_lengths(n: int, seed: int, max_src: int = 512, max_tgt: int = 95) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (source, target) token lengths, SAMSum-like (module docstring), EOS included."""
    rng = np.random.default_rng(seed)
    src = np.exp(rng.normal(math.log(SRC_MEDIAN), math.log(SRC_P85 / SRC_MEDIAN) / Z85, n))
    tgt = np.exp(rng.normal(math.log(TGT_MEDIAN), math.log(TGT_P90 / TGT_MEDIAN) / Z90, n))
    return (np.clip(np.rint(src), 8, max_src).astype(np.int64), np.clip(np.rint(tgt), 2, max_tgt).astype(np.int64))


def _tokens(n: int, seed: int, max_src: int, max_tgt: int):
    """Random token ids with the drawn lengths, as ``TokenizedExamples`` (ends in EOS = 1)."""
    from fedjax_fm.data.tokenize import TokenizedExamples

    src_len, tgt_len = draw_lengths(n, seed, max_src, max_tgt)
    rng = np.random.default_rng([seed, 1])
    ids = rng.integers(2, VOCAB, size=(n, max_src)).astype(np.int32)
    labels = rng.integers(2, VOCAB, size=(n, max_tgt)).astype(np.int32)
    ids[np.arange(max_src)[None] >= src_len[:, None]] = 0
    labels[np.arange(max_tgt)[None] >= tgt_len[:, None]] = 0
    ids[np.arange(n), src_len - 1] = 1
    labels[np.arange(n), tgt_len - 1] = 1
    return TokenizedExamples(ids, src_len.astype(np.int32), labels, tgt_len.astype(np.int32))


def _client_streams(args) -> list[np.ndarray]:
    """Each client's examples (dataset indices): a disjoint block of a large enough pool."""
    per_client = args.pool // args.clients
    return [np.arange(c * per_client, (c + 1) * per_client) for c in range(args.clients)]


# ----------------------------------------------------------------------------- JAX


def _no_attention_core(query, key, value, bias, mask, dropout_seed=None, dropout_rate=0.0):
    """A stand-in for ``layers.attention_weights_and_output`` that costs almost nothing.

    Keeps q, k and v (and their LoRA adapters) live in the forward and backward pass with
    one elementwise product, but computes no scores, softmax or weighted sum. A step with
    it is a lower bound on the time of ANY exact attention scheme (block-diagonal or
    otherwise), so the ``no attention core`` row's real tokens/s bounds what attention
    work could give. It computes a different function: its loss means nothing.
    """
    del bias, mask, dropout_seed, dropout_rate
    q_len = query.shape[1]
    assert key.shape[1] >= q_len, "the stand-in slices keys to the query length"
    return value[:, :q_len] + query * key[:, :q_len]


def _worker_jax(args, packed: bool, no_attention_core: bool = False) -> dict:
    import jax
    import optax

    if no_attention_core:
        from fedjax_fm.models import layers

        layers.attention_weights_and_output = _no_attention_core  # looked up at trace time

    from fedjax_fm import fl
    from fedjax_fm.data import batching
    from fedjax_fm.data.packing import PackingSpec, example_lengths, pack_round
    from fedjax_fm.fl.t5_task import t5_loss_fn
    from fedjax_fm.models import cpu_attention
    from fedjax_fm.models import lora as lora_lib
    from fedjax_fm.models.config import LoraConfig, preset
    from fedjax_fm.models.flops import ExampleFlops, train_step_flops
    from fedjax_fm.models.t5 import T5, init_params
    from fedjax_fm.training.round import useful_train_flops

    baseline = _rss_now_mib()
    config = preset(args.preset)
    lora = LoraConfig(rank=8, alpha=16.0, dropout=0.0, target_modules=("q", "v"))
    model = T5(config, lora=lora)
    params = init_params(config, jax.random.PRNGKey(0))
    adapters = lora_lib.init_lora(params, lora, jax.random.PRNGKey(1))
    loss_fn = t5_loss_fn(model, dropout=False)
    update = jax.jit(fl.make_client_update(loss_fn, optax.adamw(1e-4, weight_decay=0.0)))
    trainable, frozen = {"lora": adapters}, {"params": params}

    tokens = _tokens(args.pool, args.seed, args.src_len, args.tgt_len)
    rounds = []
    for c, indices in enumerate(_client_streams(args)):
        if packed:
            spec = PackingSpec(args.pack_src, args.pack_tgt, max_segments=args.max_segments, window=args.window)
            p = pack_round(tokens, indices, seed=args.seed, round_index=0, client=c,
                           num_rows=args.steps * args.pack_rows, spec=spec)
            batch = {k: v.reshape(args.steps, args.pack_rows, *v.shape[1:]) for k, v in p.batch.items()}
        else:
            idx, w = batching.round_slots(indices, seed=args.seed, round_index=0, client=c,
                                          num_slots=args.steps * args.batch, num_real=args.steps * args.batch)
            batch = batching.gather_batches(tokens, idx, w, (args.steps, args.batch))
        rounds.append(batch)

    t0 = time.perf_counter()
    jax.block_until_ready(update(trainable, frozen, rounds[0], jax.random.PRNGKey(2)))  # compile (not timed)
    compile_s = time.perf_counter() - t0
    seconds, real, slots, examples = 0.0, 0.0, 0.0, 0.0
    example_flops = ExampleFlops(config, lora)
    flops, executed, useful_attention, executed_attention = 0.0, 0.0, 0.0, 0.0
    for c, batch in enumerate(rounds):
        t0 = time.perf_counter()
        delta, n, metrics = update(trainable, frozen, batch, jax.random.PRNGKey(10 + c))
        jax.block_until_ready(delta)
        seconds += time.perf_counter() - t0
        real += float(metrics["tokens"])
        examples += float(n)
        slots += batch["attention_mask"].size + batch["decoder_attention_mask"].size
        flops += useful_train_flops(example_flops, batch)
        useful_attention += example_flops.attention(*example_lengths(batch))
        steps, rows, source_len = batch["input_ids"].shape
        step_flops = train_step_flops(config, rows, source_len, batch["labels"].shape[-1], lora=lora)
        executed += steps * step_flops.total
        executed_attention += steps * step_flops.attention
    return dict(framework="jax", packed=packed, seconds=seconds, real_tokens=real, examples=examples,
                padding_efficiency=real / slots, useful_flops=flops, executed_flops=executed, compile_s=compile_s,
                useful_attention_flops=useful_attention, executed_attention_flops=executed_attention,
                baseline_rss_mib=baseline, peak_rss_mib=_peak_rss_mib(), version=f"jax {jax.__version__}",
                loss=float(metrics["loss"]), cpu_attention=cpu_attention.status()["used"])


# ----------------------------------------------------------------------------- PyTorch


def _worker_torch(args, grouped: bool) -> dict:
    import peft
    import torch
    import transformers

    from fedjax_fm.models import preset
    from fedjax_fm.models.config import LoraConfig
    from fedjax_fm.models.flops import ExampleFlops, train_step_flops

    baseline = _rss_now_mib()
    config = preset(args.preset)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**config.to_hf_dict()))
    if not config.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q", "v"],
                                                       task_type="SEQ_2_SEQ_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    tokens = _tokens(args.pool, args.seed, args.src_len, args.tgt_len)

    def batches_of(indices: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        order = rng.permutation(indices)[: args.steps * args.batch]
        if grouped:  # transformers' LengthGroupedSampler: mega-batches of 50 batches, sorted by length
            mega = 50 * args.batch
            lengths = tokens.input_lengths
            order = np.concatenate([sorted(order[i:i + mega], key=lambda j: -lengths[j])
                                    for i in range(0, len(order), mega)])
            chunks = [order[i:i + args.batch] for i in range(0, len(order), args.batch)]
            return [chunks[i] for i in rng.permutation(len(chunks))]
        return [order[i:i + args.batch] for i in range(0, len(order), args.batch)]

    def collate(idx: np.ndarray) -> dict:
        s = int(tokens.input_lengths[idx].max())
        t = int(tokens.label_lengths[idx].max())
        ids = torch.from_numpy(tokens.input_ids[idx, :s].astype(np.int64))
        labels = torch.from_numpy(tokens.labels[idx, :t].astype(np.int64))
        mask = (torch.arange(s)[None] < torch.from_numpy(tokens.input_lengths[idx].astype(np.int64))[:, None]).long()
        labels = torch.where(labels == 0, torch.tensor(-100), labels)  # DataCollatorForSeq2Seq's label padding
        return dict(input_ids=ids, attention_mask=mask, labels=labels)

    def step(batch: dict) -> float:
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss)

    step(collate(np.arange(args.batch)))  # warm-up (allocator, first-call overheads), not timed
    lora = LoraConfig(rank=8, alpha=16.0, dropout=0.0, target_modules=("q", "v"))
    example_flops = ExampleFlops(config, lora)
    seconds, real, slots, examples, loss = 0.0, 0.0, 0.0, 0.0, float("nan")
    useful, executed = 0.0, 0.0
    for c, indices in enumerate(_client_streams(args)):
        for idx in batches_of(indices, np.random.default_rng([args.seed, 0, c])):
            batch = collate(idx)
            t0 = time.perf_counter()
            loss = step(batch)
            seconds += time.perf_counter() - t0
            real += float(tokens.input_lengths[idx].sum() + tokens.label_lengths[idx].sum())
            slots += batch["input_ids"].numel() + batch["labels"].numel()
            examples += len(idx)
            useful += example_flops(tokens.input_lengths[idx], tokens.label_lengths[idx])
            executed += train_step_flops(config, len(idx), batch["input_ids"].shape[1], batch["labels"].shape[1],
                                         lora=lora).total
    return dict(framework="torch", grouped=grouped, seconds=seconds, real_tokens=real, examples=examples,
                padding_efficiency=real / slots, useful_flops=useful, executed_flops=executed, compile_s=None,
                baseline_rss_mib=baseline, peak_rss_mib=_peak_rss_mib(), loss=loss, threads=torch.get_num_threads(),
                version=f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__} "
                f"(attn: {model.base_model.model.config._attn_implementation})")


# ----------------------------------------------------------------------------- driver

ROWS = {
    "fedjax_fm unpacked": ("jax", "unpacked"),
    "fedjax_fm packed": ("jax", "packed"),
    "torch dynamic": ("torch", "dynamic"),
    "torch grouped": ("torch", "grouped"),
}
# Diagnostic rows, run only when named in --rows (see "Ceiling rows" in the module docstring).
CEILING_ROWS = {
    "fedjax_fm packed - attn core": ("jax", "packed-no-attention-core"),
    "torch grouped + malloc kept": ("torch", "grouped-malloc-kept"),
}
DEFAULT_ROWS = tuple(ROWS)
ROWS = {**ROWS, **CEILING_ROWS}
# What each kind of row imports (fedjax_fm always: the lengths are drawn with it).
REQUIRED_MODULES = {"jax": ("fedjax_fm", "jax"), "torch": ("torch", "transformers", "peft")}


def missing_modules(kinds: set[str]) -> list[str]:
    """The modules the rows of ``kinds`` need that this Python cannot import."""
    needed = {m for kind in kinds | {"jax"} for m in REQUIRED_MODULES[kind]}
    return sorted(m for m in needed if importlib.util.find_spec(m) is None)


def _run_worker(kind: str, variant: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", f"{kind}:{variant}", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind}:{variant} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_attention_ceiling(packed: dict, no_core: dict, reference: dict, reference_name: str) -> None:
    """What any exact attention could give the packed row (module docstring, "Ceiling rows").

    Both rows ran the same batches, so the attention core's time is the difference
    ``t_core = t_packed - t_no_core``, and the rest of the step runs its FLOPs
    ``F_rest = F_executed - F_attention`` at ``R_rest = F_rest / t_no_core``. An exact
    scheme must still do the examples' own attention, ``F_useful_attention`` (each example
    alone: block-diagonal over segments), so its time is at least

        t_ideal = t_no_core + F_useful_attention / R

    with ``R`` either today's attention speed (``F_attention / t_core``) or, as the
    ceiling, the rest of the step's speed (dense matmuls, the fastest this machine ran).
    """
    t_core = packed["seconds"] - no_core["seconds"]
    f_att, f_useful_att = packed["executed_attention_flops"], packed["useful_attention_flops"]
    rate_att = f_att / t_core if t_core > 0 else float("inf")
    rate_rest = (packed["executed_flops"] - f_att) / no_core["seconds"]
    print(f"attention core: {t_core / packed['seconds']:.0%} of the packed row's time for "
          f"{f_att / packed['executed_flops']:.0%} of its executed FLOPs ({rate_att / 1e9:.0f} GFLOP/s against "
          f"{rate_rest / 1e9:.0f} for the rest); the examples' own attention is {f_useful_att / f_att:.0%} of it")
    for label, rate in (("at today's attention speed", rate_att), ("at the dense layers' speed", rate_rest)):
        seconds = no_core["seconds"] + f_useful_att / rate
        tps = packed["real_tokens"] / seconds
        print(f"exact block-diagonal attention {label}: {tps:.0f} real tokens/s, "
              f"{tps / reference['tps']:.2f}x {reference_name}")
    print(f"no attention core at all (not a model): {no_core['tps'] / reference['tps']:.2f}x {reference_name}")
    if packed.get("cpu_attention"):
        print("(the fused CPU attention kernel ran: it computes only the keys each block of rows may see, about "
              "the examples' own attention, so the attention GFLOP/s above count dense-row FLOPs it skipped)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="flan-t5-small")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="local steps per client")
    parser.add_argument("--batch", type=int, default=8, help="examples (rows, when packed) per step")
    parser.add_argument("--src-len", type=int, default=512, help="source truncation limit")
    parser.add_argument("--tgt-len", type=int, default=96, help="target truncation limit (95 + 1, as bench_model)")
    parser.add_argument("--pack-src", type=int, default=None, help="packed row source slots (default --src-len)")
    parser.add_argument("--pack-tgt", type=int, default=128,
                        help="packed row target slots (default 128: balances source and target fill; module docstring)")
    parser.add_argument("--pack-rows", type=int, default=6, help="packed rows per step (module docstring)")
    parser.add_argument("--max-segments", type=int, default=None)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--pool", type=int, default=3000, help="examples to draw (split over the clients)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help=f"comma-separated rows to run, of: {', '.join(ROWS)}")
    parser.add_argument("--quick", action="store_true", help="1 client x 1 step, batch 2: a smoke test")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.steps, args.batch, args.pack_rows = 1, 1, 2, 2
    args.pack_src = args.pack_src or args.src_len
    args.pack_tgt = max(args.pack_tgt, args.tgt_len)
    if args._worker:
        kind, variant = args._worker.split(":")
        from fedjax_fm.host_allocator import keep_freed_memory

        if kind == "jax":
            keep_freed_memory()  # as the fedjax-fm command does at start-up
            result = _worker_jax(args, variant.startswith("packed"), no_attention_core=variant.endswith("no-attention-core"))
        else:
            if variant.endswith("malloc-kept"):
                keep_freed_memory()
            result = _worker_torch(args, variant.startswith("grouped"))
        print(json.dumps(result))
        return 0

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        parser.error(f"--rows: unknown row(s) {unknown}; valid: {', '.join(ROWS)}")
    missing = missing_modules({ROWS[r][0] for r in rows})
    if missing:  # before any work, rather than a bare ModuleNotFoundError from a worker
        parser.error(f"cannot import {', '.join(missing)}: from the repository root run "
                     f"`pip install -e \".[test]\" -c constraints.txt` (torch rows need torch==2.13.0, "
                     f"transformers and peft, which the [test] extra pins)")
    worker_argv = ["--preset", args.preset, "--clients", str(args.clients), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--src-len", str(args.src_len), "--tgt-len", str(args.tgt_len),
                   "--pack-src", str(args.pack_src), "--pack-tgt", str(args.pack_tgt), "--pack-rows", str(args.pack_rows),
                   "--window", str(args.window),
                   "--pool", str(args.pool), "--seed", str(args.seed)]
    if args.max_segments is not None:
        worker_argv += ["--max-segments", str(args.max_segments)]
    src, tgt = draw_lengths(args.pool, args.seed, args.src_len, args.tgt_len)
    print(f"machine: {os.cpu_count()} cores, python {platform.python_version()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")
    print(f"work: {args.preset} dims, LoRA r=8 on q,v, AdamW, float32; {args.clients} clients x {args.steps} steps x "
          f"batch {args.batch}; limits {args.src_len}/{args.tgt_len}; packed: {args.pack_rows} rows of "
          f"{args.pack_src}/{args.pack_tgt} per step")
    print(f"lengths (seed {args.seed}): source median {np.median(src):.0f}, p85 {np.percentile(src, 85):.0f}, "
          f"max {src.max()}; target median {np.median(tgt):.0f}, p90 {np.percentile(tgt, 90):.0f}")
    results = {}
    for name in rows:
        kind, variant = ROWS[name]
        r = _run_worker(kind, variant, worker_argv)
        results[name] = r
        print(f"  [{name}] {r['version']}; {r['examples']:.0f} examples, {r['real_tokens']:.0f} real tokens "
              f"in {r['seconds']:.1f} s; load average now {os.getloadavg()[0]:.2f}", flush=True)

    width = max([20] + [len(name) + 1 for name in results])
    header = (f"{'row':<{width}}{'real tok/s':>11}{'pad eff':>9}{'peak MiB':>10}{'examples/s':>12}{'useful GFLOP/s':>16}"
              f"{'exec GFLOP/s':>14}{'tok/exec GFLOP':>16}{'loss':>8}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        r["tps"] = r["real_tokens"] / r["seconds"]
        r["mem"] = r["peak_rss_mib"] - r["baseline_rss_mib"]
        r["exec_rate"] = r["executed_flops"] / r["seconds"]  # how fast the machine runs the work
        r["tokens_per_flop"] = r["real_tokens"] / r["executed_flops"]  # what the layout wastes
        print(f"{name:<{width}}{r['tps']:>11.0f}{r['padding_efficiency']:>9.3f}{r['mem']:>10.0f}"
              f"{r['examples'] / r['seconds']:>12.2f}{r['useful_flops'] / r['seconds'] / 1e9:>16.2f}"
              f"{r['exec_rate'] / 1e9:>14.2f}{r['tokens_per_flop'] * 1e9:>16.2f}{r['loss']:>8.3f}")
    torch_rows = [n for n in results if n.startswith("torch")]
    if torch_rows:
        best = max(torch_rows, key=lambda n: results[n]["tps"])
        b = results[best]
        for name in (n for n in results if n.startswith("fedjax_fm")):
            r = results[name]
            print(f"ratio {name} / {best}: {r['tps'] / b['tps']:.2f}x real tokens/s "
                  f"= {r['tokens_per_flop'] / b['tokens_per_flop']:.2f}x real tokens per executed FLOP "
                  f"x {r['exec_rate'] / b['exec_rate']:.2f}x executed FLOP/s; "
                  f"{r['mem'] / b['mem']:.2f}x peak memory")
    if torch_rows and "fedjax_fm packed" in results and "fedjax_fm packed - attn core" in results:
        _print_attention_ceiling(results["fedjax_fm packed"], results["fedjax_fm packed - attn core"], b, best)
    if "fedjax_fm packed" in results and "fedjax_fm unpacked" in results:
        print(f"ratio packed / unpacked: {results['fedjax_fm packed']['tps'] / results['fedjax_fm unpacked']['tps']:.2f}x")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
