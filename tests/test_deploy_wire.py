"""The deployment's wire format: pytrees keyed by '/'-joined paths, never by leaf order."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from fedjax_fm.deploy.wire import WireError, decode_named, decode_tree, encode_tree, payload_bytes  # noqa: E402


def _tree(order: str) -> dict:
    a = {"q": {"lora_A": np.arange(6, dtype=np.float32).reshape(2, 3), "lora_B": np.ones((3, 2), np.float32)}}
    b = {"wo": {"lora_A": np.full((4, 1), 2.0, np.float32)}}
    return {"lora": {"block_0": a, "block_1": b} if order == "ab" else {"block_1": b, "block_0": a}}


def test_round_trip_matches_leaves_by_name_not_order():
    sent = encode_tree(_tree("ab"))
    got = decode_tree(sent, _tree("ba"))  # the receiver built its dicts in another order
    np.testing.assert_array_equal(got["lora"]["block_0"]["q"]["lora_A"], _tree("ab")["lora"]["block_0"]["q"]["lora_A"])
    np.testing.assert_array_equal(got["lora"]["block_1"]["wo"]["lora_A"], np.full((4, 1), 2.0, np.float32))
    assert sorted(decode_named(sent)) == ["lora/block_0/q/lora_A", "lora/block_0/q/lora_B", "lora/block_1/wo/lora_A"]
    arrays = 4 * (6 + 6 + 4)
    assert arrays < payload_bytes(sent) < arrays + 1024  # arrays plus the .npy and name headers


def test_mismatched_tree_is_an_error_naming_the_leaf():
    sent = encode_tree(_tree("ab"))
    other = _tree("ab")
    other["lora"]["block_1"]["wo"]["lora_A"] = np.zeros((4, 2), np.float32)
    with pytest.raises(WireError, match=r"lora/block_1/wo/lora_A is float32\[4, 1\], expected float32\[4, 2\]"):
        decode_tree(sent, other)
    del other["lora"]["block_1"]
    with pytest.raises(WireError, match="unexpected"):
        decode_tree(sent, other)
