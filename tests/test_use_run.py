"""Using a trained run from the CLI: summarize, eval, --dry-run, presets, --version, and a
PEFT adapter that still loads after the run folder moves."""

from __future__ import annotations

import io
import json
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from fedjax_fm.cli import main
from fedjax_fm.config import load_config
from fedjax_fm.data.local_files import write_jsonl
from fedjax_fm.training.experiment import run_experiment
from fedjax_fm.training.use import load_trained, summarize

REPO = Path(__file__).resolve().parents[1]

TINY_YAML = """\
base: {default}
seed: 2
model: {{name: tiny, init: random, tokenizer: train-sentencepiece, vocab_size: 256}}
lora: {{rank: 4, alpha: 8.0, target_modules: [q, v]}}
data:
  source: {{num_train: 64, num_eval: 6}}
  max_input_length: 64
  max_target_length: 16
federated: {{rounds: 2, num_clients: 2, clients_per_round: 2, local_steps: 2, batch_size: 4,
            server_optimizer: {{name: fedadam, learning_rate: 0.1, b1: 0.9, b2: 0.99, tau: 1.0e-2, variant: reddi}}}}
eval: {{every: 2, at_start: false, max_examples: 6, batch_size: 6, max_new_tokens: 6}}
output: {{export: true, plots: false, progress: false}}
"""


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's --version / errors
            code = int(exit_.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("use")
    config = folder / "tiny.yaml"
    config.write_text(TINY_YAML.format(default=REPO / "configs" / "default.yaml"))
    out = folder / "run"
    return out, run_experiment(load_config(config), out)


def test_summarize_reproduces_the_runs_own_generations(trained):
    run, summary = trained
    loaded = load_trained(run)
    assert loaded.round == 2
    dialogues = [e["prediction"] for e in summary["examples"]]  # what the run generated at its last eval
    cfg = loaded.cfg
    from fedjax_fm.training import builders

    data = builders.build_data(cfg, loaded.tokenizer)
    texts = list(data.eval_examples.inputs[: len(dialogues)])
    assert summarize(loaded, texts) == dialogues  # same parameters, same prompt, same greedy decode
    code, out, err = _cli("summarize", str(run), "--text", texts[0], "--text", texts[1])
    assert code == 0, err
    assert out.splitlines() == dialogues[:2]


def test_summarize_reads_a_file_and_explains_a_bad_folder(trained, tmp_path):
    run, _ = trained
    path = tmp_path / "texts.txt"
    path.write_text("Ana: lunch at noon?\nBo: yes.\n\nCy: meeting moved to Friday.\n")
    code, out, err = _cli("summarize", str(run), "--file", str(path), "--num-beams", "2")
    assert code == 0, err
    assert len(out.splitlines()) == 2
    code, _, err = _cli("summarize", str(tmp_path), "--text", "hi")
    assert code == 2 and "config.yaml does not exist: is" in err and "a fedjax-fm run directory" in err


def test_eval_writes_a_new_file_and_never_rewrites_the_config(trained, tmp_path):
    run, summary = trained
    config_before = (run / "config.yaml").read_bytes()
    summary_before = (run / "summary.json").read_bytes()
    code, out, err = _cli("eval", str(run))
    assert code == 0, err
    first = json.loads((run / "evals" / "eval-1.json").read_text())
    assert first["rougeL"] == pytest.approx(summary["final"]["rougeL"], abs=1e-9)  # the run's own last eval
    assert first["eval_loss"] == pytest.approx(summary["final"]["eval_loss"], rel=1e-6)
    data = tmp_path / "held.jsonl"
    write_jsonl(data, [{"dialogue": "Ana: lunch at noon?\nBo: yes.", "summary": "Ana and Bo have lunch at noon."},
                       {"dialogue": "Cy: the meeting moved to Friday.", "summary": "The meeting is on Friday."}])
    code, out, err = _cli("eval", str(run), "--data", str(data), "--set", "eval.num_beams=2")
    assert code == 0, err
    second = json.loads((run / "evals" / "eval-2.json").read_text())
    assert second["num_examples"] == 2 and second["eval"]["num_beams"] == 2 and second["data"] == str(data)
    assert (run / "config.yaml").read_bytes() == config_before
    assert (run / "summary.json").read_bytes() == summary_before
    code, _, err = _cli("eval", str(run), "--set", "federated.rounds=9")
    assert code == 2 and "only eval.* settings" in err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML.format(default=REPO / "configs" / "default.yaml"))
    out = tmp_path / "never"
    code, stdout, err = _cli("run", str(config), "--out", str(out), "--dry-run")
    assert code == 0, err
    plan = json.loads(stdout)
    assert not out.exists()
    assert plan["clients"] == 2 and plan["clients_per_round"] == 2 and plan["local_steps"] == 2
    assert plan["bytes_up_per_round"] == 2 * 4 * plan["num_trainable_params"]  # float32 adapters, 2 clients
    assert 0 < plan["slot_fill_round_1"] <= 1 and plan["tokens_round_1"] > 0
    assert "plan: tiny lora(r=4)" in err


