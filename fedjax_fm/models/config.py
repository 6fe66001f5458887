"""Model configuration: the T5 v1.1 / FLAN-T5 architecture, presets and LoRA settings.

`T5Config` mirrors the field names of Hugging Face's ``T5Config`` for the
architecture (so ``config.json`` converts both ways without a table), plus three
runtime fields that never go into ``config.json``: ``dtype`` (compute dtype),
``param_dtype`` and ``remat`` (rematerialise each block in the backward pass).

Parameter naming contract (used by the Flax module, HF checkpoint I/O, LoRA and
FLOP counting alike). Params are ``{"params": tree}`` with ``tree``::

    shared/embedding                                              [vocab, d_model]
    encoder/block_{i}/layer_0/SelfAttention/{q,k,v}/kernel        [d_model, heads*d_kv]
    encoder/block_{i}/layer_0/SelfAttention/o/kernel              [heads*d_kv, d_model]
    encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding  [buckets, heads]
    encoder/block_{i}/layer_0/layer_norm/scale                    [d_model]
    encoder/block_{i}/layer_1/DenseReluDense/wi_0|wi_1/kernel     [d_model, d_ff]   (gated)
    encoder/block_{i}/layer_1/DenseReluDense/wi/kernel            [d_model, d_ff]   (relu)
    encoder/block_{i}/layer_1/DenseReluDense/wo/kernel            [d_ff, d_model]
    encoder/block_{i}/layer_1/layer_norm/scale
    encoder/final_layer_norm/scale
    decoder/block_{i}/layer_0/SelfAttention/...   (relative bias in block_0 only, causal buckets)
    decoder/block_{i}/layer_1/EncDecAttention/{q,k,v,o}/kernel
    decoder/block_{i}/layer_1/layer_norm/scale
    decoder/block_{i}/layer_2/DenseReluDense/...
    decoder/block_{i}/layer_2/layer_norm/scale
    decoder/final_layer_norm/scale
    lm_head/kernel                                                [d_model, vocab]  (untied only)

i.e. the Hugging Face PyTorch names with ``.`` -> ``/``, ``block.{i}`` -> ``block_{i}``,
``layer.{j}`` -> ``layer_{j}``, and ``weight`` -> ``kernel`` (transposed) /
``embedding`` / ``scale``. LoRA adapters live in a separate variable collection
``"lora"`` at the same module paths: ``.../q/lora_A [in, r]`` and ``.../q/lora_B [r, out]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

from fedjax_fm.models.lora_config import LoraConfig, LoraTarget  # noqa: F401  (re-exported)

FeedForward = Literal["gated-gelu", "relu"]

# Architecture fields that round-trip through Hugging Face config.json.
_HF_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "dropout_rate",
    "layer_norm_epsilon",
    "feed_forward_proj",
    "tie_word_embeddings",
    "pad_token_id",
    "eos_token_id",
    "decoder_start_token_id",
)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture + runtime settings of a T5 v1.1 / FLAN-T5 (or original T5) model."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: FeedForward = "gated-gelu"
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # Runtime (not part of config.json).
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in ("gated-gelu", "relu"):
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                "choose 'gated-gelu' (T5 v1.1 / FLAN-T5) or 'relu' (original T5)"
            )
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @property
    def inner_dim(self) -> int:
        """Width of the attention projections: heads * d_kv."""
        return self.num_heads * self.d_kv

    def replace(self, **changes: Any) -> "T5Config":
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The architecture as a Hugging Face ``config.json`` dictionary."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _HF_FIELDS}
        out["feed_forward_proj"] = "gated-gelu" if self.is_gated else "relu"
        # transformers >= 5 always ties T5's embeddings in the config and keeps the real
        # distinction (original T5 tied head vs. v1.1 untied head) in this key.
        out["scale_decoder_outputs"] = bool(self.tie_word_embeddings)
        out.update(
            model_type="t5",
            architectures=["T5ForConditionalGeneration"],
            is_encoder_decoder=True,
            initializer_factor=1.0,
            use_cache=True,
        )
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime: Any) -> "T5Config":
        """Builds a config from a Hugging Face ``config.json`` dictionary.

        Raises ``ValueError`` for another architecture; missing optional fields take
        Hugging Face's own defaults.
        """
        model_type = hf.get("model_type")
        if model_type not in ("t5", None):
            raise ValueError(f"model_type={model_type!r} is not a T5 model (expected 't5')")
        proj = hf.get("feed_forward_proj", "relu")
        if proj in ("gated-gelu", "gated-gelu_new"):
            proj = "gated-gelu"
        if proj not in ("gated-gelu", "relu"):
            raise ValueError(f"feed_forward_proj={proj!r} is not supported (expected 'gated-gelu' or 'relu')")
        kwargs: dict[str, Any] = {}
        hf_defaults = {
            "d_ff": 2048,
            "num_layers": 6,
            "num_heads": 8,
            "dropout_rate": 0.1,
            "tie_word_embeddings": True,
            "decoder_start_token_id": 0,
        }
        for name in _HF_FIELDS:
            if name in hf and hf[name] is not None:
                kwargs[name] = hf[name]
            elif name in hf_defaults:
                kwargs[name] = hf_defaults[name]
        kwargs["feed_forward_proj"] = proj
        if hf.get("scale_decoder_outputs") is not None:
            # Written by transformers >= 5, where tie_word_embeddings is always true for T5.
            kwargs["tie_word_embeddings"] = bool(hf["scale_decoder_outputs"])
        if "num_decoder_layers" not in hf or hf["num_decoder_layers"] is None:
            kwargs["num_decoder_layers"] = kwargs.get("num_layers", 6)
        return cls(**kwargs, **runtime)


# Real dimensions of the released FLAN-T5 checkpoints (google/flan-t5-*), plus a
# tiny preset for tests and the offline demo.
PRESETS: dict[str, T5Config] = {
    "flan-t5-small": T5Config(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6),
    "flan-t5-base": T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12),
    "flan-t5-large": T5Config(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16),
    "flan-t5-xl": T5Config(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32),
    "tiny": T5Config(
        vocab_size=512,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        dropout_rate=0.0,
    ),
}


def preset(name: str, **overrides: Any) -> T5Config:
    """A preset by name (``flan-t5-small`` ... ``flan-t5-xl``, ``tiny``), with overrides."""
    key = name.removeprefix("google/")
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[key].replace(**overrides)
