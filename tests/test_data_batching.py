"""Tokenisation, static round batches, determinism, eval batches, and the build entry point."""

import warnings

import numpy as np
import pytest
from transformers import ByT5Tokenizer

from fedjax_fm.data import (
    DataError,
    DataSpec,
    LocalWork,
    ClientPartitionSpec,
    SourceSpec,
    TextExamples,
    build_federated_data,
    cached_tokenize,
    eval_batches,
    format_prompts,
    real_examples_per_round,
    tokenize_examples,
)

TOKENIZER = ByT5Tokenizer()  # byte-level: needs no files, pad 0, EOS 1


def _examples(n=10):
    return TextExamples([f"A: message {i} " + "x" * i for i in range(n)], [f"sum {i}" for i in range(n)],
                        [str(i) for i in range(n)])


def test_tokenize_pads_truncates_and_keeps_eos():
    ex = TextExamples(["short", "a much longer dialogue than fits"], ["ok", "a long summary here"], ["0", "1"])
    tokens, report = tokenize_examples(ex, TOKENIZER, prompt_template="{dialogue}", max_input_length=12,
                                       max_target_length=8)
    assert tokens.input_ids.dtype == np.int32 and tokens.input_ids.shape == (2, 12)
    # "short" = 5 bytes + EOS, then padding.
    assert tokens.input_lengths.tolist() == [6, 12]
    assert tokens.input_ids[0, 5] == 1 and (tokens.input_ids[0, 6:] == 0).all()
    # Truncated rows end with EOS and keep the first L-1 tokens.
    assert tokens.input_ids[1, -1] == 1
    assert tokens.input_ids[1, :11].tolist() == TOKENIZER("a much longer dialogue than fits")["input_ids"][:11]
    assert report.inputs_truncated == 1 and report.targets_truncated == 1
    assert report.input_length_max == len("a much longer dialogue than fits") + 1


def test_batch_format_matches_the_architecture_table():
    tokens, _ = tokenize_examples(_examples(), TOKENIZER, max_input_length=40, max_target_length=10)
    batch = tokens.gather(np.array([3, 1]))
    assert set(batch) == {"input_ids", "attention_mask", "decoder_input_ids", "labels", "decoder_attention_mask"}
    assert all(v.dtype == np.int32 for v in batch.values())
    labels, dec = batch["labels"], batch["decoder_input_ids"]
    assert (dec[:, 0] == 0).all() and (dec[:, 1:] == labels[:, :-1]).all()  # shifted right, start = 0
    assert ((labels != 0) == (batch["decoder_attention_mask"] == 1)).all()  # mask = real label tokens
    assert ((batch["input_ids"] != 0) == (batch["attention_mask"] == 1)).all()
    real = batch["decoder_attention_mask"].sum(1)
    assert (labels[np.arange(2), real - 1] == 1).all()  # labels end in EOS


def test_prompt_template_placeholders():
    assert format_prompts("summarize: {dialogue}", ["hi"]) == ["summarize: hi"]
    assert format_prompts("{input} => summary", ["hi"]) == ["hi => summary"]
    with pytest.raises(DataError, match="placeholder"):
        format_prompts("summarize: {text}", ["hi"])


def _federated(local_steps=None, local_epochs=1.0, method="iid", num_clients=4, **source):
    spec = DataSpec(
        source=SourceSpec(num_train=source.pop("num_train", 60), num_eval=source.pop("num_eval", 7), **source),
        partition=ClientPartitionSpec(method=method, alpha=2.0, group_field="intent"),
        max_input_length=64, max_target_length=32,
    )
    work = LocalWork(4, steps=local_steps, epochs=None if local_steps is not None else local_epochs)
    return build_federated_data(spec, TOKENIZER, seed=0, num_clients=num_clients, local_work=work, eval_batch_size=3)


def test_round_batches_static_shapes_for_every_client_and_round():
    data = _federated(method="dirichlet_quantity", local_epochs=1.0)
    expected = data.batch_shapes()
    for client in range(data.num_clients):
        for round_index in (0, 5):
            batch = data.client_round_batches(client, round_index)
            assert {k: v.shape for k, v in batch.items()} == expected
            assert batch["example_weight"].dtype == np.float32


