"""Builds the pieces of a run from its config: tokenizer, data, model, algorithm, meter.

Each function is a thin adapter from one config section to the API of the package
that owns the piece (``models``, ``data``, ``fl``, ``energy``), so that the rounds
loop in :mod:`fedjax_fm.experiment` reads as the algorithm and nothing else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from fedjax_fm.config import ConfigError, ExperimentConfig

# fold_in tags of the seed's independent random streams. Client training keys are
# fold_in(fold_in(PRNGKey(seed), round), client) with round < 2^31; these tags are
# folded into PRNGKey(seed) too, so they are chosen as values no round reaches.
MODEL_INIT_STREAM = 0xF0DE_0001
LORA_INIT_STREAM = 0xF0DE_0002


def jnp_dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def is_preset(name: str) -> bool:
    from fedjax_fm.models.config import PRESETS

    return name.removeprefix("google/") in PRESETS


def wants_pretrained(cfg: ExperimentConfig) -> bool:
    """Whether the base weights are loaded (``model.init``; ``auto`` = all but ``tiny``)."""
    if cfg.model.init != "auto":
        return cfg.model.init == "pretrained"
    return cfg.model.name != "tiny"


# ------------------------------------------------------------------------ tokenizer


def tokenizer_mode(cfg: ExperimentConfig) -> str:
    mode = cfg.model.tokenizer
    if mode == "auto":
        return "train-sentencepiece" if cfg.model.name == "tiny" else cfg.model.name
    return mode


def build_tokenizer(cfg: ExperimentConfig, out_dir: Path, training_texts: Callable[[], list[str]]) -> Any:
    """The run's tokenizer (pad 0, EOS 1).

    ``train-sentencepiece`` trains a unigram SentencePiece model of the model's
    vocabulary size on the run's training texts (prompted inputs + targets) and keeps
    it in ``DIR/tokenizer/`` — a resumed run loads that copy, so its token ids are the
    ones the checkpoint was trained on. ``byt5`` needs no files; anything else is a
    local tokenizer directory or a hub name.
    """
    from fedjax_fm.models.tokenizer import load_tokenizer, train_sentencepiece_tokenizer

    mode = tokenizer_mode(cfg)
    if mode == "train-sentencepiece":
        directory = out_dir / "tokenizer"
        if (directory / "spiece.model").is_file():
            return load_tokenizer(directory)
        vocab = cfg.model.vocab_size or (model_config(cfg).vocab_size if not wants_pretrained(cfg) else None)
        if vocab is None:
            raise ConfigError("model.tokenizer 'train-sentencepiece' with a pretrained model needs model.vocab_size")
        return train_sentencepiece_tokenizer(training_texts(), directory, vocab, seed=cfg.seed)
    if mode == "byt5":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    return load_tokenizer(mode)


# ---------------------------------------------------------------------------- model


def _runtime(cfg: ExperimentConfig) -> dict[str, Any]:
    return dict(dtype=jnp_dtype(cfg.model.dtype), param_dtype=jnp_dtype(cfg.model.param_dtype), remat=cfg.model.remat)


def model_config(cfg: ExperimentConfig):
    """The :class:`T5Config` of a randomly initialised model: a preset (+ ``vocab_size``) or
    the ``config.json`` of a local directory. (Pretrained models bring their own.)"""
    from fedjax_fm.models.config import preset

    name = cfg.model.name
    if is_preset(name):
        overrides = _runtime(cfg)
        if cfg.model.vocab_size is not None:
            overrides["vocab_size"] = cfg.model.vocab_size
        return preset(name, **overrides)
    if not Path(name).is_dir():
        raise ConfigError(
            f"model.name={name!r} is neither a preset nor a local directory; a hub model needs "
            "model.init 'pretrained' (or 'auto')"
        )
    from fedjax_fm.models.hf_io import read_config

    config = read_config(name, **_runtime(cfg))
    return config if cfg.model.vocab_size is None else config.replace(vocab_size=cfg.model.vocab_size)


def lora_config(cfg: ExperimentConfig):
    from fedjax_fm.models.config import LoraConfig

    if cfg.lora is None:
        return None
    return LoraConfig(
        rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=tuple(cfg.lora.target_modules)
    )


def build_model(cfg: ExperimentConfig, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """``(model, variables)`` with ``variables = {"params": base}`` plus ``"lora"`` adapters.

    Pretrained weights come from ``hf_io.from_pretrained`` (a local directory or a hub
    id); otherwise the architecture is initialised from ``fold_in(PRNGKey(seed), tag)``.
    LoRA adapters are always fresh (``A`` random from the seed, ``B = 0``).
    """
    from fedjax_fm.models.t5 import T5, init_params

    seed_key = jax.random.PRNGKey(cfg.seed)
    lora = lora_config(cfg)
    if wants_pretrained(cfg):
        from fedjax_fm.models.hf_io import from_pretrained

        runtime = _runtime(cfg)
        model, params = from_pretrained(
            cfg.model.name, dtype=runtime["dtype"], param_dtype=runtime["param_dtype"], remat=cfg.model.remat, lora=lora
        )
        if cfg.model.vocab_size is not None and cfg.model.vocab_size != model.config.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} differs from the pretrained model's "
                f"{model.config.vocab_size} ({cfg.model.name}); leave it unset"
            )
    else:
        config = model_config(cfg)
        model = T5(config, lora=lora)
        params = init_params(config, jax.random.fold_in(seed_key, MODEL_INIT_STREAM))
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
            f"{model.config.vocab_size} (model.vocab_size)"
        )
    variables: dict[str, Any] = {"params": params}
    if lora is not None:
        from fedjax_fm.models import lora as lora_lib

        variables["lora"] = lora_lib.init_lora(params, lora, jax.random.fold_in(seed_key, LORA_INIT_STREAM))
    return model, variables


# ----------------------------------------------------------------------------- data


def data_spec(cfg: ExperimentConfig):
    """The data package's :class:`DataSpec` from the ``data``, ``federated`` and ``eval`` sections."""
    from fedjax_fm.data.federated import DataSpec

    return DataSpec(
        source=cfg.data.source,
        partition=cfg.data.partition,
        prompt_template=cfg.data.prompt_template,
        max_input_length=cfg.data.max_input_length,
        max_target_length=cfg.data.max_target_length,
        batch_size=cfg.federated.batch_size,
        local_steps=None if cfg.federated.local_epochs is not None else cfg.federated.local_steps,
        local_epochs=cfg.federated.local_epochs,
        eval_batch_size=cfg.eval.batch_size,
        cache_dir=cfg.data.cache_dir,
    )


