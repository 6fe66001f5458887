"""LoRA adapters for the Flax T5: creation, merging, and PEFT adapter export / import.

Low-rank adaptation (Hu et al. 2021) with PEFT's conventions. A targeted frozen
projection ``y = x W`` (``W`` = ``kernel`` [in, out]) gains

    y = x W + (α / r) · dropout(x) A B,     A [in, r],  B [r, out]

``A`` is drawn like PEFT's ``kaiming_uniform_(a=√5)`` on its ``[r, in]`` weight,
i.e. ``A ~ U(-1/√in, 1/√in)``; ``B = 0``, so a fresh adapter leaves the model
unchanged. The adapters are a pytree mirroring the params tree: for each targeted
module path ``.../q`` the leaves ``.../q/lora_A`` and ``.../q/lora_B``, applied as
the Flax variable collection ``"lora"``: ``model.apply({"params": params, "lora": adapters}, ...)``.

Targets are matched by the module's own name, exactly as PEFT matches
``target_modules`` (``"wi"`` matches ``DenseReluDense.wi`` of the ReLU T5 only;
gated FLAN-T5 has ``wi_0`` and ``wi_1``).

PEFT's file format (``adapter_config.json`` + ``adapter_model.safetensors``) stores
``base_model.model.<HF module path>.lora_A.weight`` as ``[r, in]`` (= Aᵀ) and
``...lora_B.weight`` as ``[out, r]`` (= Bᵀ); :func:`save_peft_adapter` writes it and
:func:`load_peft_adapter` reads it back.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.models.config import LoraConfig

Params = dict[str, Any]
Path_ = tuple[str, ...]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def lora_target_paths(params: Params, lora_config: LoraConfig) -> list[Path_]:
    """Sorted module paths (tuples of names) in ``params`` that get an adapter.

    Raises ``ValueError`` if a requested target module occurs nowhere in the tree.
    """
    found: list[Path_] = []

    def walk(node: Any, path: Path_) -> None:
        if not isinstance(node, dict):
            return
        if path and path[-1] in lora_config.target_modules and "kernel" in node:
            found.append(path)
            return
        for name, child in node.items():
            walk(child, path + (name,))

    if "params" in params and len(params) == 1:
        raise ValueError("pass the params tree itself (variables['params']), not the {'params': ...} variables dict")
    walk(params, ())
    missing = [t for t in lora_config.target_modules if not any(p[-1] == t for p in found)]
    if missing:
        hint = " (gated FLAN-T5 has 'wi_0' and 'wi_1' instead of 'wi')" if "wi" in missing else ""
        raise ValueError(f"LoRA target module(s) {missing} match no projection in the params tree{hint}")
    return sorted(found)


def _get(tree: Params, path: Path_) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: Params, path: Path_, value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def init_lora(params: Params, lora_config: LoraConfig, rng: jax.Array) -> Params:
    """Fresh adapters for ``params``: ``A ~ U(-1/√in, 1/√in)`` (PEFT's kaiming-uniform, a=√5), ``B = 0``.

    Adapters take the dtype of the kernel they adapt. One key per module path,
    in sorted path order, split from ``rng``.
    """
    paths = lora_target_paths(params, lora_config)
    keys = jax.random.split(rng, len(paths))
    adapters: Params = {}
    r = lora_config.rank
    for key, path in zip(keys, paths):
        kernel = _get(params, path)["kernel"]
        fan_in, fan_out = kernel.shape
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, (fan_in, r), jnp.float32, -bound, bound).astype(kernel.dtype)
        _set(adapters, path, {"lora_A": a, "lora_B": jnp.zeros((r, fan_out), kernel.dtype)})
    return adapters


def _adapter_paths(adapters: Params) -> list[Path_]:
    paths: list[Path_] = []

    def walk(node: Any, path: Path_) -> None:
        if isinstance(node, dict) and "lora_A" in node:
            if "lora_B" not in node:
                raise ValueError(f"adapter at {'/'.join(path)} has lora_A but no lora_B")
            paths.append(path)
            return
        if isinstance(node, dict):
            for name, child in node.items():
                walk(child, path + (name,))

    walk(adapters, ())
    return sorted(paths)


def merge_lora(params: Params, adapters: Params, lora_config: LoraConfig) -> Params:
    """Params with every adapter folded in: ``kernel + (α/r) · A B`` (computed in float32).

    The result is a plain params tree: ``T5(config)`` without LoRA gives the same
    outputs (dropout off) as ``T5(config, lora)`` with the adapters.
    """
    merged = jax.tree.map(lambda x: x, params)  # fresh containers; leaves shared
    for path in _adapter_paths(adapters):
        try:
            module = _get(merged, path)
        except KeyError:
            raise ValueError(f"adapter path {'/'.join(path)} does not exist in the params tree") from None
        ad = _get(adapters, path)
        kernel = module["kernel"]
        a, b = ad["lora_A"], ad["lora_B"]
        if a.shape[0] != kernel.shape[0] or b.shape != (a.shape[1], kernel.shape[1]):
            raise ValueError(
                f"adapter at {'/'.join(path)}: lora_A {a.shape}, lora_B {b.shape} do not fit kernel {kernel.shape}"
            )
        scaling = lora_config.alpha / a.shape[1]
        delta = scaling * jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        module["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return merged


# --- PEFT adapter files ---------------------------------------------------------------


def _hf_module_name(path: Path_) -> str:
    """``('encoder','block_0','layer_0','SelfAttention','q')`` -> ``encoder.block.0.layer.0.SelfAttention.q``."""
    parts = []
    for name in path:
        m = re.fullmatch(r"(block|layer)_(\d+)", name)
        parts.extend([m.group(1), m.group(2)] if m else [name])
    return ".".join(parts)


def _path_from_hf(name: str) -> Path_:
    tokens = name.split(".")
    path: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i] in ("block", "layer") and i + 1 < len(tokens) and tokens[i + 1].isdigit():
            path.append(f"{tokens[i]}_{tokens[i + 1]}")
            i += 2
        else:
            path.append(tokens[i])
            i += 1
    return tuple(path)


def peft_state_dict(adapters: Params) -> dict[str, np.ndarray]:
    """Adapters as PEFT's tensors: ``...lora_A.weight`` [r, in], ``...lora_B.weight`` [out, r] (float32)."""
    out: dict[str, np.ndarray] = {}
    for path in _adapter_paths(adapters):
        ad = _get(adapters, path)
        stem = _PEFT_PREFIX + _hf_module_name(path)
        out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ad["lora_A"], np.float32).T)
        out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ad["lora_B"], np.float32).T)
    return out


