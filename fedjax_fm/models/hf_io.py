"""Hugging Face checkpoints in both directions: ``config.json`` + safetensors <-> Flax params.

The conversion is a fixed name table (see ``fedjax_fm/models/config.py``): a Hugging
Face PyTorch tensor ``encoder.block.3.layer.1.DenseReluDense.wo.weight`` lives at
``encoder/block_3/layer_1/DenseReluDense/wo/kernel`` in our tree. PyTorch ``Linear``
stores ``W`` as ``[out, in]`` and computes ``y = x W^T``; Flax ``Dense`` stores
``[in, out]`` and computes ``y = x K``, so ``K = W^T``. Embeddings
(``shared``, ``relative_attention_bias``) and layer-norm scales are copied as they are.

Loading is strict: every tensor the config implies must be present with its exact
shape, and every tensor in the file must be used or be one of a few known-harmless
duplicates (HF's tied ``*.embed_tokens.weight`` copies of ``shared.weight``, and the
``EncDecAttention.relative_attention_bias`` that old checkpoints carry and HF itself
ignores). Anything else is an error naming the tensor and the file: a silent partial
load would train a half-random model without anyone noticing.

Tied embeddings. In our ``T5Config`` (as in transformers 4.x) ``tie_word_embeddings``
means the original-T5 head: logits = (h * d_model^-0.5) shared^T. T5 v1.1 / FLAN-T5
are untied: logits = h lm_head^T, with no rescaling. transformers 5.x always writes
``"tie_word_embeddings": true`` for T5 and records the rescaling separately as
``scale_decoder_outputs``; when that key is present it is the one that tells the two
heads apart, and a missing ``lm_head.weight`` means "the head is ``shared``" (we then
materialise ``lm_head/kernel = shared^T``, which computes exactly what transformers does).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_fm.models.config import PRESETS, LoraConfig, T5Config

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"

# Files fetched from the Hub: config, weights, tokenizer (never PyTorch/TF/Flax pickles).
HUB_ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

# Tensors some checkpoints carry that the model does not use, and why they are harmless.
_IGNORED_TENSORS = {
    # Only the first *self*-attention layer has a relative bias; very old checkpoints also
    # carry one for cross-attention, which HF declares as ignorable on load.
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
}
# Duplicates of shared.weight (HF ties them); accepted only when equal to shared.weight.
_TIED_COPIES_OF_SHARED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


# "flan-t5-small", "google/flan-t5-small": what the Hub accepts as a repo id.
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# Weight files of the HF layout that save_safetensors_checkpoint writes (and replaces).
_WEIGHT_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")


class HFCheckpointError(ValueError):
    """A checkpoint file exists but cannot be used as it is (corrupt, wrong shape, wrong model)."""


# --------------------------------------------------------------------------- name table


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One tensor: where it lives in our tree, its HF name, and its HF (PyTorch) shape."""

    path: tuple[str, ...]
    hf_name: str
    hf_shape: tuple[int, ...]
    transpose: bool  # Linear weights: ours = hf.T

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.hf_shape)) if self.transpose else self.hf_shape


