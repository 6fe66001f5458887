"""Device peak table, measured matmul peak and its cache, and how MFU's peak is resolved."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from fedjax_fm.energy.peaks import (
    DEVICE_PEAKS,
    cached_peak,
    lookup_peak,
    measure_matmul_peak,
    resolve_peak,
    save_measured_peak,
)


def test_table_rows_have_sources_and_dense_figures():
    for row in DEVICE_PEAKS:
        assert row.source and row.flops, row.name
        # Tensor paths are never slower than plain FP32 on these devices.
        assert all(v >= row.flops.get("float32", 0) for v in row.flops.values()), row.name


def test_lookup_by_device_kind_dtype_and_sm_count():
    h100 = lookup_peak("NVIDIA H100 80GB HBM3", jnp.bfloat16)
    assert h100.flops_per_s == pytest.approx(989.4e12) and "datasheet" in h100.source
    assert lookup_peak("NVIDIA A100-SXM4-40GB", "bfloat16").flops_per_s == pytest.approx(312e12)
    assert lookup_peak("Orin", jnp.bfloat16, core_count=16).device == "Jetson AGX Orin 64GB"
    assert lookup_peak("Orin", jnp.bfloat16, core_count=14).device == "Jetson AGX Orin 32GB"
    assert lookup_peak("Orin", jnp.bfloat16, core_count=8) is None  # NX or Nano: ambiguous
    assert lookup_peak("Orin", jnp.bfloat16, device_name="Jetson Orin NX 16GB").flops_per_s == pytest.approx(15e12)
    assert lookup_peak("Xavier", jnp.bfloat16, core_count=8) is None  # Volta has no BF16
    assert lookup_peak("cpu", jnp.float32) is None
    with jax.default_matmul_precision("highest"):  # strict FP32 matmuls
        assert lookup_peak("NVIDIA A100 80GB PCIe", jnp.float32).dtype == "float32"
    with jax.default_matmul_precision("tensorfloat32"):
        assert lookup_peak("NVIDIA A100 80GB PCIe", jnp.float32).dtype == "tensorfloat32"
    with pytest.raises(ValueError, match="unknown device_name 'Jetson TX1'"):
        lookup_peak("Orin", jnp.float32, device_name="Jetson TX1")


def test_measured_peak_is_cached_and_used_for_cpu(tmp_path):
    cache = tmp_path / "peak_flops.json"
    assert resolve_peak(jnp.float32, cache_path=cache) is None  # CPU: not in the table, nothing measured
    flops = measure_matmul_peak(jnp.float32, size=128, min_seconds=0.02, trials=2)
    assert flops > 1e6
    save_measured_peak(flops, jnp.float32, path=cache, size=128)
    peak = resolve_peak(jnp.float32, cache_path=cache)
    assert peak.flops_per_s == pytest.approx(flops) and "measured matmul peak" in peak.source
    assert cached_peak(jnp.bfloat16, path=cache) is None
    assert resolve_peak(jnp.float32, explicit=2e9, cache_path=cache).source == "explicit"
    cache.write_text("{not json")
    with pytest.raises(ValueError, match="peak_flops.json: not valid JSON"):
        resolve_peak(jnp.float32, cache_path=cache)
