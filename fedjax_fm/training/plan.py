"""``fedjax-fm run CONFIG --dry-run``: validate a config, resolve its data and print the plan.

Nothing is trained and nothing is written to the run directory: a trained tokenizer
goes to a temporary folder, and the model's parameters are shapes only
(``jax.eval_shape``), so even flan-t5-xl plans in seconds. The plan says what one
round will cost before a single step runs:

* clients: the population, how many a round samples, local steps × batch;
* tokens per round: the real (non-padding) tokens of round 1's sampled clients, and
  the share of the batch slots they fill;
* bytes per round: each sampled client downloads the trainable parameters and uploads
  a delta of the same shapes (LoRA: only the adapters travel);
* the data report: partition sizes and truncation counts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from fedjax_fm import fl
from fedjax_fm.config import ExperimentConfig
from fedjax_fm.models import lora as lora_lib
from fedjax_fm.models.t5 import init_params
from fedjax_fm.training import builders


def parameter_shapes(cfg: ExperimentConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainable, frozen)`` as ``jax.ShapeDtypeStruct`` trees, without building any array.

    A pretrained model needs its ``config.json`` locally (a hub name is not resolved here).
    """
    config = builders.model_config(cfg)
    key = jax.random.PRNGKey(cfg.seed)
    params = jax.eval_shape(lambda k: init_params(config, k), key)
    variables: dict[str, Any] = {"params": params}
    if cfg.lora is not None:
        variables["lora"] = jax.eval_shape(lambda p: lora_lib.init_lora(p, cfg.lora, key), params)
    return fl.split_variables(variables, fl.trainable_collections(cfg.lora is not None))


def plan_run(cfg: ExperimentConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """Builds the data and the parameter shapes of ``cfg``, and returns (and says) the plan."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = builders.build_tokenizer(cfg, Path(scratch), lambda: builders.training_texts(cfg))
        data = builders.build_data(cfg, tokenizer)
    trainable, frozen = parameter_shapes(cfg)
    count = lambda tree: int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))  # noqa: E731
    f = cfg.federated
    ids = fl.sample_clients(cfg.seed, 0, data.num_clients, f.clients_per_round)
    batches = data.clients_round_batches([int(i) for i in ids], 0)
    weight = np.asarray(batches["example_weight"])[..., None]
    real = float(np.sum(batches["attention_mask"] * weight) + np.sum(batches["decoder_attention_mask"] * weight))
    slots = float(batches["attention_mask"].size + batches["decoder_attention_mask"].size)
    trainable_bytes = fl.tree_nbytes(trainable)
    plan = {
        "model": cfg.model.name,
        "mode": f"lora(r={cfg.lora.rank})" if cfg.lora else "full",
        "num_params": count(trainable) + count(frozen),
        "num_trainable_params": count(trainable),
        "clients": data.num_clients,
        "clients_per_round": f.clients_per_round,
        "rounds": f.rounds,
        "local_steps": data.steps_per_round,
        "batch_size": data.batch_size,
        "source_length": int(batches["input_ids"].shape[-1]),
        "target_length": int(batches["labels"].shape[-1]),
        "tokens_round_1": real,
        "slot_fill_round_1": real / slots if slots else None,
        "bytes_up_per_round": trainable_bytes * f.clients_per_round,
        "bytes_down_per_round": trainable_bytes * f.clients_per_round,
        "data": data.report(),
    }
    say(f"plan: {plan['model']} {plan['mode']}, {plan['num_trainable_params']:,} trainable of "
        f"{plan['num_params']:,} parameters")
    say(f"  {plan['clients']} clients, {plan['clients_per_round']} per round, {plan['rounds']} rounds; "
        f"{plan['local_steps']} local steps of {plan['batch_size']} x ({plan['source_length']} + "
        f"{plan['target_length']}) tokens")
    say(f"  round 1: {real:,.0f} real tokens ({100 * (plan['slot_fill_round_1'] or 0):.0f}% of the batch slots); "
        f"{plan['bytes_up_per_round'] / 1e6:.3f} MB up and {plan['bytes_down_per_round'] / 1e6:.3f} MB down "
        f"per round ({cfg.energy.network} network model)")
    t = plan["data"]["truncation"]["train"]
    say(f"  truncation (train): {t['inputs_truncated']} of {t['num_examples']} inputs longer than "
        f"{t['max_input_length']} tokens, {t['targets_truncated']} targets longer than {t['max_target_length']}")
    return plan
