"""Builds the pieces of a run from its config: tokenizer, data, model, algorithm, evaluator, meter.

Each function is a thin adapter from one config section to the API of the package
that owns the piece (``models``, ``data``, ``fl``, ``energy``, ``eval``), so that the
rounds loop in :mod:`fedjax_fm.training.experiment` and the deployment's strategy
read as the algorithm and nothing else. Simulation and deployment call the very same
builders, so their client and server steps are the same functions.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from transformers import ByT5Tokenizer

from fedjax_fm import fl
from fedjax_fm.assets import resolve_model_name
from fedjax_fm.config import ConfigError, ExperimentConfig
from fedjax_fm.data.batching import LocalWork
from fedjax_fm.data.federated import FederatedData, build_federated_data, load_source
from fedjax_fm.data.tokenize import format_prompts
from fedjax_fm.energy.comm import NetworkProfile, load_network_profiles
from fedjax_fm.energy.detect import detect_backend
from fedjax_fm.energy.base import source_label
from fedjax_fm.energy.meter import Meter
from fedjax_fm.energy.peaks import resolve_peak
from fedjax_fm.eval.evaluate import Evaluator
from fedjax_fm.fl.t5_task import t5_loss_fn
from fedjax_fm.models import hf_io, hub
from fedjax_fm.models import lora as lora_lib
from fedjax_fm.models.config import PRESETS, T5Config, preset
from fedjax_fm.models.flops import train_step_flops as count_train_step_flops
from fedjax_fm.models.generate import generate
from fedjax_fm.models.loss import batch_loss
from fedjax_fm.models.t5 import T5, init_params
from fedjax_fm.models.tokenizer import load_tokenizer, train_sentencepiece_tokenizer
from fedjax_fm.training.compression import uses_ffa_lora

# fold_in tags of the seed's independent random streams. Client training keys are
# fold_in(fold_in(PRNGKey(seed), round), client) with round < 2^31; these tags are
# folded into PRNGKey(seed) too, so they are chosen as values no round reaches.
MODEL_INIT_STREAM = 0xF0DE_0001
LORA_INIT_STREAM = 0xF0DE_0002


def jnp_dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def model_source(cfg: ExperimentConfig) -> str:
    """``model.name``, with a model shipped in the package (``demo-base``) replaced by its directory."""
    return resolve_model_name(cfg.model.name)


def is_preset(name: str) -> bool:
    return name.removeprefix("google/") in PRESETS


def wants_pretrained(cfg: ExperimentConfig) -> bool:
    """Whether the base weights are loaded (``model.init``; ``auto`` = all but ``tiny``)."""
    if cfg.model.init != "auto":
        return cfg.model.init == "pretrained"
    return cfg.model.name != "tiny"


# ------------------------------------------------------------------------ tokenizer


def is_hub_name(name: str) -> bool:
    """A name to load from the Hugging Face Hub (a preset's name is one too), not a local path."""
    return not Path(name).expanduser().exists() and not name.startswith((".", "/", "~"))


def require_hub(cfg: ExperimentConfig, key: str, name: str) -> None:
    """Raises a :class:`ConfigError` saying what to set when ``name`` (the value of config
    ``key``) must come from the Hub and the Hub cannot be used (:mod:`fedjax_fm.models.hub`)."""
    reason = hub.use_hub(name)
    if reason is None:
        return
    local = name.split("/")[-1]
    raise ConfigError(
        f"{key}={name!r} is a Hugging Face Hub model, but the Hub cannot be used here ({reason}) and no copy "
        f"is in the local Hugging Face cache. Use a local copy of it (fetch it where there is a network, e.g. "
        f"`huggingface-cli download {name} --local-dir {local}`, and copy the folder here):\n"
        f"  --set model.name=/path/to/{local}     (config.json, model.safetensors and the tokenizer files)\n"
        f"and, for SAMSum without TFDS, its JSON files (train.json, val.json, test.json) in a folder:\n"
        f"  --set data.source.kind=samsum_json --set data.source.path=/path/to/samsum\n"
        f"or try the pipeline without pretrained weights: --set model.init=random --set model.tokenizer=byt5"
    )


def tokenizer_mode(cfg: ExperimentConfig) -> str:
    mode = cfg.model.tokenizer
    if mode == "auto":
        return "train-sentencepiece" if cfg.model.name == "tiny" else model_source(cfg)
    return resolve_model_name(mode)


def build_tokenizer(cfg: ExperimentConfig, out_dir: Path, training_texts: Callable[[], list[str]]) -> Any:
    """The run's tokenizer (pad 0, EOS 1).

    ``train-sentencepiece`` trains a unigram SentencePiece model of the model's
    vocabulary size on the run's training texts (prompted inputs + targets) and keeps
    it in ``DIR/tokenizer/`` — a resumed run loads that copy, so its token ids are the
    ones the checkpoint was trained on. ``byt5`` needs no files; anything else is a
    local tokenizer directory or a hub name.
    """
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
        return ByT5Tokenizer()
    if is_hub_name(mode):
        require_hub(cfg, "model.tokenizer" if cfg.model.tokenizer != "auto" else "model.name", mode)
    return load_tokenizer(mode)


# ---------------------------------------------------------------------------- model


def _runtime(cfg: ExperimentConfig) -> dict[str, Any]:
    return dict(dtype=jnp_dtype(cfg.model.dtype), param_dtype=jnp_dtype(cfg.model.param_dtype), remat=cfg.model.remat)


def model_config(cfg: ExperimentConfig) -> T5Config:
    """The :class:`T5Config` of a randomly initialised model: a preset (+ ``vocab_size``) or
    the ``config.json`` of a local directory. (Pretrained models bring their own.)"""
    name = model_source(cfg)
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
    config = hf_io.read_config(name, **_runtime(cfg))
    return config if cfg.model.vocab_size is None else config.replace(vocab_size=cfg.model.vocab_size)


def build_model(cfg: ExperimentConfig, tokenizer: Any) -> tuple[T5, dict[str, Any]]:
    """``(model, variables)`` with ``variables = {"params": base}`` plus ``"lora"`` adapters.

    Pretrained weights come from ``hf_io.from_pretrained`` (a local directory or a hub
    id); otherwise the architecture is initialised from ``fold_in(PRNGKey(seed), tag)``.
    LoRA adapters are always fresh (``A`` random from the seed, ``B = 0``).
    """
    seed_key = jax.random.PRNGKey(cfg.seed)
    if wants_pretrained(cfg):
        source = model_source(cfg)
        if is_hub_name(source):
            require_hub(cfg, "model.name", source)
        runtime = _runtime(cfg)
        model, params = hf_io.from_pretrained(
            source, dtype=runtime["dtype"], param_dtype=runtime["param_dtype"], remat=cfg.model.remat,
            lora=cfg.lora,
        )
        if cfg.model.vocab_size is not None and cfg.model.vocab_size != model.config.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} differs from the pretrained model's "
                f"{model.config.vocab_size} ({cfg.model.name}); leave it unset"
            )
    else:
        config = model_config(cfg)
        model = T5(config, lora=cfg.lora)
        params = init_params(config, jax.random.fold_in(seed_key, MODEL_INIT_STREAM))
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
            f"{model.config.vocab_size} (model.vocab_size)"
        )
    variables: dict[str, Any] = {"params": params}
    if cfg.lora is not None:
        variables["lora"] = lora_lib.init_lora(params, cfg.lora, jax.random.fold_in(seed_key, LORA_INIT_STREAM))
    return model, variables


