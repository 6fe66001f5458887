"""The server side: a Flower ``Strategy`` whose round is our pure server update.

It runs inside the ServerApp (:mod:`fedjax_fm.deploy.apps`) that a SuperLink starts for
each ``fedjax-fm deploy run``: :func:`serve` drives it over Flower's grid with
``flwr.server.compat.start_grid``. The devices are the SuperNodes connected to that
SuperLink (with ``--enable-supernode-auth``, only those whose public keys were
registered). Per Flower round the strategy

1. identifies the connected devices (``get_properties`` -> ``client_id``, the stem of
   the device's data file; a device whose id is not in the run's client list is never
   given work, and is logged). With ``node_ids`` (``deploy run --device-keys``:
   :mod:`fedjax_fm.deploy.binding`) a listed id's work goes only to the Flower node
   whose registered key is bound to that id (the compat layer's
   ``GridClientProxy.node_id``); any other node claiming a listed id gets no work and
   is logged and reported in the row's ``rejected_devices``. Waits up to ``wait_s``
   for every sampled device;
2. samples ``fl.sample_clients(seed, r, N, K)`` exactly as simulation does (``N`` =
   the listed client ids, sorted -- the ``client_folder`` order -- ``r`` = rounds
   completed) and sends each sampled, connected device the trainable variables
   keyed by path (:mod:`fedjax_fm.deploy.wire`) with its ``round_index``,
   ``position`` and the run's ``--set`` overrides;
3. stacks the returned deltas in position order into ``fl.ClientOutputs`` and runs
   the algorithm's compiled ``server_step`` (our aggregation: weighting by examples,
   non-finite rejection, ``federated.min_clients``; then the configured server
   optimiser), metered by the server's power meter
   (:func:`fedjax_fm.training.round.metered_server_step`, as in simulation);
4. records the round exactly as a simulation does (:mod:`fedjax_fm.training.record`:
   ``round_row`` from the devices' metered calls, ``RunRecorder`` for
   ``DIR/metrics.jsonl``, orbax checkpoints, ``--resume`` and ``summary.json``), plus
   the deployment's own fields.

With ``deploy.secure_aggregation`` (:mod:`fedjax_fm.deploy.secure`) the same strategy
runs inside Flower's ``SecAggPlusWorkflow``: step 2 is unchanged, the devices' updates
arrive masked, and step 3 takes the unmasked mean that SecAgg+ writes into every
``FitRes`` instead of stacking deltas (validity from the devices' reports; under
``federated.dp`` the server adds the Gaussian noise to the sum and the accountant of
:mod:`fedjax_fm.training.privacy` records ε).

A device that crashes, times out (``round_timeout_s``) or fails to connect in time
is reported in the row's ``failed_clients`` and the round goes on with the others;
one that returns NaN/Inf is rejected by the aggregation and listed in
``nonfinite_clients``. If fewer than ``federated.min_clients`` valid updates arrive,
the round is recorded as not applied (``applied: false``) and the parameters stay.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, GetPropertiesIns, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedjax_fm import fl
from fedjax_fm.config import ExperimentConfig
from fedjax_fm.deploy.assemble import build_pieces
from fedjax_fm.deploy.binding import assign_devices
from fedjax_fm.deploy.secure import SECURE_FIELDS, make_secure_server_step, plan_secure_aggregation
from fedjax_fm.deploy.wire import WireError, decode_leaves, decode_tree, encode_tree, payload_bytes
from fedjax_fm.energy.meter import CallRecord
from fedjax_fm.training import builders
from fedjax_fm.training.record import (
    RunError,
    RunRecorder,
    client_phase,
    empty_row,
    round_communication,
    round_row,
)
from fedjax_fm.training.compression import RunCompression, compression_fields
from fedjax_fm.training.privacy import RunPrivacy
from fedjax_fm.training.round import metered_server_step

# Fields a deployment adds to the simulation's metrics row (docs/deploy.md).
DEPLOY_FIELDS = ("bytes_up_sent", "bytes_down_sent", "failed_clients", "nonfinite_clients", "rejected_devices",
                 "client_reports", *SECURE_FIELDS)


def _node_id(proxy: ClientProxy) -> int:
    """The Flower node id behind a compat-layer proxy (``flwr.server.compat``'s
    ``GridClientProxy.node_id``: the node the SuperLink authenticated by its key)."""
    node = getattr(proxy, "node_id", None)
    if node is None:
        raise RunError(f"deploy server: client proxy {proxy!r} has no node_id (not Flower's GridClientProxy)")
    return int(node)


@dataclasses.dataclass
class _RoundPlan:
    round_index: int
    started: float
    sampled: list[str]
    sent: list[str]
    bytes_down_each: int
    absent: list[str]
    nodes: dict[str, int]  # sent client id -> the node id it was sent to
    rejected: list[dict]


class DeployStrategy(Strategy):
    """Our federated round as a Flower strategy (module docstring)."""

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path, client_ids: list[str], *,
                 node_ids: Optional[dict[str, int]] = None, overrides: Optional[list[str]] = None,
                 resume: bool = False, wait_s: float = 120.0, log: Callable[[str], None] = print) -> None:
        super().__init__()
        if len(set(client_ids)) != len(client_ids) or not client_ids:
            raise RunError(f"deploy server: client ids must be distinct and non-empty, got {client_ids}")
        if cfg.federated.clients_per_round > len(client_ids):
            raise RunError(f"federated.clients_per_round={cfg.federated.clients_per_round} but only "
                           f"{len(client_ids)} client ids were listed")
        self.cfg, self.log, self.wait_s = cfg, log, wait_s
        self.overrides = list(overrides or [])
        if any("\n" in o for o in self.overrides):
            raise RunError(f"deploy server: an override may not contain a newline: {self.overrides}")
        self.client_ids = sorted(client_ids)  # positions: the simulation's client_folder order
        if node_ids is not None and (sorted(node_ids) != self.client_ids
                                     or len(set(node_ids.values())) != len(node_ids)):
            raise RunError(f"deploy server: node_ids must bind each client id to its own node, got {node_ids} "
                           f"for {self.client_ids}")
        self.node_ids = None if node_ids is None else {c: int(n) for c, n in node_ids.items()}
        if self.node_ids is None:
            log("client ids are NOT bound to device keys (--no-device-keys): a registered device may claim "
                "any listed id")
        else:
            log("client ids bound to Flower node ids (registered keys): " + json.dumps(self.node_ids))
        self.out_dir = Path(out_dir)
        # The same record as a simulation's: refuses a used folder without --resume and a
        # changed config with it, then restores the newest readable checkpoint.
        self.recorder = RunRecorder(cfg, self.out_dir, resume=resume, say=log)
        self.recorder.check()
        pieces = build_pieces(cfg)
        self.frozen = pieces.frozen
        self.algorithm = pieces.algorithm
        # deploy.secure_aggregation (fedjax_fm/deploy/secure.py): the server gets only the mean of the
        # devices' quantised updates, and (with federated.dp) adds the DP noise to their sum itself.
        self.secure = plan_secure_aggregation(cfg)
        self.privacy = RunPrivacy.from_config(cfg, len(self.client_ids))  # the population: the listed ids
        if self.privacy is not None:
            self.algorithm = self.privacy.algorithm(self.algorithm)  # DPServerState: C in the checkpoint
        self.secure_step = None
        if self.secure is not None:
            self.secure_step = make_secure_server_step(
                self.algorithm.server_optimizer, min_clients=cfg.federated.min_clients,
                noise_multiplier=None if self.privacy is None else self.privacy.noise_multiplier,
                expected_clients=None if self.privacy is None else self.privacy.expected_clients)
        self.state = self.algorithm.init(pieces.trainable, cfg.seed)
        self.trainable_bytes = fl.tree_nbytes(pieces.trainable)
        # federated.compression: devices send the codec's payload (their codec state, e.g. an
        # error-feedback residual, stays on the device); the server decodes before aggregating.
        self.compression = RunCompression(cfg.federated.compression, pieces.trainable, 0)
        self.payload_template = jax.eval_shape(
            self.compression.codec.encode, pieces.trainable,
            jax.eval_shape(self.compression.codec.init, pieces.trainable), jax.random.PRNGKey(0))[0]
        self.decode = jax.jit(self.compression.codec.decode)
        count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
        self.num_trainable = count(pieces.trainable)
        self.num_params = self.num_trainable + count(pieces.frozen)
        self.energy = builders.build_energy(cfg, log)
        restored = self.recorder.restore(self.state)
        if restored is not None:
            self.state = self.algorithm.executor.place(restored)
        if self.privacy is not None:
            self.privacy.restore(self.rounds_done)
        self._warm_up(cfg.federated.clients_per_round)
        self.claims: dict[int, str] = {}  # Flower node id -> the client id that node says it is
        self.reported: set[tuple[int, str]] = set()  # (node, claim) pairs already logged
        self.rejected: list[dict] = []  # the latest identification's refused claims
        self.plan: Optional[_RoundPlan] = None

    def _warm_up(self, num_clients: int) -> None:
        """Compiles the server step for a full round before any is metered (it is pure: the
        result is discarded). A round with fewer answering devices compiles once more."""
        if self.secure_step is not None:  # one shape whatever the number of devices
            jax.block_until_ready(self.secure_step(self.state, self.state.params, 0))
            return
        zeros = fl.ClientOutputs(
            jax.tree.map(lambda x: jnp.zeros((num_clients, *x.shape), x.dtype), self.state.params),
            jnp.ones([num_clients], jnp.float32),
            {"loss": jnp.zeros([num_clients], jnp.float32), "tokens": jnp.zeros([num_clients], jnp.float32),
             "steps": jnp.zeros([num_clients], jnp.int32)},
        )
        jax.block_until_ready(self.algorithm.server_step(self.state, zeros))

    @property
    def rounds_done(self) -> int:
        return int(self.state.round)

    @property
    def last_round(self) -> int:
        """The rounds this run does: ``federated.rounds``, or fewer when DP's target ε would be exceeded."""
        return self.cfg.federated.rounds if self.privacy is None else self.privacy.last_round

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.recorder.rows

    # -- devices -------------------------------------------------------------------

    def _identify(self, client_manager: ClientManager, group_id: int) -> dict[str, ClientProxy]:
        """``{client_id: proxy}`` of the connected devices that do a listed id's work (asks new
        nodes which id they claim; binding decides: :func:`fedjax_fm.deploy.binding.assign_devices`)."""
        proxies = {_node_id(p): p for p in dict(client_manager.all()).values()}  # a copy: (un)registrations race
        for node in list(self.claims):
            if node not in proxies:
                del self.claims[node]

        def ask(proxy: ClientProxy) -> str:
            res = proxy.get_properties(GetPropertiesIns({}), timeout=60.0, group_id=group_id)
            return str(res.properties.get("client_id", ""))

        new = [node for node in proxies if node not in self.claims]
        if new:
            # In parallel: on a SuperNode each question starts a ClientApp process.
            with ThreadPoolExecutor(max_workers=len(new)) as pool:
                futures = {node: pool.submit(ask, proxies[node]) for node in new}
            for node, future in futures.items():
                try:
                    self.claims[node] = future.result()
                except Exception as error:  # a device that cannot answer is treated as absent this time
                    self.log(f"device node {node}: no answer to get_properties ({error!r})")
        assignment = assign_devices(self.claims, self.client_ids, self.node_ids)
        for node, name in assignment.unlisted.items():
            if (node, name) not in self.reported:
                self.reported.add((node, name))
                self.log(f"device node {node} calls itself {name!r}, which is not in the client list; it gets no work")
        for rejected in assignment.rejected:
            if (rejected["node_id"], rejected["claimed"]) not in self.reported:
                self.reported.add((rejected["node_id"], rejected["claimed"]))
                self.log(f"REJECTED device node {rejected['node_id']}: it claims {rejected['claimed']!r}, but "
                         f"{rejected['reason']}; it gets no work")
        self.rejected = assignment.rejected
        return {name: proxies[node] for name, node in assignment.present.items()}

    def _absent_reason(self, name: str) -> str:
        if self.node_ids is not None and self.node_ids[name] in self.claims:
            return (f"not connected in time: its bound node {self.node_ids[name]} is connected but claims "
                    f"{self.claims[self.node_ids[name]]!r} (check that device's data file and --device-keys)")
        return "not connected in time"

    # -- Flower's Strategy interface ------------------------------------------------

    def initialize_parameters(self, client_manager: ClientManager) -> Optional[Parameters]:
        return encode_tree(self.state.params)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        cfg = self.cfg
        started = time.perf_counter()
        round_index = self.rounds_done
        if self.privacy is not None:  # the sampling the accountant assumes (Poisson or fixed-size)
            ids, mask = self.privacy.sample(cfg.seed, round_index)
            ids = [i for i, m in zip(ids, mask) if m]
        else:
            ids = fl.sample_clients(cfg.seed, round_index, len(self.client_ids), cfg.federated.clients_per_round)
        sampled = [self.client_ids[int(i)] for i in ids]
        deadline = time.monotonic() + self.wait_s
        while True:
            present = self._identify(client_manager, server_round)
            if all(name in present for name in sampled) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        sent = [name for name in sampled if name in present]
        absent = [name for name in sampled if name not in present]
        if absent:
            self.log(f"round {round_index + 1}: sampled devices not connected after {self.wait_s:.0f} s: {absent}")
        payload = encode_tree(self.state.params)
        self.plan = _RoundPlan(round_index, started, sampled, sent, payload_bytes(payload), absent,
                               {name: _node_id(present[name]) for name in sent},
                               # node ids as strings (unsigned 64-bit), as in the client reports
                               [{**r, "node_id": str(r["node_id"])} for r in self.rejected])
        instructions = [
            (present[name], FitIns(payload, {"round_index": round_index, "seed": cfg.seed,
                                             "position": self.client_ids.index(name),
                                             "overrides": "\n".join(self.overrides)}))
            for name in sent
        ]
        if not instructions:
            # Flower skips aggregate_fit when nobody is asked; record the empty round ourselves.
            self._finish_round([], [], [])
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Optional[Parameters], dict[str, Scalar]]:
        reasons: list[str] = []
        for failure in failures:
            if isinstance(failure, BaseException):
                reasons.append(repr(failure))
            else:
                proxy, res = failure
                reasons.append(f"{self.claims.get(_node_id(proxy), proxy.cid)}: {res.status.message}")
        updates = []
        mean = None  # with secure aggregation: the unmasked mean, the same Parameters in every FitRes
        refused = False  # a reply refused below; under SecAgg+ it is in the sum all the same
        for proxy, res in results:
            name = str(res.metrics.get("client_id", ""))
            node = _node_id(proxy)
            if self.plan is None or self.plan.nodes.get(name) != node:
                reasons.append(f"node {node} answered as {name!r} without being asked as it; ignored")
                refused = True
                continue
            answered_round = res.metrics.get("round_index")
            if answered_round != self.plan.round_index:
                # A reply Flower delivers late or twice (a retried message, a node that
                # reconnected) carries another round's delta: averaging it in would train
                # this round on stale parameters, silently.
                reasons.append(f"{name}: replied for round index {answered_round} while round index "
                               f"{self.plan.round_index} runs; ignored")
                refused = True
                continue
            res.metrics["node_id"] = str(node)  # a string: node ids are unsigned 64-bit
            if self.secure is not None:
                updates.append((name, None, res))
                continue
            try:
                t0 = time.perf_counter()
                delta = decode_tree(res.parameters, self.payload_template)
                if self.compression.enabled:
                    delta = jax.block_until_ready(self.decode(delta))
                    res.metrics["decode_seconds"] = time.perf_counter() - t0
            except WireError as error:
                reasons.append(f"{name}: bad payload ({error})")
                continue
            updates.append((name, delta, res))
        if self.secure is not None and refused:
            # SecAgg+ has already summed every reply: a refused one cannot be taken out.
            reasons.extend(f"{name}: in a secure sum with a refused reply; not applied"
                           for name, _, _ in updates)
            updates = []
        if self.secure is not None and updates:
            try:
                mean = decode_leaves(updates[0][2].parameters, self.state.params)
            except WireError as error:
                reasons.extend(f"{name}: secure aggregate unreadable ({error})" for name, _, _ in updates)
                updates = []
        self._finish_round(updates, reasons, failures, mean)
        return encode_tree(self.state.params), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # evaluation runs from the checkpoints (fedjax-fm's evaluator), not on devices

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[Optional[float], dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> Optional[tuple[float, dict[str, Scalar]]]:
        return None

    # -- the round's bookkeeping ----------------------------------------------------

    def _finish_round(self, updates: list[tuple[str, Any, FitRes]], reasons: list[str], failures: list[Any],
                      mean: Any = None) -> None:
        plan = self.plan
        assert plan is not None and plan.round_index == self.rounds_done
        updates.sort(key=lambda u: self.client_ids.index(u[0]))
        answered = {name for name, _, _ in updates}
        failed = [{"client": name, "reason": self._absent_reason(name)} for name in plan.absent]
        unexplained = [name for name in plan.sent if name not in answered]
        named = {name: next((r for r in reasons if r.startswith(f"{name}: ")), None) for name in unexplained}
        anonymous = iter([r for r in reasons if r not in named.values()])
        for name in unexplained:
            # Our own reasons name their device; Flower's exceptions do not, so those are
            # paired with the remaining devices in order (usually one each).
            failed.append({"client": name, "reason": named[name] or next(anonymous, "no result")})
        for name in failed:
            self.log(f"round {plan.round_index + 1}: device {name['client']} failed: {name['reason']}")
        reports = [dict(res.metrics) for _, _, res in updates]
        row = empty_row(plan.round_index + 1, self.energy.label, self.energy.is_estimate, DEPLOY_FIELDS)
        host: dict[str, Any] = {}
        if updates and self.secure is not None:
            host = self._secure_step(row, updates, reports, mean)
        elif updates:
            outputs = fl.ClientOutputs(
                jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *[d for _, d, _ in updates]),
                jnp.asarray([float(r["num_examples"]) for r in reports], jnp.float32),
                {"loss": jnp.asarray([float(r["loss"]) for r in reports], jnp.float32),
                 "tokens": jnp.asarray([float(r["tokens"]) for r in reports], jnp.float32),
                 "steps": jnp.asarray([int(r["steps"]) for r in reports], jnp.int32)},
            )
            self.state, server, host = metered_server_step(self.algorithm, self.state, outputs, self.energy.meter)
            valid = [bool(v) for v in host["client_valid"]]
            round_row(
                row, clients=len(updates), client=client_phase([_device_record(r) for r in reports]), server=server,
                losses=[float(r["loss"]) for r in reports], num_examples=[float(r["num_examples"]) for r in reports],
                client_valid=valid, num_valid=host["num_valid_clients"], applied=host["applied"],
                comm=round_communication(self.energy.network, self.compression.bytes_up, self.trainable_bytes,
                                         len(updates)),
            )
            codec_s = sum(float(r.get("encode_seconds", 0.0)) + float(r.get("decode_seconds", 0.0)) for r in reports)
            compression_fields(row, self.compression, len(updates), None)
            row["codec_seconds"] = codec_s if self.compression.enabled else None
            row["nonfinite_clients"] = [name for (name, _, _), v in zip(updates, valid) if not v]
            if all("slots" in r and "real_slots" in r for r in reports):
                # The simulation's padding_efficiency of the stacked round: Σ real slots / Σ slots.
                row["padding_efficiency"] = sum(r["real_slots"] for r in reports) / max(sum(r["slots"] for r in reports), 1.0)
        elif self.privacy is not None:
            # Nobody answered: a DP round is still applied (pure noise), as the accountant counts it.
            host = self._secure_step(row, [], [], jax.tree.map(jnp.zeros_like, self.state.params))
        else:
            # Nothing to aggregate: the round passes unapplied, exactly as server_step would leave it.
            self.state = self.state.replace(round=self.state.round + 1)
            row.update(clients=0, valid_clients=0, applied=False, nonfinite_clients=[])
        if self.privacy is not None:
            self.privacy.record_round(row, host)
        sent_bytes = (sum(int(r.get("bytes_sent", 0)) for r in reports) if self.secure is not None
                      else sum(payload_bytes(res.parameters) for _, _, res in updates))
        row.update(
            secure_aggregation=self.secure is not None,
            bytes_up_sent=int(sent_bytes),
            bytes_down_sent=plan.bytes_down_each * len(plan.sent),
            failed_clients=failed,
            rejected_devices=plan.rejected,
            client_reports=reports,
            wall_seconds=time.perf_counter() - plan.started,
        )
        row = self.recorder.record(row, self.state)
        self.log(f"round {row['round']}: {row['clients']} device(s), applied={row['applied']}, "
                 f"train_loss={row['train_loss']}, failed={[f['client'] for f in failed]}")
        self.plan = None

    def halted_round(self, reason: str) -> None:
        """Records the planned round when secure aggregation stopped before any sum: every device
        sent work is failed with ``reason`` (a DP round still releases its noise, as counted)."""
        self._finish_round([], [reason] * len(self.plan.sent) if self.plan else [], [])

    def _secure_step(self, row: dict[str, Any], updates: list[tuple[str, Any, FitRes]], reports: list[dict],
                     mean: Any) -> dict[str, Any]:
        """The server half of a SecAgg+ round from the unmasked ``mean`` (:mod:`fedjax_fm.deploy.secure`):
        fills the row and returns the step's host metrics. ``updates`` are the devices whose masked
        vectors are in the sum; which of them were valid (finite, weight > 0) only their reports say."""
        weights = [int(r.get("secagg_weight", 0)) for r in reports]
        valid = [w > 0 for w in weights]
        with self.energy.meter.section("server") as section:
            self.state, metrics = section.block(self.secure_step(self.state, mean, sum(valid)))
        host = jax.device_get(metrics)
        expected = None if self.privacy is None else self.privacy.expected_clients
        weight_sum = sum(self.secure.quantized_weight(w) for w in weights)
        clipped = sum(int(r.get("secagg_clipped_values", 0)) for r in reports)
        if reports:
            round_row(
                row, clients=len(updates), client=client_phase([_device_record(r) for r in reports]),
                server=section.record, losses=[float(r["loss"]) for r in reports],
                num_examples=[float(r["num_examples"]) for r in reports], client_valid=valid,
                num_valid=int(host["num_valid_clients"]), applied=bool(host["applied"]),
                comm=round_communication(self.energy.network, self.compression.bytes_up, self.trainable_bytes,
                                         len(updates)),
            )
        else:
            row.update(clients=0, valid_clients=0, applied=bool(host["applied"]), server_seconds=section.record.wall_s,
                       server_joules=section.record.joules)
        row.update(
            nonfinite_clients=[name for (name, _, _), r in zip(updates, reports) if r.get("nonfinite")],
            # Per coordinate of the pseudo-gradient; it holds when secagg_clipped_values is 0.
            secagg_error_bound=self.secure.error_bound(len(updates), weight_sum, expected) if host["applied"] else None,
            secagg_clipped_values=clipped,
        )
        if clipped:
            self.log(f"round {row['round']}: {clipped} update value(s) were cut at ±clipping_range="
                     f"{self.secure.clipping_range}: raise deploy.secure_aggregation.clipping_range (the error bound "
                     "does not cover them)")
        return host

    def finish(self) -> dict[str, Any]:
        """Writes ``DIR/summary.json`` (the simulation's fields, deployment fields added) and returns it."""
        self.recorder.close()
        train = [r for r in self.recorder.rows if r["round"] > 0]
        return self.recorder.write_summary(
            self.rounds_done, fl.join_variables(self.state.params, self.frozen), energy_label=self.energy.label,
            energy_is_estimate=self.energy.is_estimate, num_params=self.num_params,
            num_trainable=self.num_trainable, total_fields=("bytes_up_sent", "bytes_down_sent"),
            extra={
                "clients": self.client_ids,
                "client_nodes": None if self.node_ids is None else {c: str(n) for c, n in self.node_ids.items()},
                "rejected_devices": [{"node_id": n, "claimed": c} for n, c in sorted(
                    {(str(d["node_id"]), d["claimed"]) for r in train for d in r.get("rejected_devices") or []})],
                "failed_client_rounds": sum(len(r.get("failed_clients") or []) for r in train),
                "deployment": "flower",
                "privacy": None if self.privacy is None else {
                    **self.privacy.summary(self.rounds_done),
                    "model": "central DP: devices clip to C inside SecAgg+, the server adds the Gaussian noise to the "
                             "unmasked sum (it is trusted to add it; it never sees an individual update)"},
                "secure_aggregation": None if self.secure is None else {
                    **self.secure.summary(),
                    "max_error_bound": max((r["secagg_error_bound"] for r in train
                                            if r.get("secagg_error_bound") is not None), default=None),
                    "clipped_values": sum(int(r.get("secagg_clipped_values") or 0) for r in train),
                },
            },
        )


