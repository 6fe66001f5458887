"""Experiment configuration: a typed schema loaded from YAML, with ``--set`` overrides.

An experiment is one :class:`ExperimentConfig`, a tree of frozen dataclasses with
one section per concern (``model``, ``lora``, ``data``, ``federated``, ``eval``,
``energy``, ``checkpoint``, ``output``, ``cost``, ``deploy``) plus the ``seed``. The schema *is* the
documentation of what a YAML file may say: every field has a type, a default and,
where it is a choice, a ``Literal`` of the valid values.

Loading is strict, because a typo in an experiment file silently running the
default is the worst kind of bug in research code:

* an unknown key is an error naming its full dotted path, the valid keys of its
  section and the closest one (``difflib``);
* a value of the wrong type, or outside its ``Literal`` choices, is an error naming
  the key, the expected type or the choices, and the closest choice;
* range checks (positive counts, ``clients_per_round <= num_clients`` ...) run in
  each section's ``__post_init__``.

``--set a.b.c=VALUE`` overrides parse ``VALUE`` as YAML (so ``3`` is an int,
``1e-3`` a float, ``null`` None, ``[q, v]`` a list) and apply it to the dotted path
before validation; ``--set lora=null`` turns LoRA off (full fine-tuning).

The resolved config is written with every run (``DIR/config.yaml``) by
:func:`dump_config`; loading that file gives back an equal config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from fedjax_fm.data.federated import DataSpec
from fedjax_fm.models.lora_config import LoraConfig


class ConfigError(ValueError):
    """An experiment configuration that cannot be used; the message names the key."""


# --------------------------------------------------------------------------- schema


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model, in which precision.

    ``name`` is a preset (``tiny``, ``flan-t5-small`` ... ``flan-t5-xl``; the
    ``google/`` prefix is accepted), ``demo-base`` (the small pretrained T5 shipped in
    the package for the offline demo, ``fedjax_fm/assets/demo_base/``), a local Hugging
    Face directory, or a hub name.
    ``init``: ``random`` initialises the architecture from the seed; ``pretrained``
    loads weights from ``name`` (directory or hub); ``auto`` = ``random`` for the
    ``tiny`` preset and a local directory with no weights, ``pretrained`` otherwise.
    ``tokenizer``: ``auto`` loads it from ``name`` (directory or hub) unless the
    model is ``tiny``, where it trains a SentencePiece model on the training texts
    (``train-sentencepiece``); ``byt5`` is a byte tokenizer needing no files; any
    other string is a directory or hub name.
    ``vocab_size``: overrides the preset's (and the trained tokenizer's) vocabulary.
    """

    name: str = "tiny"
    init: Literal["auto", "random", "pretrained"] = "auto"
    tokenizer: str = "auto"
    vocab_size: Optional[int] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool = False

    def __post_init__(self) -> None:
        if self.vocab_size is not None and self.vocab_size < 8:
            raise ConfigError(f"model.vocab_size must be at least 8, got {self.vocab_size}")
        _check_model_name(self.name)


@dataclasses.dataclass(frozen=True)
class LocalOptimizerSection:
    """The client's optimiser (optax), run for the local steps of one round."""

    name: Literal["sgd", "adam", "adamw"] = "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    momentum: Optional[float] = None
    grad_clip_norm: Optional[float] = None

    def __post_init__(self) -> None:
        _positive("federated.local_optimizer.learning_rate", self.learning_rate)
        _not_negative("federated.local_optimizer.weight_decay", self.weight_decay)


