"""The device side: a Flower client that runs our jit-compiled client update, metered.

Each round the server sends ``FitIns(parameters, config)`` with the trainable
variables (:mod:`fedjax_fm.deploy.wire`) and ``config``::

    round_index   rounds completed before this one (the key of its randomness)
    seed          the run seed (checked against the device's config)
    position      this client's index among the run's sorted client ids
    overrides     the server's ``--set`` values, one per line (the device applies them
                  to its copy of the config, then its own node-config ``set`` values)

and the device answers with ``FitRes(delta, num_examples, metrics)`` where ``delta =
x_t - x_local`` from ``fl.make_client_update`` (the simulation's function, jit
compiled before the metered call), run on its own batches (:class:`~fedjax_fm.deploy.device_data.DeviceData`)
with the key ``fold_in(fold_in(PRNGKey(seed), round_index), position)`` -- the
simulation's client key -- and metered by :class:`fedjax_fm.energy.Meter`. Metrics
carry the client id, loss, tokens, steps, seconds, joules, η_e, MFU, model FLOPs and
the payload bytes received and sent (scalars only: Flower metrics cannot be null, so
an unmeasured figure is simply absent).

Fault injection for tests and drills (environment variables, off by default):
``FEDJAX_FM_DEPLOY_CRASH_AT_ROUND=t`` SIGKILLs this process's group inside round
``t``'s local training -- the whole device (SuperNode, SuperExec and ClientApp) when
``flower-supernode`` was started as a process-group leader (``setsid``);
``FEDJAX_FM_DEPLOY_HANG_AT_ROUND=t`` blocks round ``t``'s training forever (a hung
device: the server's ``--round-timeout`` must give up on it);
``FEDJAX_FM_DEPLOY_NAN_AT_ROUND=t`` returns a NaN delta in round ``t``.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from flwr.client import Client
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Status,
)

from fedjax_fm import run_setup as setup
from fedjax_fm.config import ExperimentConfig
from fedjax_fm.deploy.assemble import build_pieces
from fedjax_fm.deploy.device_data import DeviceData
from fedjax_fm.deploy.wire import decode_tree, empty_parameters, encode_tree, payload_bytes

CRASH_ENV = "FEDJAX_FM_DEPLOY_CRASH_AT_ROUND"
NAN_ENV = "FEDJAX_FM_DEPLOY_NAN_AT_ROUND"
HANG_ENV = "FEDJAX_FM_DEPLOY_HANG_AT_ROUND"


def _env_round(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


class DeviceClient(Client):
    """A Flower ``Client`` for one device's data (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, data_dir: str, client_id: str | None = None,
                 log: Callable[[str], None] = print) -> None:
        from fedjax_fm import fl
        from fedjax_fm.models.flops import train_step_flops

        self.cfg = cfg
        self.log = log
        pieces = build_pieces(cfg)
        self.trainable_template = pieces.trainable
        self.frozen = pieces.frozen
        self.data = DeviceData(cfg, pieces.tokenizer, data_dir, client_id)
        self.client_id = self.data.client_id
        self.update = jax.jit(pieces.algorithm.client_update)
        self.client_rngs = jax.jit(fl.client_rngs)
        self.base_rng = jax.random.PRNGKey(cfg.seed)
        self.energy = setup.build_energy(cfg, log)
        shape = self.data.tokens.input_ids.shape[1], self.data.tokens.labels.shape[1]
        self.step_flops = float(train_step_flops(pieces.model.config, cfg.federated.batch_size, *shape,
                                                 lora=setup.lora_config(cfg)).total)
        self.compiled = False
        self.rounds_trained = 0
        log(f"device {self.client_id}: {self.data.num_examples} examples in {self.data.path}; "
            f"{self.data.steps} local steps of {cfg.federated.batch_size}; energy {self.energy.label}")

    # -- Flower's Client interface ------------------------------------------------

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        return GetPropertiesRes(Status(Code.OK, "ok"), {"client_id": self.client_id,
                                                        "num_examples": self.data.num_examples})

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        # The server owns the parameters; a device never seeds them.
        return GetParametersRes(Status(Code.OK, "the server owns the parameters"), empty_parameters())

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        return EvaluateRes(Status(Code.OK, "no on-device evaluation"), 0.0, 0, {})

    def fit(self, ins: FitIns) -> FitRes:
        config = ins.config
        round_index, position = int(config["round_index"]), int(config["position"])
        if int(config["seed"]) != self.cfg.seed:
            return FitRes(Status(Code.FIT_NOT_IMPLEMENTED, f"seed mismatch: server {config['seed']}, device "
                                 f"{self.cfg.seed} (use the same config on both)"), empty_parameters(), 0, {})
        received = payload_bytes(ins.parameters)
        trainable = decode_tree(ins.parameters, self.trainable_template)
        batches = self.data.round_batches(position, round_index)
        rng = self.client_rngs(self.base_rng, np.int32(round_index), np.asarray([position]))[0]
        if not self.compiled:
            # Compile outside the metered window (the function is pure: discarding a run changes nothing).
            t0 = time.perf_counter()
            jax.block_until_ready(self.update(trainable, self.frozen, batches, rng))
            self.compiled = True
            self.log(f"device {self.client_id}: compiled the client update in {time.perf_counter() - t0:.1f} s")
        with self.energy.meter.section("client") as section:
            if _env_round(CRASH_ENV) == round_index + 1:
                # A device dying mid-round (fault drill): SIGKILL the process group -- the
                # SuperNode, its SuperExec and this ClientApp when flower-supernode leads its group.
                self.log(f"device {self.client_id}: fault drill, killing process group {os.getpgrp()}")
                os.killpg(os.getpgrp(), signal.SIGKILL)
            if _env_round(HANG_ENV) == round_index + 1:
                # A hung device (fault drill): alive and heartbeating, but this round never ends.
                self.log(f"device {self.client_id}: fault drill, hanging in round {round_index + 1}")
                while True:
                    time.sleep(3600)
            delta, num_examples, metrics = section.block(self.update(trainable, self.frozen, batches, rng))
            host = jax.device_get({"n": num_examples, **metrics})
            section.tokens = float(host["tokens"])
            section.flops = self.step_flops * float(host["steps"])
        record = section.record
        if _env_round(NAN_ENV) == round_index + 1:
            delta = jax.tree.map(lambda x: np.full(np.shape(x), np.nan, np.asarray(x).dtype), delta)
        parameters = encode_tree(delta)
        self.rounds_trained += 1
        out: dict[str, Any] = {
            "client_id": self.client_id,
            "position": position,
            "num_examples": float(host["n"]),
            "loss": float(host["loss"]),
            "tokens": float(host["tokens"]),
            "steps": int(host["steps"]),
            "seconds": record.wall_s,
            "joules": record.joules,
            "tps": record.tps,
            "tps_per_watt": record.eta_e,
            "mfu": record.mfu,
            "model_flops": record.model_flops,
            "energy_source": self.energy.label,
            "energy_is_estimate": self.energy.is_estimate,
            "bytes_received": received,
            "bytes_sent": payload_bytes(parameters),
        }
        metrics_out = {k: v for k, v in out.items() if v is not None and not (isinstance(v, float) and not np.isfinite(v))}
        return FitRes(Status(Code.OK, "ok"), parameters, int(round(float(host["n"]))), metrics_out)
