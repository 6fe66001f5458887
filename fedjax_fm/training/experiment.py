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
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, TextIO

import jax
import numpy as np

from fedjax_fm import fl
from fedjax_fm.config import ConfigError, ExperimentConfig, config_to_dict, load_config
from fedjax_fm.data.federated import on_demand_blocker
from fedjax_fm.data.records import DataError
from fedjax_fm.data.tokenize import truncation_report
from fedjax_fm.models.hf_io import HFCheckpointError
from fedjax_fm.training import builders, distributed
from fedjax_fm.training.checkpoint import CheckpointError
from fedjax_fm.training.checks import fault_counts, round_warning, truncation_warnings
from fedjax_fm.training.compile_watch import CompileWatch
from fedjax_fm.training.environment import environment
from fedjax_fm.training.lineage import RunLineage
from fedjax_fm.training.model_card import write_model_card
from fedjax_fm.training.per_client import PerClientEvaluator, hold_out_client_examples, last_per_client
from fedjax_fm.training.privacy import RunPrivacy
from fedjax_fm.training.interrupt import GracefulStop, RunInterrupted, interrupted_message, resume_command
from fedjax_fm.training.compression import RunCompression, compression_fields
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
from fedjax_fm.models.flops import ExampleFlops
from fedjax_fm.training.round import metered_clients, metered_server_step, round_padding_efficiency, useful_train_flops


