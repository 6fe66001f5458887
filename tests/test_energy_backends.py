"""Power backends against fake sysfs trees and a stubbed NVML: the real parsing code, no hardware."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from fedjax_fm.energy import base as backend_lib
from fedjax_fm.energy.base import ConstantBackend, PowerBackendUnavailable
from fedjax_fm.energy.detect import detect_backend, make_backend
from fedjax_fm.energy.jetson import JetsonBackend
from fedjax_fm.energy.nvml import NvmlBackend
from fedjax_fm.energy.rapl import RaplBackend
from fedjax_fm.energy.sampler import summarize_samples
from fedjax_fm.energy.sysfs import read_text


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def denying(*denied_names: str):
    """A reader that raises PermissionError for files with these names (root ignores chmod 000)."""

    def reader(path: Path) -> str:
        if Path(path).name in denied_names:
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path)

    return reader


ORIN_HWMON = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
ORIN_HWMON_2 = "sys/bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon4"


def agx_orin_tree(root: Path) -> Path:
    # JetPack 5 layout of a Jetson AGX Orin: two INA3221s, mV and mA per channel.
    return write_tree(root, {
        f"{ORIN_HWMON}/in1_label": "VDD_GPU_SOC", f"{ORIN_HWMON}/in1_input": "5000", f"{ORIN_HWMON}/curr1_input": "2000",
        f"{ORIN_HWMON}/in2_label": "VDD_CPU_CV", f"{ORIN_HWMON}/in2_input": "5000", f"{ORIN_HWMON}/curr2_input": "400",
        f"{ORIN_HWMON}/in3_label": "VIN_SYS_5V0", f"{ORIN_HWMON}/in3_input": "4976", f"{ORIN_HWMON}/curr3_input": "1000",
        f"{ORIN_HWMON}/in7_label": "sum of shunt voltages", f"{ORIN_HWMON}/in7_input": "1",
        f"{ORIN_HWMON_2}/in2_label": "VDDQ_VDD2_1V8AO", f"{ORIN_HWMON_2}/in2_input": "4992", f"{ORIN_HWMON_2}/curr2_input": "250",
    })


def test_jetson_hwmon_layout_rails_and_total(tmp_path):
    backend = JetsonBackend.discover(agx_orin_tree(tmp_path))
    assert backend.rail_names == ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO")
    watts = backend.sample().watts
    assert watts["VDD_GPU_SOC"] == pytest.approx(10.0)  # 5000 mV * 2000 mA
    assert watts["VDD_CPU_CV"] == pytest.approx(2.0)
    assert watts["VDDQ_VDD2_1V8AO"] == pytest.approx(4.992 * 0.25)
    # AGX Orin has no module-input rail: the total is the sum of the disjoint rails.
    assert backend.total_rails == backend.rail_names


def test_jetson_orin_nx_total_is_module_input_rail(tmp_path):
    write_tree(tmp_path, {
        f"{ORIN_HWMON}/in1_label": "VDD_IN", f"{ORIN_HWMON}/in1_input": "5000", f"{ORIN_HWMON}/curr1_input": "1600",
        f"{ORIN_HWMON}/in2_label": "VDD_CPU_GPU_CV", f"{ORIN_HWMON}/in2_input": "5000", f"{ORIN_HWMON}/curr2_input": "600",
        f"{ORIN_HWMON}/in3_label": "VDD_SOC", f"{ORIN_HWMON}/in3_input": "5000", f"{ORIN_HWMON}/curr3_input": "300",
    })
    backend = JetsonBackend.discover(tmp_path)
    assert backend.total_rails == ("VDD_IN",)


def test_jetson_iio_layout_xavier(tmp_path):
    iio = "sys/bus/i2c/drivers/ina3221x/1-0040/iio:device0"
    iio2 = "sys/bus/i2c/drivers/ina3221x/1-0041/iio:device1"
    write_tree(tmp_path, {
        f"{iio}/rail_name_0": "GPU", f"{iio}/in_power0_input": "3120",
        f"{iio}/rail_name_1": "CPU", f"{iio}/in_power1_input": "1560",
        f"{iio}/rail_name_2": "SOC", f"{iio}/in_power2_input": "2340",
        f"{iio2}/rail_name_0": "CV", f"{iio2}/in_power0_input": "0",
    })
    backend = JetsonBackend.discover(tmp_path)
    watts = backend.sample().watts
    assert watts == pytest.approx({"GPU": 3.12, "CPU": 1.56, "SOC": 2.34, "CV": 0.0})
    assert set(backend.total_rails) == {"GPU", "CPU", "SOC", "CV"}


def test_jetson_missing_rail_file_is_skipped_with_a_note(tmp_path):
    agx_orin_tree(tmp_path)
    (tmp_path / ORIN_HWMON / "in2_input").unlink()  # VDD_CPU_CV lost its voltage file
    backend = JetsonBackend.discover(tmp_path)
    assert "VDD_CPU_CV" not in backend.rail_names
    assert any("VDD_CPU_CV" in note and "does not exist" in note for note in backend.notes)


def test_jetson_trace_is_integrated_with_the_trapezoid_rule(tmp_path):
    backend = JetsonBackend.discover(agx_orin_tree(tmp_path))
    first = backend.sample()
    (tmp_path / ORIN_HWMON / "curr1_input").write_text("4000\n")  # GPU rail 10 W -> 20 W
    second = backend.sample()
    trace = summarize_samples(backend, [0.0, 2.0], [first, second])
    assert trace.method == "trapezoid"
    assert trace.joules_by_rail["VDD_GPU_SOC"] == pytest.approx(2.0 * (10 + 20) / 2)
    assert trace.joules == pytest.approx(sum(trace.joules_by_rail.values()))
    assert trace.peak_watts == pytest.approx(sum(second.watts.values()))


def rapl_tree(root: Path, package_uj: int = 1_000_000, dram_uj: int = 200_000) -> Path:
    zone, dram, core = ("sys/class/powercap/intel-rapl:0", "sys/class/powercap/intel-rapl:0/intel-rapl:0:0",
                        "sys/class/powercap/intel-rapl:0/intel-rapl:0:1")
    # Real trees nest subzones inside the package directory and also list them at top level.
    return write_tree(root, {
        f"{zone}/name": "package-0", f"{zone}/energy_uj": str(package_uj), f"{zone}/max_energy_range_uj": "262143328850",
        "sys/class/powercap/intel-rapl:0:0/name": "dram", "sys/class/powercap/intel-rapl:0:0/energy_uj": str(dram_uj),
        "sys/class/powercap/intel-rapl:0:0/max_energy_range_uj": "65712999613",
        "sys/class/powercap/intel-rapl:0:1/name": "core", "sys/class/powercap/intel-rapl:0:1/energy_uj": "5",
        "sys/class/powercap/intel-rapl:0:1/max_energy_range_uj": "262143328850",
        f"{dram}/name": "dram", f"{core}/name": "core",
    })


def test_rapl_zones_names_and_total(tmp_path):
    backend = RaplBackend.discover(rapl_tree(tmp_path))
    assert backend.rail_names == ("package-0", "package-0/dram", "package-0/core")
    assert backend.total_rails == ("package-0", "package-0/dram")  # core is inside the package
    sample = backend.sample()
    assert sample.watts is None
    assert sample.counters_j == pytest.approx({"package-0": 1.0, "package-0/dram": 0.2, "package-0/core": 5e-6})


def test_rapl_counter_wrap_around(tmp_path):
    max_uj = 262143328850
    rapl_tree(tmp_path, package_uj=max_uj - 1_000_000)
    backend = RaplBackend.discover(tmp_path)
    first = backend.sample()
    (tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj").write_text("2000000\n")  # wrapped past the range
    (tmp_path / "sys/class/powercap/intel-rapl:0:0/energy_uj").write_text("700000\n")
    second = backend.sample()
    trace = summarize_samples(backend, [10.0, 12.0], [first, second])
    assert trace.method == "counter"
    assert trace.joules_by_rail["package-0"] == pytest.approx(3.0)  # 1 J before the wrap + 2 J after
    assert trace.joules == pytest.approx(3.0 + 0.5)
    assert trace.watts_by_rail["package-0"] == pytest.approx([1.5])  # per-interval mean power
    assert trace.mean_watts == pytest.approx(3.5 / 2)


def test_rapl_missing_rail_is_skipped(tmp_path):
    rapl_tree(tmp_path)
    (tmp_path / "sys/class/powercap/intel-rapl:0:0/energy_uj").unlink()
    backend = RaplBackend.discover(tmp_path)
    assert backend.total_rails == ("package-0",)
    assert any("intel-rapl:0:0/energy_uj does not exist" in note for note in backend.notes)


def test_rapl_permission_denied_gives_clear_fallback_message(tmp_path):
    rapl_tree(tmp_path)
    with pytest.raises(PowerBackendUnavailable, match=r"permission denied reading .*intel-rapl:0/energy_uj"):
        RaplBackend.discover(tmp_path, reader=denying("energy_uj"))
    lines = []
    detection = detect_backend(sysfs_root=tmp_path, reader=denying("energy_uj"), log=lines.append,
                               nvml_module=None)
    assert detection.backend.name == "none"
    assert "permission denied reading" in detection.skipped["rapl"]
    assert "skipped rapl: permission denied reading" in lines[0]


class FakeNvmlError(Exception):
    pass


def fake_pynvml(power_mw=(150_000, 90_000), energy_mj=(1_000_000, 2_000_000), energy_supported=True):
    state = {"energy": list(energy_mj), "init": 0}
    module = types.ModuleType("pynvml")
    module.NVMLError = FakeNvmlError

    def energy(handle):
        if not energy_supported:
            raise FakeNvmlError("Not Supported")
        return state["energy"][handle]

    module.nvmlInit = lambda: state.__setitem__("init", state["init"] + 1)
    module.nvmlShutdown = lambda: state.__setitem__("init", state["init"] - 1)
    module.nvmlDeviceGetCount = lambda: len(power_mw)
    module.nvmlDeviceGetHandleByIndex = lambda i: i
    module.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    module.nvmlDeviceGetPowerUsage = lambda h: power_mw[h]
    module.nvmlDeviceGetTotalEnergyConsumption = energy
    module.state = state
    return module


def test_nvml_uses_energy_counter_and_keeps_power_trace(monkeypatch):
    module = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", module)  # the lazy import finds the stub
    backend = make_backend("nvml")
    assert isinstance(backend, NvmlBackend) and backend.has_energy_counter
    assert backend.device_names["gpu0"] == "NVIDIA H100 80GB HBM3"
    first = backend.sample()
    module.state["energy"] = [1_000_000 + 300_000, 2_000_000 + 180_000]  # +300 J, +180 J
    second = backend.sample()
    trace = summarize_samples(backend, [0.0, 2.0], [first, second])
    assert trace.method == "counter"
    assert trace.joules_by_rail == pytest.approx({"gpu0": 300.0, "gpu1": 180.0})
    assert trace.peak_watts == pytest.approx(240.0)
    backend.close()
    assert module.state["init"] == 0


def test_nvml_without_energy_counter_integrates_power(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(power_mw=(100_000,), energy_supported=False))
    backend = make_backend("nvml")
    assert not backend.has_energy_counter
    trace = summarize_samples(backend, [0.0, 0.5], [backend.sample(), backend.sample()])
    assert trace.method == "trapezoid" and trace.joules == pytest.approx(50.0)


def test_auto_detect_prefers_nvml_then_jetson(monkeypatch, tmp_path):
    agx_orin_tree(tmp_path)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    assert detect_backend(sysfs_root=tmp_path, log=None).backend.name == "nvml"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails -> next in order
    detection = detect_backend(sysfs_root=tmp_path, log=None)
    assert detection.backend.name == "jetson"
    assert "pynvml is not installed" in detection.skipped["nvml"]


def test_this_machine_auto_detects_none_unless_constant_configured(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    empty = tmp_path / "empty-root"
    empty.mkdir()
    detection = detect_backend(sysfs_root=empty, log=None)
    assert detection.backend.name == "none"
    assert set(detection.skipped) == {"nvml", "jetson", "rapl", "constant"}
    constant = detect_backend(sysfs_root=empty, constant_watts=15.0, log=None).backend
    assert isinstance(constant, ConstantBackend) and constant.is_estimate
    assert backend_lib.source_label(constant) == "constant (estimate)"


def test_named_backend_that_cannot_read_raises(tmp_path):
    with pytest.raises(PowerBackendUnavailable, match="no INA3221 monitor"):
        detect_backend("jetson", sysfs_root=tmp_path, log=None)
    with pytest.raises(ValueError, match="unknown power backend 'nvidia'"):
        detect_backend("nvidia", log=None)
