"""Evaluation: ROUGE (Hugging Face ``evaluate`` convention) and held-out token loss."""

from fedjax_fm.eval.evaluate import EvalResult, Evaluator
from fedjax_fm.eval.rouge import ROUGE_KEYS, rouge_scores, split_sentences

__all__ = ["ROUGE_KEYS", "EvalResult", "Evaluator", "rouge_scores", "split_sentences"]
