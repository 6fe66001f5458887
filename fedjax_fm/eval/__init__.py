"""Evaluation: ROUGE (Hugging Face ``evaluate`` convention), held-out token loss, per-client summaries."""

from fedjax_fm.eval.evaluate import EvalResult, Evaluator
from fedjax_fm.eval.per_client import PerClientSummary, per_client_summary
from fedjax_fm.eval.rouge import ROUGE_KEYS, rouge_scores, split_sentences

__all__ = [
    "ROUGE_KEYS",
    "EvalResult",
    "Evaluator",
    "PerClientSummary",
    "per_client_summary",
    "rouge_scores",
    "split_sentences",
]
