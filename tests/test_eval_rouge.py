"""ROUGE in the Hugging Face ``evaluate`` convention and the evaluator's loss."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from rouge_score import rouge_scorer

from fedjax_fm.eval.evaluate import Evaluator
from fedjax_fm.eval.rouge import ROUGE_KEYS, rouge_scores, split_sentences


def test_identical_texts_score_100_and_disjoint_0():
    scores = rouge_scores(["Anna will meet Ben at 5 pm."], ["Anna will meet Ben at 5 pm."])
    assert scores == {key: pytest.approx(100.0) for key in ROUGE_KEYS}
    assert rouge_scores(["xyz qqq"], ["Anna will come."]) == {key: 0.0 for key in ROUGE_KEYS}


def test_mean_of_per_example_f_measures_times_100_with_stemming():
    predictions = ["Anna is meeting Ben tomorrow.", "Tom buys milk. He pays later."]
    references = ["Anna meets Ben on Monday.", "Tom will buy milk and eggs. He will pay Sam later."]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    expected = {key: 0.0 for key in ROUGE_KEYS}
    for p, r in zip(predictions, references):
        scores = scorer.score("\n".join(split_sentences(r).splitlines()), "\n".join(split_sentences(p).splitlines()))
        for key in ROUGE_KEYS:
            expected[key] += 100 * scores[key].fmeasure / len(predictions)
    assert rouge_scores(predictions, references) == pytest.approx(expected)
    # Stemming: "meeting"/"meets" share the stem "meet".
    assert rouge_scores(["meeting"], ["meets"])["rouge1"] == pytest.approx(100.0)


def test_lsum_uses_sentences():
    assert split_sentences("Tom buys milk. He pays later!  Ok?") == "Tom buys milk.\nHe pays later!\nOk?"
    # Sentence order matters for ROUGE-L but not for the summary-level ROUGE-Lsum.
    scores = rouge_scores(["He pays later. Tom buys milk."], ["Tom buys milk. He pays later."])
    assert scores["rougeLsum"] == pytest.approx(100.0)
    assert scores["rougeL"] < 100.0


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])


def _batch(labels, mask, weight):
    labels = np.asarray(labels, np.int32)
    return {
        "input_ids": np.ones((len(labels), 3), np.int32),
        "attention_mask": np.ones((len(labels), 3), np.int32),
        "decoder_input_ids": labels,
        "labels": labels,
        "decoder_attention_mask": np.asarray(mask, np.int32),
        "example_weight": np.asarray(weight, np.float32),
    }


def test_evaluator_token_weighted_loss_and_padding_examples():
    # A fake "model": per-token loss = label id; the batch loss is the masked mean.
    def loss_fn(variables, batch):
        mask = batch["decoder_attention_mask"] * batch["example_weight"][:, None]
        return jnp.sum(batch["labels"] * mask) / jnp.sum(mask), jnp.sum(mask)

    def generate_fn(variables, input_ids, attention_mask):
        return jnp.tile(jnp.asarray([[7, 8, 1, 0]], jnp.int32), (input_ids.shape[0], 1))

    batches = [
        _batch([[2, 2, 0], [4, 0, 0]], [[1, 1, 0], [1, 0, 0]], [1, 1]),  # 3 tokens, sum 8
        _batch([[6, 6, 6], [9, 9, 9]], [[1, 1, 1], [1, 1, 1]], [1, 0]),  # second example is padding
    ]
    evaluator = Evaluator(loss_fn, generate_fn, lambda ids: " ".join(f"w{i}" for i in ids), batches,
                          ["w7 w8", "w7", "w9"])
    result = evaluator({})
    assert result.eval_loss == pytest.approx((8 + 18) / 6)  # token-weighted, not a mean of batch means
    assert result.predictions == ["w7 w8"] * 3  # cut at EOS (1), one per real example
    assert result.rouge["rouge1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="3 real examples but 2 references"):
        Evaluator(loss_fn, generate_fn, str, batches, ["a", "b"])