@dataclasses.dataclass(frozen=True)
class ServerOptimizerSection:
    """The server optimiser, applied to the pseudo-gradient ``x_t - mean(client params)``.

    ``fedavg`` is SGD with ``learning_rate`` (1.0 = plain averaging); ``fedavgm`` adds
    ``momentum``; ``fedadam`` / ``fedadamw`` / ``fedyogi`` / ``fedadagrad`` are the
    adaptive optimisers of Reddi et al. (2021) with ``b1``, ``b2`` and ``tau`` (their
    ε). ``variant``: ``reddi`` = the published update (no bias correction,
    ``v_0 = tau²``), ``optax`` = optax's stock transform with ``eps = tau``.
    ``schedule``: ``constant`` keeps ``learning_rate``; ``cosine`` anneals it over the
    run's ``federated.rounds`` server steps to ``final_fraction`` of itself
    (``fl.server_learning_rate``).
    """

    name: Literal["fedavg", "fedavgm", "fedadam", "fedadamw", "fedyogi", "fedadagrad"] = "fedadam"
    learning_rate: float = 10**-1.5
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.99
    tau: float = 1e-2
    weight_decay: float = 0.0
    variant: Literal["reddi", "optax"] = "reddi"
    schedule: Literal["constant", "cosine"] = "constant"
    final_fraction: float = 0.1

    def __post_init__(self) -> None:
        _positive("federated.server_optimizer.learning_rate", self.learning_rate)
        if not 0.0 <= self.final_fraction <= 1.0:
            raise ConfigError(f"federated.server_optimizer.final_fraction must be in [0, 1], got {self.final_fraction}")
        _positive("federated.server_optimizer.tau", self.tau)
        _not_negative("federated.server_optimizer.weight_decay", self.weight_decay)
        for key in ("momentum", "b1", "b2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"federated.server_optimizer.{key} must be in [0, 1), got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class AdaptiveClippingSection:
    """Adaptive clipping (Andrew et al. 2021): ``C`` tracks the ``target_quantile`` of the
    client update norms with step ``learning_rate``; ``count_stddev`` is the noise ``σ_b``
    on the clipped count (must exceed ``noise_multiplier / 2``; the paper suggests K/20)."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float = 1.0


@dataclasses.dataclass(frozen=True)
class DPSection:
    """DP-FedAvg with a real accountant (``docs/federated.md``, "Differential privacy").

    Client-level (ε, δ) with central Gaussian noise: each client's update is clipped to
    ``clip_norm`` (the initial ``C`` under ``adaptive_clipping``), weighted uniformly,
    summed, noised with ``noise_multiplier · C`` and divided by the expected number of
    clients. ``sampling``: ``poisson`` (each client joins a round with probability
    ``sampling_rate``, default ``clients_per_round / num_clients``) or ``fixed``
    (``clients_per_round`` without replacement). ``accountant``: ``rdp`` or ``pld``
    (dp_accounting). ``delta`` defaults to ``min(1e-5, 0.1 / N)``.
    ``target_epsilon``: stop before a round would exceed it. Settings the accountant
    cannot vouch for are refused (``fl.validate_dp_config``).
    """

    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: Optional[float] = None
    sampling: str = "poisson"
    sampling_rate: Optional[float] = None
    accountant: str = "rdp"
    target_epsilon: Optional[float] = None
    adaptive_clipping: Optional[AdaptiveClippingSection] = None


@dataclasses.dataclass(frozen=True)
class FederatedSection:
    """Rounds, clients and the local/server optimisers.

    Each round samples ``clients_per_round`` of ``num_clients`` (deterministically from
    ``(seed, round)``); each runs ``local_steps`` optimiser steps on batches of
    ``batch_size`` (or, when ``local_epochs`` is set, as many steps as that many passes
    over its largest client's data need — the same static count for every client).
    A round with fewer than ``min_clients`` finite updates keeps the server state.
    ``backend``: ``sequential`` (one client after another), ``vmap`` (a group of
    clients in one vectorised call), ``sharded`` (clients split over devices).
    """

    rounds: int = 10
    num_clients: int = 10
    clients_per_round: int = 4
    local_steps: int = 10
    local_epochs: Optional[float] = None
    batch_size: int = 8
    min_clients: int = 1
    backend: Literal["sequential", "vmap", "sharded"] = "sequential"
    local_optimizer: LocalOptimizerSection = dataclasses.field(default_factory=LocalOptimizerSection)
    server_optimizer: ServerOptimizerSection = dataclasses.field(default_factory=ServerOptimizerSection)
    # Aggregation weights: None = by example count, or uniform under DP (``weighting``
    # ``examples`` with ``dp`` is refused). ``dp``: null = no differential privacy.
    weighting: Optional[Literal["examples", "uniform"]] = None
    dp: Optional[DPSection] = None
    # The update codec (docs/federated.md, "Update codecs"): a spec mapping such as
    # {name: quantize, bits: 8} or {name: chain, codecs: [...]}; null = float32 deltas.
    compression: Optional[dict] = None

    def __post_init__(self) -> None:
        _check_compression(self.compression)
        for key in ("rounds", "num_clients", "clients_per_round", "local_steps", "batch_size", "min_clients"):
            _positive(f"federated.{key}", getattr(self, key))
        if self.local_epochs is not None:
            _positive("federated.local_epochs", self.local_epochs)
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"federated.clients_per_round ({self.clients_per_round}) exceeds "
                f"federated.num_clients ({self.num_clients})"
            )
        if self.min_clients > self.clients_per_round:
            raise ConfigError(
                f"federated.min_clients ({self.min_clients}) exceeds "
                f"federated.clients_per_round ({self.clients_per_round})"
            )


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Held-out evaluation: loss and ROUGE of generations.

    Runs before training (round 0) when ``at_start`` is true, every ``every`` rounds,
    and after the last round. ``max_examples`` caps the evaluation set (taken in a
    fixed order, so every evaluation sees the same examples). Generation is greedy
    with ``num_beams: 1``, else beam search with ``length_penalty`` (Hugging Face's
    semantics, ``fedjax_fm.models.generate``).
    """

    every: int = 1
    at_start: bool = True
    max_examples: Optional[int] = 64
    batch_size: int = 16
    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    # Per-client quality: every ``per_client_every`` rounds (and after the last), the
    # global model is evaluated on each client's own held-out examples: a seeded
    # ``per_client_fraction`` of each client's data (at least one example), taken out of
    # its training data. null = off (the training data are then untouched).
    per_client_every: Optional[int] = None
    per_client_fraction: float = 0.1

    def __post_init__(self) -> None:
        for key in ("every", "batch_size", "max_new_tokens", "num_beams"):
            _positive(f"eval.{key}", getattr(self, key))
        if self.max_examples is not None:
            _positive("eval.max_examples", self.max_examples)
        if self.per_client_every is not None:
            _positive("eval.per_client_every", self.per_client_every)
        if not 0.0 < self.per_client_fraction < 1.0:
            raise ConfigError(f"eval.per_client_fraction must be in (0, 1), got {self.per_client_fraction}")


@dataclasses.dataclass(frozen=True)
class EnergySection:
    """Power measurement and the network model.

    ``backend``: ``auto`` picks the first that works (NVML, Jetson INA3221, RAPL) and
    falls back to ``none`` (joules are null); ``constant`` is a user-declared power
    draw of ``watts`` (its figures are labelled estimates). ``network`` names a
    network profile (bandwidth, latency, J/bit) for communication time and energy.
    ``peak_flops``: the device's peak FLOP/s for MFU when it is not in the table.
    """

    backend: Literal["auto", "nvml", "jetson", "rapl", "constant", "none"] = "auto"
    watts: Optional[float] = None
    sample_interval_s: float = 0.05
    network: str = "wifi5"
    peak_flops: Optional[float] = None

    def __post_init__(self) -> None:
        if self.backend == "constant" and (self.watts is None or self.watts <= 0):
            raise ConfigError("energy.watts (a positive power draw) is required when energy.backend is 'constant'")
        _positive("energy.sample_interval_s", self.sample_interval_s)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Orbax checkpoints of the whole server state every ``every`` rounds, keeping ``keep``."""

    every: int = 1
    keep: int = 2
    enabled: bool = True

    def __post_init__(self) -> None:
        _positive("checkpoint.every", self.every)
        _positive("checkpoint.keep", self.keep)


@dataclasses.dataclass(frozen=True)
class OutputSection:
    """What a run writes besides ``metrics.jsonl``, ``summary.json`` and ``config.yaml``."""

    export: bool = True
    plots: bool = True
    tensorboard: bool = False
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class CostSection:
    """Cost-to-target and quality-within-budget in ``summary.json`` (``fedjax_fm.training.cost``).

    ``target_rougeL``: the ROUGE-L whose cost (rounds, bytes, joules, modelled seconds)
    is reported; null = ``target_fraction`` of the best ROUGE-L the run reached.
    ``budget_bytes`` (up + down) and ``budget_joules`` (client + server + comm): report
    the best ROUGE-L reached within them (null: not reported).
    """

    target_rougeL: Optional[float] = None
    target_fraction: float = 0.9
    budget_bytes: Optional[float] = None
    budget_joules: Optional[float] = None

    def __post_init__(self) -> None:
        if not 0.0 < self.target_fraction <= 1.0:
            raise ConfigError(f"cost.target_fraction must be in (0, 1], got {self.target_fraction}")
        for key in ("budget_bytes", "budget_joules"):
            if getattr(self, key) is not None:
                _positive(f"cost.{key}", getattr(self, key))


@dataclasses.dataclass(frozen=True)
class SecureAggregationSection:
    """Flower's SecAgg+ on the devices (``fedjax-fm deploy`` only; ``docs/deploy.md``, "Secure aggregation").

    With ``enabled`` the server learns only the sum of the devices' quantised updates.
    ``num_shares``: how many devices (itself included) each device secret-shares its
    keys with; null = every sampled device. ``reconstruction_threshold``: shares needed
    to unmask, at least 2 and below ``num_shares`` (so up to ``num_shares -
    reconstruction_threshold`` of a device's neighbours may drop out); null =
    ``max(2, ceil(2/3 · num_shares))`` capped at ``num_shares - 1``. Each device clips
    every coordinate of its (weighted) update to ``±clipping_range`` and rounds it
    stochastically to one of ``quantization_range`` levels, so one device's error is
    below ``2 · clipping_range / quantization_range`` per coordinate. ``max_weight``:
    the largest example count a device may weigh with under ``federated.weighting:
    examples`` (weights are sent as ``num_examples / max_weight``; unused when weights
    are uniform).
    """

    enabled: bool = False
    num_shares: Optional[int] = None
    reconstruction_threshold: Optional[int] = None
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    max_weight: float = 1000.0

    def __post_init__(self) -> None:
        key = "deploy.secure_aggregation"
        if self.num_shares is not None and self.num_shares < 3:
            raise ConfigError(f"{key}.num_shares must be at least 3 (Flower's SecAgg+ needs more than 2), "
                              f"got {self.num_shares}")
        if self.reconstruction_threshold is not None:
            if self.reconstruction_threshold < 2:
                raise ConfigError(f"{key}.reconstruction_threshold must be at least 2, got "
                                  f"{self.reconstruction_threshold}")
            if self.num_shares is not None and self.reconstruction_threshold >= self.num_shares:
                raise ConfigError(f"{key}.reconstruction_threshold ({self.reconstruction_threshold}) must be below "
                                  f"num_shares ({self.num_shares}): otherwise no device may drop out")
        _positive(f"{key}.clipping_range", self.clipping_range)
        _positive(f"{key}.max_weight", self.max_weight)
        if self.quantization_range < 2:
            raise ConfigError(f"{key}.quantization_range must be at least 2, got {self.quantization_range}")


@dataclasses.dataclass(frozen=True)
class DeploySection:
    """Settings only ``fedjax-fm deploy`` (Flower, real devices) reads; a simulation ignores them."""

    secure_aggregation: SecureAggregationSection = dataclasses.field(default_factory=SecureAggregationSection)


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    """One run in several processes on ``jax.distributed`` (``docs/distributed.md``).

    Every process runs ``fedjax-fm run`` with the same config except ``process_id``
    (``--set distributed.process_id=K``). Keys left null are found by JAX's own
    cluster detection (SLURM, Open MPI, ...); ``distributed: auto`` is all of them
    null. ``initialization_timeout_s``: how long ``jax.distributed.initialize`` waits
    for all ``num_processes`` to join; ``heartbeat_timeout_s``: after how long
    without a heartbeat the coordinator declares a process dead and stops the run.
    """

    coordinator_address: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    initialization_timeout_s: int = 300
    heartbeat_timeout_s: int = 100

    def __post_init__(self) -> None:
        for key in ("initialization_timeout_s", "heartbeat_timeout_s"):
            _positive(f"distributed.{key}", getattr(self, key))
        if self.num_processes is not None:
            _positive("distributed.num_processes", self.num_processes)
        if self.process_id is not None:
            _not_negative("distributed.process_id", self.process_id)
            if self.num_processes is not None and self.process_id >= self.num_processes:
                raise ConfigError(f"distributed.process_id ({self.process_id}) must be below "
                                  f"distributed.num_processes ({self.num_processes})")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. ``lora: null`` is full fine-tuning.

    Sections owned by a lower package are embedded as that package's own type, so each
    setting has one definition: ``lora`` is :class:`fedjax_fm.models.LoraConfig` (Hu et
    al. 2021's rank, alpha, dropout, target modules), ``data`` is
    :class:`fedjax_fm.data.DataSpec` (source, partition, prompt, truncation limits).
    """

    seed: int = 0
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: Optional[LoraConfig] = dataclasses.field(default_factory=LoraConfig)
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    federated: FederatedSection = dataclasses.field(default_factory=FederatedSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    energy: EnergySection = dataclasses.field(default_factory=EnergySection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    output: OutputSection = dataclasses.field(default_factory=OutputSection)
    cost: CostSection = dataclasses.field(default_factory=CostSection)
    deploy: DeploySection = dataclasses.field(default_factory=DeploySection)
    # null: one process (the default); ``auto`` or a mapping: several, see DistributedSection.
    distributed: Optional[Union[Literal["auto"], DistributedSection]] = None

    def replace(self, **changes: Any) -> "ExperimentConfig":
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------ loading + errors


def _check_compression(spec: Any) -> None:
    """``federated.compression``: a codec spec that :func:`fedjax_fm.fl.make_codec` accepts."""
    if spec is None:
        return
    from fedjax_fm.fl.codecs import make_codec  # builds closures only; no array is touched

    try:
        make_codec(spec)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _positive(key: str, value: Any) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key} must be positive, got {value!r}")


def _not_negative(key: str, value: Any) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"{key} must not be negative, got {value!r}")


def _closest(word: str, choices: typing.Iterable[str]) -> Optional[str]:
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return matches[0] if matches else None


def _choice_message(key: str, value: Any, choices: typing.Sequence[Any]) -> str:
    message = f"{key}: {value!r} is not a valid choice; valid: {', '.join(map(str, choices))}"
    suggestion = _closest(value, [str(c) for c in choices])
    if suggestion is not None:
        message += f" (did you mean {suggestion!r}?)"
    return message


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return "a list of " + _type_name(args[0])
        return f"a list of {len(args)} values"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Checks/converts one YAML value against a schema type; errors name ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for arg in non_none:
            try:
                return _convert(arg, value, key)
            except ConfigError as error:
                errors.append(error)
                if isinstance(value, dict) and dataclasses.is_dataclass(arg):
                    raise  # a mapping meant for this section: its own message says what is wrong
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(_choice_message(key, value, choices))
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        variadic = len(args) == 2 and args[1] is Ellipsis
        if isinstance(value, str) and variadic:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        if not variadic and len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        types_ = [args[0]] * len(value) if variadic else list(args)
        return tuple(_convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(types_, value)))
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} keys, got {value!r}")
        return _build(tp, value, key)
    if tp is dict:  # a free-form mapping checked by its section (e.g. federated.compression)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _deep_copy(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the float it means.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .nan / .inf would pass every range check and poison the run
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"schema type {tp!r} at {key} is not supported")  # a bug in the schema


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for raw_key, value in data.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if raw_key not in names:
            message = f"unknown key {key!r}; valid keys{' of ' + prefix if prefix else ''}: {', '.join(names)}"
            suggestion = _closest(str(raw_key), names)
            if suggestion is not None:
                message += f" (did you mean {suggestion!r}?)"
            raise ConfigError(message)
        kwargs[raw_key] = _convert(hints[raw_key], value, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # a check in a dataclass another package owns
        message = str(error)
        if not (prefix and message.startswith(prefix + ".")):  # the key is named already
            message = f"{prefix or 'config'}: {message}"
        raise ConfigError(message) from error


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Validates a plain mapping (e.g. parsed YAML) into an :class:`ExperimentConfig`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"an experiment config must be a mapping of sections, got {type(data).__name__}")
    return _build(ExperimentConfig, data)


