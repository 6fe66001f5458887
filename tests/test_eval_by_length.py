"""Evaluation batched by length: the same ROUGE and loss as in dataset order, fewer pad slots."""

from __future__ import annotations

import jax
import pytest
from transformers import ByT5Tokenizer

from fedjax_fm.data import DataSpec, LocalWork, build_federated_data
from fedjax_fm.data.federated import SourceSpec
from fedjax_fm.eval.evaluate import Evaluator
from fedjax_fm.models import T5, init_params, preset
from fedjax_fm.models.generate import generate
from fedjax_fm.models.loss import batch_loss

CONFIG = preset("tiny", num_layers=1, num_decoder_layers=1, dropout_rate=0.0, vocab_size=384)


@pytest.fixture(scope="module")
def data():
    spec = DataSpec(source=SourceSpec(kind="synthetic", num_train=8, num_eval=12), max_input_length=512,
                    max_target_length=96)
    return build_federated_data(spec, ByT5Tokenizer(), seed=0, local_work=LocalWork(2, steps=1), eval_batch_size=4,
                                num_clients=2)


def _evaluator(data, by_length):
    model = T5(CONFIG)
    tokenizer = ByT5Tokenizer()
    batches, references, ids = [], [], []
    for batch in data.eval_batches(4, by_length=by_length):
        refs, names = batch.pop("references"), batch.pop("ids")
        keep = batch["example_weight"] > 0
        references += [r for r, k in zip(refs, keep) if k]
        ids += [i for i, k in zip(names, keep) if k]
        batches.append(batch)
    evaluator = Evaluator(lambda v, b: batch_loss(model, v, b),
                          lambda v, x, m: generate(model, v, x, m, max_new_tokens=12),
                          lambda t: tokenizer.decode(t, skip_special_tokens=True), batches, references)
    return evaluator, batches, ids


def test_rouge_and_loss_do_not_depend_on_the_batching_order(data):
    variables = {"params": init_params(CONFIG, jax.random.PRNGKey(0))}
    plain, plain_batches, plain_ids = _evaluator(data, False)
    sorted_, sorted_batches, sorted_ids = _evaluator(data, True)
    assert sorted(plain_ids) == sorted(sorted_ids) and plain_ids != sorted_ids
    a, b = plain(variables), sorted_(variables)
    by_id = lambda ids, result: dict(zip(ids, result.predictions))  # noqa: E731
    assert by_id(plain_ids, a) == by_id(sorted_ids, b)
    for key in a.rouge:
        assert b.rouge[key] == pytest.approx(a.rouge[key], abs=1e-9)
    assert b.eval_loss == pytest.approx(a.eval_loss, rel=1e-5)
    # Fewer slots: each batch is only as wide as its longest source (to a multiple of 64).
    slots = lambda batches: sum(x["input_ids"].size for x in batches)  # noqa: E731
    assert slots(sorted_batches) < slots(plain_batches)
    widths = {x["input_ids"].shape[1] for x in sorted_batches}
    assert all(w % 64 == 0 or w == 512 for w in widths)