# ----------------------------------------------------------------------------- data


def local_work(cfg: ExperimentConfig) -> LocalWork:
    """The ``federated`` section's local work per round (``local_epochs``, when set, wins)."""
    f = cfg.federated
    if f.local_epochs is not None:
        return LocalWork(f.batch_size, epochs=f.local_epochs)
    return LocalWork(f.batch_size, steps=f.local_steps)


def training_texts(cfg: ExperimentConfig) -> list[str]:
    """Prompted training inputs and targets: the corpus a trained tokenizer must cover."""
    train, _ = load_source(cfg.data.source, seed=cfg.seed)
    return format_prompts(cfg.data.prompt_template, train.inputs) + list(train.targets)


def build_data(cfg: ExperimentConfig, tokenizer: Any, *, on_demand: bool = False) -> FederatedData:
    """The run's :class:`FederatedData`; ``on_demand``: tokenise clients when first fed (multi-process runs)."""
    data = build_federated_data(cfg.data, tokenizer, seed=cfg.seed, num_clients=cfg.federated.num_clients,
                                local_work=local_work(cfg), eval_batch_size=cfg.eval.batch_size,
                                on_demand=on_demand)
    if data.num_clients < cfg.federated.clients_per_round:
        raise ConfigError(
            f"federated.clients_per_round={cfg.federated.clients_per_round} but the data has only "
            f"{data.num_clients} clients"
        )
    return data


