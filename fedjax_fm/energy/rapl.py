"""CPU package and DRAM energy from Linux powercap RAPL.

Each zone ``sys/class/powercap/intel-rapl:<p>[:<s>]`` (AMD's driver uses the same
names) has ``name`` (``package-0``, ``dram``, ``core``, ``uncore``, ``psys``),
``energy_uj`` (a cumulative counter, microjoules) and ``max_energy_range_uj``
(the value at which the counter wraps to 0). The energy of an interval is
``(E_end - E_start) mod range`` per sampling step -- the sampler reads often
enough that at most one wrap happens between two readings.

Rails are named ``package-0``, ``package-0/dram``, ``package-0/core`` ...; the
total is the packages plus DRAM (core/uncore are inside the package, psys spans
the platform and overlaps both, so they are kept per rail only).

Since Linux 5.10 ``energy_uj`` is readable by root only (CVE-2020-8694); then
this backend reports "permission denied reading ..." and detection moves on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedjax_fm.energy.base import PowerBackendUnavailable, PowerSample
from fedjax_fm.energy.sysfs import Reader, describe_os_error, read_number, read_text


@dataclasses.dataclass(frozen=True)
class _Zone:
    rail: str
    energy_file: Path
    range_j: float
    in_total: bool


class RaplBackend:
    """Cumulative package/DRAM energy counters; watts are derived from their differences."""

    name = "rapl"
    is_estimate = False

    def __init__(self, zones: list[_Zone], reader: Reader = read_text, notes: list[str] | None = None):
        if not zones:
            raise PowerBackendUnavailable("no readable RAPL zone")
        self._zones = zones
        self._reader = reader
        self.notes = notes or []
        self.total_rails = tuple(z.rail for z in zones if z.in_total)
        self.counter_range_j = {z.rail: z.range_j for z in zones}

    @property
    def rail_names(self) -> tuple[str, ...]:
        return tuple(z.rail for z in self._zones)

    @classmethod
    def discover(cls, sysfs_root: str | Path = "/", reader: Reader = read_text) -> "RaplBackend":
        base = Path(sysfs_root) / "sys" / "class" / "powercap"
        directories = sorted(base.glob("intel-rapl:*"))
        if not directories:
            raise PowerBackendUnavailable(f"no RAPL zones under {base}")
        zones, notes, first_error = [], [], None
        parents = {d.name: d for d in directories if d.name.count(":") == 1}
        for directory in directories:
            try:
                zone_name = reader(directory / "name")
                energy_file = directory / "energy_uj"
                read_number(reader, energy_file)  # probe: permission is the usual failure
                range_j = read_number(reader, directory / "max_energy_range_uj") / 1e6
            except OSError as why:
                reason = describe_os_error(why, Path(why.filename) if why.filename else directory / "energy_uj")
                notes.append(reason)
                first_error = first_error or reason
                continue
            if directory.name.count(":") == 1:
                rail, in_total = zone_name, zone_name.startswith("package")
            else:
                parent = directory.name.rsplit(":", 1)[0]
                try:
                    parent_name = reader(parents[parent] / "name") if parent in parents else parent
                except OSError:
                    parent_name = parent
                rail, in_total = f"{parent_name}/{zone_name}", zone_name == "dram"
            zones.append(_Zone(rail, energy_file, range_j, in_total))
        if not zones:
            raise PowerBackendUnavailable(first_error or "no readable RAPL zone")
        return cls(zones, reader=reader, notes=notes)

    def sample(self) -> PowerSample:
        return PowerSample(
            watts=None,
            counters_j={z.rail: read_number(self._reader, z.energy_file) / 1e6 for z in self._zones},
        )

    def close(self) -> None:
        pass
