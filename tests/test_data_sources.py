"""Every source: synthetic generator, SAMSum JSON, JSON/JSONL/CSV, per-client folders, TFDS end to end."""

import importlib.util
import json
import re

import numpy as np
import pytest
from transformers import ByT5Tokenizer

from fedjax_fm.data import (
    LocalWork,
    DataError,
    DataSpec,
    ClientPartitionSpec,
    SourceSpec,
    build_federated_data,
    read_client_folder,
    read_examples,
    synthetic_examples,
    write_jsonl,
)
from fedjax_fm.data.synthetic import INTENTS, NAMES

TOKENIZER = ByT5Tokenizer()


def _samsum_records(prefix, n):
    ex = synthetic_examples(n, seed=len(prefix))
    return [{"id": f"{prefix}{i}", "summary": s, "dialogue": d.replace("\n", "\r\n")}
            for i, (d, s) in enumerate(zip(ex.inputs, ex.targets))]


def _write_samsum_dir(directory, sizes=(("train", 12), ("val", 4), ("test", 3))):
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        (directory / f"{split}.json").write_text(json.dumps(_samsum_records(split, n)), encoding="utf-8")
    return directory


def test_synthetic_is_seeded_varied_and_summaries_follow_the_dialogue():
    a, b, c = synthetic_examples(300, seed=0), synthetic_examples(300, seed=0), synthetic_examples(300, seed=1)
    assert a.inputs == b.inputs and a.targets == b.targets
    assert a.inputs != c.inputs
    assert synthetic_examples(50, seed=0).inputs == a.inputs[:50]  # prefix-stable
    assert set(a.columns["intent"]) == set(INTENTS)  # every intent shows up
    assert len(set(a.inputs)) == 300 and len(set(a.targets)) > 250  # varied
    for dialogue, summary in zip(a.inputs, a.targets):
        speakers = {line.split(":")[0] for line in dialogue.splitlines()}
        # Every person named in the summary speaks in the dialogue (nothing invented).
        named = {w for w in re.findall(r"\b[A-Z][a-z]+\b", summary) if w in NAMES}
        assert named and named <= speakers
        # Times and numbers in the summary are copied from the dialogue.
        for time in re.findall(r"\d+ [ap]m", summary):
            assert time in dialogue


def test_read_samsum_json_jsonl_and_csv(tmp_path):
    samsum = _write_samsum_dir(tmp_path / "samsum")
    ex = read_examples(samsum / "train.json")
    assert len(ex) == 12 and ex.ids[0] == "train0" and "\r\n" in ex.inputs[0]

    write_jsonl(tmp_path / "d.jsonl", [{"text": "doc ü", "headline": "h", "topic": 3}, {"text": "d2", "headline": "h2", "topic": 4}])
    jl = read_examples(tmp_path / "d.jsonl", input_field="text", target_field="headline", extra_fields=["topic"])
    assert jl.inputs == ["doc ü", "d2"] and jl.ids == ["d-0", "d-1"] and jl.columns["topic"] == ["3", "4"]

    (tmp_path / "d.csv").write_text('article,abstract\n"a, with comma",s1\nb,s2\n', encoding="utf-8")
    csv_ex = read_examples(tmp_path / "d.csv", input_field="article", target_field="abstract", id_field=None)
    assert csv_ex.inputs == ["a, with comma", "b"] and csv_ex.targets == ["s1", "s2"]


def test_client_folder_gives_a_natural_partition(tmp_path):
    for client, n in (("phone_a", 3), ("phone_b", 5), ("jetson_1", 2)):
        write_jsonl(tmp_path / "clients" / f"{client}.jsonl",
                    [{"dialogue": f"{client} says {i}", "summary": f"s{i}"} for i in range(n)])
    write_jsonl(tmp_path / "eval.jsonl", [{"dialogue": "held out", "summary": "ho"}])
    ex = read_client_folder(tmp_path / "clients")
    assert ex.columns["client"] == ["jetson_1"] * 2 + ["phone_a"] * 3 + ["phone_b"] * 5
    spec = DataSpec(
        source=SourceSpec(kind="client_folder", path=str(tmp_path / "clients"), eval_path=str(tmp_path / "eval.jsonl")),
        partition=ClientPartitionSpec(method="natural"), max_input_length=48, max_target_length=8,
    )
    data = build_federated_data(spec, TOKENIZER, seed=0, local_work=LocalWork(2, epochs=1.0), eval_batch_size=2)
    assert data.client_ids == ["jetson_1", "phone_a", "phone_b"]
    assert [data.num_examples(c) for c in data.client_ids] == [2, 3, 5]
    assert data.steps_per_round == 3  # ceil(5 / 2) for one epoch of the largest client
    batch = data.client_round_batches("jetson_1", 0)
    texts = {TOKENIZER.decode(row[row > 1]) for row in batch["input_ids"].reshape(-1, 48)}
    assert all("jetson_1" in t for t in texts)  # a client only ever sees its own file
    # Without an eval file, a seeded fraction is held out instead.
    held = build_federated_data(
        DataSpec(source=SourceSpec(kind="client_folder", path=str(tmp_path / "clients"), eval_fraction=0.2),
                 partition=ClientPartitionSpec(method="natural"), max_input_length=48, max_target_length=8),
        TOKENIZER, seed=0, local_work=LocalWork(2, epochs=1.0), eval_batch_size=2)
    assert len(held.eval_tokens) == 2 and sum(held.num_examples(c) for c in held.client_ids) == 8


