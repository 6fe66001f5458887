"""Held-out evaluation of a model: token loss and ROUGE of greedy generations.

For evaluation batches ``b = 1..N`` (fixed shapes; padding examples have weight 0)

    eval_loss = Σ_b Σ_{i,t} m_{b,i,t} · nll_{b,i,t} / Σ_b Σ_{i,t} m_{b,i,t}

with the training loss's mask ``m = decoder_attention_mask · example_weight`` —
the mean cross-entropy over every real reference token of the set (not a mean of
batch means, which would over-weight short batches).

ROUGE (see :mod:`fedjax_fm.eval.rouge`) compares the greedy generation for each
real example (decoded, special tokens skipped) with its reference text. The loss
and the generation are separate compiled functions, each compiled once per batch
width for the run (the run's batches are sorted by length and cut to a few widths,
``data.eval_batches(by_length=True)``; ROUGE and the loss are means over examples
and tokens, so the order of the batches does not change them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.eval.rouge import rouge_scores

Batch = Mapping[str, Any]
# (variables, batch) -> (mean loss over the batch's masked tokens, number of masked tokens)
LossFn = Callable[[Any, Batch], tuple[jax.Array, jax.Array]]
# (variables, input_ids, attention_mask) -> generated token ids [B, max_new_tokens]
GenerateFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# token ids of one example -> text
DecodeFn = Callable[[Sequence[int]], str]


@dataclasses.dataclass
class EvalResult:
    eval_loss: float
    rouge: dict[str, float]
    predictions: list[str]
    references: list[str]
    tokens: int  # tokens generated, summed over real examples (up to and including EOS)

    def metrics(self) -> dict[str, float]:
        return {"eval_loss": self.eval_loss, **self.rouge}


def trim_generated(ids: np.ndarray, eos_id: int, pad_id: int) -> list[int]:
    """Generated ids up to (not including) the first EOS, without padding."""
    out = []
    for token in ids.tolist():
        if token == eos_id:
            break
        if token != pad_id:
            out.append(int(token))
    return out


class Evaluator:
    """Evaluates variables on fixed batches: ``evaluator(variables) -> EvalResult``.

    Args:
      loss_fn: ``(variables, batch) -> (mean_loss, num_tokens)``, e.g. ``models.loss.batch_loss``
        with the model bound; jit-compiled here.
      generate_fn: ``(variables, input_ids, attention_mask) -> ids [B, L]`` (already compiled).
      decode_fn: token ids -> text.
      batches: evaluation batches in the project's batch format.
      references: reference texts of the real examples, in batch order.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        generate_fn: GenerateFn,
        decode_fn: DecodeFn,
        batches: Sequence[Batch],
        references: Sequence[str],
        *,
        eos_id: int = 1,
        pad_id: int = 0,
    ) -> None:
        real = sum(int(np.sum(np.asarray(b["example_weight"]) > 0)) for b in batches)
        if real != len(references):
            raise ValueError(f"evaluation batches hold {real} real examples but {len(references)} references were given")
        if not batches:
            raise ValueError("no evaluation batches")
        self._loss = jax.jit(loss_fn)
        self._generate = generate_fn
        self._decode = decode_fn
        self.batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
        self.references = list(references)
        self.eos_id, self.pad_id = eos_id, pad_id

    def __call__(self, variables: Any) -> EvalResult:
        loss_sum, token_count = 0.0, 0.0
        predictions: list[str] = []
        generated_tokens = 0
        for batch in self.batches:
            mean, count = self._loss(variables, batch)
            ids = self._generate(variables, batch["input_ids"], batch["attention_mask"])
            mean, count, ids = jax.device_get((mean, count, ids))
            loss_sum += float(mean) * float(count)
            token_count += float(count)
            weights = np.asarray(batch["example_weight"])
            for row, weight in zip(np.asarray(ids), weights):
                if weight > 0:
                    trimmed = trim_generated(row, self.eos_id, self.pad_id)
                    generated_tokens += len(trimmed) + 1
                    predictions.append(self._decode(trimmed))
        eval_loss = loss_sum / max(token_count, 1.0)
        return EvalResult(
            eval_loss=eval_loss,
            rouge=rouge_scores(predictions, self.references),
            predictions=predictions,
            references=self.references,
            tokens=generated_tokens,
        )
