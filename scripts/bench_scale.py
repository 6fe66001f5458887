"""Benchmark: one LoRA round over the execution backends, in one process and in two (``jax.distributed``).

The work: a random-init T5 (``tiny`` or ``flan-t5-small`` dimensions, no downloads)
with LoRA r=8 on q and v, ``--clients`` clients × ``--steps`` local AdamW steps ×
batch ``--batch`` × ``--src``/``--tgt`` tokens, FedAvg on the adapters. Rows:

* ``sequential``, ``vmapped``, ``sharded``: one process with ``--devices`` forced host
  devices (CPU) or its accelerators, the frozen base placed once (``executor.place``);
* ``sharded, base re-placed``: the same ``Sharded`` fed the unplaced base every round
  (what the runner did before the base was placed once): the placed-once fix as before/after;
* ``sharded, 2 processes``: two local processes on 127.0.0.1, ``--devices // 2`` devices
  each (the same global mesh), each feeding only its own clients.

Each row runs in its own subprocess: one warm-up round (compilation), then
``--rounds`` measured rounds; the figure is rounds per second from the median round.
On a 2-core CPU no speed-up is expected from more devices or processes: the rows show
correctness costs and overheads (placement, feeding, gathering), not scaling.

Usage: ``python scripts/bench_scale.py [--model tiny|flan-t5-small] [--rounds 3] [--devices 2]``
(on a GPU host: ``--platform gpu``, ``--devices`` = the GPUs to use).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("sequential", "vmapped", "sharded", "sharded-replaced", "sharded-2proc")
LABELS = {"sequential": "sequential (1 process)", "vmapped": "vmapped (1 process)",
          "sharded": "sharded (1 process), base placed once", "sharded-replaced": "sharded (1 process), base re-placed",
          "sharded-2proc": "sharded, 2 processes, base placed once"}


def client_batches(ids, round_index, args, vocab):
    import numpy as np

    out = []
    for client in ids:
        rng = np.random.default_rng([int(client), round_index])
        shape = (args.steps, args.batch)
        labels = rng.integers(2, vocab, size=shape + (args.tgt,)).astype(np.int32)
        out.append({
            "input_ids": rng.integers(2, vocab, size=shape + (args.src,)).astype(np.int32),
            "attention_mask": np.ones(shape + (args.src,), np.int32),
            "decoder_input_ids": np.concatenate([np.zeros(shape + (1,), np.int32), labels[..., :-1]], -1),
            "labels": labels, "decoder_attention_mask": np.ones(shape + (args.tgt,), np.int32),
            "example_weight": np.ones(shape, np.float32),
        })
    return {k: np.stack([c[k] for c in out]) for k in out[0]}


def worker(args) -> None:
    import jax
    import optax

    if args.process_id is not None:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=2,
                                   process_id=args.process_id, initialization_timeout=300)
    from fedjax_fm import fl
    from fedjax_fm.fl.t5_task import t5_loss_fn, t5_partition
    from fedjax_fm.models import LoraConfig, T5, init_params, preset

    config = preset(args.model)
    lora = LoraConfig(rank=8, alpha=16.0, dropout=0.05, target_modules=("q", "v"))
    trainable, frozen = t5_partition(init_params(config, jax.random.PRNGKey(0)), lora, jax.random.PRNGKey(1))
    executor = {"sequential": fl.Sequential(), "vmapped": fl.Vmapped()}.get(args.row, None) or fl.Sharded()
    update = fl.make_client_update(t5_loss_fn(T5(config, lora=lora)), optax.adamw(1e-4))
    algorithm = fl.FederatedAlgorithm(update, fl.fedavg(), executor=executor)
    state = algorithm.init(trainable, 0)
    if args.row != "sharded-replaced":
        frozen = executor.place(frozen)  # once; "sharded-replaced" hands the unplaced base every round
    times = []
    for r in range(args.rounds + 1):
        ids = fl.sample_clients(0, r, 4 * args.clients, args.clients)
        slots = fl.client_slots(executor, len(ids))
        batches = client_batches(ids[slots.sources], r, args, config.vocab_size)
        t0 = time.perf_counter()
        state, metrics = algorithm.round(state, frozen, batches, ids)
        losses = fl.to_host(metrics["client_loss"])
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - t0)
    if args.process_id in (None, 0):
        print(json.dumps({"row": args.row, "warmup_s": times[0], "round_s": statistics.median(times[1:]),
                          "devices": jax.device_count(), "processes": jax.process_count(),
                          "loss": float(losses.mean())}))
    if args.process_id is not None:
        jax.distributed.shutdown()


def run_row(row: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    devices = args.devices // 2 if row == "sharded-2proc" else args.devices
    if args.platform == "cpu":
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    base = [sys.executable, os.path.abspath(__file__), "--worker", row] + [
        f"--{k}={getattr(args, k)}" for k in ("model", "rounds", "clients", "steps", "batch", "src", "tgt")]
    if row != "sharded-2proc":
        if args.platform != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(devices)))
        out = subprocess.run(base, env=env, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        penv = dict(env)
        if args.platform != "cpu":
            penv["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(pid * devices, (pid + 1) * devices)))
        procs.append(subprocess.Popen(base + [f"--port={port}", f"--process-id={pid}"], env=penv,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"two-process row failed: {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "flan-t5-small"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--src", type=int, default=64)
    parser.add_argument("--tgt", type=int, default=16)
    parser.add_argument("--devices", type=int, default=2, help="forced host devices (CPU) or GPUs, in all")
    parser.add_argument("--platform", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.row = args.worker
        return worker(args)
    print(f"model {args.model}, LoRA r=8, {args.clients} clients x {args.steps} steps x batch {args.batch} x "
          f"{args.src}/{args.tgt} tokens; {args.devices} {args.platform} device(s); load {os.getloadavg()[0]:.2f}")
    results = [run_row(row, args) for row in args.rows.split(",")]
    print(f"{'backend':44s} {'rounds/s':>9s} {'round ms':>9s} {'warm-up s':>10s} {'mean loss':>10s}")
    for r in results:
        print(f"{LABELS[r['row']]:44s} {1 / r['round_s']:9.2f} {1000 * r['round_s']:9.1f} {r['warmup_s']:10.1f} "
              f"{r['loss']:10.4f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
