"""Benchmark: one attention call, forward + backward, XLA's attention against the fused CPU kernel.

Times ``jax.grad`` of ``sum(attention(q, k, v, bias, mask)^2)`` for q, k and v (the
gradients LoRA needs: the position bias is a constant here) with
``layers.xla_attention`` and with ``cpu_attention.attention``, alternating in one
process, and prints a table with the ratio XLA / kernel (above 1: the kernel is faster).
The shapes are the packed flan-t5-small step of ``scripts/bench_real_lengths.py`` (6 rows
of 512 source and 128 target tokens, 6 heads of 64) and the demo-base encoder (8 packed
rows of 320, 4 heads of 32); each row packs examples of 40-160 tokens, so the masks are
block-diagonal as in a real packed batch (``t5.segment_mask``).

It is a speed figure, so it lives here and in docs/benchmarks.md (the fused CPU
attention kernel, "On an AVX2-only CPU"), not in a test. It says which CPU it ran on
(``host_cpu``): the kernel is compiled for it (``-march=native``) on first use.

Usage: ``python scripts/bench_attention.py [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def segment_ids(rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
    """Packed rows: examples of 40-160 tokens, numbered from 1, until fewer than 20 slots are left (0 = padding)."""
    out = np.zeros((rows, length), np.int32)
    for row in range(rows):
        position, segment = 0, 1
        while position < length - 20:
            n = int(rng.integers(40, 160))
            out[row, position:position + n] = segment
            position, segment = position + n, segment + 1
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per implementation and case (median)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if os.environ.get("FEDJAX_FM_CPU_ATTENTION", "auto").strip().lower() in ("0", "off", "false", "no"):
        parser.error("FEDJAX_FM_CPU_ATTENTION switches the kernel off: unset it to compare")

    import jax
    import jax.numpy as jnp

    from fedjax_fm.host_cpu import host_cpu
    from fedjax_fm.models import cpu_attention, layers
    from fedjax_fm.models.t5 import segment_mask

    if jax.default_backend() != "cpu":
        parser.error(f"the fused kernel runs on the CPU backend only; this is {jax.default_backend()}")
    cpu_attention.library()  # build (once per machine) before timing; raises if it cannot be built
    cpu = host_cpu()
    print(f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs, isa_signature {cpu['isa_signature']} "
          f"(AVX-512: {'yes' if 'avx512f' in cpu['isa'] else 'no'}); load average {os.getloadavg()[0]:.2f}", flush=True)
    rng = np.random.default_rng(args.seed)

    def case(name, batch, q_len, k_len, heads, head_size, mask):
        q, k, v = (jnp.asarray(rng.standard_normal((batch, n, heads, head_size)), jnp.float32)
                   for n in (q_len, k_len, k_len))
        bias = jnp.asarray(rng.standard_normal((1, heads, q_len, k_len)), jnp.float32)
        timed = {}
        for label, attention in (("xla", layers.xla_attention), ("kernel", cpu_attention.attention)):
            step = jax.jit(jax.grad(lambda q, k, v, f=attention: jnp.sum(f(q, k, v, bias, mask) ** 2), argnums=(0, 1, 2)))
            jax.block_until_ready(step(q, k, v))  # compile
            timed[label] = step
        times = {label: [] for label in timed}
        for _ in range(args.repeats):  # alternating, so that a noisy moment hits both
            for label, step in timed.items():
                start = time.perf_counter()
                jax.block_until_ready(step(q, k, v))
                times[label].append(time.perf_counter() - start)
        xla, kernel = (1e3 * float(np.median(times[label])) for label in ("xla", "kernel"))
        print(f"| {name} | {xla:.1f} ms | {kernel:.1f} ms | {xla / kernel:.2f}x |", flush=True)

    print("| attention call (forward + backward) | XLA | fused kernel | XLA / kernel |")
    print("| --- | ---: | ---: | ---: |")
    source, target = jnp.asarray(segment_ids(rng, 6, 512)), jnp.asarray(segment_ids(rng, 6, 128))
    causal = jnp.tril(jnp.ones((128, 128), bool))[None, None]
    case("encoder self-attention, 6 x 512 x 512, 6 heads of 64", 6, 512, 512, 6, 64, segment_mask(source, source))
    case("decoder self-attention, 6 x 128 x 128, causal", 6, 128, 128, 6, 64, segment_mask(target, target) & causal)
    case("cross-attention, 6 x 128 x 512", 6, 128, 512, 6, 64, segment_mask(target, source))
    demo = jnp.asarray(segment_ids(rng, 8, 320))
    case("demo-base encoder, 8 x 320 x 320, 4 heads of 32", 8, 320, 320, 4, 32, segment_mask(demo, demo))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
