"""NVIDIA Jetson power rails from the on-board INA3221 monitors (no root needed).

Two sysfs layouts exist, both relative to ``sysfs_root`` (``/`` on a device; a
fake tree in tests):

* hwmon (JetPack 5+, AGX Orin / Orin NX / Orin Nano)::

      sys/bus/i2c/drivers/ina3221/<bus-addr>/hwmon/hwmon<k>/in<N>_label   rail name, e.g. VDD_GPU_SOC
                                                            in<N>_input   bus voltage, mV
                                                            curr<N>_input current, mA

  P_N = V_N * I_N = in<N>_input [mV] * curr<N>_input [mA] / 1e6  watts.
  Channels without a label are unconnected; a label without a current file (the
  "sum of shunt voltages" channel) is not a rail.

* iio (JetPack 4, AGX Xavier / Xavier NX / Nano)::

      sys/bus/i2c/drivers/ina3221x/<bus-addr>/iio:device<k>/rail_name_<N>     e.g. GPU
                                                          in_power<N>_input  mW

Total power: where a module-input rail exists (``VDD_IN`` on Orin NX/Nano,
``POM_5V_IN`` on Xavier NX/Nano) it already includes every other rail, so the
total is that rail alone; otherwise (AGX Orin, AGX Xavier) the rails are disjoint
and the total is their sum. These monitors keep no energy counter, so joules are
the trapezoid integral of the sampled watts.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from fedjax_fm.energy.base import PowerBackendUnavailable, PowerSample
from fedjax_fm.energy.sysfs import Reader, describe_os_error, read_number, read_text

MODULE_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


@dataclasses.dataclass(frozen=True)
class _Rail:
    name: str
    # hwmon: (voltage mV file, current mA file); iio: (power mW file,)
    files: tuple[Path, ...]

    def watts(self, reader: Reader) -> float:
        if len(self.files) == 2:
            return read_number(reader, self.files[0]) * read_number(reader, self.files[1]) / 1e6
        return read_number(reader, self.files[0]) / 1e3


class JetsonBackend:
    """Per-rail power of a Jetson module, total as described in the module docstring."""

    name = "jetson"
    is_estimate = False
    counter_range_j = None

    def __init__(self, rails: list[_Rail], reader: Reader = read_text, notes: list[str] | None = None):
        if not rails:
            raise PowerBackendUnavailable("no INA3221 rails found")
        names = [rail.name for rail in rails]
        self._rails = rails
        self._reader = reader
        self.notes = notes or []
        module_input = [n for n in names if n in MODULE_INPUT_RAILS]
        self.total_rails = (module_input[0],) if module_input else tuple(names)

    @property
    def rail_names(self) -> tuple[str, ...]:
        return tuple(rail.name for rail in self._rails)

    @classmethod
    def discover(cls, sysfs_root: str | Path = "/", reader: Reader = read_text) -> "JetsonBackend":
        """Finds the rails under ``sysfs_root`` and checks each is readable."""
        drivers = Path(sysfs_root) / "sys" / "bus" / "i2c" / "drivers"
        candidates: list[_Rail] = []
        candidates += _hwmon_rails(sorted(drivers.glob("ina3221*/*/hwmon/hwmon*")), reader)
        candidates += _iio_rails(sorted(drivers.glob("ina3221*/*/iio:device*")), reader)
        if not candidates:
            raise PowerBackendUnavailable(f"no INA3221 monitor under {drivers}")
        rails, notes = [], []
        for rail in candidates:
            try:
                rail.watts(reader)
            except OSError as why:
                notes.append(f"rail {rail.name} skipped: {describe_os_error(why, Path(why.filename or rail.files[0]))}")
                continue
            except ValueError as why:
                notes.append(f"rail {rail.name} skipped: {why}")
                continue
            rails.append(rail)
        if not rails:
            raise PowerBackendUnavailable("; ".join(notes))
        # Two monitors can name a rail alike; keep names unique so per-rail joules don't merge.
        seen: dict[str, int] = {}
        unique = []
        for rail in rails:
            count = seen.get(rail.name, 0)
            seen[rail.name] = count + 1
            unique.append(rail if count == 0 else dataclasses.replace(rail, name=f"{rail.name}#{count}"))
        return cls(unique, reader=reader, notes=notes)

    def sample(self) -> PowerSample:
        return PowerSample(watts={rail.name: rail.watts(self._reader) for rail in self._rails})

    def close(self) -> None:
        pass


def _hwmon_rails(directories: list[Path], reader: Reader) -> list[_Rail]:
    rails = []
    for directory in directories:
        for label_file in sorted(directory.glob("in*_label")):
            match = re.fullmatch(r"in(\d+)_label", label_file.name)
            if not match:
                continue
            channel = match.group(1)
            try:
                label = reader(label_file)
            except OSError:
                continue
            current = directory / f"curr{channel}_input"
            if not current.exists() or "sum" in label.lower():
                continue  # not a measured rail (e.g. "sum of shunt voltages")
            rails.append(_Rail(label, (directory / f"in{channel}_input", current)))
    return rails


def _iio_rails(directories: list[Path], reader: Reader) -> list[_Rail]:
    rails = []
    for directory in directories:
        for name_file in sorted(directory.glob("rail_name_*")):
            channel = name_file.name.rsplit("_", 1)[-1]
            try:
                label = reader(name_file)
            except OSError:
                continue
            rails.append(_Rail(label, (directory / f"in_power{channel}_input",)))
    return rails
