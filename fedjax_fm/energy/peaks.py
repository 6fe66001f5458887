"""Peak dense matmul FLOP/s per device and dtype, for model FLOP utilisation (MFU).

MFU = (model FLOPs / wall seconds) / peak. The peak comes from, in order:

1. an explicit value (``--peak-flops`` / ``energy.peak_flops``);
2. the table below, matched on ``jax.devices()[0].device_kind`` (and the SM count
   where one name covers several modules, as Jetson's "Orin" does);
3. a matmul peak measured on this device by ``fedjax-fm bench peak`` and cached in
   ``$XDG_CACHE_HOME/fedjax_fm/peak_flops.json`` (``~/.cache/...``), the only
   source for CPUs;

otherwise None, and MFU is null.

Every table figure is a *dense* rate (vendor sheets often quote 2:4-sparse tensor
rates, twice the dense ones; Jetson sheets quote sparse INT8 TOPS) for the
tensor-core path of the dtype. ``float32`` is strict FP32; on GPUs with TF32
tensor cores, when JAX's matmul precision lets XLA use TF32 (the default; not
``highest``/``float32``), the ``tensorfloat32`` row is used instead, so MFU is
measured against what the hardware could actually do for that matmul.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

T = 1e12


@dataclasses.dataclass(frozen=True)
class DevicePeak:
    """Dense peak FLOP/s of one device by dtype, and where the figures come from."""

    name: str
    match: str  # regular expression, full match against device_kind
    flops: dict[str, float]
    source: str
    core_count: int | None = None  # streaming multiprocessors; None: not used to match
    auto_match: bool = True  # False: ambiguous name, select with device_name=...


_A100_SOURCE = "NVIDIA A100 Tensor Core GPU datasheet (dense; the sheet's sparse figures are 2x)"
_H100_SOURCE = "NVIDIA H100 Tensor Core GPU datasheet (dense = the sheet's sparsity figures / 2)"

DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("NVIDIA A100", r"NVIDIA A100.*",
               {"float32": 19.5 * T, "tensorfloat32": 156 * T, "bfloat16": 312 * T, "float16": 312 * T}, _A100_SOURCE),
    DevicePeak("NVIDIA H100 SXM", r"NVIDIA H100 80GB HBM3|NVIDIA H100 SXM.*",
               {"float32": 67 * T, "tensorfloat32": 494.7 * T, "bfloat16": 989.4 * T, "float16": 989.4 * T},
               _H100_SOURCE),
    DevicePeak("NVIDIA H100 PCIe", r"NVIDIA H100 PCIe",
               {"float32": 51 * T, "tensorfloat32": 378 * T, "bfloat16": 756.5 * T, "float16": 756.5 * T},
               _H100_SOURCE),
    DevicePeak("NVIDIA H200 SXM", r"NVIDIA H200",
               {"float32": 67 * T, "tensorfloat32": 494.7 * T, "bfloat16": 989.4 * T, "float16": 989.4 * T},
               "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (dense = sparsity figures / 2)"),
    DevicePeak("NVIDIA L4", r"NVIDIA L4",
               {"float32": 30.3 * T, "tensorfloat32": 60 * T, "bfloat16": 121 * T, "float16": 121 * T},
               "NVIDIA L4 Tensor Core GPU datasheet (dense = sparsity figures / 2)"),
    DevicePeak("NVIDIA GeForce RTX 4090", r"NVIDIA GeForce RTX 4090",
               {"float32": 82.6 * T, "tensorfloat32": 82.6 * T, "bfloat16": 165.2 * T, "float16": 165.2 * T},
               "NVIDIA Ada Lovelace GPU Architecture whitepaper, appendix table (dense, FP32 accumulate)"),
    DevicePeak("NVIDIA Tesla V100", r"Tesla V100.*",
               {"float32": 15.7 * T, "float16": 125 * T},
               "NVIDIA Tesla V100 datasheet, SXM2 (Volta: no BF16, no TF32)"),
    DevicePeak("NVIDIA Tesla T4", r"Tesla T4", {"float32": 8.1 * T, "float16": 65 * T},
               "NVIDIA T4 datasheet (Turing: no BF16, no TF32)"),
    # Jetson: CUDA names the GPU "Orin" / "Xavier" whatever the module, so the SM count
    # (jax Device.core_count) tells the modules apart. Sheets give sparse INT8 TOPS;
    # dense FP16/BF16 = SMs x 2048 FLOP/clock (Ampere A100-class tensor cores) x clock.
    DevicePeak("Jetson AGX Orin 64GB", r"Orin.*",
               {"float32": 5.32 * T, "bfloat16": 42.6 * T, "float16": 42.6 * T},
               "derived: Jetson AGX Orin Series Technical Brief, 2048 CUDA / 64 Tensor cores at 1.3 GHz; "
               "dense FP16 = 16 SMs x 2048 x 1.3 GHz, i.e. the brief's 170 sparse INT8 GPU TOPS / 4",
               core_count=16),
    DevicePeak("Jetson AGX Orin 32GB", r"Orin.*",
               {"float32": 3.33 * T, "bfloat16": 26.7 * T, "float16": 26.7 * T},
               "derived: Jetson AGX Orin Series datasheet, 1792 CUDA / 56 Tensor cores at 930 MHz; "
               "dense FP16 = 14 SMs x 2048 x 0.93 GHz",
               core_count=14),
    DevicePeak("Jetson Orin NX 16GB", r"Orin.*",
               {"float32": 1.88 * T, "bfloat16": 15.0 * T, "float16": 15.0 * T},
               "derived: Jetson Orin NX Series datasheet, 1024 CUDA / 32 Tensor cores at 918 MHz; "
               "dense FP16 = 8 SMs x 2048 x 0.918 GHz. Orin Nano has 8 SMs too (lower clock): "
               "select with device_name='Jetson Orin NX 16GB'",
               core_count=8, auto_match=False),
    DevicePeak("Jetson AGX Xavier", r"Xavier.*",
               {"float32": 1.41 * T, "float16": 11.3 * T},
               "NVIDIA Jetson AGX Xavier datasheet: 512 CUDA / 64 Tensor cores at 1377 MHz, '11 TFLOPS FP16' "
               "(Volta: no BF16)",
               core_count=8),
    DevicePeak("Google TPU v4", r"TPU v4", {"bfloat16": 275 * T}, "Google Cloud TPU documentation, TPU v4"),
    DevicePeak("Google TPU v5e", r"TPU v5 ?lite|TPU v5e", {"bfloat16": 197 * T}, "Google Cloud TPU documentation, TPU v5e"),
    DevicePeak("Google TPU v5p", r"TPU v5p?", {"bfloat16": 459 * T}, "Google Cloud TPU documentation, TPU v5p"),
)


@dataclasses.dataclass(frozen=True)
class PeakFlops:
    """A resolved peak and where it came from (written next to every MFU)."""

    flops_per_s: float
    dtype: str
    device: str
    source: str


def dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def _uses_tf32() -> bool:
    precision = jax.config.jax_default_matmul_precision
    return str(precision).lower() not in ("highest", "float32", "precision.highest")


def lookup_peak(device_kind: str, dtype: Any, *, core_count: int | None = None,
                device_name: str | None = None) -> PeakFlops | None:
    """The table's dense peak for this device and dtype, or None if not listed."""
    name = dtype_name(dtype)
    rows = [r for r in DEVICE_PEAKS if r.name == device_name] if device_name else [
        r for r in DEVICE_PEAKS
        if r.auto_match and re.fullmatch(r.match, device_kind) and (r.core_count is None or r.core_count == core_count)
    ]
    if device_name and not rows:
        known = ", ".join(r.name for r in DEVICE_PEAKS)
        raise ValueError(f"unknown device_name {device_name!r}; the peak table lists: {known}")
    if not rows:
        return None
    row = rows[0]
    key = "tensorfloat32" if name == "float32" and "tensorfloat32" in row.flops and _uses_tf32() else name
    if key not in row.flops:
        return None
    return PeakFlops(row.flops[key], key, row.name, f"table: {row.source}")


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedjax_fm" / "peak_flops.json"


