"""T5's span-corruption objective as a pure NumPy function (Raffel et al. 2020, §3.1.4).

A fraction ``noise_density`` (0.15) of a token sequence is chosen as *noise*, in
spans whose lengths average ``mean_noise_span_length`` (3). The input keeps the
other tokens and replaces each noise span by one sentinel; the target lists the
noise spans, each after the sentinel that replaced it::

    tokens   Thank you for inviting me to your party last week
    inputs   Thank you <X> me to your party <Y> week </s>
    targets  <X> for inviting <Y> last </s>

Layout, as T5's ``random_spans_noise_mask`` (t5/data/preprocessors.py):

* ``n_noise = round(L * noise_density)`` clipped to ``[1, L - 1]``;
  ``n_spans = max(1, round(n_noise / mean_noise_span_length))``.
* The noise tokens and the ``L - n_noise`` kept tokens are each split into
  ``n_spans`` non-empty segments uniformly at random (a random composition: choose
  ``n_spans - 1`` cut points out of ``n - 1``), and the segments are interleaved
  kept, noise, kept, noise, ... so the sequence always starts with kept tokens.
* Sentinel ``k`` (0-based, in order of appearance) is ``<extra_id_k>``, whose id is
  ``vocab_size - 1 - k`` in a T5 tokenizer (sentinels count down from the top).
  The inputs and the targets each end in EOS. (The paper's figure closes the
  targets with one more sentinel; T5's code, followed here, does not: the noise
  span ``j`` follows kept span ``j``, and kept span ``j`` becomes sentinel ``j``
  in the targets, exactly as noise span ``j`` does in the inputs.)
"""

from __future__ import annotations

import numpy as np


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of ``num_segments`` non-empty segments summing to ``num_items``, uniformly at random."""
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    edges = np.concatenate([[0], cuts, [num_items]])
    return np.diff(edges)


def random_spans_noise_mask(length: int, rng: np.random.Generator, *, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
    """A boolean mask [length], True on noise tokens, laid out as described in the module docstring."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    num_noise = int(np.clip(round(length * noise_density), 1, length - 1))
    num_spans = max(1, int(round(num_noise / mean_noise_span_length)))
    num_spans = min(num_spans, num_noise, length - num_noise)
    noise = _random_segmentation(num_noise, num_spans, rng)
    kept = _random_segmentation(length - num_noise, num_spans, rng)
    lengths = np.stack([kept, noise], axis=1).reshape(-1)
    flags = np.tile([False, True], num_spans)
    return np.repeat(flags, lengths)


def num_spans(mask: np.ndarray) -> int:
    """The number of noise spans (maximal runs of True) in a noise mask."""
    mask = np.asarray(mask, bool)
    return int((mask & ~np.concatenate([[False], mask[:-1]])).sum())


def salient_noise_mask(tokens, salient: np.ndarray, rng: np.random.Generator, *, salient_rate: float = 0.5,
                       noise_density: float = 0.10, mean_noise_span_length: float = 3.0,
                       max_spans: int | None = None) -> np.ndarray:
    """T5's random spans plus *salient* tokens whose value the rest of the text still shows.

    Salient span masking (Guu et al. 2020, REALM; Roberts et al. 2020 for T5) masks named
    entities instead of random words, so that the model must recall them. Here the
    entities are masked only where the same token *also stays visible elsewhere in the
    sequence*: recovering it is then a lookup in the encoder input, which is what
    summarising a dialogue needs ("Clara: ..." -> "Clara will ..."). Random spans alone
    rarely ask for that (most masked words are predictable from grammar), and a small
    model trained on them barely uses its context.

    Layout: ``random_spans_noise_mask(noise_density, mean_noise_span_length)``; then the
    positions with ``salient[i]`` True are visited in a random order, and each, with
    probability ``salient_rate``, joins the noise if another position with the same
    token is in neither mask. Position 0 stays kept (T5's layout starts with kept
    tokens). If the union has more than ``max_spans`` spans (the tokenizer's sentinels),
    the random spans alone are returned. Deterministic in ``(tokens, salient, rng state)``.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    salient = np.asarray(salient, bool)
    if salient.shape != tokens.shape:
        raise ValueError(f"salient must have the tokens' shape {tokens.shape}, got {salient.shape}")
    base = random_spans_noise_mask(len(tokens), rng, noise_density=noise_density,
                                   mean_noise_span_length=mean_noise_span_length)
    positions = np.flatnonzero(salient)
    rng.shuffle(positions)
    chosen = np.zeros(len(tokens), bool)
    for p in positions:
        if rng.random() >= salient_rate:
            continue
        same = np.flatnonzero(tokens == tokens[p])
        if np.any(~(chosen[same] | base[same]) & (same != p)):  # another copy stays visible
            chosen[p] = True
    mask = base | chosen
    mask[0] = False
    if max_spans is not None and num_spans(mask) > max_spans:
        return base
    return mask


def span_corrupt(tokens, rng: np.random.Generator, *, sentinel_top: int, eos_id: int = 1,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                 max_sentinels: int | None = None, noise_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)`` int32 id arrays for one token sequence (without EOS).

    ``sentinel_top`` is the id of ``<extra_id_0>`` (``len(tokenizer) - 1`` for a T5
    tokenizer); span ``k`` uses ``sentinel_top - k``. ``max_sentinels`` (the
    tokenizer's ``extra_ids``) is checked, so that a sentinel never runs into real
    pieces. ``noise_mask``: a mask chosen by the caller (e.g. :func:`salient_noise_mask`;
    it must start with a kept token) instead of :func:`random_spans_noise_mask`, and
    then ``rng`` is not used. Deterministic in ``(tokens, rng state)``; the input is not modified.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one sequence (rank 1), got shape {tokens.shape}")
    if noise_mask is None:
        mask = random_spans_noise_mask(len(tokens), rng, noise_density=noise_density,
                                       mean_noise_span_length=mean_noise_span_length)
    else:
        mask = np.asarray(noise_mask, bool)
        if mask.shape != tokens.shape or mask[0] or not mask.any():
            raise ValueError("noise_mask must have the tokens' shape, keep the first token and mask at least one")
    starts = mask & ~np.concatenate([[False], mask[:-1]])        # first token of each noise span
    kept_starts = ~mask & np.concatenate([[True], mask[:-1]])    # first token of each kept span
    num_spans = int(starts.sum())
    if max_sentinels is not None and num_spans > max_sentinels:
        raise ValueError(f"{num_spans} noise spans need more than the tokenizer's {max_sentinels} sentinels; "
                         "shorten the sequences")
    span_of_noise = np.cumsum(starts) - 1                        # 0-based span index of each noise token
    span_of_kept = np.cumsum(kept_starts) - 1                    # kept span j precedes noise span j
    eos = np.asarray([eos_id], np.int32)
    # inputs: kept tokens, and each noise span's first token replaced by its sentinel
    input_ids = np.where(starts, sentinel_top - span_of_noise, tokens)
    inputs = np.concatenate([input_ids[~mask | starts], eos]).astype(np.int32)
    # targets: the same with the roles swapped (T5's noise_span_to_unique_sentinel on ~mask):
    # kept span j (which precedes noise span j) becomes sentinel j.
    target_ids = np.where(kept_starts, sentinel_top - span_of_kept, tokens)
    targets = np.concatenate([target_ids[mask | kept_starts], eos]).astype(np.int32)
    return inputs, targets


__all__ = ["num_spans", "random_spans_noise_mask", "salient_noise_mask", "span_corrupt"]