def training_texts(cfg: ExperimentConfig) -> list[str]:
    """Prompted training inputs and targets: the corpus a trained tokenizer must cover."""
    from fedjax_fm.data.federated import load_source
    from fedjax_fm.data.tokenize import format_prompts

    train, _ = load_source(cfg.data.source, seed=cfg.seed)
    return format_prompts(cfg.data.prompt_template, train.inputs) + list(train.targets)


def build_data(cfg: ExperimentConfig, tokenizer: Any):
    from fedjax_fm.data.federated import build_federated_data

    data = build_federated_data(data_spec(cfg), tokenizer, seed=cfg.seed, num_clients=cfg.federated.num_clients)
    if data.num_clients < cfg.federated.clients_per_round:
        raise ConfigError(
            f"federated.clients_per_round={cfg.federated.clients_per_round} but the data has only "
            f"{data.num_clients} clients"
        )
    return data


# ------------------------------------------------------------------------ algorithm


def server_optimizer_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    """The keyword arguments of ``fl.server_optimizer(name, ...)`` that the named optimiser takes."""
    s = cfg.federated.server_optimizer
    adaptive = dict(learning_rate=s.learning_rate, b1=s.b1, b2=s.b2, tau=s.tau, variant=s.variant)
    return {
        "fedavg": dict(learning_rate=s.learning_rate),
        "fedavgm": dict(learning_rate=s.learning_rate, momentum=s.momentum),
        "fedadam": adaptive,
        "fedadamw": dict(adaptive, weight_decay=s.weight_decay),
        "fedyogi": adaptive,
        "fedadagrad": dict(learning_rate=s.learning_rate, b1=s.b1, tau=s.tau, variant=s.variant),
    }[s.name]