class Experiment:
    """One run: built from a config (``prepare``), then ``run()``; see the module docstring."""

    stop: Optional[GracefulStop] = None  # SIGINT/SIGTERM handling, set by the CLI (training/interrupt.py)
    current_round: Optional[int] = None  # the training round in flight, if any

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False,
                 stream: Optional[TextIO] = None) -> None:
        # In a distributed run (training/distributed.py) process 0 writes DIR, evaluates and
        # checkpoints; the others run the same rounds with their outputs in a scratch folder.
        self.multi_process = distributed.multi_process()
        self.primary = distributed.is_primary()
        self.scratch: Optional[Path] = None
        if not self.primary:
            self.scratch = Path(tempfile.mkdtemp(prefix=f"fedjax-fm-process{jax.process_index()}-"))
            out_dir, resume = self.scratch, False
            cfg = cfg.replace(
                output=dataclasses.replace(cfg.output, export=False, plots=False, tensorboard=False, progress=False),
                checkpoint=dataclasses.replace(cfg.checkpoint, enabled=False),
            )
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.progress = ProgressPrinter(cfg.federated.rounds, stream=stream, enabled=cfg.output.progress)
        self.say = self.progress.message
        self.recorder = RunRecorder(cfg, self.out_dir, resume=resume, say=self.say)

    # -- setup -----------------------------------------------------------------

    def prepare(self) -> None:
        cfg = self.cfg
        self._on_primary(self.recorder.check)
        self.say(f"fedjax-fm run -> {self.out_dir}")
        t0 = time.perf_counter()
        self.say(f"setting up: tokenizer ({builders.tokenizer_mode(cfg)})")
        self.tokenizer = builders.build_tokenizer(cfg, self.out_dir, lambda: builders.training_texts(cfg))
        self.say(f"setting up: data ({cfg.data.source.kind}, {cfg.data.partition.method} over "
                 f"{cfg.federated.num_clients} clients; tokenising)")
        # In several processes each tokenises only the clients it feeds, when it first feeds
        # them, and process 0 the eval split (docs/distributed.md, "Data").
        self.data = builders.build_data(cfg, self.tokenizer, on_demand=self.multi_process)
        if self.multi_process and self.primary and self.data.train_fill is None:
            self.say("note: every process tokenises the whole training split: "
                     f"{on_demand_blocker(cfg.data, builders.local_work(cfg))}")
        if cfg.eval.per_client_every is not None:  # each client's held-out slice leaves its training data
            self.data, held_out = hold_out_client_examples(self.data, cfg.eval.per_client_fraction, cfg.seed)
        self.say(f"setting up: model ({cfg.model.name}, "
                 f"{'pretrained weights' if builders.wants_pretrained(cfg) else 'random init from the seed'})")
        self.model, variables = builders.build_model(cfg, self.tokenizer)
        trainable, self.local_frozen = fl.split_variables(variables, fl.trainable_collections(cfg.lora is not None))
        self.algorithm = builders.build_algorithm(cfg, self.model)
        # Placed once where the client phase wants it (fl.Sharded: replicated over the mesh)
        # and kept across rounds; evaluation, lineage and export use the local copy.
        self.frozen = self.algorithm.executor.place(self.local_frozen)
        self.privacy = RunPrivacy.from_config(cfg, self.data.num_clients)
        if self.privacy is not None:
            self.algorithm = self.privacy.algorithm(self.algorithm)
        # Evaluation runs on process 0 only: the others neither build nor tokenise it.
        self.evaluator = builders.build_evaluator(cfg, self.model, self.tokenizer, self.data) if self.primary else None
        # After the evaluator: on demand, process 0 has tokenised the eval examples only now.
        for line in truncation_warnings(self.data.truncation) if self.primary else ():
            self._warn(line)
        self.per_client = None
        if cfg.eval.per_client_every is not None and self.primary:
            self.data.ensure_examples(np.concatenate(held_out))
            targets = list(builders.load_source(cfg.data.source, seed=cfg.seed)[0].targets)
            self.per_client = PerClientEvaluator(self.evaluator, self.data, held_out, targets)
        self.environment = environment()
        self.lineage = RunLineage(self.out_dir, config_to_dict(cfg), self.environment, self.data.client_tokens)
        self.energy = builders.build_energy(cfg, self.say)
        self.progress.energy_is_estimate = self.energy.is_estimate
        self.state = self.algorithm.init(trainable, cfg.seed)
        self.compression = RunCompression(cfg.federated.compression, trainable, self.data.num_clients)
        shapes = self.data.batch_shapes()
        self.step_flops = builders.train_step_flops(cfg, self.model, shapes["input_ids"][2], shapes["labels"][2])
        self.example_flops = ExampleFlops(self.model.config, cfg.lora)  # MFU's useful work: real examples only
        self.trainable_bytes = fl.tree_nbytes(trainable)
        num = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
        self.num_trainable = num(trainable)
        self.num_params = num(variables)
        self.say(
            f"model {cfg.model.name} ({'LoRA r=%d' % cfg.lora.rank if cfg.lora else 'full fine-tuning'}): "
            f"{self.num_trainable:,} trainable of {self.num_params:,} parameters; "
            f"{self.data.num_clients} clients, {cfg.federated.clients_per_round} per round, "
            f"{self.data.steps_per_round} local steps of {self.data.batch_size}; "
            f"server {_server_description(cfg)}; set up in {time.perf_counter() - t0:.1f} s"
        )

    # -- pieces of a round ---------------------------------------------------------

    def _row(self, round_: int) -> dict[str, Any]:
        return empty_row(round_, self.energy.label, self.energy.is_estimate)

    def variables(self, state: Any = None) -> dict[str, Any]:
        """The model's variables (this process's own copy in a distributed run: no collective)."""
        state = self.state if state is None else state
        params = fl.to_host(state.params) if self.multi_process else state.params
        return fl.join_variables(params, self.local_frozen)

    def _on_primary(self, step: Any) -> Any:
        """Runs ``step`` on process 0 only (all of it in one process); every process learns
        whether it failed (``distributed.agree``), so none waits on the others forever."""
        if not self.multi_process:
            return step()
        result, error = None, None
        if self.primary:
            try:
                result = step()
            except Exception as exc:  # re-raised below, after the others have heard of it
                error = exc
        distributed.agree(None if error is None else str(error))
        if error is not None:
            raise error
        return result

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
        if self.privacy is not None:  # the sampling the accountant assumes; padded slots masked out
            ids, self.round_mask = self.privacy.sample(cfg.seed, round_index)
            batches = self.data.clients_round_batches([int(i) for i in ids], round_index)
            return ids, self.privacy.mask_batches(batches, self.round_mask)
        ids = fl.sample_clients(cfg.seed, round_index, self.data.num_clients, cfg.federated.clients_per_round)
        if self.multi_process:  # only the clients this process's devices hold (fl.Sharded.client_slots)
            slots = fl.client_slots(self.algorithm.executor, len(ids))
            self.slots_real = slots.real
            fed = [int(ids[s]) for s in slots.sources]
            batches = self.data.clients_round_batches(fed, round_index)
            batches["example_weight"] = batches["example_weight"] * slots.real[:, None, None]
            self._share_fingerprints([c for c, real in zip(fed, slots.real) if real])
            return ids, batches
        return ids, self.data.clients_round_batches([int(i) for i in ids], round_index)

    def _share_fingerprints(self, own: list[int]) -> None:
        """Every process learns the lineage fingerprints of the round's clients (a collective).

        Each fingerprints the clients it fed (it has their tokens); process 0, which writes
        the lineage, so never tokenises another process's clients."""
        local = np.zeros((len(self.slots_real), 33), np.int32)  # [slot] client id (-1: none) + 32 digest bytes
        local[:, 0] = -1
        for row, client in enumerate(own):
            local[row, 0] = client
            local[row, 1:] = np.frombuffer(bytes.fromhex(self.lineage.fingerprint(client)), np.uint8)
        for entry in distributed.gather_rows(local).reshape(-1, 33):
            if entry[0] >= 0:
                self.lineage.remember(int(entry[0]), entry[1:].astype(np.uint8).tobytes().hex())

    def _round_work(self, batches: dict[str, np.ndarray]) -> tuple[float, float]:
        """``(useful model FLOPs, padding_efficiency)`` of the round's batches (summed over processes)."""
        if not self.multi_process:
            return useful_train_flops(self.example_flops, batches), round_padding_efficiency(batches)
        real = {k: v[self.slots_real] for k, v in batches.items()}
        slots = real["attention_mask"].size + real["decoder_attention_mask"].size
        flops, used, total = distributed.sum_over_processes(
            [useful_train_flops(self.example_flops, real), round_padding_efficiency(real) * slots, slots])
        return flops, used / total

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
        if self.compression.enabled:
            self.compression.warm_up(outputs, self.state, ids)
        jax.block_until_ready(self.algorithm.server_step(self.state, outputs))
        self.say(f"compiled the client and server steps in {time.perf_counter() - t0:.1f} s (not metered)")

    def train_round(self, round_: int) -> dict[str, Any]:
        """Round ``round_`` (1-based): the state moves from ``round_ - 1`` to ``round_`` completed rounds."""
        cfg = self.cfg
        round_index = round_ - 1  # rounds completed before this one: the key of its randomness
        if int(self.state.round) != round_index:
            raise RunError(f"internal: state is at round {int(self.state.round)}, expected {round_index}")
        ids, batches = self._round_inputs(round_index)
        useful_flops, padding = self._round_work(batches)
        meter = self.energy.meter
        outputs, client = metered_clients(self.algorithm, self.state, self.frozen, batches, ids, meter,
                                          self.step_flops, useful_flops)
        codec = None
        if self.compression.enabled:  # encode per client (own key, own state), decode before aggregation
            outputs, codec = self.compression.apply(outputs, self.state, ids, meter)
        self.state, server, host = metered_server_step(self.algorithm, self.state, outputs, meter)
        if self.multi_process:  # each process metered its own devices: the round's joules are the sum
            client, server = distributed.sum_energy(client), distributed.sum_energy(server)
        clients = fl.to_host({"loss": outputs.metrics["loss"], "n": outputs.num_examples})
        real = np.ones(len(ids), bool) if self.privacy is None else self.round_mask  # Poisson: padded slots
        self.round_clients = ([int(i) for i in np.asarray(ids)[real]], [float(n) for n in np.asarray(clients["n"])[real]])
        # Each sampled client downloads the trainable parameters and uploads its delta
        # (same shapes); with LoRA the frozen base is never sent.
        # (With a codec, the upload is the encoded payload: self.compression.bytes_up.)
        comm = round_communication(self.energy.network, self.compression.bytes_up, self.trainable_bytes,
                                   int(real.sum()))
        row = round_row(
            self._row(round_), clients=int(real.sum()), client=client_phase([client]), server=server,
            losses=clients["loss"], num_examples=clients["n"], client_valid=host["client_valid"],
            num_valid=host["num_valid_clients"], applied=host["applied"], comm=comm,
        )
        row["padding_efficiency"] = padding
        compression_fields(row, self.compression, int(real.sum()), codec)
        if self.privacy is not None:
            self.privacy.record_round(row, host)
        last = round_ == self.last_round
        if not self.primary:  # evaluation runs on process 0, on its own copy of the variables
            return row
        if round_ % cfg.eval.every == 0 or round_ == cfg.federated.rounds or last:
            self._evaluate(row)
        if self.per_client is not None and (round_ % cfg.eval.per_client_every == 0 or last):
            row.update(self.per_client.evaluate(self.variables()))
        return row

    @property
    def last_round(self) -> int:
        """``federated.rounds``, or the last round within ``federated.dp.target_epsilon``."""
        return self.cfg.federated.rounds if self.privacy is None else self.privacy.last_round

    # -- the loop --------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            if self.scratch is not None:  # another process's outputs: process 0 wrote the run's
                shutil.rmtree(self.scratch, ignore_errors=True)

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        finished = self.recorder.finished_summary() if self.primary else None
        if self.multi_process:  # process 0 decides for every process
            finished = json.loads(distributed.broadcast_text(
                None if finished is None else json.dumps(finished, default=json_safe)) or "null")
        if finished is not None:
            self.say(f"{self.out_dir} already completed its {finished['rounds']} rounds: nothing to do; "
                     "summary.json and config.yaml are left as they are")
            return finished
        self.prepare()
        recorder = self.recorder
        template = self.compression.checkpoint_tree(self.state)
        restored = self._on_primary(lambda: recorder.restore(template))
        if self.multi_process:  # process 0 read the checkpoint; the others take its state
            if distributed.broadcast_text("restored" if restored is not None else None) is not None:
                restored = distributed.broadcast_tree(restored if self.primary else template)
        if restored is not None:
            self.state = self.algorithm.executor.place(self.compression.restored(restored))
        board = TensorBoardWriter(str(self.out_dir / "tensorboard"), enabled=cfg.output.tensorboard, say=self.say)
        for row in recorder.rows:
            board.write(row)
        start_round = int(self.state.round)
        if self.privacy is not None:
            self.privacy.restore(start_round)
            if self.privacy.last_round < cfg.federated.rounds:
                self.say(f"DP: stopping after round {self.privacy.last_round}: one more would exceed "
                         f"federated.dp.target_epsilon={self.privacy.target_epsilon}")
        self.lineage.open(start_round)
        if start_round >= cfg.federated.rounds and recorder.rows:
            self.say(f"the run already completed {start_round} rounds (federated.rounds={cfg.federated.rounds})")

        if start_round == 0 and cfg.eval.at_start:
            self.progress.start_round()
            row = self._row(0)
            row["clients"] = 0
            if self.primary:
                self._evaluate(row)
            row = recorder.record(row)
            board.write(row)
            self.progress.round_done(row)

        if start_round < cfg.federated.rounds:
            self.warm_up(start_round)
        for round_ in range(start_round + 1, self.last_round + 1):
            self._round_starts(round_)
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
            # Lineage before the checkpoint: a checkpoint's round always has its entry (a resume
            # truncates the file to the checkpoint's round, dropping any entry past it).
            if self.primary:  # the others' lineage would only go to their scratch folder
                self.lineage.append(round_, *self.round_clients, self.variables(),
                                    extra=None if self.privacy is None else {"dp_epsilon": row["dp_epsilon"]})
            row = recorder.record(row, self.compression.checkpoint_tree(self.state))
            board.write(row)
            self.progress.round_done(row)
            problem = round_warning(row, cfg.federated.min_clients)
            if problem:
                self._warn(problem)
            self._round_ends(round_)
        stopped = int(self.state.round)
        if (stopped < cfg.federated.rounds and stopped > start_round and recorder.store is not None
                and stopped % cfg.checkpoint.every != 0):  # DP target ε reached: checkpoint the last round too
            recorder.store.save(stopped, self.compression.checkpoint_tree(self.state), recorder.rows,
                                recorder.checkpoint_meta(), force=True)
        board.close()
        recorder.close()
        return self.finish(time.perf_counter() - started)

    def _warn(self, text: str) -> None:
        """A warning shows even with --quiet (output.progress: false)."""
        print(text, file=self.progress.stream, flush=True)

    def _round_starts(self, round_: int) -> None:
        self.current_round = round_
        if self.stop is not None:
            self.stop.deferring = True  # a signal from here on lets this round finish

    def _round_ends(self, round_: int) -> None:
        """After a round is recorded: stops here, checkpointed, if a signal came during it."""
        if self.stop is not None and self.stop.requested is not None:
            self.recorder.checkpoint_now(round_, self.compression.checkpoint_tree(self.state))
            raise RunInterrupted(self.stop.requested, finished=True, round_=round_)
        self.current_round = None
        if self.stop is not None:
            self.stop.deferring = False

    # -- outputs ---------------------------------------------------------------

    def finish(self, process_seconds: float) -> dict[str, Any]:
        cfg = self.cfg
        variables = self.variables()
        export_dir = None
        if cfg.output.export:
            export_dir = builders.export(cfg, self.out_dir / "export", self.model, variables, self.tokenizer, self.say)
        lineage = self.lineage.finish(variables)
        summary = self.recorder.write_summary(
            int(self.state.round), variables, energy_label=self.energy.label,
            energy_is_estimate=self.energy.is_estimate, num_params=self.num_params, num_trainable=self.num_trainable,
            extra={
                "data": self._data_report(),
                "examples": [{"prediction": p, "reference": r} for p, r in getattr(self, "last_predictions", [])[:5]],
                "export": str(export_dir) if export_dir else None,
                "process_seconds": process_seconds,
                "privacy": None if self.privacy is None else self.privacy.summary(int(self.state.round)),
                "per_client": last_per_client(self.recorder.rows),
                "lineage": lineage,
                "environment": self.environment,
            },
        )
        if export_dir is not None:
            write_model_card(export_dir, cfg, summary)
        if cfg.output.plots:
            plot_run(self.out_dir, self.recorder.rows)
        faults = fault_counts(self.recorder.rows)
        if any(faults.values()):
            self._warn(f"warning: over the run {faults['rejected_clients']} client update(s) were rejected as "
                       f"non-finite and {faults['skipped_rounds']} round(s) applied no update "
                       "(summary.json totals: rejected_clients, skipped_rounds)")
        self._say_examples()
        final = summary["final"] or {}
        self.say(
            f"done: {summary['rounds']} rounds; ROUGE-L {format_value(summary['initial'] and summary['initial']['rougeL'])}"
            f" -> {format_value(final.get('rougeL'))}; params_sha256 {summary['params_sha256'][:16]}…; results in {self.out_dir}"
        )
        return summary

    def _data_report(self) -> dict[str, Any]:
        """``data.report()``; in several processes with on-demand tokenisation, the training
        split's truncation covers the examples any process tokenised (a collective)."""
        report = self.data.report()
        fill = self.data.train_fill
        if self.multi_process and fill is not None:
            self._warn(f"process {jax.process_index()} of {jax.process_count()}: tokenised {int(fill.done.sum())} of "
                       f"{len(fill)} training examples (those of the clients it fed)")
            raw_in, raw_out = (distributed.gather_rows(x.astype(np.int32)).max(axis=0) for x in fill.raw_lengths())
            done = raw_in >= 0
            union = truncation_report(raw_in[done], raw_out[done], self.cfg.data.max_input_length,
                                      self.cfg.data.max_target_length)
            report["truncation"]["train"] = union.as_dict()
            for line in truncation_warnings({"train": union}) if self.primary else ():
                self._warn(line)
        return report

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


