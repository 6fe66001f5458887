"""Shared test settings: float32 matmuls on CPU and a few virtual devices for sharding tests."""

import os

# Several virtual CPU devices so sharded execution can be tested without accelerators.
# Must be set before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