def param_specs(config: T5Config) -> list[ParamSpec]:
    """Every tensor a model with ``config`` has, in HF order (shared, encoder, decoder, head)."""
    d, inner, ff = config.d_model, config.inner_dim, config.d_ff
    specs: list[ParamSpec] = []

    def add(path: str, shape: tuple[int, ...], transpose: bool = False) -> None:
        # "encoder/block_0/layer_1/DenseReluDense/wo/kernel" -> "encoder.block.0.layer.1.DenseReluDense.wo.weight"
        parts = path.split("/")
        hf = ".".join(parts[:-1]) + ".weight"
        hf = re.sub(r"\b(block|layer)_(\d+)\b", r"\1.\2", hf)
        specs.append(ParamSpec(tuple(parts), hf, shape, transpose))

    def linear(path: str, n_in: int, n_out: int) -> None:
        add(path + "/kernel", (n_out, n_in), transpose=True)

    def attention(prefix: str, with_bias: bool) -> None:
        for name in ("q", "k", "v"):
            linear(f"{prefix}/{name}", d, inner)
        linear(f"{prefix}/o", inner, d)
        if with_bias:
            add(f"{prefix}/relative_attention_bias/embedding", (config.relative_attention_num_buckets, config.num_heads))

    def feed_forward(prefix: str) -> None:
        if config.is_gated:
            linear(f"{prefix}/DenseReluDense/wi_0", d, ff)
            linear(f"{prefix}/DenseReluDense/wi_1", d, ff)
        else:
            linear(f"{prefix}/DenseReluDense/wi", d, ff)
        linear(f"{prefix}/DenseReluDense/wo", ff, d)
        add(f"{prefix}/layer_norm/scale", (d,))

    add("shared/embedding", (config.vocab_size, d))
    for i in range(config.num_layers):
        block = f"encoder/block_{i}"
        attention(f"{block}/layer_0/SelfAttention", with_bias=i == 0)
        add(f"{block}/layer_0/layer_norm/scale", (d,))
        feed_forward(f"{block}/layer_1")
    add("encoder/final_layer_norm/scale", (d,))
    for i in range(config.num_decoder_layers):
        block = f"decoder/block_{i}"
        attention(f"{block}/layer_0/SelfAttention", with_bias=i == 0)
        add(f"{block}/layer_0/layer_norm/scale", (d,))
        attention(f"{block}/layer_1/EncDecAttention", with_bias=False)
        add(f"{block}/layer_1/layer_norm/scale", (d,))
        feed_forward(f"{block}/layer_2")
    add("decoder/final_layer_norm/scale", (d,))
    if not config.tie_word_embeddings:
        linear("lm_head", d, config.vocab_size)
    return specs


# --------------------------------------------------------------------------- HF -> ours


def _source_of(name: str, source: str | Mapping[str, str]) -> str:
    return source if isinstance(source, str) else source.get(name, "<checkpoint>")


def _architecture(config: T5Config) -> str:
    return (
        f"{config.feed_forward_proj}, vocab={config.vocab_size}, d_model={config.d_model}, "
        f"d_kv={config.d_kv}, heads={config.num_heads}, d_ff={config.d_ff}, "
        f"layers={config.num_layers}/{config.num_decoder_layers}, tied={config.tie_word_embeddings}"
    )


