"""``scripts/pretrain_demo_base.py``: the batches the shipped base is pretrained on.

Each row is span-corrupted (T5's input); its target is either the hidden spans (T5's
target) or, with probability ``RECONSTRUCT_RATE``, the whole row (docs/benchmarks.md,
"Offline demo": with span targets alone the base copied no place).
"""

import numpy as np
import pytest


@pytest.fixture()
def script(load_script):
    return load_script("pretrain_demo_base")


def rows(n: int = 8, length: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(2, 900, size=length).astype(np.int32) for _ in range(n)]


def target_tokens(labels_row: np.ndarray) -> list[int]:
    """The target's ids up to and including EOS (1); 0 is padding."""
    ids = [int(i) for i in labels_row]
    return ids[: ids.index(1) + 1]


def test_reconstruction_rows_target_the_whole_row_and_span_rows_the_spans(script, monkeypatch):
    sentinel_top, tokens = 996, rows()
    salient = np.array([], np.int32)
    monkeypatch.setattr(script, "RECONSTRUCT_RATE", 1.0)
    whole = script.corrupt_batch(tokens, np.random.default_rng(0), sentinel_top, salient)
    monkeypatch.setattr(script, "RECONSTRUCT_RATE", 0.0)
    spans = script.corrupt_batch(tokens, np.random.default_rng(0), sentinel_top, salient)
    assert whole["labels"].shape == (len(tokens), script.TARGET_LEN) == spans["labels"].shape
    for row, original in enumerate(tokens):
        # the input is T5's span-corrupted row either way
        np.testing.assert_array_equal(whole["input_ids"][row], spans["input_ids"][row])
        assert (whole["input_ids"][row] > sentinel_top - script.EXTRA_IDS).any()
        assert target_tokens(whole["labels"][row]) == [*original.tolist(), 1]
        span_target = target_tokens(spans["labels"][row])
        assert span_target[0] == sentinel_top and len(span_target) < len(original)
        # teacher forcing: the decoder reads the target shifted right behind the start id 0
        np.testing.assert_array_equal(whole["decoder_input_ids"][row, 1:], whole["labels"][row, :-1])
        assert whole["decoder_input_ids"][row, 0] == 0
        np.testing.assert_array_equal(whole["decoder_attention_mask"][row], whole["labels"][row] != 0)


def test_the_mixture_draws_both_kinds_and_is_deterministic(script):
    sentinel_top, tokens = 996, rows(n=64)
    salient = np.array([], np.int32)
    first = script.corrupt_batch(tokens, np.random.default_rng(5), sentinel_top, salient)
    again = script.corrupt_batch(tokens, np.random.default_rng(5), sentinel_top, salient)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    whole = [target_tokens(first["labels"][r]) == [*tokens[r].tolist(), 1] for r in range(len(tokens))]
    # half of the 64 rows (RECONSTRUCT_RATE), give or take sampling: 19-45 rows at 6.5 sigma
    assert script.RECONSTRUCT_RATE == 0.5
    assert 19 <= sum(whole) <= 45


def test_the_logits_layer_starts_at_t5x_scale(script):
    assert script.HEAD_INIT_STD == pytest.approx(script.ARCH["d_model"] ** -0.5)