def _cache_key(device: jax.Device, dtype: Any) -> str:
    return f"{device.platform}|{device.device_kind}|{dtype_name(dtype)}"


def measure_matmul_peak(dtype: Any = jnp.float32, *, size: int | None = None, min_seconds: float = 0.5,
                        trials: int = 3, device: jax.Device | None = None) -> float:
    """FLOP/s of the fastest of ``trials`` timed runs of square matmuls (2 n^3 FLOPs each).

    Each trial repeats ``a @ b`` until it has run ``min_seconds``; the best trial is
    the peak (interference only ever slows a run down).
    """
    device = device or jax.devices()[0]
    size = size or (1024 if device.platform == "cpu" else 8192)
    keys = jax.random.split(jax.random.PRNGKey(0))
    a = jax.device_put(jax.random.normal(keys[0], (size, size), dtype), device)
    b = jax.device_put(jax.random.normal(keys[1], (size, size), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()  # compile
    best = 0.0
    for _ in range(trials):
        calls, start = 0, time.perf_counter()
        while True:
            matmul(a, b).block_until_ready()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = max(best, calls * 2 * size**3 / elapsed)
    return best


def save_measured_peak(flops_per_s: float, dtype: Any, *, device: jax.Device | None = None,
                       path: Path | None = None, size: int | None = None) -> Path:
    """Stores a measured peak for this device and dtype in the cache file."""
    device = device or jax.devices()[0]
    path = Path(path or default_cache_path())
    entries = _read_cache(path)
    entries[_cache_key(device, dtype)] = {
        "flops_per_s": flops_per_s,
        "matrix_size": size,
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return path


def _read_cache(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as why:
        raise ValueError(f"{path}: not valid JSON ({why}); delete it and re-run 'fedjax-fm bench peak'") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected a JSON object of measured peaks")
    return entries


def cached_peak(dtype: Any, *, device: jax.Device | None = None, path: Path | None = None) -> PeakFlops | None:
    device = device or jax.devices()[0]
    path = Path(path or default_cache_path())
    entry = _read_cache(path).get(_cache_key(device, dtype))
    if entry is None:
        return None
    return PeakFlops(float(entry["flops_per_s"]), dtype_name(dtype), device.device_kind,
                     f"measured matmul peak ({path}, {entry.get('measured_at', '?')})")


def resolve_peak(dtype: Any, *, device: jax.Device | None = None, explicit: float | None = None,
                 device_name: str | None = None, cache_path: Path | None = None) -> PeakFlops | None:
    """The peak MFU divides by: explicit, else the table, else a cached measurement, else None."""
    device = device or jax.devices()[0]
    if explicit is not None:
        if not explicit > 0:
            raise ValueError(f"peak FLOP/s must be > 0, got {explicit!r}")
        return PeakFlops(float(explicit), dtype_name(dtype), device.device_kind, "explicit")
    found = lookup_peak(device.device_kind, dtype, core_count=getattr(device, "core_count", None),
                        device_name=device_name)
    return found or cached_peak(dtype, device=device, path=cache_path)