def peft_adapter_config(lora_config: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` contents PEFT expects for these settings (plain LoRA, no bias)."""
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.rank,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": sorted(lora_config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_peft_adapter(
    adapters: Params,
    lora_config: LoraConfig,
    out_dir: str | os.PathLike[str],
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes a PEFT LoRA adapter directory that ``peft.PeftModel.from_pretrained`` loads.

    Files: ``adapter_config.json`` and ``adapter_model.safetensors`` (float32
    tensors). ``base_model_name_or_path`` is recorded for PEFT's
    ``AutoPeftModel`` (a hub id or the directory of the exported base model).
    Returns ``out_dir``.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = peft_state_dict(adapters)
    if not tensors:
        raise ValueError("save_peft_adapter: the adapters tree holds no lora_A / lora_B pairs")
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config = peft_adapter_config(lora_config, base_model_name_or_path)
    (out_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_peft_adapter(adapter_dir: str | os.PathLike[str], dtype: Any = jnp.float32) -> tuple[Params, LoraConfig]:
    """Reads a PEFT LoRA adapter directory back as ``(adapters, LoraConfig)``.

    Accepts plain LoRA on T5 modules (no DoRA, rsLoRA, per-module rank/alpha
    patterns or bias); anything else raises ``ValueError`` naming the file and field.
    """
    from fedjax_fm.models.hf_io import load_safetensors_checked

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no PEFT adapter config")
    cfg = json.loads(config_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type={cfg.get('peft_type')!r}, expected 'LORA'")
    for field in ("use_dora", "use_rslora"):
        if cfg.get(field):
            raise ValueError(f"{config_path}: {field}=true is not supported")
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise ValueError(f"{config_path}: a non-empty {field} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias={cfg['bias']!r} is not supported (expected 'none')")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        raise ValueError(f"{config_path}: target_modules as a regex ({targets!r}) is not supported; use a list")
    lora_config = LoraConfig(
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=tuple(targets),
    )
    weights_path = adapter_dir / ADAPTER_WEIGHTS_FILE
    tensors = load_safetensors_checked(weights_path)
    adapters: Params = {}
    pattern = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight")
    for key, value in tensors.items():
        m = pattern.fullmatch(key)
        if not m:
            raise ValueError(f"{weights_path}: unexpected tensor {key!r} (expected ...lora_A.weight / ...lora_B.weight)")
        path = _path_from_hf(m.group(1))
        if path[-1] not in lora_config.target_modules:
            raise ValueError(f"{weights_path}: tensor {key!r} is not in target_modules {list(targets)}")
        rank_axis = 0 if m.group(2) == "lora_A" else 1
        if value.ndim != 2 or value.shape[rank_axis] != lora_config.rank:
            raise ValueError(f"{weights_path}: {key} has shape {value.shape}, expected rank {lora_config.rank}")
        _set(adapters, path + (m.group(2),), jnp.asarray(np.asarray(value).T, dtype))
    paths = _adapter_paths(adapters)  # checks A/B pairs
    if not paths:
        raise ValueError(f"{weights_path}: no LoRA tensors")
    return adapters, lora_config
