"""Per-client evaluation (training/per_client.py): held-out slices, and equality with the pooled score for one client."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_fm.config import load_config
from fedjax_fm.data.batching import eval_batches
from fedjax_fm.eval.evaluate import Evaluator
from fedjax_fm.training import builders
from fedjax_fm.training.per_client import PerClientEvaluator, _subset, hold_out_client_examples

from test_experiment_run import REPO, TINY_YAML


@pytest.fixture(scope="module")
def one_client(tmp_path_factory):
    directory = tmp_path_factory.mktemp("one")
    path = directory / "tiny.yaml"
    path.write_text(TINY_YAML.format(default=REPO / "configs" / "default.yaml"))
    cfg = load_config(path, ["federated.num_clients=1", "federated.clients_per_round=1", "data.partition.method=iid",
                             "eval.per_client_every=1", "eval.per_client_fraction=0.2"])
    tokenizer = builders.build_tokenizer(cfg, directory, lambda: builders.training_texts(cfg))
    data = builders.build_data(cfg, tokenizer)
    model, variables = builders.build_model(cfg, tokenizer)
    return cfg, tokenizer, data, model, variables


def test_held_out_slices_are_disjoint_and_leave_training_data(one_client):
    cfg, _, data, _, _ = one_client
    reduced, held = hold_out_client_examples(data, 0.2, cfg.seed)
    before = np.asarray(data.partition.client_indices[0])
    train = np.asarray(reduced.partition.client_indices[0])
    assert len(held[0]) == round(0.2 * len(before))
    assert not set(held[0]) & set(train) and sorted([*held[0], *train]) == sorted(before)
    again, held_again = hold_out_client_examples(data, 0.2, cfg.seed)  # seeded: the same slice
    assert np.array_equal(held[0], held_again[0])


def test_single_client_equals_the_pooled_evaluation(one_client):
    cfg, tokenizer, data, model, variables = one_client
    reduced, held = hold_out_client_examples(data, cfg.eval.per_client_fraction, cfg.seed)
    targets = list(builders.load_source(cfg.data.source, seed=cfg.seed)[0].targets)
    base = builders.build_evaluator(cfg, model, tokenizer, reduced)
    per_client = PerClientEvaluator(base, reduced, held, targets).evaluate(variables)

    # The pooled evaluation of the same examples, built independently with the run's eval batch size.
    tokens = _subset(reduced.train_tokens, held[0])
    refs = [targets[i] for i in held[0]]
    batches = []
    for batch in eval_batches(tokens, refs, min(cfg.eval.batch_size, len(refs))):
        batch.pop("references"), batch.pop("ids")
        batches.append(batch)
    pooled = Evaluator(base._loss, base._generate, base._decode, batches, refs)(variables)

    assert len(per_client["per_client"]) == 1
    assert per_client["client_rougeL_mean"] == per_client["client_rougeL_worst_decile"] == pooled.rouge["rougeL"]
    assert per_client["client_eval_loss_mean"] == pytest.approx(pooled.eval_loss, rel=1e-6)
    assert per_client["client_rougeL_std"] == 0.0
