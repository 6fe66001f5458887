"""End-to-end runs of ``fedjax-fm run`` on a tiny model: outputs, reproducibility, kill + resume, export, report.

One uninterrupted run (module fixture) is the reference; a second run of the same
config is killed with SIGKILL after its first checkpoint and resumed, and must end
with the same ``params_sha256``; a third with another seed must differ. All runs
share a persistent XLA compilation cache so that only the first pays for compiling.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedjax_fm.training.experiment import run_experiment
from fedjax_fm.training.record import METRIC_FIELDS, RunError
from fedjax_fm.config import load_config

REPO = Path(__file__).resolve().parents[1]

TINY_YAML = """\
base: {default}
seed: 0
model: {{name: tiny, init: random, tokenizer: train-sentencepiece, vocab_size: 256}}
lora: {{rank: 4, alpha: 8.0, target_modules: [q, v]}}
data:
  source: {{num_train: 96, num_eval: 8}}
  max_input_length: 64
  max_target_length: 16
  packing: {{input_length: 128, target_length: 24}}
federated: {{rounds: 4, num_clients: 4, clients_per_round: 2, local_steps: 2, batch_size: 4,
            server_optimizer: {{name: fedadam, learning_rate: 0.1, b1: 0.9, b2: 0.99, tau: 1.0e-2, variant: reddi}}}}
eval: {{every: 2, max_examples: 8, batch_size: 8, max_new_tokens: 8}}
checkpoint: {{every: 2, keep: 2}}
output: {{export: true, plots: true}}
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_YAML.format(default=REPO / "configs" / "default.yaml"))
    return path


@pytest.fixture(scope="module")
def reference_run(tiny_config, compile_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "reference"
    summary = run_experiment(load_config(tiny_config), out)
    return out, summary


def _subprocess_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    # The same numerics as this test process (tests/conftest.py).
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from fedjax_fm.cli import main; sys.exit(main())", *args]


def test_run_writes_every_output(reference_run):
    out, summary = reference_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows:
        assert set(METRIC_FIELDS) <= set(row)
    # Round 0 is the evaluation before training; evaluation every 2 rounds.
    assert rows[0]["train_loss"] is None and rows[0]["rougeL"] is not None
    assert rows[1]["rougeL"] is None and rows[2]["rougeL"] is not None and rows[4]["rougeL"] is not None
    trained = rows[1:]
    assert [r["compiles"] for r in trained] == [0, 0, 0, 0]  # compiled once, before round 1
    assert all(r["clients"] == 2 and r["train_loss"] > 0 and r["tokens"] > 0 for r in trained)
    assert all(r["bytes_up"] == r["bytes_down"] > 0 and r["comm_seconds"] > 0 and r["granularity"] > 0 for r in trained)
    # No power backend on a test machine: joules are null, never zero or invented.
    if rows[1]["energy_source"] == "none":
        assert all(r["client_joules"] is None and r["tps_per_watt"] is None for r in trained)
    assert len(summary["params_sha256"]) == 64
    assert json.loads((out / "summary.json").read_text())["params_sha256"] == summary["params_sha256"]
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"loss.png", "rouge.png", "energy.png", "efficiency.png", "mfu.png", "granularity.png"} <= plots
    assert (out / "export" / "model" / "model.safetensors").is_file()
    assert (out / "export" / "adapter" / "adapter_config.json").is_file()
    # Checkpoints every 2 rounds, the newest 2 kept.
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_existing_run_directory_needs_resume(reference_run, tiny_config):
    out, _ = reference_run
    with pytest.raises(RunError, match="--resume"):
        run_experiment(load_config(tiny_config), out)


def test_resume_refuses_a_different_experiment(reference_run, tiny_config):
    out, _ = reference_run
    cfg = load_config(tiny_config, ["federated.local_optimizer.learning_rate=0.5"])
    with pytest.raises(RunError, match="federated.local_optimizer.learning_rate"):
        run_experiment(cfg, out, resume=True)


def test_sigkill_and_resume_is_bit_identical(reference_run, tiny_config, compile_cache, tmp_path):
    _, reference = reference_run
    out = tmp_path / "killed"
    env = _subprocess_env(compile_cache)
    # Killed as soon as the round-2 checkpoint lands: rounds 3 and 4 are left to the resume.
    args = _cli("run", str(tiny_config), "--out", str(out))
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    first_checkpoint = out / "checkpoints" / "2"
    deadline = time.monotonic() + 240
    while not first_checkpoint.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, cwd=REPO, timeout=240)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert b"resumed from" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_sha256"] == reference["params_sha256"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # no duplicated rounds after the resume