def test_presets_and_version():
    code, out, _ = _cli("presets")
    assert code == 0
    assert all(name in out for name in ("tiny", "flan-t5-small", "flan-t5-base", "flan-t5-large", "flan-t5-xl"))
    assert "configs/default.yaml" in out and "configs/paper/flan-t5-small/lora-fedadam.yaml" in out
    code, out, _ = _cli("--version")
    assert code == 0 and out.startswith("fedjax-fm ")


def test_adapter_loads_with_peft_after_the_run_folder_moves(trained, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    run, _ = trained
    config = json.loads((run / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base"
    moved = tmp_path / "moved"
    shutil.copytree(run / "export", moved / "export")
    here = os.getcwd()
    try:
        os.chdir(moved / "export")
        model = peft.AutoPeftModelForSeq2SeqLM.from_pretrained("adapter").eval()
    finally:
        os.chdir(here)
    merged = __import__("transformers").T5ForConditionalGeneration.from_pretrained(str(moved / "export" / "model")).eval()
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        a = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 5]])).logits
        b = merged(input_ids=ids, decoder_input_ids=torch.tensor([[0, 5]])).logits
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


def test_offline_hub_model_fails_fast_with_the_set_lines(monkeypatch, tmp_path):
    from fedjax_fm.config import ConfigError, config_from_dict
    from fedjax_fm.models import hub
    from fedjax_fm.training import builders

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_offline_reason.cache_clear()
    monkeypatch.setattr(hub, "is_cached", lambda repo, filename="config.json": False)
    cfg = config_from_dict({"model": {"name": "google/flan-t5-small"}})
    with pytest.raises(ConfigError) as error:
        builders.build_tokenizer(cfg, tmp_path, lambda: [])
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message
    assert "--set model.name=/path/to/flan-t5-small" in message
    assert "--set data.source.kind=samsum_json --set data.source.path=" in message
    with pytest.raises(ConfigError, match="model.name='google/flan-t5-small' is a Hugging Face Hub model"):
        builders.build_model(cfg, None)
    # A cached copy is used offline: huggingface_hub is switched to offline mode, no error.
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test
    monkeypatch.setattr(hub, "is_cached", lambda repo, filename="config.json": True)
    assert hub.use_hub("google/flan-t5-small") is None
    assert constants.HF_HUB_OFFLINE
    hub.hub_offline_reason.cache_clear()


def test_unprepared_samsum_says_what_to_do_and_creates_nothing(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from fedjax_fm.data.records import DataError
    from fedjax_fm.data.tfds_source import load_tfds

    data_dir = tmp_path / "tfds"
    with pytest.raises(DataError) as error:
        load_tfds("samsum", "train", data_dir=str(data_dir))
    message = str(error.value)
    assert "--set data.source.kind=samsum_json --set data.source.path=" in message
    assert "train.json, val.json, test.json" in message and "data.source.manual_dir is not set" in message
    empty = tmp_path / "manual"
    empty.mkdir()
    with pytest.raises(DataError, match=r"manual_dir=.* is empty"):
        load_tfds("samsum", "train", data_dir=str(data_dir), manual_dir=str(empty))
    assert not (data_dir / "samsum").exists()
