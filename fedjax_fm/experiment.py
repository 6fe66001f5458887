"""``fedjax-fm run``: one federated fine-tuning experiment, config to results.

Read top to bottom, a run is::

    config  = load_config(CONFIG, --set ...)                 -> DIR/config.yaml
    texts   = data source (synthetic / TFDS / files)
    tok     = tokenizer (from the model, or SentencePiece trained on the texts)
    data    = tokenise, partition over clients, fixed-shape eval batches
    model   = preset or HF checkpoint (+ LoRA adapters)      variables = {"params", ["lora"]}
    state   = algorithm.init(trainable, seed)                 (or restored: --resume)
    round 0 = evaluation before training (eval.at_start)
    for t in 1..rounds:                                       (randomness keyed by r = t - 1, rounds done)
        ids     = sample_clients(seed, r)                     pure in (seed, r)
        batches = data.clients_round_batches(ids, r)          pure in (seed, r, client)
        client phase  (metered)  deltas, n_k, metrics
        server phase  (metered)  aggregate + server optimiser -> new state
        communication            bytes from the pytrees; time and joules from a network profile
        evaluation every k rounds (loss + ROUGE of greedy generations)
        row -> DIR/metrics.jsonl, progress line, TensorBoard;  checkpoint every k rounds
    DIR/summary.json (totals, params_sha256), DIR/export/, DIR/plots/

Reproducibility: the only state that carries from round to round is the server
state pytree (params, optimiser state, round, base PRNG key), and it is what a
checkpoint holds; model initialisation uses ``fold_in(PRNGKey(seed), tag)``, client
keys ``fold_in(fold_in(PRNGKey(seed), round), client)``, data order NumPy generators
seeded by ``(seed, round, client)``. Hence a killed and resumed run ends with the
same ``params_sha256`` as one never interrupted (same machine, same seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

import jax
import numpy as np
import yaml

from fedjax_fm import run_setup as setup
from fedjax_fm.checkpoint import CheckpointError, CheckpointStore
from fedjax_fm.compile_watch import CompileWatch
from fedjax_fm.config import ConfigError, ExperimentConfig, config_to_dict, dump_config, load_config
from fedjax_fm.fingerprint import params_sha256
from fedjax_fm.progress import ProgressPrinter, TensorBoardWriter

# The per-round fields of metrics.jsonl, in this order; null where not measured or
# not evaluated that round. Definitions in docs/experiments.md.
METRIC_FIELDS = (
    "round", "clients", "train_loss", "eval_loss", "rouge1", "rouge2", "rougeL", "rougeLsum",
    "tokens", "client_seconds", "client_joules", "server_seconds", "server_joules",
    "bytes_up", "bytes_down", "comm_seconds", "comm_joules", "tps", "tps_per_watt", "mfu", "granularity",
    "model_flops", "examples", "valid_clients", "applied", "eval_seconds", "eval_joules", "wall_seconds", "compiles",
    "energy_source", "energy_is_estimate",
)
EVAL_FIELDS = ("eval_loss", "rouge1", "rouge2", "rougeL", "rougeLsum")

# Config keys whose change makes a resumed run a different experiment (all of these
# sections except the number of rounds, which may be raised to extend a run).
_RESUME_MUST_MATCH = ("seed", "model", "lora", "data", "federated")
_RESUME_MAY_CHANGE = {("federated", "rounds")}


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


# --------------------------------------------------------------------------- helpers


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _clean(value: Any) -> Any:
    """JSON-safe: NumPy scalars to Python, non-finite floats to null."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrites metrics.jsonl atomically (at the start, and on resume to drop rows past the checkpoint)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _append_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _flatten(d: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(d, dict):
        out: dict[tuple[str, ...], Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, prefix + (str(k),)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: d}


