"""Static-shape batches for a client's round of local work, and for evaluation.

A round of local work is ``steps`` batches of ``B`` examples: every array has shape
``[steps, B, ...]`` (see the batch table in ``docs/architecture.md``), the same for
every client and round of a run, so one compiled client update serves them all.

Which examples fill the ``steps * B`` slots of client ``c`` in round ``r``: walk through
a sequence of random permutations of the client's examples, each drawn from
``np.random.default_rng([seed, r, c])`` (nothing else), so a resumed run sees the same
batches. How many of the slots are *real* (``example_weight`` 1):

* ``local_steps = s``: all ``s * B`` slots are real; a client with fewer than ``s * B``
  examples wraps around into a fresh permutation (it sees some examples twice).
* ``local_epochs = E``: the run's step count is ``ceil(E * n_max / B)`` for the largest
  client ``n_max`` (static for the run); client ``c`` gets ``round(E * n_c)`` real slots
  (each example ``E`` times for integer ``E``), the rest are filled with repeats of its
  own examples at weight 0. Whole steps can be all-weight-0: a client update should
  leave the parameters unchanged on such steps (their loss mask is all zero).

The number of real examples per client per round is ``sum(example_weight)``
(:func:`real_examples_per_round`); FedAvg's aggregation weight is the client's dataset
size ``n_c`` (or that sum, which is proportional to it under ``local_epochs``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import numpy as np

from fedjax_fm.data.records import DataError
from fedjax_fm.data.tokenize import TokenizedExamples


@dataclasses.dataclass(frozen=True)
class LocalWork:
    """Local work per round: exactly one of ``steps`` or ``epochs``, with a batch size."""

    batch_size: int
    steps: int | None = None
    epochs: float | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {self.batch_size}")
        if (self.steps is None) == (self.epochs is None):
            raise DataError(f"give exactly one of local_steps or local_epochs (got steps={self.steps}, epochs={self.epochs})")
        if self.steps is not None and self.steps < 1:
            raise DataError(f"local_steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise DataError(f"local_epochs must be > 0, got {self.epochs}")

    def steps_per_round(self, max_client_examples: int) -> int:
        """The static number of steps of every client's round."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * max_client_examples / self.batch_size))

    def real_examples(self, client_examples: int, steps: int) -> int:
        """Slots of a round that hold real (weight 1) examples for a client of this size."""
        if self.steps is not None:
            return steps * self.batch_size
        return min(steps * self.batch_size, max(1, round(self.epochs * client_examples)))


def round_slots(
    client_indices: np.ndarray, *, seed: int, round_index: int, client: int, num_slots: int, num_real: int
) -> tuple[np.ndarray, np.ndarray]:
    """Dataset indices for a client's round and their weights (1 for the first ``num_real``).

    The slots follow consecutive random permutations of ``client_indices`` drawn from
    ``default_rng([seed, round_index, client])``.
    """
    n = len(client_indices)
    if n == 0:
        raise DataError(f"client {client} holds no examples")
    rng = np.random.default_rng([seed, round_index, client])
    passes = math.ceil(num_slots / n)
    order = np.concatenate([rng.permutation(n) for _ in range(passes)])[:num_slots]
    weights = (np.arange(num_slots) < num_real).astype(np.float32)
    return np.asarray(client_indices)[order], weights


def gather_batches(tokens: TokenizedExamples, indices: np.ndarray, weights: np.ndarray,
                   shape: Sequence[int]) -> dict[str, np.ndarray]:
    """Model-ready arrays for ``indices``, reshaped to ``shape + [length]`` (e.g. ``[C, steps, B]``)."""
    batch = tokens.gather(indices)
    batch["example_weight"] = weights.astype(np.float32)
    return {k: v.reshape(*shape, *v.shape[1:]) for k, v in batch.items()}


def real_examples_per_round(batches: dict[str, np.ndarray]) -> np.ndarray:
    """Real examples processed per client in a round: ``example_weight`` summed over steps and batch.

    For packed rows (``decoder_segment_ids`` present, see ``packing.py``) each row's
    weight counts its segments: ``w · max(decoder_segment_ids)``.
    """
    w = np.asarray(batches["example_weight"])
    if "decoder_segment_ids" in batches:
        w = w * np.asarray(batches["decoder_segment_ids"]).max(axis=-1)
    return w.reshape(*w.shape[:-2], -1).sum(-1) if w.ndim >= 2 else w.sum()


def eval_batches(
    tokens: TokenizedExamples,
    references: Sequence[str],
    batch_size: int,
    *,
    ids: Sequence[str] | None = None,
    by_length: bool = False,
    length_multiple: int = 64,
) -> Iterator[dict]:
    """Fixed-shape ``[B, ...]`` evaluation batches with reference texts.

    ``by_length=False``: dataset order, every batch at the full tokenised width.
    ``by_length=True``: examples sorted by source length (stable, longest first), and
    each batch cut to its longest source rounded up to a multiple of
    ``length_multiple`` (targets to a multiple of 16), so the encoder does not run on
    hundreds of pad slots for short dialogues. The widths come from a small set, so
    the loss and generation compile once per width, not per batch.

    The last batch is padded with repeats of an example at ``example_weight`` 0;
    ``references`` and ``ids`` are lists of length ``B`` whose padding entries are ``""``.
    """
    n = len(tokens)
    if len(references) != n:
        raise DataError(f"{len(references)} references for {n} tokenised examples")
    if batch_size < 1:
        raise DataError(f"eval batch_size must be >= 1, got {batch_size}")
    order = np.argsort(-np.asarray(tokens.input_lengths), kind="stable") if by_length else np.arange(n)
    for start in range(0, n, batch_size):
        real = order[start:start + batch_size]
        filler = real[0] if by_length else 0  # a weight-0 repeat that fits the batch's width
        indices = np.concatenate([real, np.full(batch_size - len(real), filler, dtype=real.dtype)])
        weights = (np.arange(batch_size) < len(real)).astype(np.float32)
        batch = gather_batches(tokens, indices, weights, (batch_size,))
        if by_length:
            width = lambda length, multiple, full: min(full, -(-max(int(length), 1) // multiple) * multiple)  # noqa: E731
            s = width(tokens.input_lengths[real].max(), length_multiple, batch["input_ids"].shape[1])
            t = width(tokens.label_lengths[real].max(), 16, batch["labels"].shape[1])
            source_keys, target_keys = ("input_ids", "attention_mask"), ("labels", "decoder_input_ids", "decoder_attention_mask")
            batch = {k: v[:, :s] if k in source_keys else v[:, :t] if k in target_keys else v for k, v in batch.items()}
        pad = [""] * (batch_size - len(real))
        batch["references"] = [references[i] for i in real] + pad
        batch["ids"] = ([ids[i] for i in real] if ids is not None else [str(i) for i in real]) + pad
        yield batch
