"""Progress lines and the optional TensorBoard writer."""

from __future__ import annotations

import io

import pytest

from fedjax_fm.training.record import resume_mismatches
from fedjax_fm.training.progress import ProgressPrinter, TensorBoardWriter


def test_progress_line_shows_round_loss_rouge_energy_and_eta():
    stream = io.StringIO()
    progress = ProgressPrinter(10, stream=stream)
    progress.round_done({"round": 0, "clients": 0, "eval_loss": 3.2, "rougeL": 4.56})
    progress.start_round()
    progress.round_done({"round": 1, "clients": 4, "train_loss": 2.5, "client_joules": 10.0, "server_joules": 0.5,
                         "comm_joules": 0.09})
    first, second = stream.getvalue().splitlines()
    assert first.startswith("round  0/10 | clients 0 | eval 3.200 | ROUGE-L 4.6")
    assert "loss 2.500" in second and "10.5 J compute" in second and "0.09 J comm (model)" in second
    assert "ETA" in second


def test_progress_marks_estimates_and_hides_unmeasured_energy():
    stream = io.StringIO()
    progress = ProgressPrinter(2, stream=stream, energy_is_estimate=True)
    progress.round_done({"round": 1, "clients": 2, "client_joules": 3.0, "server_joules": 1.0})
    assert "4.0 J compute (est.)" in stream.getvalue()
    stream = io.StringIO()
    ProgressPrinter(2, stream=stream).round_done({"round": 1, "clients": 2, "client_joules": None})
    assert " J " not in stream.getvalue()


def test_tensorboard_is_optional(tmp_path):
    messages = []
    writer = TensorBoardWriter(str(tmp_path / "tb"), enabled=False, say=messages.append)
    writer.write({"round": 1, "train_loss": 1.0})
    assert not (tmp_path / "tb").exists() and not messages
    pytest.importorskip("tensorboardX")
    writer = TensorBoardWriter(str(tmp_path / "tb"), enabled=True, say=messages.append)
    writer.write({"round": 1, "train_loss": 1.0, "rougeL": None, "energy_source": "none"})
    writer.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_resume_mismatches_allow_more_rounds_only():
    saved = {"seed": 0, "federated": {"rounds": 5, "batch_size": 8}, "eval": {"every": 1}}
    assert resume_mismatches(saved, {"seed": 0, "federated": {"rounds": 9, "batch_size": 8}, "eval": {"every": 3}}) == []
    assert resume_mismatches(saved, {"seed": 1, "federated": {"rounds": 5, "batch_size": 4}, "eval": {"every": 1}}) == [
        "federated.batch_size: 8 -> 4", "seed: 0 -> 1"]


def test_resume_refuses_other_rounds_under_a_server_learning_rate_schedule():
    """A cosine schedule spans federated.rounds: extending such a run would change the rates
    of the rounds still to come, so the count must match; without a schedule it may change."""
    def config(rounds, schedule):
        return {"seed": 0, "federated": {"rounds": rounds, "server_optimizer": {"schedule": schedule}}}

    assert resume_mismatches(config(5, "constant"), config(9, "constant")) == []
    assert resume_mismatches(config(5, "cosine"), config(5, "cosine")) == []
    assert resume_mismatches(config(5, "cosine"), config(9, "cosine")) == ["federated.rounds: 5 -> 9"]
    assert resume_mismatches(config(5, "constant"), config(9, "cosine")) == [
        "federated.rounds: 5 -> 9", "federated.server_optimizer.schedule: 'constant' -> 'cosine'"]



def test_resume_reads_the_saved_config_with_todays_defaults():
    """A run saved before a key existed (here: the server schedule) resumes: the missing
    key compares as its default, and a real change is still caught."""
    from fedjax_fm.config import ExperimentConfig, config_to_dict

    current = config_to_dict(ExperimentConfig())
    saved = config_to_dict(ExperimentConfig())
    for key in ("schedule", "final_fraction"):
        del saved["federated"]["server_optimizer"][key]
    assert resume_mismatches(saved, current) == []
    current["federated"]["server_optimizer"]["schedule"] = "cosine"
    assert resume_mismatches(saved, current) == ["federated.server_optimizer.schedule: 'constant' -> 'cosine'"]
