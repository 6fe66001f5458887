"""Communication model: exact pytree bytes, profile loading, T_comm, joules and granularity."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm.energy.comm import (
    client_comm_cost,
    granularity,
    load_network_profiles,
    network_profile,
    round_comm_cost,

)
from fedjax_fm.fl import tree_nbytes


def test_tree_nbytes_is_the_sum_of_leaf_sizes():
    tree = {"params": {"a": jnp.zeros((3, 4), jnp.float32), "b": jnp.zeros((5,), jnp.bfloat16)},
            "lora": [np.zeros((2, 2), np.int8), None]}
    assert tree_nbytes(tree) == 3 * 4 * 4 + 5 * 2 + 4
    compressed = {"q": np.zeros((10,), np.int8), "scale": np.float32(0.5)}  # e.g. 8-bit quantised upload
    assert tree_nbytes(compressed) == 10 + 4


def test_shipped_profiles_are_complete_and_cited():
    profiles = load_network_profiles()
    assert {"ethernet-1g", "wifi5", "wifi6", "lte", "5g"} <= set(profiles)
    for profile in profiles.values():
        assert profile.sources, profile.name
        assert profile.uplink_bps > 0 and profile.downlink_bps > 0 and profile.latency_s > 0
    lte = profiles["lte"]
    # Huang et al. 2012's LTE power model evaluated at the profile's rates.
    assert lte.energy_per_bit_up_j == pytest.approx((438.39 + 1288.04 / 5) * 1e-9, rel=1e-3)
    assert lte.energy_per_bit_down_j == pytest.approx((51.97 + 1288.04 / 12) * 1e-9, rel=1e-3)


def test_client_and_round_cost_formulas():
    wifi = network_profile("wifi5")
    cost = client_comm_cost(1_000_000, 4_000_000, wifi)
    assert cost.seconds_up == pytest.approx(wifi.latency_s + 8e6 / wifi.uplink_bps)
    assert cost.seconds == pytest.approx(cost.seconds_up + wifi.latency_s + 32e6 / wifi.downlink_bps)
    assert cost.joules == pytest.approx(8e6 * wifi.energy_per_bit_up_j + 32e6 * wifi.energy_per_bit_down_j)
    assert cost.is_estimate
    small = client_comm_cost(10, 4_000_000, wifi)
    total = round_comm_cost([cost, small])
    assert total.bytes_up == 1_000_010 and total.seconds == cost.seconds
    assert total.joules == pytest.approx(cost.joules + small.joules)
    assert granularity(2 * total.seconds, total.seconds) == pytest.approx(2.0)
    assert granularity(1.0, 0.0) is None
    assert total.to_dict()["joules"] == pytest.approx(total.joules)


def test_bad_profile_files_name_the_file_and_key(tmp_path):
    path = tmp_path / "profiles.yaml"
    path.write_text("slow:\n  description: x\n  uplink_mbps: 0\n  downlink_mbps: 1\n  latency_ms: 1\n"
                    "  energy_per_bit_up_nj: 1\n  energy_per_bit_down_nj: 1\n  sources: [a]\n  assumptions: []\n")
    with pytest.raises(ValueError, match=r"profiles.yaml: profile 'slow': uplink_mbps must be"):
        load_network_profiles(path)
    path.write_text("slow:\n  description: x\n")
    with pytest.raises(ValueError, match=r"missing keys \['uplink_mbps'"):
        load_network_profiles(path)
    with pytest.raises(ValueError, match="unknown network profile 'carrier-pigeon'"):
        network_profile("carrier-pigeon")
