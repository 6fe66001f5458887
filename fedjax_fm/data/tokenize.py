"""Prompting and tokenisation, once per dataset, into fixed-length token arrays.

The whole dataset is tokenised up front with batched tokenizer calls and kept as
padded ``int32`` arrays (``[N, S]`` inputs, ``[N, T]`` labels) plus true lengths, so a
round's batches are a numpy gather (see ``batching.py``) and never wait for a tokenizer.

Truncation keeps the final EOS: a sequence of ``n > L`` tokens ending in EOS becomes its
first ``L - 1`` tokens followed by EOS (what Hugging Face's ``truncation=True`` does),
and every truncated example is counted in :class:`TruncationReport`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import pathlib
import string
from typing import Any, Sequence

import numpy as np

from fedjax_fm.data.records import DataError, TextExamples

PAD_ID = 0
EOS_ID = 1
DECODER_START_ID = 0
PROMPT_FIELDS = ("input", "dialogue")
DEFAULT_PROMPT = "summarize: {dialogue}"


def format_prompts(template: str, texts: Sequence[str]) -> list[str]:
    """Fill ``template`` with each text; the placeholder is ``{dialogue}`` or ``{input}``."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = fields - set(PROMPT_FIELDS)
    if unknown or not fields:
        raise DataError(
            f"prompt template {template!r}: use exactly the placeholder {{dialogue}} or {{input}} "
            f"(found {sorted(fields) or 'none'}); write literal braces as {{{{ and }}}}"
        )
    return [template.format(input=t, dialogue=t) for t in texts]