def test_different_seed_gives_different_parameters(reference_run, tiny_config, tmp_path):
    _, reference = reference_run
    # This run also declares a constant power draw and a peak FLOP/s: energy, η_e and MFU
    # appear, labelled as estimates (the power model never changes the parameters).
    summary = run_experiment(
        load_config(tiny_config, ["seed=1", "output.export=false", "output.plots=false", "energy.backend=constant",
                                  "energy.watts=15", "energy.peak_flops=1e11"]),
        tmp_path / "seed1",
    )
    assert summary["params_sha256"] != reference["params_sha256"]
    rows = [json.loads(line) for line in (tmp_path / "seed1" / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        assert row["energy_is_estimate"] is True and "estimate" in row["energy_source"]
        assert row["client_joules"] == pytest.approx(15 * row["client_seconds"], rel=0.05)
        assert row["tps_per_watt"] == pytest.approx(row["tokens"] / row["client_joules"], rel=0.05)  # W over the sampled span
        assert row["mfu"] == pytest.approx(row["model_flops"] / row["client_seconds"] / 1e11, rel=1e-6)
    assert summary["energy_is_estimate"] is True and summary["totals"]["joules"] > 0


def test_export_loads_in_transformers_with_equal_logits(reference_run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out, _ = reference_run
    from fedjax_fm.training.checkpoint import CheckpointStore
    from fedjax_fm.config import load_config as load
    from fedjax_fm.training import builders as setup
    from fedjax_fm.models.t5 import T5
    from fedjax_fm.models.lora import merge_lora

    cfg = load(out / "config.yaml")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out / "export" / "model"))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(out / "export" / "model")).eval()
    # The run's final variables, rebuilt from its last checkpoint.
    model, variables = setup.build_model(cfg, tokenizer)
    from fedjax_fm import fl

    trainable, frozen = fl.split_variables(variables, fl.trainable_collections(True))
    algorithm = setup.build_algorithm(cfg, model)
    restored = CheckpointStore(out / "checkpoints").restore_latest(algorithm.init(trainable, cfg.seed))
    final = fl.join_variables(restored.state.params, frozen)

    enc = tokenizer(["summarize: Anna: see you at 5 pm at the cafe?\nBen: ok!"], return_tensors="np")
    dec = np.array([[0, 5, 9, 17]], dtype=np.int32)
    ours = np.asarray(model.apply(final, enc["input_ids"], enc["attention_mask"], dec, np.ones_like(dec)))
    with torch.no_grad():
        theirs = hf(
            input_ids=torch.tensor(enc["input_ids"]),
            attention_mask=torch.tensor(enc["attention_mask"]),
            decoder_input_ids=torch.tensor(dec, dtype=torch.long),
        ).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=2e-4)
    # The merged model alone (no adapters) gives the same logits too.
    merged = {"params": merge_lora(final["params"], final["lora"], cfg.lora)}
    plain = np.asarray(T5(model.config).apply(merged, enc["input_ids"], enc["attention_mask"], dec, np.ones_like(dec)))
    np.testing.assert_allclose(plain, ours, atol=2e-4, rtol=2e-4)
    # The PEFT adapter on the exported base gives them as well.
    peft = pytest.importorskip("peft")
    base = transformers.T5ForConditionalGeneration.from_pretrained(str(out / "export" / "base"))
    adapted = peft.PeftModel.from_pretrained(base, str(out / "export" / "adapter")).eval()
    with torch.no_grad():
        via_peft = adapted(
            input_ids=torch.tensor(enc["input_ids"]),
            attention_mask=torch.tensor(enc["attention_mask"]),
            decoder_input_ids=torch.tensor(dec, dtype=torch.long),
        ).logits.numpy()
    np.testing.assert_allclose(via_peft, ours, atol=2e-4, rtol=2e-4)

    # eval.num_beams / eval.length_penalty reach the evaluator's generation: its tokens
    # are transformers' beam search on the exported model.
    import dataclasses

    class OneBatch:
        def eval_batches(self, batch_size, max_examples, by_length=False):
            yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                   "example_weight": np.ones((1,), np.float32), "references": ["see you"]}

    beam_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_beams=3, length_penalty=0.5,
                                                                 max_new_tokens=6))
    evaluator = setup.build_evaluator(beam_cfg, model, tokenizer, OneBatch())
    generated = np.asarray(evaluator._generate(final, enc["input_ids"], enc["attention_mask"]))
    with torch.no_grad():
        hf_beams = hf.generate(input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]),
                               do_sample=False, num_beams=3, length_penalty=0.5, max_new_tokens=6).numpy()[0, 1:]
    stop = int(np.argmax(hf_beams == 1)) + 1 if (hf_beams == 1).any() else len(hf_beams)
    assert generated.shape == (1, 6)
    np.testing.assert_array_equal(generated[0, :stop], hf_beams[:stop])
    assert (generated[0, stop:] == model.config.pad_token_id).all()


def test_report_overlays_runs(reference_run, tiny_config, tmp_path):
    from fedjax_fm.training.report import add_report_command
    import argparse

    out, _ = reference_run
    other = tmp_path / "fedavg"
    # The second run is full fine-tuning (lora: null) with FedAvg: that path end to end too.
    summary = run_experiment(
        load_config(tiny_config, ["federated.server_optimizer.name=fedavg", "federated.server_optimizer.learning_rate=1.0",
                                  "lora=null"]),
        other,
    )
    assert summary["mode"] == "full" and summary["num_trainable_params"] == summary["num_params"]
    assert (other / "export" / "model" / "model.safetensors").is_file()
    assert not (other / "export" / "adapter").exists()
    parser = argparse.ArgumentParser()
    add_report_command(parser.add_subparsers())
    args = parser.parse_args(["report", str(out), str(other), "--out", str(tmp_path / "report")])
    assert args.func(args) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| reference |" in text and "| fedavg |" in text
    assert "ROUGE-L" in text
    assert (tmp_path / "report" / "rougeL.png").is_file()
    assert (tmp_path / "report" / "train_loss.png").is_file()


def test_pretrained_local_checkpoint_continues_from_the_export(reference_run, tiny_config, tmp_path):
    """``model.name`` = a local HF directory (the reference export): weights and tokenizer load
    from it, and its round-0 evaluation reproduces the reference's final one."""
    out, reference = reference_run
    summary = run_experiment(
        load_config(tiny_config, [f"model.name={out / 'export' / 'model'}", "model.init=auto", "model.tokenizer=auto",
                                  "model.vocab_size=null", "federated.rounds=1", "output.export=false",
                                  "output.plots=false"]),
        tmp_path / "continued",
    )
    assert summary["initial"]["round"] == 0
    assert summary["initial"]["eval_loss"] == pytest.approx(reference["final"]["eval_loss"], rel=1e-4)
    assert summary["initial"]["rougeL"] == pytest.approx(reference["final"]["rougeL"], abs=1e-6)
