"""``fedjax-fm deploy server|client``: the Flower deployment from the command line.

    fedjax-fm deploy server CONFIG --out DIR --clients ID[,ID...] [--address HOST:PORT]
        [--ca CA.pem --cert SERVER.pem --key SERVER.key] [--round-timeout S] [--wait S] [--resume]
    fedjax-fm deploy client CONFIG --data DIR --server HOST:PORT [--client-id ID] [--ca CA.pem]

See docs/deploy.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path


def _config(args: argparse.Namespace):
    from fedjax_fm.config import load_config

    return load_config(args.config, args.set)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _server_command(args: argparse.Namespace) -> int:
    import json

    from fedjax_fm.checkpoint import CheckpointError
    from fedjax_fm.config import ConfigError
    from fedjax_fm.deploy.server import run_server
    from fedjax_fm.experiment import RunError

    tls = (args.ca, args.cert, args.key)
    if any(tls) and not all(tls):
        print("fedjax-fm deploy server: error: TLS needs all of --ca, --cert and --key", file=sys.stderr)
        return 2
    try:
        cfg = _config(args)
        certificates = tuple(Path(p).read_bytes() for p in tls) if all(tls) else None
        clients = [c for c in args.clients.split(",") if c]
        summary = run_server(cfg, args.out, clients, args.address, certificates=certificates, resume=args.resume,
                             round_timeout_s=args.round_timeout, wait_s=args.wait, log=_say)
    except (ConfigError, RunError, CheckpointError, FileNotFoundError) as error:
        print(f"fedjax-fm deploy server: error: {error}", file=sys.stderr)
        return 2
    except BaseException:  # noqa: BLE001 - see below
        # Flower's gRPC server threads are not daemons: after an error inside a round the
        # process would live on without serving. Report and leave for real.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    print(json.dumps({k: summary[k] for k in ("rounds", "final_train_loss", "failed_client_rounds", "params_sha256")}))
    return 0


def _client_command(args: argparse.Namespace) -> int:
    from fedjax_fm.config import ConfigError
    from fedjax_fm.data.records import DataError
    from fedjax_fm.deploy.client import run_client

    try:
        cfg = _config(args)
        ca = Path(args.ca).read_bytes() if args.ca else None
        run_client(cfg, args.data, args.server, client_id=args.client_id, root_certificates=ca,
                   max_wait_s=args.max_wait, log=_say)
    except (ConfigError, DataError, FileNotFoundError) as error:
        print(f"fedjax-fm deploy client: error: {error}", file=sys.stderr)
        return 2
    except ConnectionError as error:
        print(f"fedjax-fm deploy client: error: {error}", file=sys.stderr)
        return 1
    return 0


def add_deploy_command(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``fedjax-fm deploy server ...`` and ``fedjax-fm deploy client ...``."""
    parser = subparsers.add_parser(
        "deploy", help="run the federated rounds on real devices with Flower (server or device side)",
        description="Deploy the same client and server steps on real devices with Flower (docs/deploy.md).")
    sub = parser.add_subparsers(dest="deploy_command", metavar="ROLE", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="the experiment YAML (the same file on the server and every device)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable); use the same overrides everywhere")

    server = sub.add_parser("server", help="the Flower server running our aggregation and server optimiser")
    common(server)
    server.add_argument("--out", required=True, metavar="DIR", help="run directory: metrics.jsonl, checkpoints/, summary.json")
    server.add_argument("--clients", required=True, metavar="ID,ID,...",
                        help="the devices' client ids (their data file stems); others get no work")
    server.add_argument("--address", default="0.0.0.0:8080", help="listen address (default 0.0.0.0:8080)")
    server.add_argument("--ca", help="CA certificate (PEM) for TLS")
    server.add_argument("--cert", help="server certificate (PEM), signed by the CA")
    server.add_argument("--key", help="server private key (PEM)")
    server.add_argument("--round-timeout", type=float, default=None, metavar="S",
                        help="seconds a device may take for a round before it counts as failed")
    server.add_argument("--wait", type=float, default=120.0, metavar="S",
                        help="seconds each round waits for its sampled devices to connect (default 120)")
    server.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    server.set_defaults(func=_server_command)

    client = sub.add_parser("client", help="a device: trains on its own DIR/<client_id>.jsonl")
    common(client)
    client.add_argument("--data", required=True, metavar="DIR", help="folder holding this device's <client_id>.jsonl")
    client.add_argument("--client-id", default=None, help="which file in --data (default: the only one)")
    client.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    client.add_argument("--ca", help="CA certificate (PEM) that signed the server's certificate: enables TLS")
    client.add_argument("--max-wait", type=float, default=300.0, metavar="S",
                        help="retry an unreachable server for this many seconds since the last round trained (default 300)")
    client.set_defaults(func=_client_command)
