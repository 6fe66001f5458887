"""Tokenising on demand (what each process of a multi-process run does): the same rows as
tokenising up front, only the clients fed, and up front where a setting needs every length."""

import threading

import numpy as np
import pytest
from transformers import ByT5Tokenizer

from fedjax_fm.data import DataSpec, LocalWork, SourceSpec, TextExamples, build_federated_data, tokenize_examples
from fedjax_fm.data.federated import ClientPartitionSpec, PackingConfig, on_demand_blocker
from fedjax_fm.data.tokenize import OnDemandTokens

TOKENIZER = ByT5Tokenizer()  # byte-level: needs no files, pad 0, EOS 1
KW = dict(prompt_template="summarize: {dialogue}", max_input_length=24, max_target_length=8)


def _examples(n=40):
    rng = np.random.default_rng(0)
    return TextExamples([f"A: hi {i} " + "x" * int(rng.integers(0, 30)) for i in range(n)],
                        [f"sum {i}" + "y" * int(rng.integers(0, 6)) for i in range(n)], [str(i) for i in range(n)])


def test_rows_equal_tokenising_up_front_in_any_order():
    ex = _examples()
    eager, report = tokenize_examples(ex, TOKENIZER, **KW)
    lazy = OnDemandTokens(ex, TOKENIZER, **KW)
    assert lazy.report().num_examples == 0 and not lazy.done.any()
    lazy.ensure([7, 3, 3, 30])
    assert sorted(np.flatnonzero(lazy.done)) == [3, 7, 30]
    for i in (3, 7, 30):
        np.testing.assert_array_equal(lazy.tokens.input_ids[i], eager.input_ids[i])
        np.testing.assert_array_equal(lazy.tokens.labels[i], eager.labels[i])
    assert (lazy.tokens.input_ids[0] == 0).all()  # untouched until asked for
    lazy.ensure(np.arange(len(ex))[::-1])
    for name in ("input_ids", "input_lengths", "labels", "label_lengths"):
        np.testing.assert_array_equal(getattr(lazy.tokens, name), getattr(eager, name))
    assert lazy.report() == report
    assert report.inputs_truncated > 0  # the limits above do cut some, so the counts are exercised


def test_concurrent_requests_fill_each_row_once():
    ex = _examples(200)
    lazy = OnDemandTokens(ex, TOKENIZER, **KW)
    threads = [threading.Thread(target=lazy.ensure, args=(np.arange(k, 200, 3),)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    eager, _ = tokenize_examples(ex, TOKENIZER, **KW)
    np.testing.assert_array_equal(lazy.tokens.input_ids, eager.input_ids)


def _spec(**changes) -> DataSpec:
    base = dict(source=SourceSpec(kind="synthetic", num_train=64, num_eval=6),
                partition=ClientPartitionSpec(method="dirichlet_quantity", alpha=1.0, drop_small_clients=True),
                max_input_length=256, max_target_length=32)
    base.update(changes)
    return DataSpec(**base)


@pytest.mark.parametrize("packing", [False, True])
def test_federated_data_on_demand_feeds_the_same_batches_and_tokenises_only_fed_clients(packing):
    spec = _spec(packing=PackingConfig(enabled=packing, input_length=256, target_length=48))
    work = LocalWork(batch_size=3, steps=2)
    eager = build_federated_data(spec, TOKENIZER, seed=0, local_work=work, eval_batch_size=4, num_clients=5)
    lazy = build_federated_data(spec, TOKENIZER, seed=0, local_work=work, eval_batch_size=4, num_clients=5,
                                on_demand=True)
    assert lazy.train_fill is not None and lazy.eval_fill is not None
    assert not lazy.train_fill.done.any() and not lazy.eval_fill.done.any()
    assert lazy.steps_per_round == eager.steps_per_round and lazy.batch_shapes() == eager.batch_shapes()
    fed = [2, 0]
    for round_index in (0, 1):
        got, want = lazy.clients_round_batches(fed, round_index), eager.clients_round_batches(fed, round_index)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    expected = np.zeros(64, bool)
    for c in fed:
        expected[lazy.partition.client_indices[c]] = True
    np.testing.assert_array_equal(lazy.train_fill.done, expected)  # nothing of clients 1, 3, 4
    for c in (1, 3):  # the lineage's view of a client tokenises it and equals the eager one
        for key, value in eager.client_tokens(c).items():
            np.testing.assert_array_equal(lazy.client_tokens(c)[key], value)
    assert lazy.truncation["train"].num_examples == int(lazy.train_fill.done.sum())
    got_eval = list(lazy.eval_batches(4, max_examples=5))
    want_eval = list(eager.eval_batches(4, max_examples=5))
    assert lazy.eval_fill.done.tolist() == [True] * 5 + [False]
    for got, want in zip(got_eval, want_eval):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        assert got["references"] == want["references"]
    assert lazy.report()["tokenised_on_demand"] == ["train", "eval"]
    assert eager.report()["tokenised_on_demand"] == []


def test_settings_that_need_every_length_tokenise_up_front():
    work = LocalWork(batch_size=3, steps=2)
    assert on_demand_blocker(_spec(), work) is None
    by_length = _spec(partition=ClientPartitionSpec(method="dirichlet_group", group_field="length_bucket",
                                                       drop_small_clients=True))
    assert "length_bucket" in on_demand_blocker(by_length, work)
    packed_epochs = _spec(packing=PackingConfig(enabled=True, input_length=256, target_length=48))
    assert "local_epochs" in on_demand_blocker(packed_epochs, LocalWork(batch_size=3, epochs=1.0))
    data = build_federated_data(by_length, TOKENIZER, seed=0, local_work=work, eval_batch_size=4, num_clients=4,
                                on_demand=True)
    assert data.train_fill is None and data.eval_fill is not None
    assert data.truncation["train"].num_examples == 64
