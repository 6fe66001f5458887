"""Per-client quality: the global model on each client's own held-out examples.

With ``eval.per_client_every: k`` a run takes a seeded ``eval.per_client_fraction``
of each client's examples out of its training data (at least one, and never the
client's last one; a client with a single example has no held-out set and is listed
in ``skipped``)::

    order_c  = default_rng([seed, 13, c]).permutation(n_c)
    held_c   = indices_c[sort(order_c[:m_c])],  m_c = min(max(1, round(f · n_c)), n_c - 1)
    train_c  = the rest

Every ``k`` rounds and after the last, each client's held-out set is evaluated
(loss and ROUGE of greedy generations, :class:`fedjax_fm.eval.Evaluator` with one
compiled loss and generator for all clients) and summarised over clients with
:func:`fedjax_fm.eval.per_client.per_client_summary`: mean, worst decile (mean of
the worst ⌈m/10⌉ clients), population std, and the per-client table. With a single
client every statistic equals the pooled evaluation of its held-out examples (tested).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional

import numpy as np

from fedjax_fm.data.batching import eval_batches
from fedjax_fm.data.federated import FederatedData
from fedjax_fm.data.tokenize import TokenizedExamples
from fedjax_fm.eval.evaluate import Evaluator
from fedjax_fm.eval.per_client import per_client_summary

# metrics.jsonl fields (null except in per-client evaluation rounds); appended to METRIC_FIELDS.
PER_CLIENT_FIELDS = (
    "client_rougeL_mean", "client_rougeL_worst_decile", "client_rougeL_std",
    "client_eval_loss_mean", "client_eval_loss_worst_decile", "client_eval_loss_std", "per_client",
)
_HOLDOUT_STREAM = 13


def hold_out_client_examples(data: FederatedData, fraction: float, seed: int) -> tuple[FederatedData, list[np.ndarray]]:
    """``(data without the held-out examples, held-out train-token indices per client)`` (module docstring)."""
    train, held = [], []
    for c, indices in enumerate(data.partition.client_indices):
        indices = np.asarray(indices)
        n = len(indices)
        m = min(max(1, int(round(fraction * n))), n - 1)
        order = np.random.default_rng([seed, _HOLDOUT_STREAM, c]).permutation(n)
        held.append(indices[np.sort(order[:m])])
        train.append(indices[np.sort(order[m:])])
    partition = dataclasses.replace(data.partition, client_indices=train)
    largest = max(len(i) for i in train)
    reduced = dataclasses.replace(data, partition=partition, steps_per_round=data.local_work.steps_per_round(largest))
    return reduced, held


def _subset(tokens: TokenizedExamples, indices: np.ndarray) -> TokenizedExamples:
    return TokenizedExamples(tokens.input_ids[indices], tokens.input_lengths[indices], tokens.labels[indices],
                             tokens.label_lengths[indices])


class PerClientEvaluator:
    """``evaluator(variables) -> dict`` of the per-client figures (``PER_CLIENT_FIELDS``)."""

    def __init__(self, base: Evaluator, data: FederatedData, held_out: list[np.ndarray], targets: list[str]):
        """``base``: the run's evaluator (its compiled loss and generator are reused);
        ``targets``: reference texts of the training examples, by train-token index."""
        self.client_ids = list(data.client_ids)
        self.num_held_out = {cid: int(len(h)) for cid, h in zip(self.client_ids, held_out)}
        self.skipped = [cid for cid, h in zip(self.client_ids, held_out) if len(h) == 0]
        batch_size = min(base.batches[0]["input_ids"].shape[0], max(len(h) for h in held_out))
        self.evaluators: dict[str, Evaluator] = {}
        import jax.numpy as jnp

        for cid, indices in zip(self.client_ids, held_out):
            if len(indices) == 0:
                continue
            batches, references = [], []
            for batch in eval_batches(_subset(data.train_tokens, indices), [targets[i] for i in indices], batch_size):
                refs = batch.pop("references")
                batch.pop("ids", None)
                references += [r for r, w in zip(refs, batch["example_weight"]) if w > 0]
                batches.append({k: jnp.asarray(v) for k, v in batch.items()})
            evaluator = copy.copy(base)  # shares the compiled functions: one compile for all clients
            evaluator.batches, evaluator.references = batches, references
            self.evaluators[cid] = evaluator

    def evaluate(self, variables: Any) -> dict[str, Any]:
        results = {cid: ev(variables) for cid, ev in self.evaluators.items()}
        return summarize({cid: r.rouge["rougeL"] for cid, r in results.items()},
                         {cid: r.eval_loss for cid, r in results.items()}, self.num_held_out)


def summarize(rouge_l: dict[str, float], eval_loss: dict[str, float], num_examples: dict[str, int]) -> dict[str, Any]:
    """The row fields from per-client ROUGE-L and loss (ROUGE-L: higher is better; loss: lower)."""
    n = {c: num_examples[c] for c in rouge_l}
    rouge = per_client_summary(rouge_l, n, metric="rougeL", higher_is_better=True)
    loss = per_client_summary(eval_loss, n, metric="eval_loss", higher_is_better=False)
    table = [{"client": c, "num_eval_examples": n[c], "rougeL": rouge_l[c], "eval_loss": eval_loss[c]}
             for c in (row["client"] for row in rouge.table)]  # worst ROUGE-L first
    return {
        "client_rougeL_mean": rouge.mean, "client_rougeL_worst_decile": rouge.worst_decile,
        "client_rougeL_std": rouge.std, "client_eval_loss_mean": loss.mean,
        "client_eval_loss_worst_decile": loss.worst_decile, "client_eval_loss_std": loss.std,
        "per_client": table,
    }


def last_per_client(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """summary.json's ``per_client``: the last per-client evaluation's figures (None if there was none)."""
    for row in reversed(rows):
        if row.get("per_client") is not None:
            return {"round": row["round"], **{k: row[k] for k in PER_CLIENT_FIELDS}}
    return None
