"""T5's attention core as one fused XLA:CPU custom call, forward and backward.

The maths is ``layers.attention_weights_and_output``'s (no ``1/sqrt(d)``; T5 folds it
into ``q``):

    S = q k^T + bias,  S_qk = -FLT_MAX where the mask hides k from q,
    P = softmax_k(S),  O = P v
    dv = P^T dO,  dP = dO v^T,  dS = P ⊙ (dP − D),  D_q = Σ_d dO_qd O_qd,
    dq = dS k,  dk = dS^T q,  dbias = Σ_batch dS

Why: XLA:CPU runs these as separate products over whole [B, H, Q, K] float32 arrays,
which do not fit in cache, and it cannot skip the pairs that the mask hides. The kernel
(``cpu_attention.cc``, C++ through the XLA FFI) works on blocks of 4 query rows of one
head whose scores stay in L1, and each block only touches the keys between the first
and the last one its mask lets it see. On packed rows (several examples per row,
attention only within an example) that is each example's own keys, so the work scales
with the sum of the squared example lengths instead of the squared row length. A key
whose weight is exactly 0 adds nothing to any sum, so the result does not depend on how
much is skipped. Every output element is computed by one thread in a fixed order: the
results are bit-identical from run to run, for any number of threads.

When it is used (``usable``): the CPU backend, float32 ``q``/``k``/``v``, no attention
dropout, a head size of at most 128, a position bias shared by the batch
([1, H, Q, K]) or none, and a mask that does not depend on the head ([B or 1, 1, Q or 1,
K]) or none. Everything else (GPUs, bfloat16, dropout) runs XLA's attention, and so
does everything when the kernel cannot be built.

Built on first use with the system's C++ compiler (``$CXX``, else ``c++``/``g++``/
``clang++``; ``-O3 -march=native``) into ``$FEDJAX_FM_KERNEL_CACHE`` (default
``~/.cache/fedjax-fm/kernels``), one file per source, compiler, jaxlib and CPU kind, so
a home directory shared by machines of different kinds never loads code built for
another. ``FEDJAX_FM_CPU_ATTENTION=0`` turns the kernel off; ``=1`` makes a failed
build an error instead of a warning and XLA's attention.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.host_cpu import host_cpu

Array = jax.Array

_LOG = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_FORWARD = "fedjax_fm_cpu_attention_forward"
_BACKWARD = "fedjax_fm_cpu_attention_backward"
_MAX_HEAD_SIZE = 128
_ENV_SWITCH = "FEDJAX_FM_CPU_ATTENTION"
_ENV_CACHE = "FEDJAX_FM_KERNEL_CACHE"


class KernelBuildError(RuntimeError):
    """The fused CPU attention kernel could not be built or loaded."""


def _mode() -> str:
    """``"off"``, ``"auto"`` (default: use it when it builds) or ``"on"`` (a failed build is an error)."""
    value = os.environ.get(_ENV_SWITCH, "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes"):
        return "on"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(f"{_ENV_SWITCH}={value!r}: use 0 (off), 1 (on) or auto")


def _compiler() -> str:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    raise KernelBuildError("no C++ compiler found (set CXX, or install g++ or clang++)")


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try, best first: tuned for this CPU, then generic."""
    base = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", f"-I{jax.ffi.include_dir()}"]
    return [[*base, "-march=native"], base]


def _build_key(compiler: str, flags: list[str]) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    parts = [
        _SOURCE.read_bytes().hex(),
        version,
        " ".join(flags),
        jax.__version__,
        platform.machine(),
        host_cpu()["isa_signature"],
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    return Path(os.environ.get(_ENV_CACHE) or Path.home() / ".cache" / "fedjax-fm" / "kernels")


def _build() -> Path:
    """Compiles the kernel (once per key) and returns the shared library's path."""
    compiler = _compiler()
    errors = []
    for flags in _flag_sets():
        path = _cache_dir() / f"cpu_attention-{_build_key(compiler, flags)}.so"
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Build into a temporary name and rename: processes that build at once never
        # load a half-written file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        _LOG.info("building the fused CPU attention kernel (once per machine): %s", path)
        result = subprocess.run([compiler, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode == 0:
            os.replace(tmp, path)
            return path
        os.unlink(tmp)
        errors.append(f"{' '.join(flags[-1:])}: {result.stderr.strip()[-600:]}")
    raise KernelBuildError("compiling cpu_attention.cc failed:\n" + "\n".join(errors))


_lock = threading.Lock()
_state: dict[str, Any] = {}


def library() -> Path:
    """Builds (if need be), loads and registers the kernel; returns the library's path.

    Raises ``KernelBuildError`` when it cannot be built or loaded.
    """
    with _lock:
        if "path" in _state:
            return _state["path"]
        if "error" in _state:
            raise _state["error"]
        try:
            path = _build()
            lib = ctypes.cdll.LoadLibrary(str(path))
            jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.FedjaxAttentionForward), platform="cpu")
            jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.FedjaxAttentionBackward), platform="cpu")
        except (KernelBuildError, OSError, AttributeError) as error:
            wrapped = error if isinstance(error, KernelBuildError) else KernelBuildError(str(error))
            _state["error"] = wrapped
            raise wrapped from None
        _state["lib"] = lib  # keep the library loaded
        _state["path"] = path
        return path


