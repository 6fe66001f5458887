"""The shipped demo base model (fedjax_fm/assets/demo_base): intact, loadable here and in PyTorch."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from fedjax_fm.assets import DEMO_BASE_DIR, resolve_model_name

pytestmark = pytest.mark.skipif(not (DEMO_BASE_DIR / "SHA256SUMS").is_file(), reason="demo base not built")


def test_shipped_files_match_sha256sums_and_are_small():
    lines = (DEMO_BASE_DIR / "SHA256SUMS").read_text().splitlines()
    listed = {}
    for line in lines:
        digest, name = line.split("  ")
        listed[name] = digest
    on_disk = {p.name for p in DEMO_BASE_DIR.iterdir() if p.is_file() and p.name != "SHA256SUMS"}
    assert set(listed) == on_disk
    for name, digest in listed.items():
        assert hashlib.sha256((DEMO_BASE_DIR / name).read_bytes()).hexdigest() == digest, name
    assert {"config.json", "model.safetensors", "LICENSE.md", "tokenizer_config.json"} <= on_disk
    assert sum((DEMO_BASE_DIR / n).stat().st_size for n in on_disk) < 8 * 2**20
    assert "Apache-2.0" in (DEMO_BASE_DIR / "LICENSE.md").read_text()


def test_pyproject_ships_the_demo_base_as_package_data():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["fedjax_fm"]
    for name in ("model.safetensors", "SHA256SUMS", "LICENSE.md", "config.json"):
        rel = f"assets/demo_base/{name}"
        assert any(Path(rel).match(p) or p == rel or p.startswith("assets/demo_base/") for p in patterns), name


def test_demo_base_name_resolves_to_the_package_directory():
    assert resolve_model_name("demo-base") == str(DEMO_BASE_DIR)
    assert resolve_model_name("tiny") == "tiny"


def test_loads_with_from_pretrained_and_in_transformers_with_equal_logits():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from fedjax_fm.models import hf_io
    from fedjax_fm.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(DEMO_BASE_DIR)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 1) == "<extra_id_0>"
    model, params = hf_io.from_pretrained(DEMO_BASE_DIR)
    assert model.config.vocab_size >= len(tokenizer)
    ids = tokenizer(["On Friday Lena met Omar at the <extra_id_0> at 5 pm."], return_tensors="np")["input_ids"]
    decoder_ids = np.array([[0, len(tokenizer) - 1, 5, 6]])
    ours = np.asarray(model.apply({"params": params}, ids, np.ones_like(ids), decoder_ids, np.ones_like(decoder_ids)))
    pt = transformers.T5ForConditionalGeneration.from_pretrained(str(DEMO_BASE_DIR)).eval()
    with torch.no_grad():
        theirs = pt(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-4)


def test_pretraining_record_says_how_it_was_made():
    record = json.loads((DEMO_BASE_DIR / "pretraining.json").read_text())
    assert record["script"] == "scripts/pretrain_demo_base.py"
    assert "span corruption" in record["objective"]
    assert "whole row" in record["objective"]  # the reconstruction half of the mixture
    # the shipped base is the whole 2500-step schedule: the script's defaults
    assert (record["steps"], record["schedule_steps"]) == (2500, 2500)
    assert record["command"].endswith("--steps 2500 --seed 0 --learning-rate 0.003")