def params_from_hf_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: T5Config,
    *,
    source: str | Mapping[str, str] = "state dict",
    convert: Callable[[np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """Converts a Hugging Face T5 state dict (PyTorch names) into our params tree.

    Args:
      state_dict: HF tensor name -> array (NumPy, or anything ``np.asarray`` accepts).
        Values are read one at a time, so a lazy mapping over files keeps at most one
        tensor in host memory beyond what ``convert`` keeps.
      config: the architecture; it decides which tensors are expected and their shapes.
      source: file name used in error messages, or a map tensor name -> file (sharded).
      convert: applied to each ``[in, out]`` array before it goes into the tree
        (e.g. ``jnp.asarray`` with a dtype); default: a contiguous NumPy copy.

    Returns the params tree (nested dict; the checkpoint's dtype unless ``convert``
    changes it): what ``init_params`` returns, applied as ``model.apply({"params": params}, ...)``.

    Raises ``HFCheckpointError`` naming the tensor, the file, expected and actual shape
    for any missing, mis-shaped or unexpected tensor, before converting anything.
    """
    convert = np.ascontiguousarray if convert is None else convert
    names = set(state_dict)
    shared_name = "shared.weight"
    if shared_name not in names:
        # Some checkpoints keep only a stack's (tied) copy of the shared embedding.
        shared_name = next((n for n in _TIED_COPIES_OF_SHARED if n in names), shared_name)

    def hf_name_in_file(spec: ParamSpec) -> str | None:
        if spec.hf_name == "shared.weight":
            return shared_name if shared_name in names else None
        if spec.hf_name == "lm_head.weight" and spec.hf_name not in names:
            # transformers 5 ties T5's head to `shared` whenever the file has no lm_head.
            return shared_name if shared_name in names else None
        return spec.hf_name if spec.hf_name in names else None

    def shape_of(name: str) -> tuple[int, ...]:
        shape_fn = getattr(state_dict, "shape_of", None)
        return tuple(shape_fn(name)) if shape_fn else tuple(np.shape(state_dict[name]))

    # Pass 1: names and shapes only (cheap for lazy mappings); every problem is reported at once.
    problems: list[str] = []
    plan: list[tuple[ParamSpec, str]] = []
    for spec in param_specs(config):
        name = hf_name_in_file(spec)
        if name is None:
            problems.append(f"missing tensor {spec.hf_name!r} (expected shape {spec.hf_shape})")
            continue
        shape = shape_of(name)
        if shape != spec.hf_shape:
            problems.append(
                f"tensor {name!r} in {_source_of(name, source)!r} has shape {shape}, expected {spec.hf_shape}"
            )
            continue
        plan.append((spec, name))

    used = {name for _, name in plan}
    for name in sorted(names - used - _IGNORED_TENSORS):
        tied_copy = name in _TIED_COPIES_OF_SHARED or (name == "lm_head.weight" and config.tie_word_embeddings)
        if tied_copy and shared_name in names:
            value, shared = np.asarray(state_dict[name]), np.asarray(state_dict[shared_name])
            if value.shape == shared.shape and np.array_equal(value, shared):
                continue
            what = "a tied copy of it" if name != "lm_head.weight" else (
                "the config ties the LM head to it (tie_word_embeddings / scale_decoder_outputs), "
                "so a different lm_head would be silently ignored"
            )
            problems.append(f"tensor {name!r} in {_source_of(name, source)!r} differs from {shared_name!r} but {what}")
            continue
        problems.append(
            f"unexpected tensor {name!r} (shape {shape_of(name)}) in {_source_of(name, source)!r}: "
            "not part of this architecture"
        )
    if problems:
        files = source if isinstance(source, str) else ", ".join(sorted(set(source.values())))
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise HFCheckpointError(
            f"checkpoint {files!r} does not match the T5 config ({_architecture(config)}):\n  "
            + "\n  ".join(shown)
        )

    # Pass 2: read, transpose Linear weights ([out, in] -> [in, out]), convert.
    tree: dict[str, Any] = {}
    for spec, name in plan:
        value = np.asarray(state_dict[name])
        node = tree
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = convert(value.T if spec.transpose else value)
    return tree


class SafetensorsFiles(Mapping):
    """Read-on-access view of the tensors in one or more safetensors files (name -> array).

    Opening reads only the headers; ``mapping[name]`` reads that one tensor. Errors
    name the file: a corrupt header at construction, a bad tensor on access.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]]):
        from safetensors import SafetensorError, safe_open

        self._error_types = (SafetensorError, OSError, ValueError)
        self._handles: dict[str, Any] = {}
        self.sources: dict[str, str] = {}
        for path in map(Path, paths):
            if not path.is_file():
                raise FileNotFoundError(f"safetensors file not found: '{path}'")
            try:
                handle = safe_open(str(path), framework="numpy")
                keys = list(handle.keys())
            except self._error_types as err:
                raise HFCheckpointError(
                    f"'{path}' is not a readable safetensors file (truncated or corrupt download?): {err}"
                ) from err
            self._handles[str(path)] = handle
            for name in keys:
                if name in self.sources:
                    raise HFCheckpointError(f"tensor {name!r} appears in both '{self.sources[name]}' and '{path}'")
                self.sources[name] = str(path)

    def __getitem__(self, name: str) -> np.ndarray:
        path = self.sources[name]
        try:
            return self._handles[path].get_tensor(name)
        except self._error_types as err:
            raise HFCheckpointError(f"could not read tensor {name!r} from '{path}': {err}") from err

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.sources[name]].get_slice(name).get_shape())

    def __iter__(self):
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


# --------------------------------------------------------------------------- ours -> HF


def _as_numpy(x: Any) -> np.ndarray:
    # np.asarray on a jax.Array copies it to host; bfloat16 comes back as ml_dtypes.bfloat16.
    return np.asarray(x)


def hf_state_dict_from_params(
    params: Mapping[str, Any],
    config: T5Config,
    *,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
    """Converts a params tree (or the variables ``{"params": tree}``) into a Hugging Face T5 state dict.

    The result has one entry per HF tensor (``shared.weight`` only once: transformers
    re-ties ``*.embed_tokens``; ``lm_head.weight`` only when untied), contiguous NumPy
    arrays in the params' dtype or ``dtype`` if given. Raises ``HFCheckpointError`` for a
    missing, mis-shaped or unexpected leaf.
    """
    if "lora" in params:
        raise HFCheckpointError(
            "params carry a 'lora' collection: merge the adapters into the base weights first "
            "(fedjax_fm.models.lora.merge_lora) or export them as a PEFT adapter "
            "(save_peft_adapter); a HF T5 checkpoint has no place for them"
        )
    tree = params["params"] if "params" in params else params
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    expected_paths = set()
    for spec in param_specs(config):
        expected_paths.add(spec.path)
        node: Any = tree
        for key in spec.path:
            if not isinstance(node, Mapping) or key not in node:
                node = None
                break
            node = node[key]
        if node is None:
            problems.append(f"missing param {'/'.join(spec.path)!r} (expected shape {spec.shape})")
            continue
        value = _as_numpy(node)
        if tuple(value.shape) != spec.shape:
            problems.append(f"param {'/'.join(spec.path)!r} has shape {tuple(value.shape)}, expected {spec.shape}")
            continue
        if dtype is not None:
            value = value.astype(dtype)
        out[spec.hf_name] = np.ascontiguousarray(value.T if spec.transpose else value)

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, prefix + (str(key),))
        elif prefix not in expected_paths:
            problems.append(f"unexpected param {'/'.join(prefix)!r}: not part of this architecture")

    walk(tree, ())
    if problems:
        raise HFCheckpointError(
            f"params do not match the T5 config ({_architecture(config)}):\n  " + "\n  ".join(problems[:20])
        )
    return out


# --------------------------------------------------------------------------- safetensors files


def load_safetensors_checked(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file into NumPy arrays, with errors that name the file.

    Raises ``FileNotFoundError`` if it is absent and ``HFCheckpointError`` if it is
    truncated, corrupt or not a safetensors file (safetensors' own message included).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: '{path}'")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise HFCheckpointError(
            f"'{path}' is not a readable safetensors file (truncated or corrupt download?): {err}"
        ) from err
    except (OSError, ValueError, TypeError) as err:
        raise HFCheckpointError(f"could not read safetensors file '{path}': {err}") from err


def open_checkpoint_tensors(directory: str | os.PathLike[str]) -> SafetensorsFiles:
    """Lazy view of a single-file or sharded (``model.safetensors.index.json``) checkpoint.

    Raises ``FileNotFoundError`` naming the directory when there are no safetensors
    weights (and which other weight files it holds), or naming the shards an index
    lists that are absent; ``HFCheckpointError`` for a bad index or a corrupt file.
    """
    directory = Path(directory)
    index_path = directory / SAFETENSORS_INDEX_FILE
    single_path = directory / SAFETENSORS_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise HFCheckpointError(f"'{index_path}' is not a valid safetensors index (needs a 'weight_map'): {err}") from err
        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"shard(s) {missing} listed in '{index_path}' are missing from '{directory}'")
        tensors = SafetensorsFiles([directory / name for name in shard_names])
        not_found = sorted(name for name in weight_map if name not in tensors)
        if not_found:
            raise HFCheckpointError(f"'{index_path}' lists tensor(s) {not_found[:5]} that its shard files do not contain")
        return tensors
    if single_path.is_file():
        return SafetensorsFiles([single_path])
    others = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".h5", ".msgpack", ".pt", ".pth"))
    hint = (
        f" It holds {others}: only safetensors checkpoints are read (convert with "
        "`transformers` by loading and calling save_pretrained(..., safe_serialization=True))."
        if others
        else ""
    )
    raise FileNotFoundError(f"no '{SAFETENSORS_FILE}' or '{SAFETENSORS_INDEX_FILE}' in '{directory}'.{hint}")


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"500MB"``, ``"2GB"``, ``"10GiB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not match:
        raise ValueError(f"cannot parse shard size {size!r} (use bytes or e.g. '500MB', '2GB')")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    factors = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    return int(number * factors[unit])


def save_safetensors_checkpoint(
    state_dict: Mapping[str, np.ndarray],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
) -> list[Path]:
    """Writes ``model.safetensors``, or shards + ``model.safetensors.index.json`` (HF layout).

    Shards are filled greedily in name order up to ``max_shard_size`` bytes (a single
    tensor larger than that gets a shard of its own). Stale weight files from an
    earlier save in ``out_dir`` are removed first so loaders never mix two checkpoints.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():
        if _WEIGHT_FILE.fullmatch(stale.name) and stale.is_file():
            stale.unlink()
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    tensors = {name: np.ascontiguousarray(value) for name, value in state_dict.items()}
    total = sum(value.nbytes for value in tensors.values())
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    if limit is None or total <= limit:
        path = out_dir / SAFETENSORS_FILE
        save_file(tensors, str(path), metadata=metadata)
        return [path]

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / filename), metadata=metadata)
        paths.append(out_dir / filename)
        weight_map.update({name: filename for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return paths


# --------------------------------------------------------------------------- config.json


def config_from_hf_dict(hf: Mapping[str, Any], *, source: str = CONFIG_FILE, **runtime: Any) -> T5Config:
    """``T5Config`` from a ``config.json`` dict, with errors that name the file.

    Raises ``HFCheckpointError`` naming ``source`` for another architecture or an
    unsupported feed-forward type.
    """
    hf = dict(hf)
    model_type = hf.get("model_type")
    if model_type != "t5":
        architectures = hf.get("architectures")
        raise HFCheckpointError(
            f"'{source}' describes model_type={model_type!r} (architectures={architectures}), "
            "not a T5 model; fedjax_fm reads T5 / T5 v1.1 / FLAN-T5 checkpoints (model_type 't5')"
        )
    try:
        return T5Config.from_hf_dict(hf, **runtime)
    except (ValueError, TypeError) as err:
        raise HFCheckpointError(f"'{source}': {err}") from err


def hf_config_dict(config: T5Config, weights_dtype: str = "float32") -> dict[str, Any]:
    """``config.json`` contents for ``config``, readable by transformers 4.x and 5.x."""
    out = config.to_hf_dict()  # includes transformers 5's scale_decoder_outputs
    out["dtype"] = out["torch_dtype"] = weights_dtype  # 5.x reads "dtype", 4.x "torch_dtype"
    return out


# --------------------------------------------------------------------------- directories / hub


def resolve_checkpoint_dir(name_or_dir: str | os.PathLike[str]) -> Path:
    """A local directory as it is; otherwise a Hub repo id, downloaded (config, safetensors, tokenizer).

    Errors: ``HFCheckpointError`` for a preset name or a file, ``FileNotFoundError`` for a
    missing local path or a Hub id that cannot be fetched (offline, no such repo).
    """
    text = os.fspath(name_or_dir)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HFCheckpointError(f"'{path}' is a file; pass the checkpoint directory that holds config.json")
    if text in PRESETS:
        hub_hint = f" To load the released weights pass the Hub id 'google/{text}'." if text.startswith("flan-t5") else ""
        raise HFCheckpointError(
            f"{text!r} is a preset name (random initialisation), not a checkpoint: use "
            f"`init_params(preset({text!r}), rng)`.{hub_hint}"
        )
    if not _HUB_REPO_ID.fullmatch(text):
        raise FileNotFoundError(f"checkpoint directory not found: '{path}'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
        raise FileNotFoundError(f"'{text}' is not a local directory and huggingface_hub is not installed") from err
    try:
        return Path(snapshot_download(text, allow_patterns=list(HUB_ALLOW_PATTERNS)))
    except Exception as err:  # noqa: BLE001 - hub errors are many; all mean "could not fetch"
        raise FileNotFoundError(
            f"'{text}' is not a local directory, and downloading it from the Hugging Face Hub failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). If you are offline, "
            "download it elsewhere (`huggingface-cli download <repo>`) and pass the local directory."
        ) from err


_resolve_checkpoint_dir = resolve_checkpoint_dir  # earlier private name, still used by callers


def _has_safetensors(directory: Path) -> bool:
    return (directory / SAFETENSORS_FILE).is_file() or (directory / SAFETENSORS_INDEX_FILE).is_file()


def read_config(directory: str | os.PathLike[str], **runtime: Any) -> T5Config:
    """The ``T5Config`` in ``directory/config.json`` (errors name the file)."""
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no '{CONFIG_FILE}' in checkpoint directory '{directory}'")
    try:
        hf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFCheckpointError(f"'{config_path}' is not valid JSON: {err}") from err
    if not isinstance(hf, dict):
        raise HFCheckpointError(f"'{config_path}' must hold a JSON object, got {type(hf).__name__}")
    return config_from_hf_dict(hf, source=str(config_path), **runtime)


def load_params(
    directory: str | os.PathLike[str],
    config: T5Config,
    *,
    convert: Callable[[np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """The params tree from the safetensors weights in ``directory``, read one tensor at a time.

    ``convert`` as in ``params_from_hf_state_dict`` (default: NumPy, the file's dtype).
    """
    tensors = open_checkpoint_tensors(directory)
    return params_from_hf_state_dict(tensors, config, source=tensors.sources, convert=convert)


def from_pretrained(
    name_or_dir: str | os.PathLike[str],
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    remat: bool = False,
    lora: LoraConfig | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Loads a Hugging Face T5 / FLAN-T5 checkpoint as ``(model, params)``.

    Args:
      name_or_dir: a local directory with ``config.json`` and ``model.safetensors``
        (or shards + ``model.safetensors.index.json``), or a Hub repo id such as
        ``"google/flan-t5-small"`` (downloaded with ``huggingface_hub``: config,
        safetensors and tokenizer files only).
      dtype: compute dtype of the module (default float32).
      param_dtype: dtype the weights are cast to (default float32).
      remat: rematerialise each block in the backward pass.
      lora: if given, the model is built as ``T5(config, lora=lora)``; ``params``
        stays the frozen base and the adapters (the ``"lora"`` collection) come from
        ``fedjax_fm.models.lora.init_lora(params, lora, rng)``.

    Returns ``(model, params)``: the Flax ``T5`` and its params tree of ``jax.Array``
    (same structure as ``init_params``; apply with ``{"params": params}``).
    """
    import jax.numpy as jnp

    from fedjax_fm.models.t5 import T5

    dtype = jnp.float32 if dtype is None else dtype
    param_dtype = jnp.float32 if param_dtype is None else param_dtype
    directory = resolve_checkpoint_dir(name_or_dir)
    config = read_config(directory, dtype=dtype, param_dtype=param_dtype, remat=remat)
    if not Path(os.fspath(name_or_dir)).expanduser().is_dir() and not _has_safetensors(directory):
        raise FileNotFoundError(
            f"the Hub repo '{os.fspath(name_or_dir)}' has no safetensors weights ({SAFETENSORS_FILE} or "
            f"{SAFETENSORS_INDEX_FILE}); fedjax_fm reads only safetensors checkpoints"
        )
    # Straight from each file's tensor to a device array: the host never holds a
    # second full copy of the model (matters for 3B models on 16 GB edge boards).
    params = load_params(directory, config, convert=lambda x: jnp.asarray(x, dtype=param_dtype))
    return T5(config, lora=lora), params


def save_pretrained(
    model: Any,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    tokenizer: Any = None,
    *,
    dtype: Any = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Writes a Hugging Face checkpoint that ``T5ForConditionalGeneration.from_pretrained`` loads.

    Files: ``config.json``, ``generation_config.json``, ``model.safetensors`` (or
    shards + index when larger than ``max_shard_size``), and the tokenizer's files
    when ``tokenizer`` is given. ``model`` is the Flax ``T5`` (its ``.config`` is used)
    or a ``T5Config``. Weights keep the params' dtype unless ``dtype`` is given.
    Returns ``out_dir``.
    """
    config = model if isinstance(model, T5Config) else model.config
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}: "
            "ids beyond the embedding table would be out of range"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = hf_state_dict_from_params(params, config, dtype=dtype)
    save_safetensors_checkpoint(state_dict, out_dir, max_shard_size=max_shard_size)
    hf = hf_config_dict(config, weights_dtype=next(iter(state_dict.values())).dtype.name)
    (out_dir / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    generation = {
        "decoder_start_token_id": config.decoder_start_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    (out_dir / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


__all__ = [
    "HFCheckpointError",
    "ParamSpec",
    "config_from_hf_dict",
    "from_pretrained",
    "hf_config_dict",
    "hf_state_dict_from_params",
    "load_params",
    "open_checkpoint_tensors",
    "SafetensorsFiles",
    "load_safetensors_checked",
    "param_specs",
    "params_from_hf_state_dict",
    "read_config",
    "resolve_checkpoint_dir",
    "save_pretrained",
    "save_safetensors_checkpoint",
]
