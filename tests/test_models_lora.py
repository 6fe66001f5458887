"""LoRA adapters: initialisation, no-op at B = 0, merging, PEFT export round trip with torch + peft."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm.models import LoraConfig, T5, init_params, preset
from fedjax_fm.models.lora import (
    init_lora,
    load_peft_adapter,
    lora_target_paths,
    merge_lora,
    peft_state_dict,
    save_peft_adapter,
)

CONFIG = preset("tiny")
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("q", "v", "wi_0", "wo"))


def random_inputs(config, batch=2, src=7, tgt=5, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, config.vocab_size, size=(batch, src)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, -2:] = 0
    dec = rng.integers(2, config.vocab_size, size=(batch, tgt)).astype(np.int32)
    dec[:, 0] = 0
    return ids, mask, dec, np.ones_like(dec)


def randomise_b(adapters, seed=1, scale=0.1):
    leaves, treedef = jax.tree.flatten_with_path(adapters)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        is_b = path[-1].key == "lora_B"
        out.append(jnp.asarray(rng.normal(scale=scale, size=leaf.shape), leaf.dtype) if is_b else leaf)
    return jax.tree.unflatten(treedef, out)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.PRNGKey(0))


def test_init_lora_shapes_distribution_and_targets(params):
    adapters = init_lora(params, LORA, jax.random.PRNGKey(1))
    paths = lora_target_paths(params, LORA)
    # q, v in every self/cross attention and wi_0, wo in every feed-forward:
    # encoder 2 blocks × 4, decoder 2 blocks × 6.
    assert len(paths) == 2 * 4 + 2 * 6
    q = adapters["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]
    assert q["lora_A"].shape == (CONFIG.d_model, 4) and q["lora_B"].shape == (4, CONFIG.inner_dim)
    wo = adapters["decoder"]["block_1"]["layer_2"]["DenseReluDense"]["wo"]
    assert wo["lora_A"].shape == (CONFIG.d_ff, 4)
    bound = 1 / np.sqrt(CONFIG.d_ff)
    assert float(jnp.max(jnp.abs(wo["lora_A"]))) <= bound and float(jnp.std(wo["lora_A"])) > bound / 3
    assert all(float(jnp.max(jnp.abs(leaf))) == 0.0 for p, leaf in jax.tree.flatten_with_path(adapters)[0] if p[-1].key == "lora_B")
    assert "k" not in adapters["encoder"]["block_0"]["layer_0"]["SelfAttention"]
    bf16 = init_lora(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), LORA, jax.random.PRNGKey(1))
    assert q["lora_A"].dtype == jnp.float32 and bf16["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["lora_A"].dtype == jnp.bfloat16


def test_unknown_or_absent_targets_are_clear_errors(params):
    with pytest.raises(ValueError, match="wi_0"):
        init_lora(params, LoraConfig(target_modules=("wi",)), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="params tree itself"):
        init_lora({"params": params}, LORA, jax.random.PRNGKey(0))


def test_lora_at_init_leaves_outputs_unchanged_and_merge_equals_unmerged(params):
    ids, mask, dec, dec_mask = random_inputs(CONFIG)
    plain_apply, lora_apply = jax.jit(T5(CONFIG).apply), jax.jit(T5(CONFIG, lora=LORA).apply)
    base = plain_apply({"params": params}, ids, mask, dec, dec_mask)
    adapters = init_lora(params, LORA, jax.random.PRNGKey(1))
    fresh = lora_apply({"params": params, "lora": adapters}, ids, mask, dec, dec_mask)
    np.testing.assert_array_equal(np.asarray(fresh), np.asarray(base))  # B = 0 -> exactly the base model

    trained = randomise_b(adapters)
    unmerged = lora_apply({"params": params, "lora": trained}, ids, mask, dec, dec_mask)
    merged = plain_apply({"params": merge_lora(params, trained, LORA)}, ids, mask, dec, dec_mask)
    assert float(jnp.max(jnp.abs(unmerged - base))) > 1e-3  # the adapters do something
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=2e-5, rtol=1e-5)
    # merge_lora did not modify its input
    assert float(jnp.max(jnp.abs(params["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"]
                                  - merge_lora(params, adapters, LORA)["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"]))) == 0.0


def test_peft_export_round_trip_matches_torch_peft(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from fedjax_fm.models import from_pretrained

    torch.manual_seed(0)
    hf_config = transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
    )
    torch_model = transformers.T5ForConditionalGeneration(hf_config).eval()
    torch_model.save_pretrained(tmp_path / "base")

    lora = LoraConfig(rank=4, alpha=16.0, dropout=0.05, target_modules=("q", "v", "wi_1", "o"))
    model, params = from_pretrained(tmp_path / "base", lora=lora)
    adapters = randomise_b(init_lora(params, lora, jax.random.PRNGKey(3)), scale=0.2)
    ids, mask, dec, dec_mask = random_inputs(model.config, seed=4)
    ours = np.asarray(model.apply({"params": params, "lora": adapters}, ids, mask, dec, dec_mask))

    out = save_peft_adapter(adapters, lora, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16.0 and cfg["peft_type"] == "LORA"
    assert "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in peft_state_dict(adapters)

    peft_model = peft.PeftModel.from_pretrained(torch_model, str(out)).eval()
    loaded_keys = {k for k in peft_model.state_dict() if "lora_" in k}
    assert len(loaded_keys) == len(peft_state_dict(adapters))
    with torch.no_grad():
        theirs = peft_model(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
            decoder_input_ids=torch.from_numpy(dec).long(), decoder_attention_mask=torch.from_numpy(dec_mask).long(),
        ).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)

    back, back_config = load_peft_adapter(out)
    assert back_config == LoraConfig(rank=4, alpha=16.0, dropout=0.05, target_modules=tuple(sorted(lora.target_modules)))
    for x, y in zip(jax.tree.leaves(adapters), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(back) == jax.tree.structure(adapters)


def test_load_peft_adapter_rejects_what_it_cannot_represent(tmp_path, params):
    adapters = init_lora(params, LORA, jax.random.PRNGKey(1))
    out = save_peft_adapter(adapters, LORA, tmp_path / "a")
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(out)
    with pytest.raises(FileNotFoundError, match="adapter config"):
        load_peft_adapter(tmp_path / "missing")