def _server_description(cfg: ExperimentConfig) -> str:
    """``fedadam`` or, under a schedule, ``fedadam (learning rate 0.1, cosine to 0.1x over 40 rounds)``."""
    s = cfg.federated.server_optimizer
    if s.schedule == "constant":
        return s.name
    return f"{s.name} (learning rate {s.learning_rate:g}, {s.schedule} to {s.final_fraction:g}x over {cfg.federated.rounds} rounds)"


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False,
                   stream: Optional[TextIO] = None) -> dict[str, Any]:
    """Runs (or with ``resume`` continues) an experiment into ``out_dir``; returns the summary."""
    return Experiment(cfg, out_dir, resume=resume, stream=stream).run()


# ----------------------------------------------------------------------------- CLI


def _interrupted(error: RunInterrupted, args: argparse.Namespace, experiment: Optional[Experiment]) -> int:
    """Prints the one line of a stopped run (training/interrupt.py); returns 130 or 143."""
    recorder = experiment.recorder if experiment is not None else None
    if experiment is not None and error.round is None and not error.finished:
        error.round = experiment.current_round
    store = recorder.store if recorder is not None else None
    rounds = store.all_rounds() if store is not None else []
    print(interrupted_message(
        error, rounds=experiment.cfg.federated.rounds if experiment is not None else 0,
        last_checkpoint=rounds[-1] if rounds else None,
        checkpoints_enabled=experiment is None or experiment.cfg.checkpoint.enabled,
        command=resume_command(args.config, args.out, args.set),
    ), file=sys.stderr, flush=True)
    if recorder is not None:
        recorder.close()
    return error.exit_code


def _run_command(args: argparse.Namespace) -> int:
    experiment: Optional[Experiment] = None
    try:
        cfg = load_config(args.config, args.set)
        distributed.check_config(cfg)
        if args.quiet:
            cfg = cfg.replace(output=dataclasses.replace(cfg.output, progress=False))
        if args.dry_run:
            from fedjax_fm.training.plan import plan_run

            plan = plan_run(cfg, lambda message: print(message, file=sys.stderr, flush=True))
            print(json.dumps(plan, default=json_safe))
            return 0
        distributed.start(cfg)  # before anything touches a device
        with GracefulStop() as stop:
            experiment = Experiment(cfg, args.out, resume=args.resume)
            experiment.stop = stop
            summary = experiment.run()
    except RunInterrupted as error:
        return _interrupted(error, args, experiment)
    except (ConfigError, RunError, CheckpointError, HFCheckpointError, DataError, FileNotFoundError,
            distributed.DistributedError) as error:
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
