"""A SentencePiece tokenizer for the synthetic dialogues, trained once and cached.

The offline default (a tiny T5 on synthetic dialogues) needs a small vocabulary that
fits the synthetic corpus. Training is delegated to
``fedjax_fm.models.tokenizer.train_sentencepiece_tokenizer`` (the project's one
tokenizer trainer); this module only chooses the corpus (prompted dialogues plus
summaries) and caches the result in a directory keyed by its settings.
"""

from __future__ import annotations

import json
import pathlib

from fedjax_fm.data.synthetic import synthetic_examples
from fedjax_fm.data.tokenize import DEFAULT_PROMPT, format_prompts

_MARKER = "fedjax_fm_synthetic_corpus.json"


def synthetic_corpus(num_examples: int = 4000, *, seed: int = 0, prompt_template: str = DEFAULT_PROMPT,
                     **generator_kwargs) -> list[str]:
    """Prompted dialogues and their summaries: the texts a synthetic-data tokenizer must cover."""
    examples = synthetic_examples(num_examples, seed=seed, **generator_kwargs)
    return format_prompts(prompt_template, examples.inputs) + list(examples.targets)


def synthetic_tokenizer(cache_dir: str | pathlib.Path, *, vocab_size: int = 512, num_examples: int = 4000,
                        seed: int = 0, prompt_template: str = DEFAULT_PROMPT):
    """Load the cached synthetic-corpus tokenizer from ``cache_dir``, training it first if absent.

    The directory is reused only when it was trained with the same settings (recorded in
    a marker file); otherwise a subdirectory per setting keeps several side by side.
    """
    try:
        from fedjax_fm.models.tokenizer import load_tokenizer, train_sentencepiece_tokenizer
    except ImportError as err:  # pragma: no cover - depends on the models package state
        raise ImportError(
            "fedjax_fm.models.tokenizer (train_sentencepiece_tokenizer, load_tokenizer) is needed "
            f"to build the synthetic tokenizer: {err}"
        ) from err
    settings = {"vocab_size": vocab_size, "num_examples": num_examples, "seed": seed, "prompt_template": prompt_template}
    out_dir = pathlib.Path(cache_dir) / f"synthetic-sp{vocab_size}-n{num_examples}-s{seed}"
    marker = out_dir / _MARKER
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return load_tokenizer(str(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = synthetic_corpus(num_examples, seed=seed, prompt_template=prompt_template)
    train_sentencepiece_tokenizer(corpus, str(out_dir), vocab_size)
    marker.write_text(json.dumps(settings))
    return load_tokenizer(str(out_dir))
