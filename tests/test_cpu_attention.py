"""The fused CPU attention kernel (``models.cpu_attention``) against the plain expression.

What must hold: forward and gradients (q, k, v, position bias) equal autodiff of
``softmax(q k^T + bias, masked) v`` for every mask the model builds (packed encoder
rows, causal decoder rows, cross attention, padding only, none) and for head sizes that
are and are not multiples of 16; a packed example's outputs and gradients are
bit-identical to the same example alone (the keys the mask hides are skipped, and
skipping them changes nothing); the results do not depend on the number of threads; the
model dispatches to it only where it applies; and switching it off or failing to build
it falls back to XLA's attention.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm.models import cpu_attention, layers
from fedjax_fm.models.t5 import segment_mask


def reference(query, key, value, bias, mask):
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, precision="highest")
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = jnp.where(mask, scores, layers._MASKED_LOGIT)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), value, precision="highest")


def relative_bias(heads, q_len, k_len, seed=0):
    """A bias that depends only on the offset k - q, as T5's does."""
    table = np.random.default_rng(seed).normal(size=(heads, q_len + k_len))
    offsets = np.arange(k_len)[None, :] - np.arange(q_len)[:, None] + q_len
    return jnp.asarray(table[:, offsets][None], jnp.float32)


def segments(lengths_per_row, width):
    """Packed segment ids [B, width]: consecutive examples numbered from 1, then 0 (padding)."""
    rows = []
    for lengths in lengths_per_row:
        row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(width - sum(lengths))])
        rows.append(row.astype(np.int32))
    return jnp.asarray(np.stack(rows))


def qkv(batch, q_len, k_len, heads, head_size, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, q_len, heads, head_size)) * 0.5, jnp.float32)
    k = jnp.asarray(rng.normal(size=(batch, k_len, heads, head_size)) * 0.5, jnp.float32)
    v = jnp.asarray(rng.normal(size=(batch, k_len, heads, head_size)), jnp.float32)
    return q, k, v


def value_and_grads(fn, q, k, v, bias, mask, weight=None):
    """The output and the gradients of ``sum(output * weight)`` (a random cotangent by default)."""
    if weight is None:
        weight = jnp.asarray(np.random.default_rng(1).normal(size=q.shape[:3] + v.shape[3:]), jnp.float32)

    def loss(q, k, v, bias):
        return jnp.sum(fn(q, k, v, bias, mask) * weight)

    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    out = jax.jit(lambda q, k, v, bias: fn(q, k, v, bias, mask))(q, k, v, bias)
    return out, jax.jit(jax.grad(loss, argnums=argnums))(q, k, v, bias)


def assert_close(ours, expected, what):
    ours_out, ours_grads = ours
    exp_out, exp_grads = expected
    np.testing.assert_allclose(ours_out, exp_out, atol=1e-5, rtol=1e-5, err_msg=f"{what}: output")
    for name, a, b in zip("qkvb", ours_grads, exp_grads):
        scale = max(1.0, float(jnp.abs(b).max()))
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-5, err_msg=f"{what}: d{name}")


def encoder_case(head_size):
    seg = segments([[13, 20, 7], [40], [9, 0], [25, 15]], 40)  # row 2: one example, then padding
    q, k, v = qkv(4, 40, 40, 3, head_size)
    return q, k, v, relative_bias(3, 40, 40), segment_mask(seg, seg)


def decoder_case(head_size):
    seg = segments([[5, 9, 4], [18], [3, 3, 3, 3]], 19)
    q, k, v = qkv(3, 19, 19, 2, head_size, seed=2)
    causal = jnp.tril(jnp.ones((19, 19), bool))[None, None]
    return q, k, v, relative_bias(2, 19, 19, seed=3), causal & segment_mask(seg, seg)


def cross_case(head_size):
    dec = segments([[5, 9, 4], [18], [3, 3, 3, 3]], 19)
    enc = segments([[30, 11, 20], [50], [8, 8, 8, 8]], 70)
    q, k, v = qkv(3, 19, 70, 2, head_size, seed=4)
    return q, k, v, None, segment_mask(dec, enc)


def padding_case(head_size):
    q, k, v = qkv(2, 6, 33, 4, head_size, seed=5)
    keep = jnp.asarray(np.arange(33)[None, :] < np.array([[33], [17]]))
    return q, k, v, relative_bias(4, 6, 33, seed=6), keep[:, None, None, :]