def test_epochs_mode_weights_count_each_example_once():
    data = _federated(local_epochs=1.0, method="dirichlet_quantity")
    sizes = [data.num_examples(c) for c in range(data.num_clients)]
    assert data.steps_per_round == -(-max(sizes) // 4)
    for c, n in enumerate(sizes):
        batch = data.client_round_batches(c, 2)
        w = batch["example_weight"].reshape(-1)
        assert w.sum() == n == data.real_examples_per_round(c)
        # The real slots hold each of the client's examples exactly once.
        idx, weights = data._slots(c, 2)
        assert sorted(idx[weights == 1].tolist()) == sorted(data.partition.client_indices[c].tolist())


def test_steps_mode_wraps_around_with_all_real_examples():
    data = _federated(local_steps=5, num_clients=12)  # 5 clients' worth of 5 examples < 5*4 slots
    batch = data.client_round_batches(0, 0)
    assert batch["input_ids"].shape[:2] == (5, 4)
    assert batch["example_weight"].sum() == 20 == data.real_examples_per_round(0)


def test_shuffling_depends_only_on_seed_round_client():
    a = _federated(local_steps=3)
    b = _federated(local_steps=3)  # rebuilt from scratch, as after a resume
    for key in ("input_ids", "labels", "example_weight"):
        assert np.array_equal(a.client_round_batches(1, 7)[key], b.client_round_batches(1, 7)[key])
    assert not np.array_equal(a.client_round_batches(1, 7)["input_ids"], a.client_round_batches(1, 8)["input_ids"])
    # The group stack is the individual rounds stacked.
    group = a.clients_round_batches([2, 0], 4)
    assert group["labels"].shape[:3] == (2, 3, 4)
    assert np.array_equal(group["labels"][1], a.client_round_batches(0, 4)["labels"])
    assert np.array_equal(group["example_weight"][0], a.client_round_batches("client_2", 4)["example_weight"])
    assert real_examples_per_round(group).tolist() == [12.0, 12.0]


def test_eval_batches_pad_last_batch_and_carry_references():
    data = _federated(num_eval=7)
    batches = list(data.eval_batches())
    assert len(batches) == 3 and all(b["input_ids"].shape == (3, 64) for b in batches)
    assert [b["example_weight"].tolist() for b in batches][-1] == [1.0, 0.0, 0.0]
    refs = [r for b in batches for r, w in zip(b["references"], b["example_weight"]) if w]
    assert refs == data.eval_examples.targets
    assert batches[-1]["references"][1:] == ["", ""]
    with pytest.raises(DataError, match="references"):
        next(eval_batches(data.eval_tokens, ["one"], 2))


def test_local_work_needs_exactly_one_of_steps_or_epochs():
    with pytest.raises(DataError, match="exactly one"):
        LocalWork(4)
    with pytest.raises(DataError, match="exactly one"):
        LocalWork(4, steps=2, epochs=1.0)


def test_token_cache_round_trip(tmp_path):
    ex = _examples()
    first = cached_tokenize(ex, TOKENIZER, tmp_path, max_input_length=20, max_target_length=8)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 1
    again = cached_tokenize(ex, TOKENIZER, tmp_path, max_input_length=20, max_target_length=8)
    assert np.array_equal(first[0].input_ids, again[0].input_ids) and first[1] == again[1]
    cached_tokenize(ex, TOKENIZER, tmp_path, max_input_length=21, max_target_length=8)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 2  # new settings, new entry


def test_spec_from_dict_and_partition_report():
    # The data spec is the config's `data:` section: the config's loader builds and checks it.
    from fedjax_fm.config import ConfigError, config_from_dict

    cfg = config_from_dict({"data": {
        "source": {"kind": "synthetic", "num_train": 40, "num_eval": 4, "small_talk_turns": [0, 1]},
        "partition": {"method": "dirichlet_group", "group_field": "intent", "alpha": 100.0},
        "max_input_length": 32, "max_target_length": 16,
    }})
    spec = cfg.data
    assert spec.source.small_talk_turns == (0, 1)
    data = build_federated_data(spec, TOKENIZER, seed=3, num_clients=3, local_work=LocalWork(2, steps=2),
                                eval_batch_size=2)
    report = data.report()
    assert report["partition"]["num_examples"] == 40 and report["steps_per_round"] == 2
    assert report["truncation"]["train"]["inputs_truncated"] > 0  # 32 bytes is short: counted, not hidden
    with pytest.raises(ConfigError, match=r"unknown key 'data\.batchsize'"):
        config_from_dict({"data": {"batchsize": 2}})


def test_prefetched_rounds_equal_direct_rounds():
    from fedjax_fm.data import prefetch_round_batches

    data = _federated(local_steps=2)
    sampler = lambda r: [r % 4, (r + 1) % 4]  # noqa: E731
    seen = list(prefetch_round_batches(data, range(5), sampler, depth=2))
    assert [r for r, _, _ in seen] == list(range(5))
    for r, clients, batches in seen:
        direct = data.clients_round_batches(sampler(r), r)
        assert clients == sampler(r)
        assert all(np.array_equal(batches[k], direct[k]) for k in direct)


def test_content_skew_by_length_bucket():
    spec = DataSpec(source=SourceSpec(num_train=80, num_eval=2),
                    partition=ClientPartitionSpec(method="dirichlet_group", group_field="length_bucket", alpha=0.1,
                                            num_length_buckets=4, drop_small_clients=True),
                    max_input_length=400, max_target_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small alpha may drop an empty client; that is allowed here
        data = build_federated_data(spec, TOKENIZER, seed=0, num_clients=4, local_work=LocalWork(8, steps=1),
                                    eval_batch_size=8)
    groups = data.report()["partition"]["group_counts"]
    assert set().union(*(g.keys() for g in groups.values())) <= {f"len_q{q}" for q in range(4)}
    assert sum(sum(g.values()) for g in groups.values()) + sum(data.partition.dropped.values()) == 80
