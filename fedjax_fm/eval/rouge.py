"""ROUGE for summarisation, in the Hugging Face ``evaluate`` convention.

For each (prediction, reference) pair, ``rouge_score`` (Lin 2004; Google's
reimplementation) gives F-measures

    ROUGE-N F = 2·P·R / (P + R),  P = |ngrams(pred) ∩ ngrams(ref)| / |ngrams(pred)|,
                                   R = |ngrams(pred) ∩ ngrams(ref)| / |ngrams(ref)|

(clipped multiset intersection), ROUGE-L the same with the longest common
subsequence in place of the n-gram overlap, and ROUGE-Lsum the summary-level LCS
over sentences (union-LCS of each reference sentence against all prediction
sentences). Tokens are lower-cased alphanumeric runs, Porter-stemmed
(``use_stemmer=True``).

Reported scores are the **mean F-measure over examples × 100**. (``evaluate``'s
default bootstrap aggregator reports a resampled median of means, which is random;
the plain mean is its deterministic centre and is what ``use_aggregator=False``
followed by a mean gives.)

ROUGE-Lsum needs sentences separated by newlines; as the Hugging Face
summarisation examples do (with ``nltk.sent_tokenize``), texts are split into
sentences before scoring — here by a punctuation rule (``. ! ?`` followed by
space), which needs no downloaded NLTK data.
"""

from __future__ import annotations

import re
from typing import Sequence

from rouge_score import rouge_scorer

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """Puts each sentence on its own line (for ROUGE-Lsum); existing newlines stay."""
    lines = []
    for line in text.strip().splitlines():
        lines.extend(s for s in _SENTENCE_END.split(line.strip()) if s)
    return "\n".join(lines)


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures × 100 over aligned prediction/reference pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("ROUGE of an empty evaluation set is undefined")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(split_sentences(reference), split_sentences(prediction))
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * total / len(predictions) for key, total in totals.items()}
