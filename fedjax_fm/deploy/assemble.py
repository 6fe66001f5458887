"""The pieces a server and a device both build from the same experiment config.

Both sides load the *same* YAML config. From it each builds the tokenizer, the
model (base weights from the seed or a pretrained checkpoint, LoRA adapters from the
seed) and the :class:`fedjax_fm.fl.FederatedAlgorithm` through
:mod:`fedjax_fm.training.builders` -- the very functions ``fedjax-fm run`` uses -- so the
client and server steps are the simulation's, byte for byte.

Two config constraints that simulation does not have, checked here:

* the tokenizer must be shareable: ``model.tokenizer: train-sentencepiece`` trains on
  *all* clients' texts, which no device has; use a tokenizer directory (e.g. the
  ``tokenizer/`` of a simulation run, copied to every device), a hub name, or ``byt5``;
* ``federated.local_steps`` must be set: with ``local_epochs`` the static number of
  steps depends on the largest client's data, which no device knows;
* ``federated.dp`` only together with ``deploy.secure_aggregation`` (whose own settings
  are checked by :func:`fedjax_fm.deploy.secure.plan_secure_aggregation`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fedjax_fm import fl
from fedjax_fm.config import ConfigError, ExperimentConfig
from fedjax_fm.training import builders as setup


@dataclasses.dataclass
class DeployPieces:
    """What :func:`build_pieces` returns."""

    cfg: ExperimentConfig
    tokenizer: Any
    model: Any
    trainable: Any  # the round-0 trainable variables (LoRA: {"lora": ...}; full: {"params": ...})
    frozen: Any  # the frozen variables (LoRA: {"params": base}; full: {})
    algorithm: Any  # fl.FederatedAlgorithm


def check_deployable(cfg: ExperimentConfig) -> None:
    """Raises :class:`ConfigError` for the settings a deployment cannot honour (module docstring)."""
    if setup.tokenizer_mode(cfg) == "train-sentencepiece":
        raise ConfigError(
            "deploy: model.tokenizer 'train-sentencepiece' trains on every client's texts, which no "
            "device has; set model.tokenizer to a tokenizer directory present on the server and every "
            "device (e.g. the tokenizer/ of a simulation run), a hub name, or 'byt5'"
        )
    if cfg.federated.local_steps is None or cfg.federated.local_epochs is not None:
        raise ConfigError(
            "deploy: set federated.local_steps (and local_epochs: null): with local_epochs the number of "
            "local steps depends on the largest client's data, which no device knows"
        )
    from fedjax_fm.deploy.secure import plan_secure_aggregation

    secure = plan_secure_aggregation(cfg)  # refuses settings SecAgg+ cannot honour
    if cfg.federated.dp is not None and secure is None:
        raise ConfigError(
            "deploy: federated.dp needs deploy.secure_aggregation.enabled: true in a deployment (devices clip "
            "their updates to C inside SecAgg+ and the server adds the noise to the sum; without secure "
            "aggregation the server would see each device's update); or run DP-FedAvg in simulation (`fedjax-fm run`)"
        )
    if cfg.eval.per_client_every is not None:
        raise ConfigError("deploy: eval.per_client_every needs every client's held-out data on the server; "
                          "set it to null for a deployment")


def build_pieces(cfg: ExperimentConfig) -> DeployPieces:
    """Tokenizer, model, trainable/frozen split and algorithm of ``cfg`` (as ``fedjax-fm run`` builds them)."""
    check_deployable(cfg)
    # The out_dir is only used by train-sentencepiece, excluded above.
    tokenizer = setup.build_tokenizer(cfg, Path("."), lambda: [])
    model, variables = setup.build_model(cfg, tokenizer)
    trainable, frozen = fl.split_variables(variables, fl.trainable_collections(cfg.lora is not None))
    return DeployPieces(cfg, tokenizer, model, trainable, frozen, setup.build_algorithm(cfg, model))
