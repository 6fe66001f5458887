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

With ``deploy.secure_aggregation`` the device answers only inside a SecAgg+ round
(``secure_aggregation_mod`` of :mod:`fedjax_fm.deploy.apps` marks those): it checks
its delta for NaN/Inf, clips it to ``C`` under DP and picks its weight
(:func:`fedjax_fm.deploy.secure.device_contribution`), and hands the result as bare
float64 arrays to Flower's ``secaggplus_mod``, which quantises and masks it. Its
metrics add ``secagg_weight``, ``secagg_clipped_values`` and ``nonfinite``.

The metered local training is one method, :meth:`DeviceClient.train`, so that the
fault drills of the tests (a device killed, hung or sending NaN) wrap it in a
test-only ClientApp (``tests/drill_app/``) instead of living in this code.
"""

from __future__ import annotations

import time
from pathlib import Path
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

from fedjax_fm import fl
from fedjax_fm.config import ExperimentConfig
from fedjax_fm.deploy.assemble import build_pieces
from fedjax_fm.deploy.device_data import DeviceData
from fedjax_fm.deploy.apps import MASKED_FLAG
from fedjax_fm.deploy.secure import device_contribution, plan_secure_aggregation
from fedjax_fm.deploy.wire import decode_tree, empty_parameters, encode_leaves, encode_tree, payload_bytes
from fedjax_fm.energy.meter import CallRecord
from fedjax_fm.training import builders
from fedjax_fm.models.flops import ExampleFlops
from fedjax_fm.training.compression import encode_one
from fedjax_fm.training.fingerprint import key_path_name, named_leaves
from fedjax_fm.training.round import count_client_work, useful_train_flops


class DeviceClient(Client):
    """A Flower ``Client`` for one device's data (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, data_dir: str, client_id: str | None = None,
                 log: Callable[[str], None] = print) -> None:
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
        self.energy = builders.build_energy(cfg, log)
        self.step_flops = builders.train_step_flops(cfg, pieces.model, self.data.tokens.input_ids.shape[1],
                                                    self.data.tokens.labels.shape[1])
        self.example_flops = ExampleFlops(pieces.model.config, cfg.lora)  # MFU's useful work: real examples only
        self.compiled = False
        self.rounds_trained = 0
        # federated.compression: the device sends the codec's payload, not its float delta.
        self.codec = fl.make_codec(cfg.federated.compression) if cfg.federated.compression is not None else None
        # deploy.secure_aggregation: the update goes through SecAgg+ (fedjax_fm/deploy/secure.py).
        self.secure = plan_secure_aggregation(cfg)
        if self.codec is not None:
            self.encode = jax.jit(lambda delta, state, rng: encode_one(self.codec, delta, state, rng))
            self.codec_state_dir = Path(data_dir) / "codec_state" / self.client_id
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
        masked = bool(config.get(MASKED_FLAG, False))
        refusal = None
        if int(config["seed"]) != self.cfg.seed:
            refusal = f"seed mismatch: server {config['seed']}, device {self.cfg.seed} (use the same config on both)"
        elif self.secure is not None and not masked:
            refusal = ("this device's config enables deploy.secure_aggregation: it sends its update only "
                       "inside a SecAgg+ round, never in the clear")
        elif self.secure is None and masked:
            refusal = "the server runs SecAgg+ but this device's config does not enable deploy.secure_aggregation"
        if refusal is not None:
            if masked:
                # secaggplus_mod masks whatever fit returns, even an error status: raising is the
                # only way out, and SecAgg+ then treats this device as dropped.
                raise RuntimeError(f"device {self.client_id}: {refusal}")
            return FitRes(Status(Code.FIT_NOT_IMPLEMENTED, refusal), empty_parameters(), 0, {})
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
        delta, host, record = self.train(trainable, batches, rng, round_index)
        encode_s = None
        if self.codec is not None:
            t0 = time.perf_counter()
            delta = self.encode_delta(delta, rng, round_index)  # the payload: what travels
            encode_s = time.perf_counter() - t0
        secure: dict[str, Any] = {}
        weight = int(round(float(host["n"])))
        if self.secure is not None:
            # Finiteness, DP clipping and weighting on the device: the server only sees the sum.
            contribution = device_contribution(delta, float(host["n"]), self.secure)
            parameters = encode_leaves(contribution.update)  # float64: SecAgg+'s rounding, not float32's
            weight = contribution.weight
            # Metrics travel in the clear: nothing here says more about the update than the row needs
            # (not its norm, which under DP would leak past the guarantee).
            secure = {"secagg_weight": contribution.weight, "secagg_clipped_values": contribution.clipped_values,
                      "nonfinite": not contribution.finite}
        else:
            parameters = encode_tree(delta)
        self.rounds_trained += 1
        out: dict[str, Any] = {
            "client_id": self.client_id,
            "round_index": round_index,  # the server refuses a reply that is not for the round it runs
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
            "peak_flops": record.peak_flops,
            "mean_watts": record.mean_watts,
            "model_flops": record.model_flops,
            "energy_source": self.energy.label,
            "energy_is_estimate": self.energy.is_estimate,
            "bytes_received": received,
            "bytes_sent": payload_bytes(parameters),
            # padding_efficiency = real slots / slots, summed over the round's devices by the server
            "real_slots": real_slots(batches),
            "slots": float(batches["attention_mask"].size + batches["decoder_attention_mask"].size),
            "encode_seconds": encode_s,
            **secure,  # bytes_sent is then set by secure_aggregation_mod: the masked vector's size
        }
        metrics_out = {k: v for k, v in out.items() if v is not None and not (isinstance(v, float) and not np.isfinite(v))}
        return FitRes(Status(Code.OK, "ok"), parameters, weight, metrics_out)

    def encode_delta(self, delta: Any, rng: jax.Array, round_index: int) -> Any:
        """The codec's payload of ``delta``, with the simulation's codec key for this client and round.

        A stateful codec's state (top-k's error-feedback residual) is this device's own: it is
        kept on disk, one file per round trained (``DATA/codec_state/<client>/<round>.npz``), and
        round ``r`` starts from the newest file of a round before ``r`` -- so a server that
        resumes from an older checkpoint and replays rounds gets the residuals it had then.
        """
        state = self.codec.init(delta)
        stateful = bool(jax.tree.leaves(state))
        if stateful:
            state = self._load_codec_state(state, round_index)
        payload, new_state = jax.block_until_ready(self.encode(delta, state, rng))
        if stateful:
            self._save_codec_state(new_state, round_index)
        return payload

    def _load_codec_state(self, fresh: Any, round_index: int) -> Any:
        rounds = sorted(int(p.stem) for p in self.codec_state_dir.glob("*.npz") if p.stem.isdigit()) \
            if self.codec_state_dir.is_dir() else []
        before = [r for r in rounds if r < round_index]
        if not before:
            return fresh
        with np.load(self.codec_state_dir / f"{before[-1]}.npz") as saved:
            arrays = dict(saved)
        flat, treedef = jax.tree_util.tree_flatten_with_path(fresh)
        if sorted(name for name, _ in named_leaves(fresh)) != sorted(arrays):
            raise ValueError(f"device {self.client_id}: saved codec state {before[-1]}.npz does not match the codec")
        return jax.tree_util.tree_unflatten(treedef, [arrays[key_path_name(path)] for path, _ in flat])

    def _save_codec_state(self, state: Any, round_index: int) -> None:
        self.codec_state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.codec_state_dir / f"{round_index}.tmp.npz"
        np.savez(tmp, **{name: np.asarray(leaf) for name, leaf in named_leaves(jax.device_get(state))})
        tmp.replace(self.codec_state_dir / f"{round_index}.npz")

    def train(self, trainable: Any, batches: dict, rng: jax.Array,
              round_index: int) -> tuple[Any, dict[str, Any], CallRecord]:
        """The metered local training of one round: ``(delta, host metrics, record)``.

        The one place a device computes; the test suite's fault drills override it.
        """
        useful_flops = useful_train_flops(self.example_flops, batches)  # host-side, before the metered call
        with self.energy.meter.section("client") as section:
            delta, num_examples, metrics = section.block(self.update(trainable, self.frozen, batches, rng))
            section.tokens, section.flops = count_client_work(metrics, self.step_flops, useful_flops)
        host = jax.device_get({"n": num_examples, **metrics})
        return delta, host, section.record


def real_slots(batches: dict) -> float:
    """Real token slots of a device's round: Σ (attention_mask + decoder_attention_mask) · weight."""
    w = np.asarray(batches["example_weight"], np.float64)[..., None]
    return float((np.asarray(batches["attention_mask"]) * w).sum() + (np.asarray(batches["decoder_attention_mask"]) * w).sum())