def unmasked_case(head_size):
    q, k, v = qkv(2, 21, 21, 2, head_size, seed=7)
    return q, k, v, None, None


CASES = {"encoder": encoder_case, "decoder": decoder_case, "cross": cross_case, "padding": padding_case,
         "unmasked": unmasked_case}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("head_size", [8, 32, 64, 100])
def test_forward_and_gradients_equal_the_plain_expression(case, head_size):
    q, k, v, bias, mask = CASES[case](head_size)
    assert cpu_attention.usable(q, k, v, bias, mask)
    assert_close(value_and_grads(cpu_attention.attention, q, k, v, bias, mask),
                 value_and_grads(reference, q, k, v, bias, mask), f"{case}, head size {head_size}")


def test_a_frozen_bias_skips_its_gradient_and_the_rest_is_unchanged():
    """LoRA: the position bias comes from frozen parameters, so the backward pass
    skips the bias gradient; q, k and v get the same gradients, bit for bit."""
    q, k, v, bias, mask = encoder_case(32)
    weight = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)

    def loss(q, k, v, bias):
        return jnp.sum(cpu_attention.attention(q, k, v, bias, mask) * weight)

    with_bias_grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    frozen = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, bias)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, bias).as_text()
    assert "bias_grad = 0" in lowered and "bias_grad = 1" not in lowered
    assert "bias_grad = 1" in jax.jit(jax.grad(loss, argnums=3)).lower(q, k, v, bias).as_text()
    for name, a, b in zip("qkv", frozen, with_bias_grad[:3]):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_fully_masked_rows_are_uniform_and_get_no_query_gradient():
    q, k, v, bias, mask = encoder_case(16)
    out, grads = value_and_grads(cpu_attention.attention, q, k, v, bias, mask)
    # Row 2 is one example of 9 then padding: padding queries see no key (uniform weights,
    # as softmax gives for equal scores) and send no gradient back.
    np.testing.assert_allclose(out[2, 20], jnp.mean(v[2], axis=0), atol=1e-6)
    np.testing.assert_array_equal(grads[0][2, 9:], 0.0)


def test_a_packed_example_equals_the_example_alone_bit_for_bit():
    """Skipping the keys the mask hides changes no sum: a packed example's outputs and
    gradients are the same bits as when it is the only example of its row."""
    lengths, width, heads = [13, 30, 7], 64, 2
    q, k, v = qkv(1, width, width, heads, 32, seed=8)
    bias = relative_bias(heads, width, width, seed=9)
    seg = segments([lengths], width)
    # Padding queries attend uniformly to every key (all of theirs are masked), so they
    # get no cotangent here, as they get no loss weight in training.
    weight = jnp.asarray(np.random.default_rng(10).normal(size=q.shape), jnp.float32) * (seg > 0)[..., None, None]
    packed = value_and_grads(cpu_attention.attention, q, k, v, bias, segment_mask(seg, seg), weight)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone_seg = jnp.asarray((np.arange(width) < n).astype(np.int32))[None]
        shift = lambda x: jnp.zeros_like(x).at[:, :n].set(x[:, part])  # the example at offset 0
        alone = value_and_grads(cpu_attention.attention, shift(q), shift(k), shift(v), bias,
                                segment_mask(alone_seg, alone_seg), shift(weight))
        np.testing.assert_array_equal(packed[0][:, part], alone[0][:, :n])
        for name, a, b in zip("qkv", packed[1][:3], alone[1][:3]):
            np.testing.assert_array_equal(a[:, part], b[:, :n], err_msg=f"d{name}, example of {n}")
        start += n


def test_vmap_equals_one_by_one():
    q, k, v, bias, mask = encoder_case(32)
    stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]

    def grad_q(q, k, v):
        return jax.grad(lambda q: cpu_attention.attention(q, k, v, bias, mask).sum())(q)

    batched = jax.jit(jax.vmap(grad_q))(*stacked)
    for i in range(2):
        np.testing.assert_array_equal(batched[i], jax.jit(grad_q)(*(s[i] for s in stacked)))