def _device_record(report: dict[str, Any]) -> CallRecord:
    """A device's metered client update, as it reported it (absent figures: not measured)."""
    return CallRecord(
        name="client", wall_s=float(report.get("seconds", 0.0)), tokens=report.get("tokens"),
        model_flops=report.get("model_flops"), tps=report.get("tps"), joules=report.get("joules"),
        mean_watts=report.get("mean_watts"), eta_e=report.get("tps_per_watt"), mfu=report.get("mfu"),
        peak_flops=report.get("peak_flops"), energy_source=str(report.get("energy_source", "none")),
        is_estimate=bool(report.get("energy_is_estimate", False)),
    )


def serve(grid: Any, cfg: ExperimentConfig, out_dir: str | Path, client_ids: list[str], *,
          node_ids: Optional[dict[str, int]] = None, overrides: Optional[list[str]] = None, resume: bool = False,
          round_timeout_s: Optional[float] = None, wait_s: float = 120.0, context: Any = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs ``cfg.federated.rounds`` rounds (minus those a resumed run has done) on Flower's ``grid``.

    Called by the ServerApp (:mod:`fedjax_fm.deploy.apps`) inside a SuperLink run.
    ``overrides``: the ``--set`` values the config was loaded with; they travel to the
    devices with each round (so every device trains the server's config).
    ``round_timeout_s``: a device that has not answered by then counts as failed (with
    secure aggregation: within each of SecAgg+'s four stages).
    ``wait_s``: how long each round waits for its sampled devices to connect.
    ``node_ids``: ``{client_id: Flower node id}`` binding each id to its device's
    registered key (``None``: ids are not bound; see docs/deploy.md).
    ``context``: the ServerApp's Flower ``Context``; required with ``deploy.secure_aggregation``,
    whose rounds run as Flower's ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``
    over a ``LegacyContext`` holding the strategy (plain rounds run through ``start_grid``).
    """
    from flwr.server import ServerConfig
    from flwr.server.compat import start_grid

    strategy = DeployStrategy(cfg, out_dir, client_ids, node_ids=node_ids, overrides=overrides, resume=resume,
                              wait_s=wait_s, log=log)
    remaining = strategy.last_round - strategy.rounds_done
    if remaining <= 0:
        log(f"the run already completed {strategy.rounds_done} rounds (of {strategy.last_round})")
    elif strategy.secure is None:
        start_grid(grid=grid, strategy=strategy, config=ServerConfig(num_rounds=remaining, round_timeout=round_timeout_s))
    else:
        from flwr.server import LegacyContext
        from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

        if context is None:
            raise RunError("deploy server: secure aggregation needs the ServerApp's Context (serve(..., context=))")
        secagg = SecAggPlusWorkflow(**strategy.secure.flower_arguments(round_timeout_s))

        def fit_workflow(grid: Any, legacy: Any) -> None:
            secagg(grid, legacy)
            if strategy.plan is not None:
                # SecAgg+ halted before unmasking (fewer answering devices than the threshold, or
                # fewer than 2 sampled): Flower calls no aggregate_fit; record the round as failed.
                strategy.halted_round("secure aggregation halted: too few devices answered a SecAgg+ stage for "
                                      f"reconstruction_threshold={strategy.secure.reconstruction_threshold} "
                                      "(see the ServerApp log)")

        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining), strategy=strategy)
        log("secure aggregation (SecAgg+): " + json.dumps(strategy.secure.summary()))
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    return strategy.finish()
