"""NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

Per GPU ``i`` the rail ``gpu{i}`` carries

* watts: ``nvmlDeviceGetPowerUsage`` (milliwatts) -- the trace;
* joules: ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver
  loaded; Volta and newer) -- used for the energy of a call when every GPU
  supports it, because the counter integrates on the board at a rate no host
  sampler matches (and recent drivers average the power reading over up to 1 s).

Install with ``pip install 'fedjax-fm[nvml]'``; the import is lazy so the rest of
the library never needs it.
"""

from __future__ import annotations

from typing import Sequence

from fedjax_fm.energy.base import PowerBackendUnavailable, PowerSample


def _import_pynvml():
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        raise PowerBackendUnavailable(
            "pynvml is not installed (pip install 'fedjax-fm[nvml]', i.e. nvidia-ml-py)"
        ) from None
    return pynvml


class NvmlBackend:
    """Power and energy of NVIDIA GPUs (all visible to NVML, or ``device_indices``)."""

    name = "nvml"
    is_estimate = False
    counter_range_j = None  # a 64-bit millijoule counter: no wrap in practice

    def __init__(self, device_indices: Sequence[int] | None = None, nvml=None):
        self._nvml = nvml if nvml is not None else _import_pynvml()
        error = getattr(self._nvml, "NVMLError", Exception)
        try:
            self._nvml.nvmlInit()
        except error as why:
            raise PowerBackendUnavailable(f"nvmlInit failed: {why}") from None
        try:
            count = self._nvml.nvmlDeviceGetCount()
            if count == 0:
                raise PowerBackendUnavailable("NVML reports no GPU")
            indices = list(range(count)) if device_indices is None else list(device_indices)
            bad = [i for i in indices if not 0 <= i < count]
            if bad:
                raise PowerBackendUnavailable(f"GPU indices {bad} out of range (NVML sees {count})")
            self._handles = {f"gpu{i}": self._nvml.nvmlDeviceGetHandleByIndex(i) for i in indices}
            self.device_names = {rail: _text(self._nvml.nvmlDeviceGetName(h)) for rail, h in self._handles.items()}
            # Probe both readings once so an unsupported board is reported now, not mid-run.
            for rail, handle in self._handles.items():
                try:
                    self._nvml.nvmlDeviceGetPowerUsage(handle)
                except error as why:
                    raise PowerBackendUnavailable(f"{rail}: power reading not supported: {why}") from None
            self.has_energy_counter = True
            for handle in self._handles.values():
                try:
                    self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                except error:
                    self.has_energy_counter = False  # pre-Volta: integrate the samples
        except BaseException:
            self._nvml.nvmlShutdown()
            raise
        self.total_rails = tuple(self._handles)

    def sample(self) -> PowerSample:
        watts = {rail: self._nvml.nvmlDeviceGetPowerUsage(h) / 1e3 for rail, h in self._handles.items()}
        counters = None
        if self.has_energy_counter:
            counters = {rail: self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3 for rail, h in self._handles.items()}
        return PowerSample(watts=watts, counters_j=counters)

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def _text(value) -> str:
    # Older pynvml releases return bytes.
    return value.decode() if isinstance(value, bytes) else str(value)
