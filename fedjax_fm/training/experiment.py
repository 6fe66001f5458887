"""``fedjax-fm run``: one federated fine-tuning experiment, config to results -- the rounds loop.

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
        client phase  (metered)  algorithm.run_clients -> deltas, n_k, metrics     (training/round.py)
        server phase  (metered)  algorithm.server_step: aggregate + server optimiser -> new state
        communication            bytes from the pytrees; time and joules from a network profile
        evaluation every k rounds (loss + ROUGE of greedy generations)
        row -> DIR/metrics.jsonl, progress line, TensorBoard;  checkpoint every k rounds (training/record.py)
    DIR/summary.json (totals, params_sha256), DIR/export/, DIR/plots/

The bookkeeping after the client phase (row, totals, checkpoints, summary) is the
deployment's too (``fedjax_fm.deploy.server``): :mod:`fedjax_fm.training.record`.

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
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

import jax
import numpy as np

from fedjax_fm import fl
from fedjax_fm.config import ConfigError, ExperimentConfig, load_config
from fedjax_fm.data.records import DataError
from fedjax_fm.models.hf_io import HFCheckpointError
from fedjax_fm.training import builders
from fedjax_fm.training.checkpoint import CheckpointError
from fedjax_fm.training.compile_watch import CompileWatch
from fedjax_fm.training.progress import ProgressPrinter, TensorBoardWriter
from fedjax_fm.training.record import (
    RunError,
    RunRecorder,
    client_phase,
    empty_row,
    json_safe,
    round_communication,
    round_row,
)
from fedjax_fm.training.report import format_value, plot_run
from fedjax_fm.training.round import metered_clients, metered_server_step


class Experiment:
    """One run: built from a config (``prepare``), then ``run()``; see the module docstring."""

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False,
                 stream: Optional[TextIO] = None) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.progress = ProgressPrinter(cfg.federated.rounds, stream=stream, enabled=cfg.output.progress)
        self.say = self.progress.message
        self.recorder = RunRecorder(cfg, self.out_dir, resume=resume, say=self.say)

    # -- setup -----------------------------------------------------------------

    def prepare(self) -> None:
        cfg = self.cfg
        self.recorder.check()
        self.say(f"fedjax-fm run -> {self.out_dir}")
        t0 = time.perf_counter()
        self.say(f"setting up: tokenizer ({builders.tokenizer_mode(cfg)})")
        self.tokenizer = builders.build_tokenizer(cfg, self.out_dir, lambda: builders.training_texts(cfg))
        self.say(f"setting up: data ({cfg.data.source.kind}, {cfg.data.partition.method} over "
                 f"{cfg.federated.num_clients} clients; tokenising)")
        self.data = builders.build_data(cfg, self.tokenizer)
        self.say(f"setting up: model ({cfg.model.name}, "
                 f"{'pretrained weights' if builders.wants_pretrained(cfg) else 'random init from the seed'})")
        self.model, variables = builders.build_model(cfg, self.tokenizer)
        trainable, self.frozen = fl.split_variables(variables, fl.trainable_collections(cfg.lora is not None))
        self.algorithm = builders.build_algorithm(cfg, self.model)
        self.evaluator = builders.build_evaluator(cfg, self.model, self.tokenizer, self.data)
        self.energy = builders.build_energy(cfg, self.say)
        self.progress.energy_is_estimate = self.energy.is_estimate
        self.state = self.algorithm.init(trainable, cfg.seed)
        shapes = self.data.batch_shapes()
        self.step_flops = builders.train_step_flops(cfg, self.model, shapes["input_ids"][2], shapes["labels"][2])
        self.trainable_bytes = fl.tree_nbytes(trainable)
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
        return empty_row(round_, self.energy.label, self.energy.is_estimate)

    def variables(self, state: Any = None) -> dict[str, Any]:
        state = self.state if state is None else state
        return fl.join_variables(state.params, self.frozen)

    def _evaluate(self, row: dict[str, Any]) -> None:
        with self.energy.meter.section("eval") as section:
            result = self.evaluator(self.variables())
            section.block(None)
        record = section.record
        row.update({k: json_safe(v) for k, v in result.metrics().items()})
        row["eval_seconds"] = record.wall_s
        row["eval_joules"] = record.joules
        self.last_predictions = list(zip(result.predictions, result.references))
        if row["round"] == 0:
            self.first_predictions = self.last_predictions

    def _round_inputs(self, round_index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
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
        self.say("compiling the client and server steps (XLA; once per run) ...")
        ids, batches = self._round_inputs(round_index)
        outputs = self.algorithm.run_clients(self.state, self.frozen, batches, ids)
        jax.block_until_ready(self.algorithm.server_step(self.state, outputs))
        self.say(f"compiled the client and server steps in {time.perf_counter() - t0:.1f} s (not metered)")

    def train_round(self, round_: int) -> dict[str, Any]:
        """Round ``round_`` (1-based): the state moves from ``round_ - 1`` to ``round_`` completed rounds."""
        cfg = self.cfg
        round_index = round_ - 1  # rounds completed before this one: the key of its randomness
        if int(self.state.round) != round_index:
            raise RunError(f"internal: state is at round {int(self.state.round)}, expected {round_index}")
        ids, batches = self._round_inputs(round_index)
        meter = self.energy.meter
        outputs, client = metered_clients(self.algorithm, self.state, self.frozen, batches, ids, meter,
                                          self.step_flops)
        self.state, server, host = metered_server_step(self.algorithm, self.state, outputs, meter)
        clients = jax.device_get({"loss": outputs.metrics["loss"], "n": outputs.num_examples})
        # Each sampled client downloads the trainable parameters and uploads its delta
        # (same shapes); with LoRA the frozen base is never sent.
        comm = round_communication(self.energy.network, self.trainable_bytes, self.trainable_bytes, len(ids))
        row = round_row(
            self._row(round_), clients=len(ids), client=client_phase([client]), server=server,
            losses=clients["loss"], num_examples=clients["n"], client_valid=host["client_valid"],
            num_valid=host["num_valid_clients"], applied=host["applied"], comm=comm,
        )
        if round_ % cfg.eval.every == 0 or round_ == cfg.federated.rounds:
            self._evaluate(row)
        return row

    # -- the loop --------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        self.prepare()
        recorder = self.recorder
        restored = recorder.restore(self.state)
        if restored is not None:
            self.state = self.algorithm.executor.place(restored)
        board = TensorBoardWriter(str(self.out_dir / "tensorboard"), enabled=cfg.output.tensorboard, say=self.say)
        for row in recorder.rows:
            board.write(row)
        start_round = int(self.state.round)
        if start_round >= cfg.federated.rounds and recorder.rows:
            self.say(f"the run already completed {start_round} rounds (federated.rounds={cfg.federated.rounds})")

        if start_round == 0 and cfg.eval.at_start:
            self.progress.start_round()
            row = self._row(0)
            row["clients"] = 0
            self._evaluate(row)
            row = recorder.record(row)
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
            row = recorder.record(row, self.state)
            board.write(row)
            self.progress.round_done(row)
        board.close()
        recorder.close()
        return self.finish(time.perf_counter() - started)

    # -- outputs ---------------------------------------------------------------

    def finish(self, process_seconds: float) -> dict[str, Any]:
        cfg = self.cfg
        variables = self.variables()
        export_dir = None
        if cfg.output.export:
            export_dir = builders.export(cfg, self.out_dir / "export", self.model, variables, self.tokenizer, self.say)
        summary = self.recorder.write_summary(
            int(self.state.round), variables, energy_label=self.energy.label,
            energy_is_estimate=self.energy.is_estimate, num_params=self.num_params, num_trainable=self.num_trainable,
            extra={
                "data": self.data.report(),
                "examples": [{"prediction": p, "reference": r} for p, r in getattr(self, "last_predictions", [])[:5]],
                "export": str(export_dir) if export_dir else None,
                "process_seconds": process_seconds,
            },
        )
        if cfg.output.plots:
            plot_run(self.out_dir, self.recorder.rows)
        self._say_examples()
        final = summary["final"] or {}
        self.say(
            f"done: {summary['rounds']} rounds; ROUGE-L {format_value(summary['initial'] and summary['initial']['rougeL'])}"
            f" -> {format_value(final.get('rougeL'))}; params_sha256 {summary['params_sha256'][:16]}…; results in {self.out_dir}"
        )
        return summary


    def _say_examples(self) -> None:
        """One held-out example before and after training, then the last evaluation's five."""
        last = getattr(self, "last_predictions", [])
        first = getattr(self, "first_predictions", [])
        if first and last and first is not last:
            self.say("before and after training, held-out example 1:")
            self.say(f"  reference: {last[0][1]}")
            self.say(f"  before:    {first[0][0]}")
            self.say(f"  after:     {last[0][0]}")
        if last:
            self.say(f"held-out examples (prediction / reference), the first {min(5, len(last))}:")
            for k, (prediction, reference) in enumerate(last[:5], 1):
                self.say(f"  {k}. {prediction}")
                self.say(f"     {reference}")


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False,
                   stream: Optional[TextIO] = None) -> dict[str, Any]:
    """Runs (or with ``resume`` continues) an experiment into ``out_dir``; returns the summary."""
    return Experiment(cfg, out_dir, resume=resume, stream=stream).run()


# ----------------------------------------------------------------------------- CLI


def _run_command(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.set)
        if args.quiet:
            cfg = cfg.replace(output=dataclasses.replace(cfg.output, progress=False))
        if args.dry_run:
            from fedjax_fm.training.plan import plan_run

            plan = plan_run(cfg, lambda message: print(message, file=sys.stderr, flush=True))
            print(json.dumps(plan, default=json_safe))
            return 0
        summary = run_experiment(cfg, args.out, resume=args.resume)
    except (ConfigError, RunError, CheckpointError, HFCheckpointError, DataError, FileNotFoundError) as error:
        print(f"fedjax-fm run: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("rounds", "initial", "final", "params_sha256")}, default=json_safe))
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
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, resolve the data, print the plan (clients, steps, tokens and "
                             "bytes per round) and exit; nothing is trained or written")
    parser.set_defaults(func=_run_command)