def test_the_model_dispatches_to_the_kernel_only_where_it_applies():
    q, k, v, bias, mask = encoder_case(32)

    def uses_kernel(*args, **kwargs):
        text = str(jax.make_jaxpr(lambda *a: layers.attention_weights_and_output(*a, **kwargs))(*args))
        return "ffi_call" in text

    assert uses_kernel(q, k, v, bias, mask)
    assert uses_kernel(q, k, v, None, None)
    seed = jnp.array([1, 2], jnp.uint32)
    assert not uses_kernel(q, k, v, bias, mask, dropout_seed=seed, dropout_rate=0.1)  # dropout
    assert uses_kernel(q, k, v, bias, mask, dropout_seed=seed, dropout_rate=0.0)  # rate 0 is no dropout
    assert not uses_kernel(*(x.astype(jnp.bfloat16) for x in (q, k, v)), bias, mask)  # bfloat16
    assert not uses_kernel(q, k, v, jnp.concatenate([bias] * 4), mask)  # a bias per row
    q_big, k_big, v_big = qkv(1, 4, 4, 1, 160)
    assert not uses_kernel(q_big, k_big, v_big, None, None)  # head size over 128


def _run_python(code, **env):
    full_env = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=full_env, timeout=None)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_results_do_not_depend_on_the_number_of_threads(tmp_path):
    """Each output element is computed by one thread in a fixed order: one CPU and all
    of them give the same bits (the call is large enough to use threads)."""
    code = f"""
        import os, sys, numpy as np
        if sys.argv[1:] == ["1"]:
            os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import jax, jax.numpy as jnp
        from test_cpu_attention import qkv, relative_bias, segments, value_and_grads
        from fedjax_fm.models import cpu_attention
        from fedjax_fm.models.t5 import segment_mask
        q, k, v = qkv(2, 128, 128, 4, 64)
        seg = segments([[50, 78], [128]], 128)
        out, grads = value_and_grads(cpu_attention.attention, q, k, v, relative_bias(4, 128, 128), segment_mask(seg, seg))
        np.savez(sys.argv[2], out=out, *grads)
    """
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(code))
    results = []
    for cpus in ("1", "all"):
        path = tmp_path / f"{cpus}.npz"
        subprocess.run([sys.executable, str(script), cpus, str(path)], check=True, capture_output=True)
        results.append(np.load(path))
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to compare")
    for name in results[0].files:
        np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)


def test_switched_off_the_model_uses_xla_attention():
    result = _run_python("""
        import jax.numpy as jnp
        from fedjax_fm.models import cpu_attention
        q = jnp.ones((1, 4, 1, 8))
        print(cpu_attention.usable(q, q, q, None, None), cpu_attention.status())
    """, FEDJAX_FM_CPU_ATTENTION="0")
    assert result.stdout.split()[0] == "False"
    assert "'mode': 'off'" in result.stdout


def test_a_failed_build_warns_and_falls_back_or_fails_when_required(tmp_path):
    code = """
        import logging, jax, jax.numpy as jnp
        logging.basicConfig(level=logging.WARNING)
        from fedjax_fm.models import layers, cpu_attention
        q = jnp.ones((1, 4, 1, 8))
        out = layers.attention_weights_and_output(q, q, q, None, None)
        print("ok", cpu_attention.usable(q, q, q, None, None), float(out.sum()))
    """
    env = dict(CXX="/bin/false", FEDJAX_FM_KERNEL_CACHE=str(tmp_path / "kernels"))
    fallback = _run_python(code, **env)
    assert fallback.stdout.split()[:2] == ["ok", "False"]
    assert "fused CPU attention unavailable, using XLA's attention" in fallback.stderr
    assert fallback.stderr.count("fused CPU attention unavailable") == 1  # warned once
    required = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              env={**os.environ, **env, "FEDJAX_FM_CPU_ATTENTION": "1"})
    assert required.returncode != 0
    assert "KernelBuildError" in required.stderr and "compiling cpu_attention.cc failed" in required.stderr
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left behind


def test_a_bad_switch_value_is_refused(monkeypatch):
    monkeypatch.setenv("FEDJAX_FM_CPU_ATTENTION", "maybe")
    with pytest.raises(ValueError, match="FEDJAX_FM_CPU_ATTENTION='maybe'"):
        cpu_attention.available()


def test_status_names_the_library():
    status = cpu_attention.status()
    assert status["used"] is True and status["library"].startswith("cpu_attention-")
    assert json.dumps(status)  # goes into summary.json