def resume_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys (dotted) whose value differs between a run's saved config and the current one."""
    saved_flat = {k: v for k, v in _flatten(saved).items() if k and k[0] in _RESUME_MUST_MATCH}
    current_flat = {k: v for k, v in _flatten(current).items() if k and k[0] in _RESUME_MUST_MATCH}
    keys = sorted(set(saved_flat) | set(current_flat))
    return [
        f"{'.'.join(k)}: {saved_flat.get(k)!r} -> {current_flat.get(k)!r}"
        for k in keys
        if k not in _RESUME_MAY_CHANGE and saved_flat.get(k) != current_flat.get(k)
    ]


def _total(rows: list[dict[str, Any]], key: str) -> Optional[float]:
    """Sum over training rounds; None if any training round lacks the value (a partial sum would mislead)."""
    values = [r.get(key) for r in rows if r["round"] > 0]
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))


# ------------------------------------------------------------------------ the run


class Experiment:
    """One run: built from a config (``prepare``), then ``run()``; see the module docstring."""

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False,
                 stream: Optional[TextIO] = None) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.progress = ProgressPrinter(cfg.federated.rounds, stream=stream, enabled=cfg.output.progress)
        self.say = self.progress.message
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.checkpoint_dir = self.out_dir / "checkpoints"

    # -- setup -----------------------------------------------------------------

    def _check_out_dir(self) -> None:
        has_run = self.metrics_path.exists() or (self.checkpoint_dir.is_dir() and any(self.checkpoint_dir.iterdir()))
        if has_run and not self.resume:
            raise RunError(
                f"{self.out_dir} already holds a run (metrics.jsonl or checkpoints/); "
                "pass --resume to continue it, or choose another --out"
            )
        saved_path = self.out_dir / "config.yaml"
        if self.resume and saved_path.is_file():
            saved = yaml.safe_load(saved_path.read_text()) or {}
            mismatches = resume_mismatches(saved, config_to_dict(self.cfg))
            if mismatches:
                raise RunError(
                    f"--resume: the config differs from the one {self.out_dir} was started with "
                    f"({saved_path}); only federated.rounds and the eval/energy/checkpoint/output "
                    "sections may change:\n  " + "\n  ".join(mismatches)
                )

    def prepare(self) -> None:
        from fedjax_fm import fl

        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._check_out_dir()
        dump_config(cfg, self.out_dir / "config.yaml")
        self.say(f"fedjax-fm run -> {self.out_dir}")
        t0 = time.perf_counter()
        self.tokenizer = setup.build_tokenizer(cfg, self.out_dir, lambda: setup.training_texts(cfg))
        self.data = setup.build_data(cfg, self.tokenizer)
        self.model, variables = setup.build_model(cfg, self.tokenizer)
        self.trainable_names = fl.trainable_collections(cfg.lora is not None)
        trainable, self.frozen = fl.split_variables(variables, self.trainable_names)
        self.algorithm = setup.build_algorithm(cfg, self.model)
        self.server_step = jax.jit(self.algorithm.server_step)
        self.evaluator = setup.build_evaluator(cfg, self.model, self.tokenizer, self.data)
        self.energy = setup.build_energy(cfg, self.say)
        self.progress.energy_is_estimate = self.energy.is_estimate
        self.state = self.algorithm.init(trainable, cfg.seed)
        self.step_flops = setup.train_step_flops(cfg, self.model, self.data)
        self.trainable_bytes = fl.tree_bytes(trainable)
        num = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
        self.num_trainable = num(trainable)
        self.num_params = num(variables)
        self.say(
            f"model {cfg.model.name} ({'LoRA r=%d' % cfg.lora.rank if cfg.lora else 'full fine-tuning'}): "
            f"{self.num_trainable:,} trainable of {self.num_params:,} parameters; "
            f"{self.data.num_clients} clients, {cfg.federated.clients_per_round} per round, "
            f"{self.data.steps_per_round} local steps of {self.data.batch_size}; "
            f"server {cfg.federated.server_optimizer.name}; set up in {time.perf_counter() - t0:.1f} s"
        )

    # -- pieces of a round ---------------------------------------------------------

    def _row(self, round_: int) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(METRIC_FIELDS)
        row["round"] = round_
        row["energy_source"] = self.energy.label
        row["energy_is_estimate"] = self.energy.is_estimate
        return row

    def variables(self, state: Any = None) -> dict[str, Any]:
        from fedjax_fm import fl

        state = self.state if state is None else state
        return fl.join_variables(state.params, self.frozen)

    def _evaluate(self, row: dict[str, Any]) -> None:
        with self.energy.meter.section("eval") as section:
            result = self.evaluator(self.variables())
            section.block(None)
        record = section.record
        row.update({k: _clean(v) for k, v in result.metrics().items()})
        row["eval_seconds"] = record.wall_s
        row["eval_joules"] = record.joules
        self.last_predictions = list(zip(result.predictions, result.references))

    def _communication(self, row: dict[str, Any], clients: int) -> None:
        """Bytes from the pytrees; time and energy from the network profile (a model, not a measurement)."""
        # Each sampled client downloads the trainable parameters and uploads its delta
        # (same shapes); with LoRA the frozen base is never sent.
        cost = setup.communication(self.energy.network, self.trainable_bytes, self.trainable_bytes, clients)
        row["bytes_up"], row["bytes_down"] = cost.bytes_up, cost.bytes_down
        row["comm_seconds"], row["comm_joules"] = cost.seconds, cost.joules
        # G = T_comp / T_comm per client: the simulation runs the round's clients one
        # after another, real clients run in parallel, so T_comp is the mean client's.
        row["granularity"] = _div(_div(row["client_seconds"], clients), cost.seconds)

    def _round_inputs(self, round_index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        from fedjax_fm import fl

        cfg = self.cfg
        ids = fl.sample_clients(cfg.seed, round_index, self.data.num_clients, cfg.federated.clients_per_round)
        return ids, self.data.clients_round_batches([int(i) for i in ids], round_index)

    def warm_up(self, round_index: int) -> None:
        """Compiles the client and server steps before the first metered round.

        Both are pure, so running them once on that round's inputs and discarding the
        result changes nothing; without it the first round's seconds, TPS, η_e and MFU
        would include XLA compilation.
        """
        t0 = time.perf_counter()
        ids, batches = self._round_inputs(round_index)
        outputs = self.algorithm.run_clients(self.state, self.frozen, batches, ids)
        jax.block_until_ready(self.server_step(self.state, outputs))
        self.say(f"compiled the client and server steps in {time.perf_counter() - t0:.1f} s (not metered)")

    def train_round(self, round_: int) -> dict[str, Any]:
        """Round ``round_`` (1-based): the state moves from ``round_ - 1`` to ``round_`` completed rounds."""
        cfg = self.cfg
        round_index = round_ - 1  # rounds completed before this one: the key of its randomness
        if int(self.state.round) != round_index:
            raise RunError(f"internal: state is at round {int(self.state.round)}, expected {round_index}")
        ids, batches = self._round_inputs(round_index)
        meter = self.energy.meter
        with meter.section("clients") as section:
            outputs = section.block(self.algorithm.run_clients(self.state, self.frozen, batches, ids))
            # Host-side sums: a jnp reduction here would compile inside the metered window.
            counts = jax.device_get({"tokens": outputs.metrics["tokens"], "steps": outputs.metrics["steps"]})
            section.tokens = float(np.sum(counts["tokens"]))
            section.flops = None if self.step_flops is None else self.step_flops * float(np.sum(counts["steps"]))
        client = section.record
        with meter.section("server") as section:
            new_state, server_metrics = section.block(self.server_step(self.state, outputs))
        server = section.record
        self.state = new_state
        host = jax.device_get({"loss": outputs.metrics["loss"], "n": outputs.num_examples, **server_metrics})
        weights = np.asarray(host["n"], np.float64) * np.asarray(host["client_valid"], np.float64)
        losses = np.asarray(host["loss"], np.float64)
        finite = np.isfinite(losses) & (weights > 0)
        train_loss = float(np.sum(losses[finite] * weights[finite]) / np.sum(weights[finite])) if finite.any() else None

        row = self._row(round_)
        row.update(
            clients=int(len(ids)),
            train_loss=_clean(train_loss),
            tokens=client.tokens,
            client_seconds=client.wall_s,
            client_joules=client.joules,
            server_seconds=server.wall_s,
            server_joules=server.joules,
            tps=client.tps,
            tps_per_watt=client.eta_e,
            mfu=client.mfu,
            model_flops=client.model_flops,
            examples=float(np.sum(host["n"])),
            valid_clients=int(host["num_valid_clients"]),
            applied=bool(host["applied"]),
        )
        self._communication(row, len(ids))
        if round_ % cfg.eval.every == 0 or round_ == cfg.federated.rounds:
            self._evaluate(row)
        return row

    # -- the loop --------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        self.prepare()
        rows: list[dict[str, Any]] = []
        store = (
            CheckpointStore(self.checkpoint_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
            if cfg.checkpoint.enabled
            else None
        )
        if self.resume and store is not None:
            restored = store.restore_latest(self.state, on_skip=lambda e: self.say(f"skipping checkpoint: {e}"))
            if restored is None:
                self.say("--resume: no checkpoint yet; starting from round 0")
            else:
                self.state = self.algorithm.executor.place(restored.state)
                rows = [r for r in restored.metrics if r["round"] <= restored.round]
                self.say(f"resumed from {restored.path} (round {restored.round})")
        _write_rows(self.metrics_path, rows)
        board = TensorBoardWriter(str(self.out_dir / "tensorboard"), enabled=cfg.output.tensorboard, say=self.say)
        for row in rows:
            board.write(row)
        start_round = int(self.state.round)
        if start_round >= cfg.federated.rounds and rows:
            self.say(f"the run already completed {start_round} rounds (federated.rounds={cfg.federated.rounds})")

        if start_round == 0 and cfg.eval.at_start:
            self.progress.start_round()
            row = self._row(0)
            row["clients"] = 0
            row["wall_seconds"] = None
            self._evaluate(row)
            rows.append(row)
            _append_row(self.metrics_path, row)
            board.write(row)
            self.progress.round_done(row)

        if start_round < cfg.federated.rounds:
            self.warm_up(start_round)
        for round_ in range(start_round + 1, cfg.federated.rounds + 1):
            self.progress.start_round()
            t0 = time.perf_counter()
            with CompileWatch() as watch:
                row = self.train_round(round_)
            row["wall_seconds"] = time.perf_counter() - t0
            row["compiles"] = watch.count
            if watch.count and round_ > start_round + cfg.eval.every:
                # Past the first round and the first evaluation every shape has been seen.
                self.say(f"warning: round {round_} compiled {watch.count} function(s) again "
                         f"({', '.join(sorted(set(watch.names)))}): a shape or static argument changed")
            rows.append(row)
            _append_row(self.metrics_path, row)
            board.write(row)
            if store is not None and (round_ % cfg.checkpoint.every == 0 or round_ == cfg.federated.rounds):
                store.save(round_, self.state, rows, {"config": config_to_dict(cfg)}, force=True)
            self.progress.round_done(row)
        board.close()
        if store is not None:
            store.close()
        return self.finish(rows, time.perf_counter() - started)

    # -- outputs ---------------------------------------------------------------

    def finish(self, rows: list[dict[str, Any]], process_seconds: float) -> dict[str, Any]:
        cfg = self.cfg
        variables = self.variables()
        fingerprint = params_sha256(variables)
        evaluated = [r for r in rows if r.get("rougeL") is not None]
        export_dir = None
        if cfg.output.export:
            export_dir = setup.export(cfg, self.out_dir / "export", self.model, variables, self.tokenizer, self.say)
        totals = {
            key: _total(rows, key)
            for key in ("tokens", "client_seconds", "client_joules", "server_seconds", "server_joules",
                        "comm_seconds", "comm_joules", "bytes_up", "bytes_down", "model_flops", "wall_seconds")
        }
        parts = [totals["client_joules"], totals["server_joules"], totals["comm_joules"]]
        totals["joules"] = None if any(p is None for p in parts) else float(sum(parts))
        compute = [totals["client_joules"], totals["server_joules"]]
        totals["compute_joules"] = None if any(p is None for p in compute) else float(sum(compute))
        totals["seconds"] = totals["wall_seconds"]
        summary = {
            "rounds": int(self.state.round),
            "seed": cfg.seed,
            "model": cfg.model.name,
            "mode": f"lora(r={cfg.lora.rank})" if cfg.lora else "full",
            "server_optimizer": cfg.federated.server_optimizer.name,
            "num_params": self.num_params,
            "num_trainable_params": self.num_trainable,
            "initial": {k: evaluated[0].get(k) for k in ("round", *EVAL_FIELDS)} if evaluated else None,
            "final": {k: evaluated[-1].get(k) for k in ("round", *EVAL_FIELDS)} if evaluated else None,
            "best_rougeL": max((r["rougeL"] for r in evaluated), default=None),
            "final_train_loss": next((r["train_loss"] for r in reversed(rows) if r.get("train_loss") is not None), None),
            "totals": totals,
            "energy_source": self.energy.label,
            "energy_is_estimate": self.energy.is_estimate,
            "data": self.data.report(),
            "examples": [{"prediction": p, "reference": r} for p, r in getattr(self, "last_predictions", [])[:5]],
            "params_sha256": fingerprint,
            "params_sha256_covers": "all variables (" + ", ".join(sorted(variables)) + "); canonical order "
            "documented in fedjax_fm/fingerprint.py",
            "export": str(export_dir) if export_dir else None,
            "process_seconds": process_seconds,
        }
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_clean) + "\n")
        if cfg.output.plots:
            from fedjax_fm.report import plot_run

            plot_run(self.out_dir, rows)
        final = summary["final"] or {}
        self.say(
            f"done: {summary['rounds']} rounds; ROUGE-L {_fmt(summary['initial'] and summary['initial']['rougeL'])}"
            f" -> {_fmt(final.get('rougeL'))}; params_sha256 {fingerprint[:16]}…; results in {self.out_dir}"
        )
        return summary


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False,
                   stream: Optional[TextIO] = None) -> dict[str, Any]:
    """Runs (or with ``resume`` continues) an experiment into ``out_dir``; returns the summary."""
    return Experiment(cfg, out_dir, resume=resume, stream=stream).run()


# ----------------------------------------------------------------------------- CLI


def _run_command(args: argparse.Namespace) -> int:
    from fedjax_fm.data.records import DataError

    try:
        cfg = load_config(args.config, args.set)
        if args.quiet:
            cfg = cfg.replace(output=dataclasses.replace(cfg.output, progress=False))
        summary = run_experiment(cfg, args.out, resume=args.resume)
    except (ConfigError, RunError, CheckpointError, DataError, FileNotFoundError) as error:
        print(f"fedjax-fm run: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("rounds", "initial", "final", "params_sha256")}, default=_clean))
    return 0


def add_run_command(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``fedjax-fm run CONFIG --out DIR [--set section.key=value ...] [--resume]``."""
    parser = subparsers.add_parser(
        "run",
        help="run a federated fine-tuning experiment from a YAML config",
        description="Run a federated fine-tuning experiment: metrics.jsonl (one row per round), "
        "summary.json (with params_sha256), checkpoints/, export/ (Hugging Face), plots/.",
    )
    parser.add_argument("config", help="YAML experiment file (e.g. configs/default.yaml)")
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory (created; must be new unless --resume)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value, parsed as YAML (repeatable), e.g. --set federated.rounds=5 --set lora=null",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=_run_command)