def config_to_dict(config: Any) -> Any:
    """The config as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [config_to_dict(v) for v in config]
    return config


_OVERRIDE = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)=(.*)$", re.DOTALL)


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Applies ``section.key=value`` strings (values parsed as YAML) to a raw mapping.

    Intermediate sections missing from ``data`` are created (so ``--set
    lora.rank=4`` works on a file that does not mention ``lora``); whether the key
    exists is checked by validation afterwards, with the usual suggestions.
    """
    result = _deep_copy(data)
    for override in overrides:
        match = _OVERRIDE.match(override.strip())
        if not match:
            raise ConfigError(f"--set {override!r}: expected section.key=value (e.g. federated.rounds=5)")
        path, raw_value = match.group(1).split("."), match.group(2)
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {override!r}: the value is not valid YAML ({error})") from error
        node = result
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {override!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    return data if data is not None else {}


def load_config_dict(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads a YAML config, following ``base: other.yaml`` (relative to the file) first.

    ``base`` lets the paper grid share one file of defaults: the including file's
    sections are merged key by key over the base's. A cycle of ``base:`` is an error.
    """
    path = Path(path)
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(resolved):], resolved))
        raise ConfigError(f"{_chain[-1]}: base: makes a cycle ({cycle})")
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an experiment config must be a mapping of sections")
    _check_empty_sections(path)
    base = data.pop("base", None)
    if base is not None:
        base_data = load_config_dict(path.parent / base, (*_chain, resolved))
        data = _merge(base_data, data)
    return data


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = _deep_copy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = _deep_copy(value)
    return out


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """Loads, overrides and validates a YAML experiment; errors name the file and key."""
    data = apply_overrides(load_config_dict(path), overrides)
    try:
        return config_from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def dump_config(config: ExperimentConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML (what the run actually used)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def _check_empty_sections(path: Path) -> None:
    """``lora:`` with nothing under it (every key commented out) reads as null, i.e. *full*
    fine-tuning: far from what it looks like, so it is an error; ``lora: null`` says it."""
    try:
        root = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):  # reported by _read_yaml
        return
    if not isinstance(root, yaml.MappingNode):
        return
    for key, value in root.value:
        if key.value == "lora" and isinstance(value, yaml.ScalarNode) and value.tag.endswith(":null") and value.value == "":
            raise ConfigError(
                f"{path}:{key.start_mark.line + 1}: the lora: section is empty (every key commented out?), "
                "which would mean full fine-tuning; write `lora: null` for full fine-tuning, "
                "or give LoRA's keys (rank, alpha, target_modules)"
            )


def _check_model_name(name: str) -> None:
    """A name one typo away from a preset (``tinyy``, ``flan-t5-smal``) that is no local
    directory and no ``org/model`` hub id is an error with a "did you mean", not a hub
    download attempt that fails with a network error."""
    from fedjax_fm.models.config import PRESETS

    key = name.removeprefix("google/")
    if key in PRESETS or "/" in key or Path(name).expanduser().exists():
        return
    matches = difflib.get_close_matches(key, list(PRESETS), n=1, cutoff=0.8)
    if matches:
        raise ConfigError(
            f"model.name: {name!r} is not a preset, a local directory or an org/model hub id "
            f"(did you mean {matches[0]!r}?); presets: {', '.join(PRESETS)}"
        )
