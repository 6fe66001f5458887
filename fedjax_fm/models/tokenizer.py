"""Tokenizers: load a Hugging Face one, or train a small T5-compatible SentencePiece model offline.

FLAN-T5 uses a SentencePiece *unigram* model (Kudo 2018) with fixed special ids:
``<pad>`` = 0 (also the decoder start token), ``</s>`` = 1 (appended to every encoded
text), ``<unk>`` = 2, no BOS. Sentinels ``<extra_id_0..n-1>`` are appended after the
pieces in reverse order (``<extra_id_0>`` gets the highest id), which is what
transformers' ``T5Tokenizer`` does with ``extra_ids=n``.

The unigram model picks the vocabulary ``V`` (|V| = ``vocab_size``) and piece
probabilities ``p`` maximising the corpus likelihood
``sum_s log sum_{x in S(s)} prod_i p(x_i)`` over segmentations ``S(s)`` of each
sentence, by EM and pruning of the pieces whose removal costs least likelihood;
encoding takes the Viterbi segmentation ``argmax_x prod_i p(x_i)``.

``train_sentencepiece_tokenizer`` is what the offline demo and the tests use: no
download, a few seconds on a laptop, byte-identical output for the same corpus and
settings (one trainer thread, fixed seed, no sentence sampling).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPIECE_FILE = "spiece.model"

# Files that make a directory loadable by transformers' AutoTokenizer / T5Tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "vocab.json", "sentencepiece.bpe.model")


def load_tokenizer(name_or_dir: str | os.PathLike[str], **kwargs: Any):
    """A Hugging Face tokenizer from a local directory or a Hub id (``AutoTokenizer``).

    Raises ``FileNotFoundError`` naming the directory when it holds no tokenizer
    files, or when the Hub cannot be reached for a non-local name; ``ImportError``
    when transformers is not installed.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as err:  # pragma: no cover - transformers is a dependency
        raise ImportError("load_tokenizer needs `transformers` (pip install transformers sentencepiece)") from err
    text = os.fspath(name_or_dir)
    path = Path(text).expanduser()
    if path.is_dir():
        found = [name for name in _TOKENIZER_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"no tokenizer files in '{path}' (expected one of {list(_TOKENIZER_FILES)}); "
                "train one with train_sentencepiece_tokenizer(...) or save one with tokenizer.save_pretrained(dir)"
            )
        try:
            return AutoTokenizer.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"could not load the tokenizer in '{path}' (files {found}): {err}") from err
    if path.exists() or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer directory not found: '{path}'")
    try:
        return AutoTokenizer.from_pretrained(text, **kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"'{text}' is not a local directory and could not be loaded from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). If you are offline, "
            "pass a local tokenizer directory (in a run: model.tokenizer, or model.name for a local checkpoint "
            "that holds its tokenizer files)."
        ) from err


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Each non-empty line of each text: dialogues are multi-line, and SentencePiece
    silently drops "sentences" longer than its max_sentence_length."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        for line in text.splitlines():
            line = line.strip()
            if line:
                yield line


def train_sentencepiece_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 512,
    *,
    extra_ids: int = 0,
    character_coverage: float = 1.0,
    model_max_length: int = 512,
    seed: int = 0,
):
    """Trains a T5-compatible SentencePiece unigram tokenizer and returns it loaded.

    Args:
      texts: the corpus (each text is split into lines; empty lines are skipped).
      out_dir: written with ``spiece.model``, ``tokenizer_config.json`` and
        ``special_tokens_map.json``: a directory that ``AutoTokenizer`` /
        ``T5Tokenizer.from_pretrained`` (and ``load_tokenizer``) read.
      vocab_size: total size of the tokenizer, sentinels included (so it can equal
        the model's ``vocab_size``). A corpus too small for that many pieces gives
        fewer: check ``len(tokenizer)``, which never exceeds ``vocab_size``.
      extra_ids: number of ``<extra_id_*>`` sentinels (100 in FLAN-T5; only span
        corruption needs them, so 0 by default leaves the whole budget to real pieces).
      character_coverage: fraction of characters covered by single-character pieces;
        1.0 keeps every character of the corpus (the rest map to ``<unk>``).
      model_max_length: recorded in ``tokenizer_config.json``.
      seed: SentencePiece's random seed (training is single-threaded, so the same
        corpus + settings give a byte-identical ``spiece.model``).

    Returns a transformers ``T5Tokenizer``: pad 0, eos 1 (appended on encode), unk 2.
    """
    import sentencepiece as spm

    num_pieces = vocab_size - extra_ids
    if extra_ids < 0 or num_pieces <= 3:
        raise ValueError(
            f"vocab_size={vocab_size} leaves {num_pieces} pieces after {extra_ids} sentinels; "
            "need more than the 3 special pieces"
        )
    sentences = list(_sentences(texts))
    if not sentences:
        raise ValueError("train_sentencepiece_tokenizer got no non-empty text to train on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="unigram",
            vocab_size=num_pieces,
            hard_vocab_limit=False,  # a small corpus gives fewer pieces instead of failing
            character_coverage=character_coverage,
            normalization_rule_name="nmt_nfkc",  # as in T5's spiece.model
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            input_sentence_size=0,  # use every sentence: sampling would make output depend on the RNG
            max_sentence_length=1 << 16,
            num_threads=1,  # EM statistics summed in a fixed order -> byte-identical model
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(
            f"SentencePiece training for '{out_dir}' failed ({err}); with a small vocab_size try a "
            "larger one or character_coverage < 1.0"
        ) from err
    (out_dir / SPIECE_FILE).write_bytes(model.getvalue())

    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": sentinels}
    tokenizer_config = {
        "tokenizer_class": "T5Tokenizer",
        "extra_ids": extra_ids,
        "model_max_length": model_max_length,
        **special,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", special)
    return load_tokenizer(out_dir)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


__all__ = ["EOS_ID", "PAD_ID", "UNK_ID", "load_tokenizer", "train_sentencepiece_tokenizer"]