def available() -> bool:
    """Whether the kernel is switched on and built (a failed build warns once, or raises
    with ``FEDJAX_FM_CPU_ATTENTION=1``)."""
    mode = _mode()
    if mode == "off":
        return False
    try:
        library()
    except KernelBuildError as error:
        if mode == "on":
            raise
        if not _state.get("warned"):
            _state["warned"] = True
            _LOG.warning("fused CPU attention unavailable, using XLA's attention: %s", error)
        return False
    return True


def status() -> dict[str, Any]:
    """For the run's environment record: ``{"mode", "used", "library"}``, or why it is not used."""
    mode = _mode()
    if mode == "off":
        return {"mode": mode, "used": False}
    if jax.default_backend() != "cpu":
        return {"mode": mode, "used": False, "reason": f"the backend is {jax.default_backend()}"}
    try:
        return {"mode": mode, "used": available(), "library": library().name}
    except KernelBuildError as error:
        return {"mode": mode, "used": False, "error": str(error).splitlines()[0]}


def usable(query: Array, key: Array, value: Array, bias: Array | None, mask: Array | None) -> bool:
    """Whether ``attention`` can compute this call (see the module docstring)."""
    if jax.default_backend() != "cpu":
        return False
    if any(x.dtype != jnp.float32 or x.ndim != 4 for x in (query, key, value)):
        return False
    batch, q_len, heads, head_size = query.shape
    k_len = key.shape[1]
    if head_size > _MAX_HEAD_SIZE or key.shape != value.shape or key.shape[::2] != query.shape[::2]:
        return False
    if bias is not None and tuple(bias.shape) != (1, heads, q_len, k_len):
        return False
    if mask is not None and (
        mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch)
        or mask.shape[2] not in (1, q_len) or mask.shape[3] != k_len
    ):
        return False
    return available()


def _forward_call(query, key, value, bias, mask, has_bias, has_mask):
    batch, q_len, heads, _ = query.shape
    out_types = (
        jax.ShapeDtypeStruct(query.shape, jnp.float32),
        jax.ShapeDtypeStruct((batch, heads, q_len, 2), jnp.float32),  # each row's max and 1/sum
    )
    return jax.ffi.ffi_call(_FORWARD, out_types, vmap_method="sequential")(
        query, key, value, bias, mask, has_bias=np.int64(has_bias), has_mask=np.int64(has_mask)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(query, key, value, bias, mask, has_bias, has_mask):
    return _forward_call(query, key, value, bias, mask, has_bias, has_mask)[0]


def _attention_fwd(query, key, value, bias, mask, has_bias, has_mask):
    # symbolic_zeros: each input arrives as (value, perturbed). A position bias made from
    # frozen parameters (LoRA) needs no gradient, and the backward kernel then skips the
    # bias gradient, a sum over the batch of [H, Q, K] (and gets one task per row and
    # head instead of one per head).
    bias_needs_grad = has_bias and bias.perturbed
    query, key, value, bias, mask = (x.value for x in (query, key, value, bias, mask))
    out, stats = _forward_call(query, key, value, bias, mask, has_bias, has_mask)
    # Residuals: the inputs, O and two floats per row; the weights are recomputed.
    # ``bias_needs_grad`` travels as the presence of a residual (residuals are arrays).
    return out, (query, key, value, bias, mask, out, stats, bias if bias_needs_grad else None)


def _attention_bwd(has_bias, has_mask, residuals, d_out):
    query, key, value, bias, mask, out, stats, bias_marker = residuals
    bias_grad = bias_marker is not None
    if isinstance(d_out, jax.custom_derivatives.SymbolicZero):
        d_out = jnp.zeros(d_out.aval.shape, d_out.aval.dtype)
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (query, key, value))
    out_types += (jax.ShapeDtypeStruct(bias.shape if bias_grad else (1,), jnp.float32),)
    d_query, d_key, d_value, d_bias = jax.ffi.ffi_call(_BACKWARD, out_types, vmap_method="sequential")(
        query, key, value, bias, mask, out, stats, d_out.astype(jnp.float32),
        has_bias=np.int64(has_bias), has_mask=np.int64(has_mask), bias_grad=np.int64(bias_grad),
    )
    return d_query, d_key, d_value, d_bias if bias_grad else jnp.zeros_like(bias), None


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def attention(query: Array, key: Array, value: Array, bias: Array | None, mask: Array | None) -> Array:
    """``softmax(q k^T + bias, masked) v`` [B, Q, H, D] by the fused kernel (``usable`` says where it applies;
    raises ``KernelBuildError`` where it cannot be built).

    ``query`` [B, Q, H, D], ``key``/``value`` [B, K, H, D] float32; ``bias`` [1, H, Q, K]
    or None; ``mask`` boolean [B or 1, 1, Q or 1, K] (True = may attend) or None.
    Differentiable in ``query``, ``key``, ``value`` and ``bias``.
    """
    library()  # built and registered before the call is traced
    batch, q_len, heads, _ = query.shape
    k_len = key.shape[1]
    has_bias, has_mask = bias is not None, mask is not None
    # Placeholders stand in for an absent bias or mask (the call's arity is fixed).
    bias_arg = bias.reshape(heads, q_len, k_len) if has_bias else jnp.zeros((1,), jnp.float32)
    mask_arg = (
        jnp.broadcast_to(mask, (batch, 1, q_len, k_len)).reshape(batch, q_len, k_len).astype(jnp.uint8)
        if has_mask else jnp.zeros((1,), jnp.uint8)
    )
    return _attention(query, key, value, bias_arg, mask_arg, has_bias, has_mask)