# ------------------------------------------------------------------------ algorithm


def server_optimizer_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    """The keyword arguments of ``fl.server_optimizer(name, ...)`` that the named optimiser takes;
    the learning rate is a schedule over ``federated.rounds`` when ``schedule`` is not ``constant``."""
    s = cfg.federated.server_optimizer
    lr = fl.server_learning_rate(s.learning_rate, s.schedule, cfg.federated.rounds, s.final_fraction)
    adaptive = dict(learning_rate=lr, b1=s.b1, b2=s.b2, tau=s.tau, variant=s.variant)
    return {
        "fedavg": dict(learning_rate=lr),
        "fedavgm": dict(learning_rate=lr, momentum=s.momentum),
        "fedadam": adaptive,
        "fedadamw": dict(adaptive, weight_decay=s.weight_decay),
        "fedyogi": adaptive,
        "fedadagrad": dict(learning_rate=lr, b1=s.b1, tau=s.tau, variant=s.variant),
    }[s.name]


def local_optimizer(cfg: ExperimentConfig) -> optax.GradientTransformation:
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


def executor(cfg: ExperimentConfig) -> fl.Sequential | fl.Vmapped | fl.Sharded:
    return {"sequential": fl.Sequential, "vmap": fl.Vmapped, "sharded": fl.Sharded}[cfg.federated.backend]()


def uses_dropout(cfg: ExperimentConfig, model: T5) -> bool:
    return bool(model.config.dropout_rate > 0 or (cfg.lora is not None and cfg.lora.dropout > 0))


def build_algorithm(cfg: ExperimentConfig, model: T5) -> fl.FederatedAlgorithm:
    """The :class:`fl.FederatedAlgorithm`: client AdamW (etc.) on the seq2seq loss, the server optimiser."""
    # Without any dropout the loss is deterministic and cheaper (no dropout masks).
    loss_fn = t5_loss_fn(model, dropout=uses_dropout(cfg, model))
    client_opt = local_optimizer(cfg)
    server_opt = fl.server_optimizer(cfg.federated.server_optimizer.name, **server_optimizer_kwargs(cfg))
    client_opt, server_opt = ffa_lora_optimizers(cfg, client_opt, server_opt)
    client_update = fl.make_client_update(loss_fn, client_opt)
    return fl.FederatedAlgorithm(
        client_update,
        server_opt,
        fl.make_aggregator(cfg.federated.weighting or "examples", min_clients=cfg.federated.min_clients),
        executor(cfg),
    )


