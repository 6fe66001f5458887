"""The Flower App run by a SuperLink and its SuperNodes: ``server_app`` and ``client_app``.

``fedjax-fm deploy run`` submits the app in ``flower-app/`` (its ``pyproject.toml`` names
these two objects) with ``flwr run``; see ``docs/deploy.md``.

* ``server_app`` runs in the SuperLink's ServerApp process. Its run config (set by
  ``fedjax-fm deploy run``; keys in ``flower-app/pyproject.toml``) names the experiment
  YAML, the run directory, the client ids, their bound Flower node ids
  (``device-nodes``, :mod:`fedjax_fm.deploy.binding`), the ``--set`` overrides,
  ``resume``, ``wait`` and ``round-timeout``; it drives :class:`fedjax_fm.deploy.server.DeployStrategy` over
  Flower's grid (:func:`fedjax_fm.deploy.server.serve`).
* ``client_app`` runs in a process the SuperNode starts for each message. Its node
  config (``flower-supernode --node-config``) says where the device's files are::

      config="/path/experiment.yaml" data="/path/data-dir" [client-id="jetson-a"] [set="energy.backend=jetson"]

  ``set`` holds device-only overrides separated by ``;`` (e.g. the power backend),
  applied after the server's overrides. The ClientApp carries
  :func:`secure_aggregation_mod`, Flower's ``secaggplus_mod`` for the messages of a
  SecAgg+ round (``deploy.secure_aggregation``), so it serves plain and secure runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from flwr.app import Context
from flwr.client import Client
from flwr.clientapp import ClientApp
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
    Parameters,
    Status,
)
from flwr.serverapp import Grid, ServerApp

APP_DIR = Path(__file__).resolve().parent / "flower-app"
NODE_CONFIG_HELP = "--node-config 'config=\"/path/experiment.yaml\" data=\"/path/data-dir\"'"


class DeployAppError(ValueError):
    """A run config or node config the app cannot use."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _use_compilation_cache() -> None:
    """Flower starts a fresh process for every ServerApp run and every device message, so
    without a persistent XLA cache each round would compile the client update again.
    ``JAX_COMPILATION_CACHE_DIR`` wins when set; the default is ``~/.cache/fedjax-fm/xla``."""
    import os

    import jax

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(Path.home() / ".cache" / "fedjax-fm" / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    _log(f"JAX compilation cache: {path}")


def _lines(value: object) -> list[str]:
    return [line.strip() for line in str(value or "").splitlines() if line.strip()]


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from fedjax_fm.config import load_config
    from fedjax_fm.deploy.binding import BindingError, decode_node_ids
    from fedjax_fm.deploy.server import serve

    _use_compilation_cache()
    run_config = context.run_config
    for key in ("config", "out", "clients"):
        if not str(run_config.get(key, "")).strip():
            raise DeployAppError(f"the run config lacks {key!r}: submit the app with `fedjax-fm deploy run`")
    overrides = _lines(run_config.get("overrides"))
    cfg = load_config(str(run_config["config"]), overrides)
    clients = [c.strip() for c in str(run_config["clients"]).split(",") if c.strip()]
    try:
        node_ids = decode_node_ids(str(run_config.get("device-nodes", "")), clients)
    except BindingError as error:
        raise DeployAppError(str(error)) from None
    round_timeout = float(run_config.get("round-timeout", 0.0))
    summary = serve(grid, cfg, str(run_config["out"]), clients, node_ids=node_ids, overrides=overrides,
                    resume=bool(run_config.get("resume", False)), wait_s=float(run_config.get("wait", 120.0)),
                    round_timeout_s=round_timeout if round_timeout > 0 else None, context=context, log=_log)
    _log("summary: " + json.dumps({k: summary[k] for k in ("rounds", "final_train_loss", "failed_client_rounds",
                                                             "params_sha256")}))


class NodeClient(Client):
    """What a SuperNode's ClientApp runs for one message.

    Flower starts a fresh ClientApp process for every message, so this is cheap to
    build and ``get_properties`` (the server asking which device this is) imports no
    JAX: it only names the device's data file. ``fit`` loads the config with the
    server's overrides (``FitIns.config["overrides"]``, one per line) followed by the
    device's own, builds a :class:`fedjax_fm.deploy.client.DeviceClient` and trains.
    """

    def __init__(self, config_path: str, data_dir: str, client_id: str | None = None,
                 device_overrides: tuple[str, ...] = ()) -> None:
        from fedjax_fm.deploy.device_data import find_client_file

        self.config_path, self.data_dir, self.device_overrides = config_path, data_dir, device_overrides
        self.client_id, _ = find_client_file(data_dir, client_id)  # fails early on a wrong folder

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        return GetPropertiesRes(Status(Code.OK, "ok"), {"client_id": self.client_id})

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        # The server owns the parameters; a device never seeds them.
        return GetParametersRes(Status(Code.OK, "the server owns the parameters"), Parameters([], ""))

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        return EvaluateRes(Status(Code.OK, "no on-device evaluation"), 0.0, 0, {})

    def fit(self, ins: FitIns) -> FitRes:
        from fedjax_fm.config import load_config
        from fedjax_fm.host_allocator import keep_freed_memory

        keep_freed_memory()  # as the fedjax-fm command does: XLA:CPU's step buffers stop page-faulting
        _use_compilation_cache()
        cfg = load_config(self.config_path, _lines(ins.config.get("overrides")) + list(self.device_overrides))
        return self.device_client(cfg).fit(ins)

    def device_client(self, cfg: Any) -> Any:
        """The :class:`~fedjax_fm.deploy.client.DeviceClient` that trains this device's round."""
        from fedjax_fm.deploy.client import DeviceClient

        return DeviceClient(cfg, self.data_dir, self.client_id, log=_log)


# Set by :func:`secure_aggregation_mod` in the fit config of a message that came through SecAgg+
# (and removed from any other): a device configured for secure aggregation trains only then.
MASKED_FLAG = "fedjax_fm.secagg_masked"


def secure_aggregation_mod(msg: Any, ctxt: Context, call_next: Callable) -> Any:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round; others pass through.

    One ClientApp serves plain and secure runs: a TRAIN message carrying SecAgg+'s
    ``secaggplus_configs`` record goes through ``secaggplus_mod`` (which masks the fit
    result), any other message straight to the client. Only this mod sets
    :data:`MASKED_FLAG` in the fit config, so the device knows whether its update will
    be masked (:class:`fedjax_fm.deploy.client.DeviceClient` refuses otherwise), and the
    fit reply's ``bytes_sent`` becomes the size of the masked vector that actually travels.
    """
    from flwr.app.message_type import MessageType
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    fit_config = msg.content.config_records.get("fitins.config")
    if fit_config is not None:
        fit_config.pop(MASKED_FLAG, None)  # a server cannot claim masking it does not do
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    if fit_config is not None:
        fit_config[MASKED_FLAG] = True
    out = secaggplus_mod(msg, ctxt, call_next)
    masked = out.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS) if out.has_content() else None
    metrics = out.content.config_records.get("fitres.metrics") if out.has_content() else None
    if masked is not None and metrics is not None:
        metrics["bytes_sent"] = int(sum(len(blob) for blob in masked))
    return out


def make_client_fn(node_client: type[NodeClient] = NodeClient) -> Callable[[Context], Client]:
    """Flower's ``client_fn``: a ``node_client`` for the device described by the node config."""

    def client_fn(context: Context) -> Client:
        node_config = context.node_config
        missing = [key for key in ("config", "data") if not str(node_config.get(key, "")).strip()]
        if missing:
            raise DeployAppError(f"flower-supernode was started without {missing} in its node config; start it "
                                 f"with {NODE_CONFIG_HELP}")
        device_overrides = tuple(s.strip() for s in str(node_config.get("set", "")).split(";") if s.strip())
        return node_client(str(node_config["config"]), str(node_config["data"]),
                           str(node_config.get("client-id", "")).strip() or None, device_overrides).to_client()

    return client_fn


def make_client_app(node_client: type[NodeClient] = NodeClient) -> ClientApp:
    """fedjax-fm's ClientApp for ``node_client``, with :func:`secure_aggregation_mod` so that it
    serves runs with and without SecAgg+ (what an App of your own should export)."""
    return ClientApp(client_fn=make_client_fn(node_client), mods=[secure_aggregation_mod])


_client_fn = make_client_fn()  # fedjax-fm's own devices
client_app = ClientApp(client_fn=_client_fn, mods=[secure_aggregation_mod])
