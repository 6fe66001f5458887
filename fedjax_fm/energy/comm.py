"""Communication cost of federated rounds: exact bytes, time and energy, granularity.

Bytes are exact: the sum of ``nbytes`` over the leaves of the pytree a client
sends (after any compression) or receives (:func:`fedjax_fm.fl.tree_nbytes`). Time
and energy come from a named network profile (``network_profiles.yaml``: bandwidth up/down, one-way latency,
energy per bit up/down, each with its source or marked as an assumption).

For one client with ``b_up`` bytes up and ``b_down`` bytes down over a link with
rates ``R_up``, ``R_down`` (bit/s), one-way latency ``L`` and energy per bit
``e_up``, ``e_down``:

    T_up   = L + 8 b_up / R_up          T_down = L + 8 b_down / R_down
    T_comm = T_up + T_down
    E_comm = 8 b_up e_up + 8 b_down e_down              (client radio / NIC only)

A round with several clients on their own links (the usual FL picture)
takes ``T_comm = max`` over clients and ``E_comm = sum`` over clients.
Granularity ``G = T_comp / T_comm`` (Hoefler's ratio of computation to
communication time): G >> 1 means the round is compute bound.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from fedjax_fm.energy.meter import safe_div

PROFILE_KEYS = ("description", "uplink_mbps", "downlink_mbps", "latency_ms", "energy_per_bit_up_nj",
                "energy_per_bit_down_nj", "sources", "assumptions")


@dataclasses.dataclass(frozen=True)
class NetworkProfile:
    name: str
    description: str
    uplink_bps: float
    downlink_bps: float
    latency_s: float
    energy_per_bit_up_j: float
    energy_per_bit_down_j: float
    sources: tuple[str, ...]
    assumptions: tuple[str, ...]


def _default_profiles_path() -> Path:
    return Path(str(resources.files("fedjax_fm.energy") / "network_profiles.yaml"))


def load_network_profiles(path: str | Path | None = None) -> dict[str, NetworkProfile]:
    """Profiles from a YAML file (the shipped one by default); errors name the file and key."""
    path = Path(path) if path is not None else _default_profiles_path()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"network profiles file {path} does not exist") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a mapping of profile name -> settings")
    profiles = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: profile {name!r} must be a mapping with keys {PROFILE_KEYS}")
        missing = [k for k in PROFILE_KEYS if k not in entry]
        unknown = [k for k in entry if k not in PROFILE_KEYS]
        if missing or unknown:
            raise ValueError(f"{path}: profile {name!r}: missing keys {missing}, unknown keys {unknown}")
        for key in PROFILE_KEYS[1:6]:
            value = entry[key]
            if not isinstance(value, (int, float)) or value < 0 or (key.endswith("mbps") and value == 0):
                raise ValueError(f"{path}: profile {name!r}: {key} must be a non-negative number"
                                 f"{' (> 0)' if key.endswith('mbps') else ''}, got {value!r}")
        if not entry["sources"] and not entry["assumptions"]:
            raise ValueError(f"{path}: profile {name!r} cites no source and states no assumption")
        profiles[str(name)] = NetworkProfile(
            name=str(name),
            description=str(entry["description"]),
            uplink_bps=entry["uplink_mbps"] * 1e6,
            downlink_bps=entry["downlink_mbps"] * 1e6,
            latency_s=entry["latency_ms"] / 1e3,
            energy_per_bit_up_j=entry["energy_per_bit_up_nj"] * 1e-9,
            energy_per_bit_down_j=entry["energy_per_bit_down_nj"] * 1e-9,
            sources=tuple(entry["sources"] or ()),
            assumptions=tuple(entry["assumptions"] or ()),
        )
    return profiles


def network_profile(name: str, path: str | Path | None = None) -> NetworkProfile:
    profiles = load_network_profiles(path)
    if name not in profiles:
        raise ValueError(f"unknown network profile {name!r}; known: {sorted(profiles)}")
    return profiles[name]


@dataclasses.dataclass(frozen=True)
class CommCost:
    """Bytes, seconds and joules of communication (one client, or a round's total)."""

    bytes_up: int
    bytes_down: int
    seconds_up: float
    seconds_down: float
    seconds: float  # T_comm
    joules_up: float
    joules_down: float
    profile: str
    is_estimate: bool = True  # a network model, not a measurement

    @property
    def joules(self) -> float:
        return self.joules_up + self.joules_down

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "joules": self.joules}


def client_comm_cost(bytes_up: int, bytes_down: int, profile: NetworkProfile) -> CommCost:
    """T_up, T_down, T_comm and joules of one client's upload and download."""
    if bytes_up < 0 or bytes_down < 0:
        raise ValueError(f"byte counts must be >= 0, got up={bytes_up}, down={bytes_down}")
    seconds_up = profile.latency_s + 8 * bytes_up / profile.uplink_bps
    seconds_down = profile.latency_s + 8 * bytes_down / profile.downlink_bps
    return CommCost(
        bytes_up=int(bytes_up), bytes_down=int(bytes_down), seconds_up=seconds_up, seconds_down=seconds_down,
        seconds=seconds_up + seconds_down, joules_up=8 * bytes_up * profile.energy_per_bit_up_j,
        joules_down=8 * bytes_down * profile.energy_per_bit_down_j, profile=profile.name,
    )


def round_comm_cost(client_costs: Iterable[CommCost]) -> CommCost:
    """A round of clients on parallel links: bytes and joules add, time is the slowest client's."""
    costs = list(client_costs)
    if not costs:
        raise ValueError("a round needs at least one client's communication cost")
    slowest = max(costs, key=lambda c: c.seconds)
    return CommCost(
        bytes_up=sum(c.bytes_up for c in costs), bytes_down=sum(c.bytes_down for c in costs),
        seconds_up=slowest.seconds_up, seconds_down=slowest.seconds_down, seconds=slowest.seconds,
        joules_up=sum(c.joules_up for c in costs), joules_down=sum(c.joules_down for c in costs),
        profile=costs[0].profile,
    )


def granularity(compute_seconds: float | None, comm_seconds: float | None) -> float | None:
    """G = T_comp / T_comm (None when there is no communication time)."""
    return safe_div(compute_seconds, comm_seconds)
