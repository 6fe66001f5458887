"""T5's span corruption (fedjax_fm.data.span_corruption) and the pretraining corpus generator."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_fm.data.narratives import NAMES, narrative_corpus
from fedjax_fm.data.span_corruption import num_spans, random_spans_noise_mask, salient_noise_mask, span_corrupt

TOP = 999  # id of <extra_id_0>


def _spans(mask):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("length", [2, 5, 20, 57, 114])
def test_noise_mask_layout_follows_t5(length):
    for seed in range(20):
        mask = random_spans_noise_mask(length, np.random.default_rng(seed))
        assert mask.shape == (length,) and mask.dtype == bool
        assert mask.sum() == int(np.clip(round(length * 0.15), 1, length - 1))
        assert not mask[0]          # starts with kept tokens
        assert mask[-1]             # and ends with a noise span, as T5's interleaving does
        expected_spans = max(1, round(mask.sum() / 3))
        assert len(_spans(mask)) == min(expected_spans, mask.sum(), length - mask.sum())


def test_mean_span_length_is_three_on_long_sequences():
    lengths = [e - s for seed in range(200) for s, e in _spans(random_spans_noise_mask(200, np.random.default_rng(seed)))]
    assert np.mean(lengths) == pytest.approx(3.0, abs=0.05)


def test_inputs_and_targets_reassemble_the_text():
    tokens = np.arange(10, 70, dtype=np.int32)
    for seed in range(30):
        inputs, targets = span_corrupt(tokens, np.random.default_rng(seed), sentinel_top=TOP, eos_id=1)
        assert inputs[-1] == 1 and targets[-1] == 1
        # Replace sentinel k in the inputs by the tokens following sentinel k in the targets.
        pieces, current = {}, None
        for t in targets[:-1]:
            if t > 900:
                current = TOP - t
                pieces[current] = []
            else:
                pieces[current].append(int(t))
        rebuilt = []
        for t in inputs[:-1]:
            rebuilt.extend(pieces[TOP - t] if t > 900 else [int(t)])
        assert rebuilt == tokens.tolist()
        sentinels = [TOP - t for t in inputs if t > 900]
        assert sentinels == list(range(len(sentinels)))      # <extra_id_0>, <extra_id_1>, ... in order
        assert targets[0] == TOP                              # targets open with <extra_id_0>
        assert len(inputs) + len(targets) == len(tokens) + 2 * len(sentinels) + 2


def test_span_corrupt_is_pure_and_seeded():
    tokens = np.arange(5, 45)
    copy = tokens.copy()
    a = span_corrupt(tokens, np.random.default_rng(7), sentinel_top=TOP)
    b = span_corrupt(tokens, np.random.default_rng(7), sentinel_top=TOP)
    c = span_corrupt(tokens, np.random.default_rng(8), sentinel_top=TOP)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    np.testing.assert_array_equal(tokens, copy)


def test_too_few_sentinels_and_short_input_are_errors():
    with pytest.raises(ValueError, match="sentinels"):
        span_corrupt(np.arange(3, 300), np.random.default_rng(0), sentinel_top=TOP, max_sentinels=4)
    with pytest.raises(ValueError, match="at least 2"):
        span_corrupt([5], np.random.default_rng(0), sentinel_top=TOP)


def test_narrative_corpus_is_seeded_extends_and_repeats_entities():
    small, large = narrative_corpus(20, seed=3), narrative_corpus(40, seed=3)
    assert large[:20] == small and narrative_corpus(20, seed=4) != small
    # Entities recur: most texts name some person at least twice (what teaches copying).
    repeats = sum(any(text.count(name) >= 2 for name in NAMES) for text in large)
    assert repeats >= 30
    assert not any("summar" in text.lower() for text in large)   # no summaries: not the demo's task


def _salient_case(seed):
    """Ids 10..29 as 'words', 30..35 as entities; each entity appears 1-3 times."""
    rng = np.random.default_rng([seed, 1])
    tokens = rng.integers(10, 30, size=60).astype(np.int32)
    for entity, copies in zip(range(30, 36), (1, 2, 3, 2, 1, 3)):
        tokens[rng.choice(np.arange(1, 60), size=copies, replace=False)] = entity
    return tokens, tokens >= 30


def test_salient_mask_hides_only_entities_that_stay_visible_elsewhere():
    for seed in range(30):
        tokens, salient = _salient_case(seed)
        mask = salient_noise_mask(tokens, salient, np.random.default_rng(seed), salient_rate=1.0, noise_density=0.1)
        base = random_spans_noise_mask(len(tokens), np.random.default_rng(seed), noise_density=0.1)
        assert not mask[0] and (mask >= base).all()          # the random spans, plus ...
        extra = np.flatnonzero(mask & ~base)
        assert salient[extra].all()                          # ... entities only,
        for p in extra:                                      # each with a copy left to look up
            assert (~mask & (tokens == tokens[p])).any()
        for entity in range(30, 36):                         # rate 1: all but the copy someone must see
            where = tokens == entity
            if where.sum() >= 2 and not (base & where).any():
                assert (~mask & where).sum() == 1
            if where.sum() == 1:
                assert not (mask & ~base & where).any()      # a lone entity is never hidden by this rule


def test_salient_mask_rate_zero_and_too_many_spans_give_the_random_spans():
    tokens, salient = _salient_case(0)
    base = random_spans_noise_mask(len(tokens), np.random.default_rng(3), noise_density=0.1)
    np.testing.assert_array_equal(
        salient_noise_mask(tokens, salient, np.random.default_rng(3), salient_rate=0.0, noise_density=0.1), base)
    np.testing.assert_array_equal(
        salient_noise_mask(tokens, salient, np.random.default_rng(3), salient_rate=1.0, noise_density=0.1,
                           max_spans=num_spans(base)), base)


def test_span_corrupt_takes_a_given_mask_and_reassembles_the_text():
    tokens, salient = _salient_case(1)
    mask = salient_noise_mask(tokens, salient, np.random.default_rng(1), salient_rate=1.0)
    state = np.random.default_rng(7)
    inputs, targets = span_corrupt(tokens, state, sentinel_top=TOP, noise_mask=mask)
    assert state.random() == np.random.default_rng(7).random()  # a given mask draws nothing
    assert (inputs[:-1] >= TOP - num_spans(mask)).sum() == num_spans(mask)
    rebuilt, noise = [], {}
    current = None
    for t in targets[:-1]:
        if t > TOP - 32:
            current = TOP - t
            noise[current] = []
        else:
            noise[current].append(t)
    for t in inputs[:-1]:
        rebuilt.extend(noise[TOP - t] if t > TOP - 32 else [t])
    np.testing.assert_array_equal(rebuilt, tokens)
    with pytest.raises(ValueError, match="keep the first token"):
        span_corrupt(tokens, state, sentinel_top=TOP, noise_mask=np.ones(len(tokens), bool))


def test_chat_notes_retell_their_chat_without_the_demos_summary_wording():
    from fedjax_fm.data import narratives

    demo_wording = (" will meet ", " will pick ", " will lend ", " will be ", " can't come to ", " will come to ",
                    " booked a table for ", " has to ", " will buy ", " will watch ", " will bring ")
    notes = [narratives.KINDS["chat_note"](np.random.default_rng([5, i])) for i in range(200)]
    for text in notes:
        *chat, note = text.split("\n")
        assert all(": " in line for line in chat) and len(chat) >= 4
        said = " ".join(chat)
        retold = note.split(": ", 1)[1]  # after the opener ("In Ethan's diary: ...")
        named = [w.strip(".,") for w in retold.split() if w.strip(".,") in NAMES]
        assert named and all(name in said for name in named), text  # people come from the chat
        assert not any(phrase in note for phrase in demo_wording), note
