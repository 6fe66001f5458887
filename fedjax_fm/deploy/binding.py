"""Each listed client id bound to one registered device key, hence to one Flower node id.

With ``--enable-supernode-auth`` the SuperLink knows *which key* a SuperNode holds
(it checks a signature by that key on every Fleet request and maps the key to a node
id), but a device *names itself* (``get_properties`` -> its data file's stem). Binding
closes that gap: the operator keeps each listed device's public key as
``KEYDIR/<client_id>.pub``; ``fedjax-fm deploy run --device-keys KEYDIR``

1. loads those keys (:func:`load_device_keys`: a listed id without a key file, a file
   that is not an EC public key, or two ids sharing one key are refused, naming them),
2. asks the SuperLink which node id each key is registered as
   (:func:`registered_nodes`: Flower's Control API ``ListNodes``, the call behind
   ``flwr supernode ls``, through Flower's own CLI client and connection config), and
3. refuses a key that is not registered (:func:`resolve_node_ids`);

the resulting ``{client_id: node_id}`` travels to the ServerApp in the run config
(:func:`encode_node_ids` / :func:`decode_node_ids`), where
:func:`assign_devices` gives a listed id's work only to the node bound to it.

``flwr supernode ls --format json`` (flwr 1.42, ``flwr/cli/supernode/ls.py``,
``_to_json``) prints node id, owner, status and times but not the public key, so
:func:`registered_nodes` calls the same ``ListNodes`` itself and reads
``NodeInfo.public_key``: PEM SubjectPublicKeyInfo, as ``flwr supernode register``
converts the OpenSSH ``.pub`` file (``try_load_public_key`` ->
``flwr.supercore.primitives.asymmetric.public_key_to_bytes``). Keys are compared as
DER SubjectPublicKeyInfo, whatever file format they came in.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Optional

UNBOUND = "unbound"  # the run config's device-nodes value for `deploy run --no-device-keys`


class BindingError(ValueError):
    """The listed client ids cannot be bound to registered device keys."""


@dataclasses.dataclass(frozen=True)
class RegisteredNode:
    node_id: int
    status: str  # registered | online | offline | unregistered (flwr.supercore.constant.NodeStatus)
    public_key: bytes  # DER SubjectPublicKeyInfo


def _der(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> bytes:
    """The EC public key in ``path`` (OpenSSH, as ``fedjax-fm deploy keygen`` writes it,
    or PEM) as DER SubjectPublicKeyInfo."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = path.read_bytes()
    try:
        loader = serialization.load_pem_public_key if data.lstrip().startswith(b"-----") \
            else serialization.load_ssh_public_key
        key = loader(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise BindingError(f"{path} is not a public key ({error}); it should be the .pub file that "
                           "`fedjax-fm deploy keygen` wrote on the device") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise BindingError(f"{path} holds a {type(key).__name__}, not an EC public key (SuperNode keys are EC; "
                           "make them with `fedjax-fm deploy keygen`)")
    return _der(key)


def load_device_keys(client_ids: Iterable[str], key_dir: str | Path) -> dict[str, bytes]:
    """``{client_id: DER public key}`` from ``key_dir/<client_id>.pub``, refusing missing
    files, non-keys and one key shared by several ids."""
    key_dir = Path(key_dir).expanduser()
    if not key_dir.is_dir():
        raise BindingError(f"--device-keys {key_dir}: not a directory (it should hold <client_id>.pub for every "
                           "listed client)")
    client_ids = list(client_ids)
    missing = [c for c in client_ids if not (key_dir / f"{c}.pub").is_file()]
    if missing:
        raise BindingError("no public key for listed client(s) " + ", ".join(
            f"{c} (expected {key_dir / f'{c}.pub'})" for c in missing))
    keys = {c: load_public_key(key_dir / f"{c}.pub") for c in client_ids}
    by_key: dict[bytes, list[str]] = {}
    for client, key in keys.items():
        by_key.setdefault(key, []).append(client)
    shared = [ids for ids in by_key.values() if len(ids) > 1]
    if shared:
        raise BindingError("; ".join(
            f"clients {', '.join(ids)} have the same public key ({', '.join(str(key_dir / f'{c}.pub') for c in ids)})"
            for ids in shared) + ": each device needs its own key pair (`fedjax-fm deploy keygen` on each device)")
    return keys


def registered_nodes(superlink: str) -> list[RegisteredNode]:
    """The SuperNodes registered with the SuperLink connection ``superlink`` (a name in
    ``$FLWR_HOME/config.toml``), with their public keys: Flower's ``ListNodes`` call,
    made with Flower's CLI client exactly as ``flwr supernode ls`` makes it."""
    import click
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import flwr_cli_exc_handler, init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module

    client = None
    try:
        connection = read_superlink_connection(superlink)
        client = init_http_client_from_connection(connection)
        with flwr_cli_exc_handler():
            response = client.ListNodes(ListNodesRequest())
    except click.ClickException as error:
        raise BindingError(f"could not list the SuperNodes registered with SuperLink {superlink!r}: "
                           f"{error.format_message()}") from None
    finally:
        if client is not None:
            client.close()
    return [node_from_info(info) for info in response.nodes_info]


def node_from_info(info) -> RegisteredNode:
    """A ``flwr.proto.node_pb2.NodeInfo`` (its ``public_key``: PEM, as the SuperLink stores it)."""
    from cryptography.hazmat.primitives import serialization

    key = _der(serialization.load_pem_public_key(info.public_key)) if info.public_key else b""
    return RegisteredNode(int(info.node_id), str(info.status), key)


def resolve_node_ids(keys: dict[str, bytes], nodes: list[RegisteredNode], superlink: str,
                     key_dir: str | Path = "KEYDIR") -> dict[str, int]:
    """``{client_id: node_id}``: the node each client's key is registered as (unregistered
    nodes do not count). Refuses a key that is not registered."""
    live: dict[bytes, list[int]] = {}
    for node in nodes:
        if node.status != "unregistered" and node.public_key:
            live.setdefault(node.public_key, []).append(node.node_id)
    unknown = [c for c, key in keys.items() if key not in live]
    if unknown:
        raise BindingError(
            f"the public key(s) of {', '.join(unknown)} are not registered with SuperLink {superlink!r}; register "
            "each with " + "; ".join(f"`flwr supernode register {Path(key_dir) / f'{c}.pub'} {superlink}`"
                                     for c in unknown))
    ambiguous = [c for c, key in keys.items() if len(live[key]) > 1]
    if ambiguous:  # Flower refuses a second registration of a key; guard anyway
        raise BindingError(f"the key(s) of {', '.join(ambiguous)} are registered as several nodes: "
                           + "; ".join(f"{c}: {live[keys[c]]}" for c in ambiguous))
    return {c: live[key][0] for c, key in keys.items()}


def encode_node_ids(node_ids: Optional[dict[str, int]]) -> str:
    """The run config's ``device-nodes`` value: JSON, or :data:`UNBOUND`. (A string:
    Flower node ids are unsigned 64-bit, beyond TOML's signed integers.)"""
    return UNBOUND if node_ids is None else json.dumps(node_ids, sort_keys=True)


def decode_node_ids(value: str, client_ids: list[str]) -> Optional[dict[str, int]]:
    """Inverse of :func:`encode_node_ids`, checked against the run's client ids."""
    value = value.strip()
    if value == UNBOUND:
        return None
    if not value:
        raise BindingError("the run config lacks 'device-nodes': submit the app with `fedjax-fm deploy run "
                           "--device-keys KEYDIR` (or --no-device-keys)")
    try:
        raw = json.loads(value)
        node_ids = {str(c): int(n) for c, n in raw.items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise BindingError(f"device-nodes is not a JSON object of client id -> node id: {value!r} ({error})") from None
    if sorted(node_ids) != sorted(client_ids):
        raise BindingError(f"device-nodes binds {sorted(node_ids)} but the run lists {sorted(client_ids)}")
    if len(set(node_ids.values())) != len(node_ids):
        raise BindingError(f"device-nodes binds several client ids to one node: {node_ids}")
    return node_ids


@dataclasses.dataclass
class Assignment:
    present: dict[str, int]  # listed client id -> the node that gets its work
    rejected: list[dict]  # {"node_id", "claimed", "reason"}: claims of a listed id that were refused
    unlisted: dict[int, str]  # node id -> the unlisted id it claims


def assign_devices(claims: dict[int, str], client_ids: list[str],
                   node_ids: Optional[dict[str, int]]) -> Assignment:
    """Which connected node does each listed client id's work.

    ``claims``: node id -> the client id that node says it is (its data file's stem).
    With ``node_ids`` (bound) a claim counts only from the node bound to that id; any
    other node claiming a listed id is rejected. Unbound (``None``), the first node
    (in ``claims`` order) to claim an id gets it and later claimants are rejected."""
    present: dict[str, int] = {}
    rejected: list[dict] = []
    unlisted: dict[int, str] = {}
    for node, claimed in claims.items():
        if claimed not in client_ids:
            unlisted[node] = claimed
        elif node_ids is not None and node_ids[claimed] != node:
            rejected.append({"node_id": node, "claimed": claimed,
                             "reason": f"{claimed!r} is bound to node {node_ids[claimed]} (its registered key)"})
        elif claimed in present:
            rejected.append({"node_id": node, "claimed": claimed,
                             "reason": f"{claimed!r} is already served by node {present[claimed]} (ids not bound "
                                       "to keys: first come)"})
        else:
            present[claimed] = node
    return Assignment(present, rejected, unlisted)
