"""Binding client ids to registered device keys (fedjax_fm/deploy/binding.py), without a SuperLink.

The loopback tests (test_deploy_loopback.py) run the same logic against a real
SuperLink: an unregistered key refused by ``deploy run``, and a registered device
claiming another listed device's id given no work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedjax_fm.deploy.binding import (  # noqa: E402
    UNBOUND,
    BindingError,
    RegisteredNode,
    assign_devices,
    decode_node_ids,
    encode_node_ids,
    load_device_keys,
    node_from_info,
    resolve_node_ids,
)


def _keygen(path: Path) -> Path:
    """What ``fedjax-fm deploy keygen PATH`` writes (its code, in-process)."""
    import argparse

    from fedjax_fm.deploy.cli import _keygen_command

    assert _keygen_command(argparse.Namespace(path=str(path))) == 0
    return Path(f"{path}.pub")


def _registered(pub: Path, node_id: int, status: str = "online") -> RegisteredNode:
    """The node as the SuperLink lists it: the key converted by `flwr supernode register`
    (PEM SubjectPublicKeyInfo) inside Flower's NodeInfo."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.proto.node_pb2 import NodeInfo

    info = NodeInfo(node_id=node_id, status=status, public_key=try_load_public_key(pub))
    return node_from_info(info)


@pytest.fixture
def keydir(tmp_path):
    for name in ("alice", "bob", "carol"):
        _keygen(tmp_path / "keys" / name)
    return tmp_path / "keys"


def test_keys_resolve_to_the_nodes_flower_registered_them_as(keydir):
    keys = load_device_keys(["alice", "bob", "carol"], keydir)
    # Node ids are unsigned 64-bit: one beyond int64 on purpose.
    nodes = [_registered(keydir / "alice.pub", 11), _registered(keydir / "bob.pub", 2**64 - 5, "offline"),
             _registered(keydir / "carol.pub", 33, "registered")]
    assert resolve_node_ids(keys, nodes, "fedjax", keydir) == {"alice": 11, "bob": 2**64 - 5, "carol": 33}
    # A key re-registered after `flwr supernode unregister`: the unregistered node does not count.
    nodes.append(_registered(keydir / "alice.pub", 44, "unregistered"))
    assert resolve_node_ids(keys, nodes, "fedjax", keydir)["alice"] == 11


def test_an_unregistered_key_is_refused_with_the_register_command(keydir):
    keys = load_device_keys(["alice", "bob", "carol"], keydir)
    nodes = [_registered(keydir / "alice.pub", 11), _registered(keydir / "carol.pub", 33, "unregistered")]
    with pytest.raises(BindingError, match=r"public key\(s\) of bob, carol are not registered with SuperLink "
                                           r"'fedjax'.*flwr supernode register .*bob\.pub fedjax"):
        resolve_node_ids(keys, nodes, "fedjax", keydir)


def test_missing_shared_and_bad_key_files_are_refused(keydir, tmp_path):
    with pytest.raises(BindingError, match=r"no public key for listed client\(s\) dave \(expected .*dave\.pub\)"):
        load_device_keys(["alice", "dave"], keydir)
    with pytest.raises(BindingError, match="not a directory"):
        load_device_keys(["alice"], tmp_path / "nowhere")
    shared = tmp_path / "shared"
    shutil.copytree(keydir, shared)
    shutil.copy(shared / "alice.pub", shared / "carol.pub")
    with pytest.raises(BindingError, match=r"clients alice, carol have the same public key .*own key pair"):
        load_device_keys(["alice", "bob", "carol"], shared)
    (shared / "carol.pub").write_text("not a key\n")
    with pytest.raises(BindingError, match=r"carol\.pub is not a public key"):
        load_device_keys(["alice", "carol"], shared)
    # A private key by mistake is not a public key either.
    shutil.copy(keydir / "carol", shared / "carol.pub")
    with pytest.raises(BindingError, match=r"carol\.pub is not a public key"):
        load_device_keys(["carol"], shared)


def test_run_config_value_round_trips_and_is_checked():
    node_ids = {"alice": 2**64 - 1, "bob": 7}
    assert decode_node_ids(encode_node_ids(node_ids), ["bob", "alice"]) == node_ids
    assert encode_node_ids(None) == UNBOUND and decode_node_ids(UNBOUND, ["alice"]) is None
    with pytest.raises(BindingError, match="lacks 'device-nodes'"):
        decode_node_ids("", ["alice"])
    with pytest.raises(BindingError, match=r"binds \['alice', 'bob'\] but the run lists \['alice', 'carol'\]"):
        decode_node_ids(encode_node_ids(node_ids), ["alice", "carol"])
    with pytest.raises(BindingError, match="several client ids to one node"):
        decode_node_ids(encode_node_ids({"alice": 1, "bob": 1}), ["alice", "bob"])


def test_a_listed_id_goes_only_to_its_bound_node():
    clients = ["alice", "bob", "carol"]
    bound = {"alice": 1, "bob": 2, "carol": 3}
    # Node 9 (registered, e.g. mallet) claims alice before alice's node answers; node 3 (carol's key) claims bob.
    claims = {9: "alice", 1: "alice", 2: "bob", 3: "bob", 8: "zed"}
    got = assign_devices(claims, clients, bound)
    assert got.present == {"alice": 1, "bob": 2}
    assert [(r["node_id"], r["claimed"]) for r in got.rejected] == [(9, "alice"), (3, "bob")]
    assert "'alice' is bound to node 1" in got.rejected[0]["reason"]
    assert got.unlisted == {8: "zed"}
    # Unbound, the first claimant wins -- the gap binding closes.
    unbound = assign_devices(claims, clients, None)
    assert unbound.present == {"alice": 9, "bob": 2}
    assert [(r["node_id"], r["claimed"]) for r in unbound.rejected] == [(1, "alice"), (3, "bob")]
