"""A run's record, written the same way by simulation and deployment.

One round of bookkeeping, whoever ran the clients::

    row    = round_row(round, client records, server record, losses, weights, ...)
    totals = run_totals(rows)                        sums over training rounds; None if any is unmeasured
    RunRecorder: DIR/config.yaml, DIR/metrics.jsonl (a row per round), DIR/checkpoints/ every k
                 rounds, --resume (same config, newest readable checkpoint), DIR/summary.json

Definitions (README, "Metrics"):

* the round's client phase is the sum of its client calls (one metered call for a
  simulated round, one per device in a deployment): ``TPS = ΣN / Σt``,
  ``η_e = TPS / W`` with ``W = ΣE / Σt``, and ``MFU = ΣF / Σt / peak`` — useful FLOPs
  per device-second over the device's peak (PaLM's definition), the same in both;
* ``train_loss`` = ``Σ_k n_k ℓ_k / Σ_k n_k`` over the valid clients with finite loss
  (``n_k`` the client's example count, its FedAvg weight);
* ``G = (client seconds / clients) / T_comm``: the mean client's compute time over the
  round's modelled communication time (clients on parallel links).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import numpy as np
import yaml

from fedjax_fm.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict, dump_config
from fedjax_fm.energy.comm import CommCost, NetworkProfile, client_comm_cost, granularity, round_comm_cost
from fedjax_fm.energy.meter import CallRecord, safe_div, sum_records
from fedjax_fm.training.checkpoint import CheckpointStore
from fedjax_fm.training.checks import fault_counts, unused_resume_changes
from fedjax_fm.training.environment import environment
from fedjax_fm.training.cost import cost_to_target, quality_within_budget
from fedjax_fm.training.fingerprint import params_sha256

# The per-round fields of metrics.jsonl, in this order; null where not measured or
# not evaluated that round. Definitions in docs/experiments.md.
METRIC_FIELDS = (
    "round", "clients", "train_loss", "eval_loss", "rouge1", "rouge2", "rougeL", "rougeLsum",
    "tokens", "client_seconds", "client_joules", "server_seconds", "server_joules",
    "bytes_up", "bytes_down", "comm_seconds", "comm_joules", "tps", "tps_per_watt", "mfu", "granularity",
    "model_flops", "examples", "valid_clients", "applied", "eval_seconds", "eval_joules", "wall_seconds", "compiles",
    "energy_source", "energy_is_estimate", "padding_efficiency",
    # DP-FedAvg (training/privacy.py) and per-client quality (training/per_client.py); null when off.
    "dp_epsilon", "dp_delta", "dp_clip_norm", "dp_noise_stddev",
    "client_rougeL_mean", "client_rougeL_worst_decile", "client_rougeL_std",
    "client_eval_loss_mean", "client_eval_loss_worst_decile", "client_eval_loss_std", "per_client",
    # Update codecs (training/compression.py); null without one.
    "bytes_up_raw", "compression_ratio", "codec_seconds",
)
EVAL_FIELDS = ("eval_loss", "rouge1", "rouge2", "rougeL", "rougeLsum")
# Sums over the training rounds in summary.json's "totals".
TOTAL_FIELDS = ("tokens", "client_seconds", "client_joules", "server_seconds", "server_joules",
                "comm_seconds", "comm_joules", "bytes_up", "bytes_down", "model_flops", "wall_seconds",
                "bytes_up_raw", "codec_seconds")

# Config keys whose change makes a resumed run a different experiment (all of these
# sections except the number of rounds, which may be raised to extend a run).
_RESUME_MUST_MATCH = ("seed", "model", "lora", "data", "federated")
_RESUME_MAY_CHANGE = {("federated", "rounds")}


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


# ------------------------------------------------------------------------ values


def json_safe(value: Any) -> Any:
    """JSON-safe: NumPy scalars to Python, non-finite floats to null."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sum_or_none(values: Iterable[Any]) -> Optional[float]:
    """A sum, or None if there is nothing to sum or any part is missing (a partial sum would mislead)."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))


def weighted_train_loss(losses: Sequence[float], num_examples: Sequence[float],
                        valid: Sequence[bool]) -> Optional[float]:
    """``Σ n_k ℓ_k / Σ n_k`` over valid clients with a finite loss and a positive weight; None if none."""
    weights = np.asarray(num_examples, np.float64) * np.asarray(valid, np.float64)
    losses = np.asarray(losses, np.float64)
    ok = np.isfinite(losses) & (weights > 0)
    if not ok.any():
        return None
    return json_safe(float(np.sum(losses[ok] * weights[ok]) / np.sum(weights[ok])))


def client_phase(records: Sequence[CallRecord]) -> CallRecord:
    """The round's client phase from its client calls: one simulated call as it is, several
    devices summed (:func:`fedjax_fm.energy.meter.sum_records`: ΣN/Σt, ΣF/Σt/peak, ΣE)."""
    if len(records) == 1:
        return records[0]
    return sum_records(records, "clients")


def round_communication(network: NetworkProfile, bytes_up_per_client: int, bytes_down_per_client: int,
                        clients: int) -> CommCost:
    """The round's :class:`~fedjax_fm.energy.comm.CommCost`: clients on parallel links, each
    moving the same payload (T_comm = the slowest client's, joules summed)."""
    return round_comm_cost([client_comm_cost(bytes_up_per_client, bytes_down_per_client, network)] * clients)


def empty_row(round_: int, energy_label: str, energy_is_estimate: bool,
              extra_fields: Sequence[str] = ()) -> dict[str, Any]:
    """A row with every field null but its round and the energy source."""
    row: dict[str, Any] = dict.fromkeys((*METRIC_FIELDS, *extra_fields))
    row.update(round=round_, energy_source=energy_label, energy_is_estimate=energy_is_estimate)
    return row


def round_row(
    row: dict[str, Any],
    *,
    clients: int,
    client: CallRecord,
    server: CallRecord,
    losses: Sequence[float],
    num_examples: Sequence[float],
    client_valid: Sequence[bool],
    num_valid: int,
    applied: bool,
    comm: CommCost,
) -> dict[str, Any]:
    """Fills a training round's figures into ``row`` (from :func:`empty_row`) and returns it."""
    row.update(
        clients=int(clients),
        train_loss=weighted_train_loss(losses, num_examples, client_valid),
        tokens=client.tokens,
        client_seconds=client.wall_s,
        client_joules=client.joules,
        server_seconds=server.wall_s,
        server_joules=server.joules,
        tps=client.tps,
        tps_per_watt=client.eta_e,
        mfu=client.mfu,
        model_flops=client.model_flops,
        examples=float(np.sum(np.asarray(num_examples, np.float64))),
        valid_clients=int(num_valid),
        applied=bool(applied),
        bytes_up=comm.bytes_up,
        bytes_down=comm.bytes_down,
        comm_seconds=comm.seconds,
        comm_joules=comm.joules,
        # Real clients run in parallel (a simulation runs them one after another), so
        # T_comp is the mean client's.
        granularity=granularity(safe_div(client.wall_s, clients), comm.seconds),
    )
    return row


def run_totals(rows: Sequence[dict[str, Any]], extra_fields: Sequence[str] = ()) -> dict[str, Optional[float]]:
    """summary.json's ``totals``: each field summed over the training rounds (None if any
    round lacks it), plus ``joules`` (compute + communication), ``compute_joules`` and ``seconds``."""
    train = [r for r in rows if r["round"] > 0]
    totals = {key: sum_or_none(r.get(key) for r in train) for key in (*TOTAL_FIELDS, *extra_fields)}
    totals["joules"] = sum_or_none([totals["client_joules"], totals["server_joules"], totals["comm_joules"]])
    totals["compute_joules"] = sum_or_none([totals["client_joules"], totals["server_joules"]])
    totals["seconds"] = totals["wall_seconds"]
    totals.update(fault_counts(train))  # rejected_clients, skipped_rounds (training/checks.py)
    return totals


# ------------------------------------------------------------------------ resume


def _flatten(d: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(d, dict):
        out: dict[tuple[str, ...], Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, prefix + (str(k),)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: d}


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    try:
        return config_to_dict(config_from_dict(config))
    except (ConfigError, TypeError, ValueError):
        return config  # not loadable by today's schema: compare what it says


def _server_schedule(config: dict[str, Any]) -> str:
    return ((config.get("federated") or {}).get("server_optimizer") or {}).get("schedule", "constant")


def resume_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys (dotted) whose value differs between a run's saved config and the current one.

    ``federated.rounds`` may change (a run extended or cut short), except under a server
    learning-rate schedule: that spans the rounds, so another count would give rounds
    that no uninterrupted run of either length has. Both configs are read through today's
    schema first, so a key added since the run began compares as its default."""
    saved, current = _with_defaults(saved), _with_defaults(current)
    may_change = set(_RESUME_MAY_CHANGE)
    if _server_schedule(saved) != "constant" or _server_schedule(current) != "constant":
        may_change.discard(("federated", "rounds"))
    saved_flat = {k: v for k, v in _flatten(saved).items() if k and k[0] in _RESUME_MUST_MATCH}
    current_flat = {k: v for k, v in _flatten(current).items() if k and k[0] in _RESUME_MUST_MATCH}
    keys = sorted(set(saved_flat) | set(current_flat))
    return [
        f"{'.'.join(k)}: {saved_flat.get(k)!r} -> {current_flat.get(k)!r}"
        for k in keys
        if k not in may_change and saved_flat.get(k) != current_flat.get(k)
    ]


# ---------------------------------------------------------------------- recorder


class RunRecorder:
    """Writes one run's record into ``out_dir`` (module docstring); simulation and deployment share it.

    Use: ``check()`` before building anything (refuses a used folder without ``resume``
    and a changed config with it), ``restore(template)`` for the state to continue from,
    then ``record(row, state)`` after every round and ``write_summary(...)`` at the end.
    """

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path, *, resume: bool = False,
                 say: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.say = say
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.rows: list[dict[str, Any]] = []
        self.store: Optional[CheckpointStore] = None

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint records besides the state and rows: the config and the process count."""
        return {"config": config_to_dict(self.cfg), "processes": jax.process_count()}

    def check(self) -> None:
        """Creates ``out_dir``; refuses to start over a run, or to resume one with another config;
        then writes the config this run uses (``DIR/config.yaml``)."""
        make_run_dir(self.out_dir)
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
                    f"({saved_path}); only federated.rounds (not under a server learning-rate "
                    "schedule, which spans the rounds) and the eval/energy/checkpoint/output "
                    "sections may change:\n  " + "\n  ".join(mismatches)
                )
        dump_config(self.cfg, saved_path)

    def restore(self, template: Any) -> Optional[Any]:
        """Opens the checkpoint store and rewrites ``metrics.jsonl`` to the rows it vouches for.

        With ``resume``, returns the newest readable checkpoint's state (structured like
        ``template``) and keeps the rows up to its round; otherwise (or with no checkpoint
        yet) returns None and starts with no rows.
        """
        cfg = self.cfg
        if cfg.checkpoint.enabled:
            self.store = CheckpointStore(self.checkpoint_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
        state = None
        if self.resume and self.store is not None:
            restored = self.store.restore_latest(template, on_skip=lambda e: self.say(f"skipping checkpoint: {e}"))
            if restored is None:
                self.say("--resume: no checkpoint yet; starting from round 0")
            else:
                saved_processes = int(restored.meta.get("processes", 1))
                if saved_processes != jax.process_count():
                    raise RunError(
                        f"--resume: {restored.path} was written by a run in {saved_processes} process(es); this "
                        f"one has {jax.process_count()}. Resume with the same number of processes "
                        "(distributed.num_processes), or start a new run with another --out"
                    )
                state = restored.state
                self.rows = [r for r in restored.metrics if r["round"] <= restored.round]
                self.say(f"resumed from {restored.path} (round {restored.round})")
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.metrics_path)  # atomic: a kill leaves the old file or the new one
        return state

    def record(self, row: dict[str, Any], state: Any = None) -> dict[str, Any]:
        """Appends ``row`` (made JSON-safe) to ``metrics.jsonl``; with ``state``, checkpoints it
        on the interval and at the last round. Returns the stored row."""
        row = {k: json_safe(v) for k, v in row.items()}
        self.rows.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        round_ = row["round"]
        last = round_ == self.cfg.federated.rounds
        if state is not None and self.store is not None and (round_ % self.cfg.checkpoint.every == 0 or last):
            self.store.save(round_, state, self.rows, self.checkpoint_meta(), force=True)
        return row

    def write_summary(self, rounds: int, variables: Any, *, energy_label: str, energy_is_estimate: bool,
                      num_params: Optional[int] = None, num_trainable: Optional[int] = None,
                      total_fields: Sequence[str] = (), extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Writes ``DIR/summary.json``: what every run reports (scores, totals, fingerprint) plus ``extra``."""
        cfg = self.cfg
        rows = self.rows
        evaluated = [r for r in rows if r.get("rougeL") is not None]
        fingerprint = params_sha256(variables)
        summary: dict[str, Any] = {
            "rounds": int(rounds),
            "seed": cfg.seed,
            "model": cfg.model.name,
            "mode": f"lora(r={cfg.lora.rank})" if cfg.lora else "full",
            "server_optimizer": cfg.federated.server_optimizer.name,
            "num_params": num_params,
            "num_trainable_params": num_trainable,
            "initial": {k: evaluated[0].get(k) for k in ("round", *EVAL_FIELDS)} if evaluated else None,
            "final": {k: evaluated[-1].get(k) for k in ("round", *EVAL_FIELDS)} if evaluated else None,
            "best_rougeL": max((r["rougeL"] for r in evaluated), default=None),
            "final_train_loss": next((r["train_loss"] for r in reversed(rows) if r.get("train_loss") is not None), None),
            "totals": run_totals(rows, total_fields),
            "cost_to_target": cost_to_target(rows, cfg.cost.target_rougeL, cfg.cost.target_fraction),
            "quality_within_budget": quality_within_budget(rows, budget_bytes=cfg.cost.budget_bytes,
                                                           budget_joules=cfg.cost.budget_joules),
            "energy_source": energy_label,
            "energy_is_estimate": energy_is_estimate,
            # Issue 13's fields, the same for every way of running (a run passes its own in ``extra``).
            "privacy": None,
            "per_client": None,
            "lineage": None,
            "environment": environment(),
            **(extra or {}),
            "params_sha256": fingerprint,
            "params_sha256_covers": "all variables (" + ", ".join(sorted(variables)) + "); canonical order "
            "documented in fedjax_fm/training/fingerprint.py",
        }
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=json_safe) + "\n")
        return summary

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def finished_summary(self) -> Optional[dict[str, Any]]:
        """With ``--resume`` on a run that completed its rounds (``summary.json`` is written
        last) and the same experiment: its summary, untouched; there is nothing to do, and
        ``config.yaml`` is not rewritten. Changed ``eval.*`` settings would go unused, so they
        are refused. None otherwise (the run goes on; :meth:`check` judges other changes)."""
        summary_path, saved_path = self.out_dir / "summary.json", self.out_dir / "config.yaml"
        if not (self.resume and summary_path.is_file() and saved_path.is_file()):
            return None
        saved = yaml.safe_load(saved_path.read_text()) or {}
        current = config_to_dict(self.cfg)
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError:
            return None
        if resume_mismatches(saved, current) or int(summary.get("rounds") or 0) < self.cfg.federated.rounds:
            return None
        changed = unused_resume_changes(saved, current, ("eval",))
        if changed:
            raise RunError(
                f"--resume: {self.out_dir} already completed its {summary['rounds']} rounds, so no round would "
                "run and these evaluation settings would not be used:\n  " + "\n  ".join(changed)
                + "\nNothing was changed. To evaluate with them, start a new run with another --out; "
                "to train on, raise federated.rounds."
            )
        return summary

    def checkpoint_now(self, round_: int, state: Any) -> None:
        """Checkpoints ``round_`` off the interval (a run stopped by a signal), unless it is saved already."""
        if self.store is not None and round_ not in self.store.all_rounds():
            self.store.save(round_, state, self.rows, self.checkpoint_meta(), force=True)


def make_run_dir(path: Path) -> None:
    """Creates the run folder; a path that cannot be one (an existing file, a path under a
    file, no permission) is a :class:`RunError` naming it."""
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        what = "is a file" if blocker == path else f"lies under {blocker}, which is a file"
        raise RunError(f"--out {path}: {what}, not a folder; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"--out {path}: cannot create the run folder: {error.strerror}") from None
