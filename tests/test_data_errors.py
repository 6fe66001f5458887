"""Bad input gives a clear error naming the file and the problem; nothing is skipped unasked."""

import json

import pytest
from transformers import ByT5Tokenizer

from fedjax_fm.data import (
    LocalWork,
    DataError,
    DataSpec,
    ClientPartitionSpec,
    SourceSpec,
    TextExamples,
    build_federated_data,
    read_client_folder,
    read_examples,
    tokenize_examples,
)

WORK = LocalWork(8, epochs=1.0)  # the data layer's local work (the config's federated section)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"{missing}: no such file"):
        read_examples(missing)
    with pytest.raises(DataError, match="no such directory"):
        read_client_folder(tmp_path / "no_clients")
    spec = DataSpec(source=SourceSpec(kind="samsum_json", path=str(tmp_path)))
    with pytest.raises(DataError, match="train.json: no such file"):
        build_federated_data(spec, ByT5Tokenizer(), seed=0, num_clients=2, local_work=WORK, eval_batch_size=8)


def test_malformed_json_line_reports_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"dialogue": "a", "summary": "b"}\n\n{"dialogue": "c", "summary": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: malformed JSON on line 3"):
        read_examples(path)
    whole = tmp_path / "bad.json"
    whole.write_text('[{"dialogue": "a",\n "summary": }]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 2"):
        read_examples(whole)


def test_skip_invalid_only_when_asked_and_then_warns(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"dialogue": "a", "summary": "b"}\nnot json\n{"dialogue": "c"}\n', encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 2 invalid record"):
        ex = read_examples(path, skip_invalid=True)
    assert ex.inputs == ["a"]


def test_missing_fields_list_the_available_ones(tmp_path):
    path = tmp_path / "fields.jsonl"
    path.write_text(json.dumps({"text": "a", "headline": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"fields\.jsonl: line 1: missing field\(s\) \['dialogue', 'summary'\]; "
                                        r"available fields: \['headline', 'text'\]"):
        read_examples(path)
    with pytest.raises(DataError, match=r"no column 'topic'; available columns"):
        TextExamples(["a"], ["b"], ["0"], origin="x").column("topic")


def test_non_text_values_are_errors(tmp_path):
    path = tmp_path / "types.json"
    path.write_text(json.dumps([{"dialogue": None, "summary": "s"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"types\.json: record 1: field 'dialogue' must be text, got NoneType"):
        read_examples(path)


def test_empty_dataset(tmp_path):
    for name, content in (("empty.json", "[]"), ("empty.jsonl", "\n\n"), ("empty.csv", "dialogue,summary\n")):
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(DataError, match=f"{name}: the dataset is empty"):
            read_examples(tmp_path / name)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="no client files"):
        read_client_folder(tmp_path / "folder")


def test_non_utf8_text_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"dialogue": "ok", "summary": "ok"}\n{"dialogue": "caf\xe9", "summary": "x"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl: not valid UTF-8 text \(line 2"):
        read_examples(path)


def test_unknown_format_and_bad_spec(tmp_path):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="unknown file format"):
        read_examples(tmp_path / "data.parquet")
    from fedjax_fm.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"unknown key 'data\.partition\.alfa'"):
        config_from_dict({"data": {"partition": {"alfa": 0.1}}})
    with pytest.raises(DataError, match="needs group_field"):
        build_federated_data(DataSpec(source=SourceSpec(num_train=20, num_eval=2),
                                      partition=ClientPartitionSpec(method="dirichlet_group")),
                             ByT5Tokenizer(), seed=0, num_clients=2, local_work=WORK, eval_batch_size=8)


def test_clients_below_minimum_are_an_error_by_default():
    spec = DataSpec(source=SourceSpec(num_train=30, num_eval=2), partition=ClientPartitionSpec(min_examples=8),
                    max_input_length=32, max_target_length=16)
    with pytest.raises(DataError, match="fewer than 8 examples"):
        build_federated_data(spec, ByT5Tokenizer(), seed=0, num_clients=5, local_work=WORK, eval_batch_size=8)


def test_tokenizer_with_other_special_ids_is_rejected():
    class OtherIds:
        pad_token_id, eos_token_id = 1, 2

        def encode(self, text):
            return [3]

    with pytest.raises(DataError, match="pad_token_id=1, eos_token_id=2"):
        tokenize_examples(TextExamples(["a"], ["b"], ["0"]), OtherIds())


def test_tfds_bad_arguments_are_named(tmp_path):
    from fedjax_fm.data import load_tfds

    with pytest.raises(DataError, match=r"tfds:glue/cola: no built-in field mapping; give input_field and target_field"):
        load_tfds("glue/cola", "train", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"tfds:samsum: manual_dir .*missing is not a directory"):
        load_tfds("samsum", "train", data_dir=str(tmp_path), manual_dir=str(tmp_path / "missing"))