def local_optimizer(cfg: ExperimentConfig):
    import optax

    from fedjax_fm import fl

    o = cfg.federated.local_optimizer
    kwargs: dict[str, Any] = {"learning_rate": o.learning_rate}
    if o.name == "adamw":
        kwargs["weight_decay"] = o.weight_decay
    if o.name == "sgd" and o.momentum is not None:
        kwargs["momentum"] = o.momentum
    opt = fl.client_optimizer(o.name, **kwargs)
    if o.grad_clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
    return opt


def executor(cfg: ExperimentConfig):
    from fedjax_fm import fl

    return {"sequential": fl.Sequential, "vmap": fl.Vmapped, "sharded": fl.Sharded}[cfg.federated.backend]()


def uses_dropout(cfg: ExperimentConfig, model: Any) -> bool:
    return bool(model.config.dropout_rate > 0 or (cfg.lora is not None and cfg.lora.dropout > 0))


def build_algorithm(cfg: ExperimentConfig, model: Any):
    """The :class:`fl.FederatedAlgorithm`: client AdamW (etc.) on the seq2seq loss, the server optimiser."""
    from fedjax_fm import fl
    from fedjax_fm.fl.t5_task import t5_loss_fn

    # Without any dropout the loss is deterministic and cheaper (no dropout masks).
    loss_fn = t5_loss_fn(model, dropout=uses_dropout(cfg, model))
    client_update = fl.make_client_update(loss_fn, local_optimizer(cfg))
    server_opt = fl.server_optimizer(cfg.federated.server_optimizer.name, **server_optimizer_kwargs(cfg))
    return fl.FederatedAlgorithm(
        client_update,
        server_opt,
        fl.make_aggregator("examples", min_clients=cfg.federated.min_clients),
        executor(cfg),
    )


# ----------------------------------------------------------------------- evaluation


def build_evaluator(cfg: ExperimentConfig, model: Any, tokenizer: Any, data: Any):
    from fedjax_fm.eval.evaluate import Evaluator
    from fedjax_fm.models.generate import generate
    from fedjax_fm.models.loss import batch_loss

    batches, references = [], []
    for batch in data.eval_batches(cfg.eval.batch_size, cfg.eval.max_examples):
        refs = batch.pop("references")
        batch.pop("ids", None)
        references += [r for r, w in zip(refs, batch["example_weight"]) if w > 0]
        batches.append(batch)

    def loss_fn(variables, batch):
        return batch_loss(model, variables, batch)

    def generate_fn(variables, input_ids, attention_mask):
        return generate(model, variables, input_ids, attention_mask, max_new_tokens=cfg.eval.max_new_tokens,
                        num_beams=cfg.eval.num_beams, length_penalty=cfg.eval.length_penalty)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    return Evaluator(loss_fn, generate_fn, decode, batches, references,
                     eos_id=model.config.eos_token_id, pad_id=model.config.pad_token_id)


# --------------------------------------------------------------------------- energy


@dataclasses.dataclass
class EnergySetup:
    meter: Any
    label: str
    is_estimate: bool
    network: Any  # a network profile, or None when unknown


def build_energy(cfg: ExperimentConfig, log: Callable[[str], None]) -> EnergySetup:
    from fedjax_fm.energy.backend import detect_backend, source_label
    from fedjax_fm.energy.meter import Meter

    detection = detect_backend(cfg.energy.backend, constant_watts=cfg.energy.watts, log=None)
    for line in detection.describe().splitlines():
        log(line)
    peak = _device_peak_flops(cfg, log)
    meter = Meter(detection.backend, interval_s=cfg.energy.sample_interval_s, peak_flops=peak)
    label = source_label(detection.backend)
    return EnergySetup(meter=meter, label=label, is_estimate=cfg.energy.backend == "constant" or "estimate" in label,
                       network=_network_profile(cfg, log))