def ffa_lora_optimizers(cfg: ExperimentConfig, client_opt: optax.GradientTransformation,
                        server_opt: optax.GradientTransformation
                        ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """With an ``ffa_lora`` codec (FFA-LoRA: LoRA ``A`` frozen, only ``B`` sent), both optimisers
    freeze ``A`` (``fl.freeze_lora_a``): the clients never change it, and neither does a
    weight-decaying server optimiser. Unchanged otherwise."""
    if not uses_ffa_lora(cfg.federated.compression):
        return client_opt, server_opt
    if cfg.lora is None:
        raise ConfigError("federated.compression: codec 'ffa_lora' needs LoRA (set the lora section; "
                          "lora=null is full fine-tuning, which has no A matrices to freeze)")
    return fl.freeze_lora_a(client_opt), fl.freeze_lora_a(server_opt)


def train_step_flops(cfg: ExperimentConfig, model: T5, source_length: int, target_length: int) -> float:
    """Analytic model FLOPs of one local step of ``federated.batch_size`` rows at the given lengths."""
    return float(count_train_step_flops(model.config, cfg.federated.batch_size, source_length, target_length,
                                        lora=cfg.lora).total)


# ----------------------------------------------------------------------- evaluation


def decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """Generated ids -> text. A model whose vocabulary is larger than its tokenizer's (e.g.
    ByT5's 259 ids under a 512-row embedding) may generate ids no tokenizer can spell;
    they are dropped rather than crash the decode."""
    known = len(tokenizer)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode([i for i in ids if i < known], skip_special_tokens=True)

    return decode


def build_evaluator(cfg: ExperimentConfig, model: T5, tokenizer: Any, data: FederatedData) -> Evaluator:
    batches, references = [], []
    # Sorted by length and cut to a few widths: no encoder work on pad slots (ROUGE is a
    # mean over examples, so the order does not change it).
    for batch in data.eval_batches(cfg.eval.batch_size, cfg.eval.max_examples, by_length=True):
        refs = batch.pop("references")
        batch.pop("ids", None)
        references += [r for r, w in zip(refs, batch["example_weight"]) if w > 0]
        batches.append(batch)

    def loss_fn(variables, batch):
        return batch_loss(model, variables, batch)

    def generate_fn(variables, input_ids, attention_mask):
        return generate(model, variables, input_ids, attention_mask, max_new_tokens=cfg.eval.max_new_tokens,
                        num_beams=cfg.eval.num_beams, length_penalty=cfg.eval.length_penalty)

    return Evaluator(loss_fn, generate_fn, decoder(tokenizer), batches, references,
                     eos_id=model.config.eos_token_id, pad_id=model.config.pad_token_id)


# --------------------------------------------------------------------------- energy


@dataclasses.dataclass
class EnergySetup:
    meter: Meter
    label: str
    is_estimate: bool
    network: NetworkProfile


def build_energy(cfg: ExperimentConfig, log: Callable[[str], None]) -> EnergySetup:
    detection = detect_backend(cfg.energy.backend, constant_watts=cfg.energy.watts, log=None)
    for line in detection.describe().splitlines():
        log(line)
    peak = _device_peak_flops(cfg, log)
    meter = Meter(detection.backend, interval_s=cfg.energy.sample_interval_s, peak_flops=peak)
    label = source_label(detection.backend)
    return EnergySetup(meter=meter, label=label, is_estimate=cfg.energy.backend == "constant" or "estimate" in label,
                       network=_network_profile(cfg))


def _device_peak_flops(cfg: ExperimentConfig, log: Callable[[str], None]) -> Optional[float]:
    """The device's peak FLOP/s for MFU: ``energy.peak_flops``, the known-device table, or a cached measurement."""
    peak = resolve_peak(jnp_dtype(cfg.model.dtype), explicit=cfg.energy.peak_flops)
    if peak is None:
        log("MFU: peak FLOP/s of this device unknown (set energy.peak_flops, or measure it once with "
            "`fedjax-fm bench peak`); mfu is null")
        return None
    log(f"MFU against {peak.flops_per_s:.3g} FLOP/s ({peak.device}, {peak.dtype}, {peak.source})")
    return peak.flops_per_s


def _network_profile(cfg: ExperimentConfig) -> NetworkProfile:
    profiles = load_network_profiles()
    if cfg.energy.network not in profiles:
        close = difflib.get_close_matches(cfg.energy.network, list(profiles), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"energy.network: {cfg.energy.network!r} is not a known network profile; valid: "
            f"{', '.join(sorted(profiles))}{hint}"
        )
    return profiles[cfg.energy.network]


# --------------------------------------------------------------------------- export


def export(cfg: ExperimentConfig, out_dir: Path, model: T5, variables: dict[str, Any], tokenizer: Any,
           log: Callable[[str], None]) -> Path:
    """Hugging Face checkpoint(s) of the final model under ``out_dir``.

    ``model/``: the fine-tuned model (LoRA merged into the base) + tokenizer, loadable by
    ``transformers.T5ForConditionalGeneration.from_pretrained``. With LoRA also
    ``adapter/`` (a PEFT adapter) and ``base/`` (the frozen base it applies to). The
    adapter's ``base_model_name_or_path`` is the hub name when the base came from the hub,
    and otherwise ``base``: a path relative to the export folder, so that the folder can
    be moved (PEFT resolves it from the working directory: load from inside ``export/``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    lora = cfg.lora
    if lora is None:
        hf_io.save_pretrained(model, variables["params"], out_dir / "model", tokenizer)
    else:
        merged = lora_lib.merge_lora(variables["params"], variables["lora"], lora)
        hf_io.save_pretrained(model, merged, out_dir / "model", tokenizer)
        if wants_pretrained(cfg) and not Path(model_source(cfg)).is_dir():
            base_name = cfg.model.name  # a hub id: PEFT fetches the base itself
        else:
            hf_io.save_pretrained(model, variables["params"], out_dir / "base", tokenizer)
            base_name = "base"  # relative to the export folder: survives moving the run
        lora_lib.save_peft_adapter(variables["lora"], lora, out_dir / "adapter", base_model_name_or_path=base_name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir / "adapter"))
    log(f"exported Hugging Face checkpoint{'s' if lora else ''} to {out_dir}")
    return out_dir