def test_samsum_json_source_builds(tmp_path):
    samsum = _write_samsum_dir(tmp_path / "samsum")
    spec = DataSpec(source=SourceSpec(kind="samsum_json", path=str(samsum), eval_split="test"),
                    max_input_length=64, max_target_length=16)
    data = build_federated_data(spec, TOKENIZER, seed=0, num_clients=3, local_work=LocalWork(2, steps=1),
                                eval_batch_size=2)
    assert sum(data.num_examples(c) for c in range(3)) == 12 and len(data.eval_tokens) == 3


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="preparing TFDS SAMSum needs TensorFlow (pip install 'fedjax-fm[tensorflow]')")
def test_tfds_samsum_end_to_end_from_a_manual_dir(tmp_path, monkeypatch):
    # Fully offline: GCS lookups off (tfds's own switch), and the manual directory is written here.
    from tensorflow_datasets.core.utils import gcs_utils

    monkeypatch.setattr(gcs_utils, "_is_gcs_disabled", True)
    manual = _write_samsum_dir(tmp_path / "manual")
    spec = DataSpec(
        source=SourceSpec(kind="tfds", name="samsum", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual),
                          eval_split="test"),
        max_input_length=96, max_target_length=32,
    )
    data = build_federated_data(spec, TOKENIZER, seed=0, num_clients=2, local_work=LocalWork(2, steps=2),
                                eval_batch_size=2)
    assert (tmp_path / "tfds" / "samsum" / "1.0.0").is_dir()
    assert sum(data.num_examples(c) for c in range(2)) == 12
    refs = [r for b in data.eval_batches() for r, w in zip(b["references"], b["example_weight"]) if w]
    expected = {r["id"]: r["summary"] for r in _samsum_records("test", 3)}
    assert sorted(refs) == sorted(expected.values())
    batch = data.clients_round_batches([0, 1], 0)
    assert batch["input_ids"].shape == (2, 2, 2, 96) and batch["input_ids"].dtype == np.int32
    # A second load reuses the prepared ArrayRecord files (no manual dir needed).
    from fedjax_fm.data import load_tfds

    again = load_tfds("samsum", "validation", data_dir=str(tmp_path / "tfds"), prepare=False)
    assert len(again) == 4 and set(again.ids) == {f"val{i}" for i in range(4)}
    # A manual directory lacking a split's file is a clear error, not a half-prepared dataset.
    partial = _write_samsum_dir(tmp_path / "partial", sizes=(("train", 2),))
    with pytest.raises(DataError, match=r"tfds:samsum: preparing the dataset failed .*val\.json"):
        load_tfds("samsum", "train", data_dir=str(tmp_path / "tfds2"), manual_dir=str(partial))


def test_synthetic_tokenizer_is_trained_once_and_round_trips(tmp_path):
    from fedjax_fm.data import synthetic_tokenizer

    tokenizer = synthetic_tokenizer(tmp_path, vocab_size=300, num_examples=300)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1 and len(tokenizer) <= 300
    (model_file,) = list(tmp_path.glob("*/spiece.model"))
    stamp = model_file.stat().st_mtime_ns
    again = synthetic_tokenizer(tmp_path, vocab_size=300, num_examples=300)  # cached: not retrained
    assert model_file.stat().st_mtime_ns == stamp and len(again) == len(tokenizer)
    ex = synthetic_examples(20, seed=9)
    ids = tokenizer(ex.targets)["input_ids"]
    assert [tokenizer.decode(i, skip_special_tokens=True) for i in ids] == ex.targets
