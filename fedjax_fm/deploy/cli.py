"""``fedjax-fm deploy run|keygen``: the Flower deployment from the command line.

    fedjax-fm deploy keygen PATH
    fedjax-fm deploy run CONFIG --out DIR --clients ID[,ID...] --superlink NAME
        (--device-keys KEYDIR | --no-device-keys)
        [--set SECTION.KEY=VALUE ...] [--resume] [--wait S] [--round-timeout S]

``keygen`` writes a device's SuperNode key pair. ``run`` submits the Flower App of
:mod:`fedjax_fm.deploy.apps` to a SuperLink with Flower's own ``flwr run`` (``NAME``: a
SuperLink connection in ``$FLWR_HOME/config.toml``), streams its log until the run
ends and exits 0 only if Flower reports it completed. Before submitting, it binds each
listed client id to the Flower node id of the device key ``KEYDIR/<id>.pub``
(:mod:`fedjax_fm.deploy.binding`) and refuses the run if that fails. See docs/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _flwr() -> str:
    """The ``flwr`` command of this Python environment."""
    sibling = Path(sys.executable).with_name("flwr")
    found = str(sibling) if sibling.is_file() else shutil.which("flwr")
    if not found:
        raise FileNotFoundError("Flower's `flwr` command was not found; install the deploy extra: "
                                'pip install "fedjax-fm[deploy]"')
    return found


def _keygen_command(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = Path(args.path)
    public = private.with_name(private.name + ".pub")
    existing = [str(p) for p in (private, public) if p.exists()]
    if existing:
        print(f"fedjax-fm deploy keygen: error: {', '.join(existing)} already exist(s); not overwriting",
              file=sys.stderr)
        return 2
    key = ec.generate_private_key(ec.SECP384R1())
    private.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                  serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    print(f"wrote {private} (private: stays on this device) and {public} (register it on the server)")
    return 0


def _run_command(args: argparse.Namespace) -> int:
    import tomli_w

    from fedjax_fm.config import ConfigError, load_config
    from fedjax_fm.deploy.apps import APP_DIR
    from fedjax_fm.deploy.assemble import check_deployable
    from fedjax_fm.deploy import binding

    def fail(message: str, code: int = 2) -> int:
        print(f"fedjax-fm deploy run: error: {message}", file=sys.stderr)
        return code

    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    out = Path(args.out).expanduser().resolve()
    try:
        cfg = load_config(args.config, args.set)
        check_deployable(cfg)
        flwr = _flwr()
    except (ConfigError, FileNotFoundError) as error:
        return fail(str(error))
    if len(set(clients)) != len(clients) or not clients:
        return fail(f"--clients must list distinct ids, got {args.clients!r}")
    if cfg.federated.clients_per_round > len(clients):
        return fail(f"federated.clients_per_round={cfg.federated.clients_per_round} but --clients lists "
                    f"{len(clients)} id(s)")
    try:  # what the accountant cannot model is refused before anything is submitted (population: the ids)
        from fedjax_fm.training.privacy import RunPrivacy

        RunPrivacy.from_config(cfg, len(clients))
    except ConfigError as error:
        return fail(str(error))
    if not args.resume and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
        return fail(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if any("\n" in s for s in args.set):
        return fail("a --set value may not contain a newline")
    node_ids = None
    if args.device_keys is not None:
        try:
            keys = binding.load_device_keys(clients, args.device_keys)  # files first: no SuperLink needed
            node_ids = binding.resolve_node_ids(keys, binding.registered_nodes(args.superlink), args.superlink,
                                                Path(args.device_keys).expanduser())
        except binding.BindingError as error:
            return fail(str(error))
        for client in sorted(node_ids):
            print(f"{client}: node {node_ids[client]} (key {Path(args.device_keys) / f'{client}.pub'})")
    else:
        print("fedjax-fm deploy run: warning: --no-device-keys: client ids are not bound to device keys; a "
              "registered device may claim any listed id", file=sys.stderr)
    run_config = {
        "config": str(Path(args.config).expanduser().resolve()),
        "out": str(out),
        "clients": ",".join(clients),
        "device-nodes": binding.encode_node_ids(node_ids),
        "overrides": "\n".join(args.set),
        "resume": bool(args.resume),
        "wait": float(args.wait),
        "round-timeout": float(args.round_timeout or 0.0),
    }
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "run-config.toml"
        config_file.write_text(tomli_w.dumps(run_config))
        app_dir = Path(args.app).expanduser().resolve() if args.app else APP_DIR
        command = [flwr, "run", str(app_dir), args.superlink, "--run-config", str(config_file), "--stream"]
        run_id = None
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                found = re.search(r"Successfully started run (\d+)", line)
                if found and run_id is None:
                    run_id = found.group(1)
        if proc.returncode != 0 or run_id is None:
            return fail(f"`flwr run` exited with {proc.returncode}" + ("" if run_id else " before starting a run"), 1)
    status = subprocess.run([flwr, "ls", args.superlink, "--run-id", run_id, "--format", "json"],
                            capture_output=True, text=True)
    try:
        run = json.loads(status.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        return fail(f"could not read the status of run {run_id} (`flwr ls`): {status.stdout}{status.stderr}", 1)
    if run.get("status") != "finished:completed":
        return fail(f"run {run_id} ended with status {run.get('status')!r}: {run.get('status-details')}", 1)
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        return fail(f"run {run_id} completed but wrote no {summary_path}", 1)
    summary = json.loads(summary_path.read_text())
    print(json.dumps({"run_id": run_id, **{k: summary[k] for k in ("rounds", "final_train_loss",
                                                                   "failed_client_rounds", "params_sha256")}}))
    return 0


def add_deploy_command(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``fedjax-fm deploy run ...`` and ``fedjax-fm deploy keygen ...``."""
    parser = subparsers.add_parser(
        "deploy", help="run the federated rounds on real devices with Flower (SuperLink/SuperNodes)",
        description="Deploy the same client and server steps on real devices with Flower (docs/deploy.md).")
    sub = parser.add_subparsers(dest="deploy_command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="submit the run to a SuperLink (flwr run) and follow it to the end",
                         description="On the server machine: submit fedjax-fm's Flower App to the SuperLink "
                                     "named --superlink and stream its log until the run ends.")
    run.add_argument("config", help="the experiment YAML (the same file on the server and every device)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a config value (repeatable); sent to the devices with every round")
    run.add_argument("--out", required=True, metavar="DIR", help="run directory: metrics.jsonl, checkpoints/, summary.json")
    run.add_argument("--clients", required=True, metavar="ID,ID,...",
                     help="the devices' client ids (their data file stems); other devices get no work")
    run.add_argument("--superlink", required=True, metavar="NAME",
                     help="the SuperLink connection in $FLWR_HOME/config.toml (Flower's CLI configuration)")
    bind = run.add_mutually_exclusive_group(required=True)
    bind.add_argument("--device-keys", metavar="KEYDIR",
                      help="folder with each listed device's public key as <client_id>.pub: a client id's work "
                           "goes only to the SuperNode registered with that key")
    bind.add_argument("--no-device-keys", action="store_true",
                      help="do not bind client ids to keys (any registered device may claim any listed id)")
    run.add_argument("--round-timeout", type=float, default=None, metavar="S",
                     help="seconds a device may take for a round before it counts as failed")
    run.add_argument("--wait", type=float, default=120.0, metavar="S",
                     help="seconds each round waits for its sampled devices to connect (default 120)")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    run.add_argument("--app", default=None, metavar="DIR",
                     help="a Flower App directory to submit instead of fedjax-fm's own (e.g. one whose ClientApp "
                          "wraps fedjax_fm.deploy.apps.NodeClient; the test suite's fault drills do)")
    run.set_defaults(func=_run_command)

    keygen = sub.add_parser("keygen", help="write a device's SuperNode key pair (EC P-384, OpenSSH format)",
                            description="Writes PATH (private key, mode 600; stays on the device) and PATH.pub "
                                        "(register it on the server with `flwr supernode register`).")
    keygen.add_argument("path", metavar="PATH", help="where to write the private key; the public key goes to PATH.pub")
    keygen.set_defaults(func=_keygen_command)
