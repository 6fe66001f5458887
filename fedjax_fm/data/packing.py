"""Packing: several tokenised examples per static-shape row, T5X / seqio style.

Padding every example to the configured maximum wastes most slots on dialogue data
(~70% padding on SAMSum at 512/95). Packing places several examples in one row of
``[rows, S]`` sources and ``[rows, T]`` targets. Sources and targets are packed
*separately but in the same rows*: example ``k`` of a row owns source segment ``k``
and target segment ``k``. On top of the batch keys of ``docs/architecture.md`` a
packed batch carries

    encoder_segment_ids, decoder_segment_ids   int32 [rows, S] / [rows, T]: 1, 2, ... per example, 0 = pad
    encoder_positions,   decoder_positions     int32: 0, 1, ... restarting in each segment (0 on pad)

``decoder_input_ids`` are the labels shifted right *within each segment* (every
segment starts with the decoder start token), ``example_weight`` [rows] is 1 for a row
holding examples and 0 for an all-padding row. The segment-aware model
(``models.T5`` with segment ids) keeps attention inside a segment, so each example
computes exactly what it would alone.

**Algorithm** (:func:`pack_rows`): the examples are cut into windows of ``window``
consecutive examples (all of them when ``window`` is None); each window is shuffled
with the given ``np.random.Generator`` and packed greedily *first-fit*: each example
goes into the lowest-numbered open row of the window where both its source fits in
the row's remaining source slots and its target in the remaining target slots (and the
row has fewer than ``max_segments`` examples), else it opens a new row. Rows of a
window are closed when the next window starts, which bounds the search per example to
the rows of its window and keeps the order of a stream locally random. Same inputs
and same generator state -> same rows.

**Over-long examples** never reach the packer: tokenisation already truncates each
source to ``max_input_length`` and each target to ``max_target_length`` (keeping the
final EOS; ``data.tokenize``). A packed row must be at least that long
(``input_length >= max_input_length``, likewise for targets), so every example fits in
an empty row; a longer example is an error, not a silent cut.

**Local work** (:func:`pack_round`): a step is a fixed number of packed rows ``R`` (the
batch size, now counted in rows), so shapes stay ``[steps, R, L]`` for the whole run
and one compiled client update serves every client and round. Each row's example count
is real and varies with the lengths:

* ``local_steps = s``: the client's example stream (consecutive random permutations,
  as in ``batching.round_slots``) is packed into ``s * R`` rows, filled as far as
  first-fit gets; examples that do not make it into those rows are not used this round.
* ``local_epochs = E``: the ``round(E * n_c)`` examples of the round are packed; rows
  left over are all-padding (weight 0), and they must all fit in ``s * R`` rows (the
  run layer sizes ``s`` from the largest client with :func:`rows_needed`).

FedAvg's count of examples processed is the number of packed segments in rows of
weight 1, ``Σ_rows w · max(decoder_segment_ids)`` (:func:`packed_example_count`,
``fl.batch_counts``), and tokens are the real slots ``Σ masks · w``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fedjax_fm.data.batching import round_slots
from fedjax_fm.data.records import DataError
from fedjax_fm.data.tokenize import DECODER_START_ID, TokenizedExamples

PACKED_KEYS = ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids", "decoder_positions")
# Appended to the (seed, round, client) seed of the packing shuffles, so they never
# replay the draws of the example stream.
_PACK_STREAM = 0x9ACC


@dataclasses.dataclass(frozen=True)
class PackingSpec:
    """Geometry of packed rows.

    Attributes:
      input_length: source slots per row ``S`` (>= the tokenisation's ``max_input_length``).
      target_length: target slots per row ``T`` (>= ``max_target_length``).
      max_segments: at most this many examples per row (None: no cap).
      window: examples shuffled and first-fit packed together (None: all at once).
    """

    input_length: int
    target_length: int
    max_segments: int | None = None
    window: int | None = None

    def __post_init__(self):
        if self.input_length < 1 or self.target_length < 1:
            raise DataError(f"packed row lengths must be >= 1 (got {self.input_length}, {self.target_length})")
        if self.max_segments is not None and self.max_segments < 1:
            raise DataError(f"max_segments must be >= 1 or None, got {self.max_segments}")
        if self.window is not None and self.window < 1:
            raise DataError(f"window must be >= 1 or None, got {self.window}")


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """A packed batch and which examples went where.

    Attributes:
      batch: ``{key: [rows, ...]}`` arrays (the batch keys plus ``PACKED_KEYS``).
      rows: dataset indices of the examples in each row, in segment order (segment
        ``k + 1`` of row ``r`` is ``rows[r][k]``); empty lists for padding rows.
      leftover: dataset indices that were given but did not fit in ``num_rows`` rows.
    """

    batch: dict[str, np.ndarray]
    rows: list[list[int]]
    leftover: np.ndarray


def _check_lengths(source_lengths: np.ndarray, target_lengths: np.ndarray, spec: PackingSpec) -> None:
    if source_lengths.shape != target_lengths.shape or source_lengths.ndim != 1:
        raise DataError(f"length arrays must be 1-D and equal in shape: {source_lengths.shape}, {target_lengths.shape}")
    if source_lengths.size and (source_lengths.min() < 1 or target_lengths.min() < 1):
        raise DataError("every example needs at least one source and one target token (EOS)")
    too_long = (source_lengths > spec.input_length) | (target_lengths > spec.target_length)
    if too_long.any():
        i = int(np.flatnonzero(too_long)[0])
        raise DataError(
            f"{int(too_long.sum())} example(s) do not fit an empty packed row (first: source {int(source_lengths[i])} "
            f"> {spec.input_length} or target {int(target_lengths[i])} > {spec.target_length} tokens); tokenisation "
            "truncates to max_input_length / max_target_length, so pack into rows at least that long"
        )


def first_fit(source_lengths: np.ndarray, target_lengths: np.ndarray, spec: PackingSpec) -> list[list[int]]:
    """Greedy first-fit of examples, in the order given, into as many rows as needed.

    Example ``i`` goes into the lowest row ``r`` with ``src_used[r] + s_i <= S``,
    ``tgt_used[r] + t_i <= T`` and ``count[r] < max_segments``; if there is none it
    opens a new row. Returns each row's example positions (into the given arrays), in
    placement order. No row overflows by construction.
    """
    source_lengths = np.asarray(source_lengths, np.int64)
    target_lengths = np.asarray(target_lengths, np.int64)
    _check_lengths(source_lengths, target_lengths, spec)
    n = source_lengths.size
    cap = spec.max_segments if spec.max_segments is not None else n + 1
    # Preallocated per-row state; at most n rows can ever open.
    src_free = np.empty(n, np.int64)
    tgt_free = np.empty(n, np.int64)
    count = np.empty(n, np.int64)
    rows: list[list[int]] = []
    for i in range(n):
        s, t = source_lengths[i], target_lengths[i]
        open_rows = len(rows)
        fits = (src_free[:open_rows] >= s) & (tgt_free[:open_rows] >= t) & (count[:open_rows] < cap)
        hit = np.flatnonzero(fits)
        if hit.size:
            r = int(hit[0])
            rows[r].append(i)
        else:
            r = open_rows
            rows.append([i])
            src_free[r], tgt_free[r], count[r] = spec.input_length, spec.target_length, 0
        src_free[r] -= s
        tgt_free[r] -= t
        count[r] += 1
    return rows


def pack_rows(
    source_lengths: np.ndarray, target_lengths: np.ndarray, spec: PackingSpec, rng: np.random.Generator
) -> list[list[int]]:
    """Windowed shuffle + :func:`first_fit` (see the module docstring).

    Returns rows of example positions (into the given arrays). The windows are taken in
    the order given; within each, the examples are permuted by ``rng`` before packing,
    and rows of one window never receive examples of a later one.
    """
    source_lengths = np.asarray(source_lengths, np.int64)
    target_lengths = np.asarray(target_lengths, np.int64)
    _check_lengths(source_lengths, target_lengths, spec)
    n = source_lengths.size
    window = spec.window or max(n, 1)
    rows: list[list[int]] = []
    for start in range(0, n, window):
        members = start + rng.permutation(min(window, n - start))
        for row in first_fit(source_lengths[members], target_lengths[members], spec):
            rows.append([int(members[j]) for j in row])
    return rows


def assemble_rows(tokens: TokenizedExamples, rows: Sequence[Sequence[int]], num_rows: int,
                  spec: PackingSpec) -> dict[str, np.ndarray]:
    """Packed arrays for ``rows`` (lists of dataset indices), padded to ``num_rows`` rows.

    Segment ``k + 1`` of row ``r`` holds example ``rows[r][k]``: its source tokens in
    ``input_ids`` and its labels in ``labels``, each right after the previous segment's;
    ``decoder_input_ids`` is ``[start, y_0, ..., y_{n-2}]`` per segment. Padding
    slots are 0 everywhere; ``example_weight[r] = 1`` iff row ``r`` holds an example.
    """
    if len(rows) > num_rows:
        raise DataError(f"{len(rows)} packed rows do not fit in {num_rows}")
    S, T = spec.input_length, spec.target_length
    src = {k: np.zeros((num_rows, S), np.int32) for k in ("input_ids", "attention_mask", "encoder_segment_ids", "encoder_positions")}
    tgt = {k: np.zeros((num_rows, T), np.int32)
           for k in ("decoder_input_ids", "labels", "decoder_attention_mask", "decoder_segment_ids", "decoder_positions")}
    weight = np.zeros((num_rows,), np.float32)
    for r, row in enumerate(rows):
        if spec.max_segments is not None and len(row) > spec.max_segments:
            raise DataError(f"row {r} holds {len(row)} examples, more than max_segments={spec.max_segments}")
        s0 = t0 = 0
        for segment, i in enumerate(row, start=1):
            ls, lt = int(tokens.input_lengths[i]), int(tokens.label_lengths[i])
            if s0 + ls > S or t0 + lt > T:
                raise DataError(f"row {r} overflows at example {i}: {s0 + ls} > {S} or {t0 + lt} > {T} slots")
            s, t = slice(s0, s0 + ls), slice(t0, t0 + lt)
            src["input_ids"][r, s] = tokens.input_ids[i, :ls]
            src["attention_mask"][r, s] = 1
            src["encoder_segment_ids"][r, s] = segment
            src["encoder_positions"][r, s] = np.arange(ls)
            tgt["labels"][r, t] = tokens.labels[i, :lt]
            tgt["decoder_input_ids"][r, t0] = DECODER_START_ID
            tgt["decoder_input_ids"][r, t0 + 1 : t0 + lt] = tokens.labels[i, : lt - 1]
            tgt["decoder_attention_mask"][r, t] = 1
            tgt["decoder_segment_ids"][r, t] = segment
            tgt["decoder_positions"][r, t] = np.arange(lt)
            s0, t0 = s0 + ls, t0 + lt
        weight[r] = 1.0 if row else 0.0
    return {**src, **tgt, "example_weight": weight}


def pack_examples(
    tokens: TokenizedExamples,
    indices: Sequence[int] | np.ndarray,
    *,
    num_rows: int,
    spec: PackingSpec,
    rng: np.random.Generator,
) -> PackedRows:
    """Packs the examples at ``indices`` (in that stream order) into ``num_rows`` rows.

    :func:`pack_rows` decides the rows; the first ``num_rows`` are kept and the
    examples of any later row are returned as ``leftover``. Unused rows are padding.
    """
    if num_rows < 1:
        raise DataError(f"num_rows must be >= 1, got {num_rows}")
    indices = np.asarray(indices, np.int64)
    _check_token_widths(tokens, spec)
    positions = pack_rows(tokens.input_lengths[indices], tokens.label_lengths[indices], spec, rng)
    rows = [[int(indices[j]) for j in row] for row in positions]
    kept, rest = rows[:num_rows], rows[num_rows:]
    leftover = np.asarray([i for row in rest for i in row], np.int64)
    return PackedRows(assemble_rows(tokens, kept, num_rows, spec), kept + [[] for _ in range(num_rows - len(kept))],
                      leftover)


def _check_token_widths(tokens: TokenizedExamples, spec: PackingSpec) -> None:
    if tokens.input_ids.shape[1] > spec.input_length or tokens.labels.shape[1] > spec.target_length:
        raise DataError(
            f"packed rows ({spec.input_length}, {spec.target_length}) are shorter than the tokenised maximum "
            f"({tokens.input_ids.shape[1]}, {tokens.labels.shape[1]}): an example of maximum length could not fit"
        )


def rows_needed(tokens: TokenizedExamples, indices: Sequence[int] | np.ndarray, spec: PackingSpec,
                rng: np.random.Generator) -> int:
    """How many rows :func:`pack_rows` uses for ``indices`` with this generator state."""
    indices = np.asarray(indices, np.int64)
    return len(pack_rows(tokens.input_lengths[indices], tokens.label_lengths[indices], spec, rng))


def pack_round(
    tokens: TokenizedExamples,
    client_indices: np.ndarray,
    *,
    seed: int,
    round_index: int,
    client: int,
    num_rows: int,
    spec: PackingSpec,
    num_examples: int | None = None,
) -> PackedRows:
    """One client's round of packed local work (``num_rows = steps * R`` rows).

    All randomness comes from the seed, round and client: the example stream is
    ``batching.round_slots``' (consecutive permutations of the client's examples from
    ``default_rng([seed, round_index, client])``), the window shuffles of
    :func:`pack_rows` use ``default_rng([seed, round_index, client, 0x9ACC])``.

    * ``num_examples=None`` (``local_steps``): the stream holds enough examples to fill
      every row (``num_rows`` times the most examples a row can take); what does not
      fit is not used this round.
    * ``num_examples=m`` (``local_epochs``, ``m = round(E n_c)``): exactly the first
      ``m`` examples of the stream; all must fit (else ``DataError`` naming the rows needed).

    Reshape ``batch`` to ``[steps, R, ...]`` for the client update.
    """
    client_indices = np.asarray(client_indices, np.int64)
    if client_indices.size == 0:
        raise DataError(f"client {client} holds no examples")
    if num_examples is None:
        src, tgt = tokens.input_lengths[client_indices], tokens.label_lengths[client_indices]
        per_row = min(spec.input_length // max(int(src.min()), 1), spec.target_length // max(int(tgt.min()), 1))
        if spec.max_segments is not None:
            per_row = min(per_row, spec.max_segments)
        stream_length = num_rows * max(per_row, 1)
    else:
        if num_examples < 1:
            raise DataError(f"num_examples must be >= 1, got {num_examples}")
        stream_length = num_examples
    # The stream is the unpacked run's (round_slots seeds default_rng([seed, round,
    # client])); the window shuffles get their own generator, with a constant appended
    # to the seed, so they never replay the stream's draws.
    stream, _ = round_slots(client_indices, seed=seed, round_index=round_index, client=client,
                            num_slots=stream_length, num_real=stream_length)
    shuffle_seed = [seed, round_index, client, _PACK_STREAM]
    packed = pack_examples(tokens, stream, num_rows=num_rows, spec=spec, rng=np.random.default_rng(shuffle_seed))
    if num_examples is not None and packed.leftover.size:
        needed = rows_needed(tokens, stream, spec, np.random.default_rng(shuffle_seed))
        raise DataError(
            f"client {client}, round {round_index}: {num_examples} examples need {needed} packed rows, "
            f"more than the {num_rows} of a round; size steps from rows_needed() of the largest client"
        )
    return packed


def padding_efficiency(batch: dict[str, np.ndarray]) -> float:
    """``real token slots / all slots`` of a batch, packed or not, any leading axes.

    real = Σ attention_mask·w + Σ decoder_attention_mask·w (w = ``example_weight``, so
    weight-0 repeats count as padding); all = size of both masks.
    """
    w = np.asarray(batch["example_weight"], np.float64)[..., None]
    src = np.asarray(batch["attention_mask"], np.float64)
    tgt = np.asarray(batch["decoder_attention_mask"], np.float64)
    total = src.size + tgt.size
    return float(((src * w).sum() + (tgt * w).sum()) / total) if total else 0.0


def packed_example_count(batch: dict[str, np.ndarray]) -> float:
    """Real examples in a batch: Σ_rows w · (segments in the row) when packed, else Σ w.

    The NumPy twin of ``fl.batch_counts``' example count.
    """
    w = np.asarray(batch["example_weight"], np.float64)
    if "decoder_segment_ids" in batch:
        return float((w * np.asarray(batch["decoder_segment_ids"]).max(axis=-1)).sum())
    return float(w.sum())


__all__ = [
    "PACKED_KEYS",
    "PackedRows",
    "PackingSpec",
    "assemble_rows",
    "example_lengths",
    "first_fit",
    "pack_examples",
    "pack_round",
    "pack_rows",
    "packed_example_count",
    "padding_efficiency",
    "rows_needed",
]


def example_lengths(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(source_lengths, target_lengths)`` of the real examples of a batch, packed or not,
    any leading axes: one entry per segment of a weight-1 row (per row when unpacked)."""
    w = np.asarray(batch["example_weight"]).reshape(-1) > 0
    src_mask = np.asarray(batch["attention_mask"]).reshape(w.size, -1)[w]
    tgt_mask = np.asarray(batch["decoder_attention_mask"]).reshape(w.size, -1)[w]
    if "decoder_segment_ids" not in batch:
        return src_mask.sum(-1), tgt_mask.sum(-1)
    src_seg = np.asarray(batch["encoder_segment_ids"]).reshape(w.size, -1)[w]
    tgt_seg = np.asarray(batch["decoder_segment_ids"]).reshape(w.size, -1)[w]
    k = int(tgt_seg.max(initial=0))
    segments = np.arange(1, k + 1)
    # [rows, k]: slots of each segment (0 for segments a row does not have).
    src = (src_seg[:, :, None] == segments).sum(1)
    tgt = (tgt_seg[:, :, None] == segments).sum(1)
    has = tgt > 0
    return src[has], tgt[has]