def _device_peak_flops(cfg: ExperimentConfig, log: Callable[[str], None]) -> Optional[float]:
    """The device's peak FLOP/s for MFU: ``energy.peak_flops``, the known-device table, or a cached measurement."""
    from fedjax_fm.energy.peaks import resolve_peak

    peak = resolve_peak(jnp_dtype(cfg.model.dtype), explicit=cfg.energy.peak_flops)
    if peak is None:
        log("MFU: peak FLOP/s of this device unknown (set energy.peak_flops, or measure it once with "
            "`fedjax-fm bench peak`); mfu is null")
        return None
    log(f"MFU against {peak.flops_per_s:.3g} FLOP/s ({peak.device}, {peak.dtype}, {peak.source})")
    return peak.flops_per_s


def _network_profile(cfg: ExperimentConfig, log: Callable[[str], None]) -> Any:
    from fedjax_fm.energy.comm import load_network_profiles

    profiles = load_network_profiles()
    if cfg.energy.network not in profiles:
        import difflib

        close = difflib.get_close_matches(cfg.energy.network, list(profiles), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"energy.network: {cfg.energy.network!r} is not a known network profile; valid: "
            f"{', '.join(sorted(profiles))}{hint}"
        )
    return profiles[cfg.energy.network]


def train_step_flops(cfg: ExperimentConfig, model: Any, data: Any) -> Optional[float]:
    """Analytic model FLOPs of one local step on the run's static batch shape."""
    from fedjax_fm.models.flops import train_step_flops as count

    shapes = data.batch_shapes()
    _, batch, source_len = shapes["input_ids"]
    target_len = shapes["labels"][2]
    return float(count(model.config, batch, source_len, target_len, lora=lora_config(cfg)).total)


def communication(network: Any, bytes_up_per_client: int, bytes_down_per_client: int, clients: int):
    """The round's :class:`fedjax_fm.energy.comm.CommCost`: clients on parallel links, each
    moving the same payload (T_comm = the slowest client's, joules summed)."""
    from fedjax_fm.energy.comm import client_comm_cost, round_comm_cost

    cost = client_comm_cost(bytes_up_per_client, bytes_down_per_client, network)
    return round_comm_cost([cost] * clients)


# --------------------------------------------------------------------------- export


def export(cfg: ExperimentConfig, out_dir: Path, model: Any, variables: dict[str, Any], tokenizer: Any,
           log: Callable[[str], None]) -> Path:
    """Hugging Face checkpoint(s) of the final model under ``out_dir``.

    ``model/``: the fine-tuned model (LoRA merged into the base) + tokenizer, loadable by
    ``transformers.T5ForConditionalGeneration.from_pretrained``. With LoRA also
    ``adapter/`` (a PEFT adapter) and ``base/`` (the frozen base it applies to, which the
    adapter's ``base_model_name_or_path`` names unless the base came from the hub).
    """
    from fedjax_fm.models.hf_io import save_pretrained

    out_dir.mkdir(parents=True, exist_ok=True)
    lora = lora_config(cfg)
    if lora is None:
        save_pretrained(model, variables["params"], out_dir / "model", tokenizer)
    else:
        from fedjax_fm.models import lora as lora_lib

        merged = lora_lib.merge_lora(variables["params"], variables["lora"], lora)
        save_pretrained(model, merged, out_dir / "model", tokenizer)
        if wants_pretrained(cfg) and not Path(cfg.model.name).is_dir():
            base_name = cfg.model.name  # a hub id: PEFT fetches the base itself
        else:
            save_pretrained(model, variables["params"], out_dir / "base", tokenizer)
            base_name = str((out_dir / "base").resolve())
        lora_lib.save_peft_adapter(variables["lora"], lora, out_dir / "adapter", base_model_name_or_path=base_name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir / "adapter"))
    log(f"exported Hugging Face checkpoint{'s' if lora else ''} to {out_dir}")
    return out_dir