@dataclasses.dataclass(frozen=True)
class TruncationReport:
    """How many examples were cut to fit the configured lengths, and the untruncated lengths."""

    num_examples: int
    max_input_length: int
    max_target_length: int
    inputs_truncated: int
    targets_truncated: int
    input_length_mean: float
    input_length_max: int
    target_length_mean: float
    target_length_max: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TokenizedExamples:
    """Padded token arrays for ``N`` examples (pad = 0, every sequence ends with EOS = 1).

    Attributes:
      input_ids: ``[N, S]`` int32 prompt tokens.
      input_lengths: ``[N]`` int32 number of real prompt tokens.
      labels: ``[N, T]`` int32 target tokens.
      label_lengths: ``[N]`` int32 number of real target tokens.
    """

    input_ids: np.ndarray
    input_lengths: np.ndarray
    labels: np.ndarray
    label_lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The model-ready arrays (minus ``example_weight``) of the examples at ``indices``.

        ``decoder_input_ids`` is ``labels`` shifted right by one with the decoder start
        token (0) first; masks are 1 on real tokens.
        """
        input_ids = self.input_ids[indices]
        labels = self.labels[indices]
        source_positions = np.arange(self.input_ids.shape[1], dtype=np.int32)
        target_positions = np.arange(self.labels.shape[1], dtype=np.int32)
        decoder_input_ids = np.empty_like(labels)
        decoder_input_ids[..., 0] = DECODER_START_ID
        decoder_input_ids[..., 1:] = labels[..., :-1]
        return {
            "input_ids": input_ids,
            "attention_mask": (source_positions < self.input_lengths[indices][..., None]).astype(np.int32),
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
            "decoder_attention_mask": (target_positions < self.label_lengths[indices][..., None]).astype(np.int32),
        }


def _check_special_ids(tokenizer) -> None:
    pad = getattr(tokenizer, "pad_token_id", PAD_ID)
    eos = getattr(tokenizer, "eos_token_id", EOS_ID)
    if pad != PAD_ID or eos != EOS_ID:
        raise DataError(
            f"tokenizer {type(tokenizer).__name__}: pad_token_id={pad}, eos_token_id={eos}; "
            f"the T5 batch format needs pad={PAD_ID} and EOS={EOS_ID}"
        )


def _encode(tokenizer, texts: list[str], chunk_size: int) -> list[list[int]]:
    """Token ids of each text (with the tokenizer's special tokens), in batched calls."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), chunk_size):
        chunk = texts[start : start + chunk_size]
        if callable(tokenizer):
            encoded = tokenizer(chunk, add_special_tokens=True)
            ids.extend(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)
        else:
            ids.extend(tokenizer.encode(t) for t in chunk)
    return ids


def _pad_truncate(sequences: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad/truncate to ``[N, length]`` keeping a final EOS; returns (ids, lengths, raw lengths)."""
    # Make every sequence end with EOS (the labels contract; tokenizers without special tokens skip it).
    sequences = [s if s and s[-1] == EOS_ID else [*s, EOS_ID] for s in sequences]
    raw_lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    cut = [s if len(s) <= length else [*s[: length - 1], EOS_ID] for s in sequences]
    lengths = np.minimum(raw_lengths, length).astype(np.int32)
    out = np.zeros((len(cut), length), dtype=np.int32)
    # One vectorised scatter of all tokens into their padded rows.
    out[np.arange(length)[None, :] < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(cut), dtype=np.int32, count=int(lengths.sum())
    )
    return out, lengths, raw_lengths


def truncation_report(raw_input_lengths: np.ndarray, raw_target_lengths: np.ndarray, max_input_length: int,
                      max_target_length: int) -> TruncationReport:
    """The :class:`TruncationReport` of examples with these untruncated lengths (EOS included)."""
    n = len(raw_input_lengths)
    return TruncationReport(
        num_examples=n,
        max_input_length=max_input_length,
        max_target_length=max_target_length,
        inputs_truncated=int((raw_input_lengths > max_input_length).sum()),
        targets_truncated=int((raw_target_lengths > max_target_length).sum()),
        input_length_mean=float(raw_input_lengths.mean()) if n else 0.0,
        input_length_max=int(raw_input_lengths.max()) if n else 0,
        target_length_mean=float(raw_target_lengths.mean()) if n else 0.0,
        target_length_max=int(raw_target_lengths.max()) if n else 0,
    )


def _tokenize(examples: TextExamples, tokenizer, *, prompt_template: str, max_input_length: int,
              max_target_length: int, chunk_size: int) -> tuple[TokenizedExamples, np.ndarray, np.ndarray]:
    """``(tokens, raw input lengths, raw target lengths)`` of ``examples``."""
    if max_input_length < 2 or max_target_length < 2:
        raise DataError(f"max lengths must be >= 2 (got {max_input_length}, {max_target_length})")
    _check_special_ids(tokenizer)
    prompts = format_prompts(prompt_template, examples.inputs)
    input_ids, input_lengths, raw_in = _pad_truncate(_encode(tokenizer, prompts, chunk_size), max_input_length)
    labels, label_lengths, raw_out = _pad_truncate(
        _encode(tokenizer, list(examples.targets), chunk_size), max_target_length
    )
    return TokenizedExamples(input_ids, input_lengths, labels, label_lengths), raw_in, raw_out


def tokenize_examples(
    examples: TextExamples,
    tokenizer,
    *,
    prompt_template: str = DEFAULT_PROMPT,
    max_input_length: int = 512,
    max_target_length: int = 128,
    chunk_size: int = 1024,
) -> tuple[TokenizedExamples, TruncationReport]:
    """Apply the prompt, tokenise inputs and targets, pad/truncate; report truncations.

    ``tokenizer`` is a Hugging Face tokenizer (anything callable on a list of strings that
    returns ``{"input_ids": [...]}``, or with ``encode``) whose pad id is 0 and EOS id is 1.
    """
    tokens, raw_in, raw_out = _tokenize(examples, tokenizer, prompt_template=prompt_template,
                                        max_input_length=max_input_length, max_target_length=max_target_length,
                                        chunk_size=chunk_size)
    return tokens, truncation_report(raw_in, raw_out, max_input_length, max_target_length)


class OnDemandTokens:
    """A split's :class:`TokenizedExamples`, each example tokenised when it is first needed.

    ``tokens`` has the full ``[N, S]`` / ``[N, T]`` shapes from the start (zeros until
    filled), so indices, shapes and every consumer are those of an eagerly tokenised
    split; :meth:`ensure` fills the rows of the examples asked for that are still empty,
    with exactly the ids :func:`tokenize_examples` gives (each example is tokenised on its
    own: the chunking of a batched call does not change a row). A process of a
    multi-process run uses it so that it tokenises only the clients it feeds
    (``docs/distributed.md``). Thread-safe: the round prefetcher and the lineage
    fingerprints may ask at the same time.
    """

    def __init__(self, examples: TextExamples, tokenizer, *, prompt_template: str = DEFAULT_PROMPT,
                 max_input_length: int = 512, max_target_length: int = 128, chunk_size: int = 1024) -> None:
        import threading

        if max_input_length < 2 or max_target_length < 2:
            raise DataError(f"max lengths must be >= 2 (got {max_input_length}, {max_target_length})")
        _check_special_ids(tokenizer)
        format_prompts(prompt_template, [""])  # a bad template fails now, not at the first round
        n = len(examples)
        self.examples = examples
        self._tokenizer = tokenizer
        self._kwargs = dict(prompt_template=prompt_template, max_input_length=max_input_length,
                            max_target_length=max_target_length, chunk_size=chunk_size)
        self.tokens = TokenizedExamples(np.zeros((n, max_input_length), np.int32), np.zeros(n, np.int32),
                                        np.zeros((n, max_target_length), np.int32), np.zeros(n, np.int32))
        self._raw_input = np.full(n, -1, np.int64)   # -1: not tokenised yet
        self._raw_target = np.full(n, -1, np.int64)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def done(self) -> np.ndarray:
        """``[N]`` bool: the example has been tokenised."""
        return self._raw_input >= 0

    def ensure(self, indices: Sequence[int] | np.ndarray) -> None:
        """Tokenises the examples at ``indices`` that are not tokenised yet (in one batched call)."""
        indices = np.unique(np.asarray(indices, np.int64).reshape(-1))
        with self._lock:
            todo = indices[self._raw_input[indices] < 0]
            if todo.size == 0:
                return
            new, raw_in, raw_out = _tokenize(self.examples.select(todo), self._tokenizer, **self._kwargs)
            t = self.tokens
            t.input_ids[todo], t.input_lengths[todo] = new.input_ids, new.input_lengths
            t.labels[todo], t.label_lengths[todo] = new.labels, new.label_lengths
            self._raw_target[todo] = raw_out
            self._raw_input[todo] = raw_in  # last: marks the rows done

    def report(self) -> TruncationReport:
        """The truncation report of the examples tokenised so far."""
        done = self.done
        return truncation_report(self._raw_input[done], self._raw_target[done], self._kwargs["max_input_length"],
                                 self._kwargs["max_target_length"])

    def raw_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """``[N]`` untruncated input and target lengths (-1 where not tokenised yet)."""
        return self._raw_input.copy(), self._raw_target.copy()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes when the tokenizer's vocabulary or special ids change."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    if hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    probe = "summarize: Amanda: hi Tom, 5 pm at the cafe? Ünïcödé 123"
    h.update(json.dumps(_encode(tokenizer, [probe], 1)).encode())
    return h.hexdigest()[:16]


def cached_tokenize(
    examples: TextExamples,
    tokenizer,
    cache_dir: str | pathlib.Path | None,
    **kwargs,
) -> tuple[TokenizedExamples, TruncationReport]:
    """:func:`tokenize_examples`, stored in ``cache_dir`` under a hash of texts, tokenizer and settings."""
    if cache_dir is None:
        return tokenize_examples(examples, tokenizer, **kwargs)
    h = hashlib.sha256()
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(sorted(kwargs.items()), default=str).encode())
    for text in itertools.chain(examples.inputs, examples.targets):
        h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    path = pathlib.Path(cache_dir) / f"tokens-{h.hexdigest()[:24]}.npz"
    if path.exists():
        with np.load(path) as z:
            tokens = TokenizedExamples(z["input_ids"], z["input_lengths"], z["labels"], z["label_lengths"])
            report = TruncationReport(**json.loads(str(z["report"])))
        return tokens, report
    tokens, report = tokenize_examples(examples, tokenizer, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, report=json.dumps(report.as_dict()), **dataclasses.asdict(tokens))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return tokens, report
