"""Hugging Face checkpoint I/O: exact round trips, transformers parity, and clear errors.

Every checkpoint here is a tiny random ``transformers`` model written to a temporary
directory; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from fedjax_fm.models import hf_io  # noqa: E402
from fedjax_fm.models.config import T5Config, preset  # noqa: E402

VOCAB = 64
FLAVOURS = ("gated_untied", "relu_tied")


def _make_hf_model(flavour: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_heads=4, dropout_rate=0.0,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
    )
    if flavour == "gated_untied":
        config = transformers.T5Config(
            **common, num_layers=2, num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False
        )
        model = transformers.T5ForConditionalGeneration(config)
        # transformers 5 ties T5's head to `shared` at construction; FLAN-T5's is separate.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))
    else:
        config = transformers.T5Config(**common, num_layers=2, feed_forward_proj="relu")
        model = transformers.T5ForConditionalGeneration(config)
    return model.eval()


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """flavour -> (directory written by transformers' save_pretrained, the model in eval mode)."""
    out = {}
    for flavour in FLAVOURS:
        directory = tmp_path_factory.mktemp(flavour)
        model = _make_hf_model(flavour)
        model.save_pretrained(directory)
        out[flavour] = (directory, model)
    return out


def _hf_logits(model, input_ids: np.ndarray, decoder_input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(input_ids), decoder_input_ids=torch.tensor(decoder_input_ids)).logits.numpy()


def _ids(seed: int, vocab: int = VOCAB) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(2, vocab, (2, 7)), rng.integers(2, vocab, (2, 5))


def _file_tensors(directory: Path) -> dict[str, np.ndarray]:
    return load_file(str(directory / "model.safetensors"))


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_name_table_matches_transformers_state_dict(hf_checkpoints, flavour):
    directory, model = hf_checkpoints[flavour]
    config = hf_io.read_config(directory)
    assert config.tie_word_embeddings == (flavour == "relu_tied")
    hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if "embed_tokens" not in k}
    if config.tie_word_embeddings:
        hf_shapes.pop("lm_head.weight")
    assert {s.hf_name: s.hf_shape for s in hf_io.param_specs(config)} == hf_shapes


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_hf_to_ours_to_hf_is_identical(hf_checkpoints, flavour):
    directory, _ = hf_checkpoints[flavour]
    config = hf_io.read_config(directory)
    params = hf_io.load_params(directory, config)
    assert params["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"].shape == (16, 16)
    assert params["decoder"]["block_0"]["layer_2"]["DenseReluDense"]["wo"]["kernel"].shape == (24, 16)
    back = hf_io.hf_state_dict_from_params(params, config)
    original = _file_tensors(directory)
    assert set(back) == set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
        assert back[name].flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_loaded_tree_has_the_flax_module_structure(hf_checkpoints, flavour):
    from fedjax_fm.models.t5 import init_params

    directory, _ = hf_checkpoints[flavour]
    config = hf_io.read_config(directory)
    loaded = hf_io.load_params(directory, config)
    expected = jax.eval_shape(lambda key: init_params(config, key), jax.random.PRNGKey(0))
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    assert jax.tree.map(np.shape, loaded) == jax.tree.map(lambda x: x.shape, expected)


def test_transformers_v4_style_config_reads_untied(hf_checkpoints, tmp_path):
    directory, _ = hf_checkpoints["gated_untied"]
    hf = json.loads((directory / "config.json").read_text())
    hf.pop("scale_decoder_outputs")
    hf["tie_word_embeddings"] = False  # how transformers 4.x writes FLAN-T5
    assert not hf_io.config_from_hf_dict(hf).tie_word_embeddings


def test_missing_lm_head_means_head_is_shared(hf_checkpoints):
    """transformers 5 ties T5's head to `shared` when a checkpoint has no lm_head."""
    directory, _ = hf_checkpoints["gated_untied"]
    config = hf_io.read_config(directory)
    tensors = _file_tensors(directory)
    del tensors["lm_head.weight"]
    params = hf_io.params_from_hf_state_dict(tensors, config)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], tensors["shared.weight"].T)


def test_known_harmless_extras_are_accepted(hf_checkpoints):
    directory, _ = hf_checkpoints["relu_tied"]
    config = hf_io.read_config(directory)
    tensors = _file_tensors(directory)
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].copy()
    tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"].copy()
    tensors["lm_head.weight"] = tensors["shared.weight"].copy()
    tensors["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = np.zeros((8, 4), np.float32)
    params = hf_io.params_from_hf_state_dict(tensors, config)
    assert "lm_head" not in params


# --------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_from_pretrained_logits_match_transformers(hf_checkpoints, flavour):
    directory, hf_model = hf_checkpoints[flavour]
    model, params = hf_io.from_pretrained(directory)
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    input_ids, decoder_input_ids = _ids(1)
    ours = jax.jit(model.apply)({"params": params}, input_ids, None, decoder_input_ids, None)
    np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf_model, input_ids, decoder_input_ids), atol=2e-5, rtol=1e-5)


def _load_in_transformers(directory: Path):
    model, info = transformers.T5ForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_save_pretrained_reloads_in_transformers_identically(hf_checkpoints, flavour, tmp_path):
    directory, hf_model = hf_checkpoints[flavour]
    model, params = hf_io.from_pretrained(directory)
    out = hf_io.save_pretrained(model, params, tmp_path / "out")
    reloaded = _load_in_transformers(out)
    input_ids, decoder_input_ids = _ids(2)
    np.testing.assert_array_equal(
        _hf_logits(reloaded, input_ids, decoder_input_ids), _hf_logits(hf_model, input_ids, decoder_input_ids)
    )
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "t5" and written["architectures"] == ["T5ForConditionalGeneration"]
    assert written["tie_word_embeddings"] == (flavour == "relu_tied")


def test_flax_born_params_export_matches_transformers_logits(tmp_path):
    """Params made on our side (random, in our layout, untied head) export to an equal HF model."""
    from fedjax_fm.models.t5 import T5

    config = preset("tiny")
    rng = np.random.default_rng(3)
    params: dict = {}
    for spec in hf_io.param_specs(config):
        node = params
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        base = 1.0 if spec.path[-1] == "scale" else 0.0
        node[spec.path[-1]] = (base + 0.2 * rng.standard_normal(spec.shape)).astype(np.float32)
    model = T5(config)
    out = hf_io.save_pretrained(model, params, tmp_path / "flax_born")
    reloaded = _load_in_transformers(out)
    input_ids, decoder_input_ids = _ids(4, config.vocab_size)
    ours = jax.jit(model.apply)({"params": params}, input_ids, None, decoder_input_ids, None)
    np.testing.assert_allclose(_hf_logits(reloaded, input_ids, decoder_input_ids), np.asarray(ours), atol=1e-4, rtol=1e-4)


def test_from_pretrained_runtime_options_and_lora(hf_checkpoints):
    from fedjax_fm.models.config import LoraConfig

    directory, _ = hf_checkpoints["gated_untied"]
    lora = LoraConfig(rank=2)
    model, params = hf_io.from_pretrained(directory, dtype=jnp.bfloat16, remat=True, lora=lora)
    assert model.lora == lora and model.config.dtype == jnp.bfloat16 and model.config.remat
    assert "lora" not in params  # the frozen base; adapters come from models.lora.init_lora
    _, plain = hf_io.from_pretrained(directory)
    jax.tree.map(np.testing.assert_array_equal, params, plain)


def test_sharded_checkpoint_round_trip(hf_checkpoints, tmp_path):
    directory, hf_model = hf_checkpoints["gated_untied"]
    config = hf_io.read_config(directory)
    params = hf_io.load_params(directory, config)
    hf_io.save_pretrained(config, params, tmp_path / "sharded", max_shard_size="6KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    again = hf_io.load_params(tmp_path / "sharded", config)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    reloaded = _load_in_transformers(tmp_path / "sharded")
    input_ids, decoder_input_ids = _ids(5)
    np.testing.assert_array_equal(
        _hf_logits(reloaded, input_ids, decoder_input_ids), _hf_logits(hf_model, input_ids, decoder_input_ids)
    )
    # Saving again unsharded removes the stale shards.
    hf_io.save_pretrained(config, params, tmp_path / "sharded")
    assert sorted(p.name for p in (tmp_path / "sharded").glob("model*")) == ["model.safetensors"]


def test_bfloat16_export_and_load(hf_checkpoints, tmp_path):
    directory, _ = hf_checkpoints["relu_tied"]
    model, params = hf_io.from_pretrained(directory, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    out = hf_io.save_pretrained(model, params, tmp_path / "bf16")
    assert all(v.dtype.name == "bfloat16" for v in _file_tensors(out).values())
    _load_in_transformers(out)
    _, params32 = hf_io.from_pretrained(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), params, params32)


def test_save_pretrained_writes_tokenizer_files(hf_checkpoints, tmp_path):
    from fedjax_fm.models.tokenizer import load_tokenizer, train_sentencepiece_tokenizer

    tokenizer = train_sentencepiece_tokenizer(["hello there", "general kenobi"] * 50, tmp_path / "tok", vocab_size=40)
    directory, _ = hf_checkpoints["relu_tied"]
    model, params = hf_io.from_pretrained(directory)
    out = hf_io.save_pretrained(model, params, tmp_path / "with_tok", tokenizer=tokenizer)
    assert load_tokenizer(out)("hello there").input_ids == tokenizer("hello there").input_ids


# --------------------------------------------------------------------------- errors


@pytest.fixture()
def copy_of(hf_checkpoints, tmp_path):
    def make(flavour: str = "gated_untied") -> Path:
        return Path(shutil.copytree(hf_checkpoints[flavour][0], tmp_path / f"copy_{flavour}"))

    return make


def _edit_config(directory: Path, **changes) -> None:
    hf = json.loads((directory / "config.json").read_text())
    hf.update(changes)
    (directory / "config.json").write_text(json.dumps(hf))


def _edit_tensors(directory: Path, edit) -> None:
    tensors = _file_tensors(directory)
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found.*does_not_exist"):
        hf_io.from_pretrained(tmp_path / "does_not_exist")


def test_missing_config(copy_of):
    directory = copy_of()
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"no 'config.json' in checkpoint directory '{directory}'"):
        hf_io.from_pretrained(directory)


def test_invalid_json_config(copy_of):
    directory = copy_of()
    (directory / "config.json").write_text("{not json")
    with pytest.raises(hf_io.HFCheckpointError, match="config.json' is not valid JSON"):
        hf_io.from_pretrained(directory)


def test_missing_weights_names_pytorch_bin(copy_of):
    directory = copy_of()
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no 'model.safetensors'.*pytorch_model\.bin"):
        hf_io.from_pretrained(directory)


def test_other_architecture(copy_of):
    directory = copy_of()
    _edit_config(directory, model_type="bart", architectures=["BartForConditionalGeneration"])
    with pytest.raises(hf_io.HFCheckpointError, match=r"config\.json' describes model_type='bart'.*not a T5 model"):
        hf_io.from_pretrained(directory)


def test_unsupported_feed_forward(copy_of):
    directory = copy_of()
    _edit_config(directory, feed_forward_proj="gated-silu")
    with pytest.raises(hf_io.HFCheckpointError, match=r"config\.json'.*gated-silu.*not supported"):
        hf_io.from_pretrained(directory)


def test_shape_mismatch_names_tensor_file_and_shapes(copy_of):
    directory = copy_of()
    _edit_config(directory, d_ff=20)
    with pytest.raises(hf_io.HFCheckpointError) as err:
        hf_io.from_pretrained(directory)
    message = str(err.value)
    assert "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in message
    assert str(directory / "model.safetensors") in message
    assert "has shape (24, 16), expected (20, 16)" in message


def test_missing_tensor(copy_of):
    directory = copy_of()
    _edit_tensors(directory, lambda t: t.pop("decoder.block.2.layer.1.EncDecAttention.v.weight"))
    with pytest.raises(hf_io.HFCheckpointError, match=r"missing tensor 'decoder\.block\.2\.layer\.1\.EncDecAttention\.v\.weight'"):
        hf_io.from_pretrained(directory)


def test_unexpected_tensor(copy_of):
    directory = copy_of()
    _edit_tensors(directory, lambda t: t.update({"encoder.block.2.layer.0.SelfAttention.q.weight": np.zeros((16, 16), np.float32)}))
    with pytest.raises(hf_io.HFCheckpointError, match=r"unexpected tensor 'encoder\.block\.2\.layer\.0\.SelfAttention\.q\.weight'.*model\.safetensors"):
        hf_io.from_pretrained(directory)


def test_tied_config_with_different_lm_head(copy_of):
    directory = copy_of("relu_tied")
    _edit_tensors(directory, lambda t: t.update({"lm_head.weight": np.ones((VOCAB, 16), np.float32)}))
    with pytest.raises(hf_io.HFCheckpointError, match=r"'lm_head\.weight' in '.*model\.safetensors' differs from 'shared\.weight'"):
        hf_io.from_pretrained(directory)


def test_embed_tokens_differing_from_shared(copy_of):
    directory = copy_of()
    _edit_tensors(directory, lambda t: t.update({"encoder.embed_tokens.weight": np.ones((VOCAB, 16), np.float32)}))
    with pytest.raises(hf_io.HFCheckpointError, match=r"'encoder\.embed_tokens\.weight'.*differs from 'shared\.weight'"):
        hf_io.from_pretrained(directory)


@pytest.mark.parametrize("keep_bytes", [20, 5000, -100])
def test_truncated_safetensors(copy_of, keep_bytes):
    directory = copy_of()
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep_bytes])
    with pytest.raises(hf_io.HFCheckpointError, match=f"'{path}' is not a readable safetensors file.*truncated or corrupt"):
        hf_io.from_pretrained(directory)


def test_load_safetensors_checked_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors file not found: .*absent.safetensors"):
        hf_io.load_safetensors_checked(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(hf_io.HFCheckpointError, match="garbage.safetensors' is not a readable safetensors file"):
        hf_io.load_safetensors_checked(garbage)


def test_missing_shard(hf_checkpoints, tmp_path):
    directory, _ = hf_checkpoints["gated_untied"]
    config = hf_io.read_config(directory)
    hf_io.save_pretrained(config, hf_io.load_params(directory, config), tmp_path / "s", max_shard_size=6000)
    lost = sorted((tmp_path / "s").glob("model-*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{lost.name}'\] listed in '.*model\.safetensors\.index\.json' are missing"):
        hf_io.from_pretrained(tmp_path / "s")


def test_bad_index(hf_checkpoints, tmp_path):
    directory, _ = hf_checkpoints["gated_untied"]
    config = hf_io.read_config(directory)
    hf_io.save_pretrained(config, hf_io.load_params(directory, config), tmp_path / "s", max_shard_size=6000)
    index_path = tmp_path / "s" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["decoder.block.9.layer.0.layer_norm.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(hf_io.HFCheckpointError, match=r"index\.json' lists tensor\(s\) \['decoder\.block\.9\.layer\.0\.layer_norm\.weight'\]"):
        hf_io.from_pretrained(tmp_path / "s")
    index_path.write_text("[]")
    with pytest.raises(hf_io.HFCheckpointError, match=r"index\.json' is not a valid safetensors index"):
        hf_io.from_pretrained(tmp_path / "s")


def test_tokenizer_larger_than_vocab_is_refused(hf_checkpoints, tmp_path):
    class FakeTokenizer:
        def __len__(self):
            return VOCAB + 1

    directory, _ = hf_checkpoints["relu_tied"]
    model, params = hf_io.from_pretrained(directory)
    with pytest.raises(ValueError, match="tokenizer has 65 tokens but the model's vocab_size is 64"):
        hf_io.save_pretrained(model, params, tmp_path / "x", tokenizer=FakeTokenizer())


def test_preset_name_is_not_a_checkpoint():
    with pytest.raises(hf_io.HFCheckpointError, match=r"'tiny' is a preset name.*init_params"):
        hf_io.from_pretrained("tiny")
    with pytest.raises(hf_io.HFCheckpointError, match="google/flan-t5-small"):
        hf_io.from_pretrained("flan-t5-small")


def test_hub_name_unreachable_gives_clear_error():
    # This machine (and CI) has no route to the Hub; with one, the repo does not exist.
    with pytest.raises(FileNotFoundError, match=r"'fedjax-fm-tests/no-such-model' is not a local directory.*Hugging Face Hub"):
        hf_io.from_pretrained("fedjax-fm-tests/no-such-model")


def test_hub_download_path(hf_checkpoints, tmp_path, monkeypatch):
    """The Hub branch with snapshot_download replaced by a local copy (no network in tests)."""
    import huggingface_hub

    directory, _ = hf_checkpoints["relu_tied"]
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(directory if repo_id == "org/good" else tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = hf_io.from_pretrained("org/good")
    assert model.config.feed_forward_proj == "relu"
    assert calls[0][0] == "org/good" and "*.safetensors" in calls[0][1] and "spiece.model" in calls[0][1]
    assert not any(p.endswith((".bin", ".h5", ".msgpack")) for p in calls[0][1])
    shutil.copy(directory / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="the Hub repo 'org/bin-only' has no safetensors weights"):
        hf_io.from_pretrained("org/bin-only")


def test_export_rejects_bad_params(hf_checkpoints):
    directory, _ = hf_checkpoints["relu_tied"]
    config = hf_io.read_config(directory)
    params = hf_io.load_params(directory, config)
    with pytest.raises(hf_io.HFCheckpointError, match="'lora' collection"):
        hf_io.hf_state_dict_from_params({"params": params, "lora": {}}, config)
    del params["decoder"]["final_layer_norm"]
    params["extra"] = {"kernel": np.zeros(3)}
    with pytest.raises(hf_io.HFCheckpointError) as err:
        hf_io.hf_state_dict_from_params(params, config)
    assert "missing param 'decoder/final_layer_norm/scale'" in str(err.value)
    assert "unexpected param 'extra/kernel'" in str(err.value)
    wrong = hf_io.load_params(directory, config)
    with pytest.raises(hf_io.HFCheckpointError, match=r"param 'shared/embedding' has shape \(64, 16\), expected \(65, 16\)"):
        hf_io.hf_state_dict_from_params(wrong, config.replace(vocab_size=65))


def test_config_object_round_trips_through_config_json():
    config = preset("tiny")
    again = hf_io.config_from_hf_dict(json.loads(json.dumps(hf_io.hf_config_dict(config))))
    assert again == config
    assert isinstance(again, T5Config)


def test_released_flan_t5_config_reads_as_the_preset():
    """google/flan-t5-small's config.json (written by transformers 4.23), as published."""
    released = {
        "architectures": ["T5ForConditionalGeneration"], "d_ff": 1024, "d_kv": 64, "d_model": 512,
        "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
        "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
        "num_decoder_layers": 8, "num_heads": 6, "num_layers": 8, "output_past": True, "pad_token_id": 0,
        "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.23.1",
        "use_cache": True, "vocab_size": 32128,
    }
    assert hf_io.config_from_hf_dict(released) == preset("flan-t5-small")
    # Original T5 (t5-small) leaves feed_forward_proj and tie_word_embeddings to the defaults.
    original = {"model_type": "t5", "d_ff": 2048, "d_kv": 64, "d_model": 512, "num_heads": 8, "num_layers": 6, "vocab_size": 32128}
    config = hf_io.config_from_hf_dict(original)
    assert config.feed_forward_proj == "relu" and config.tie_word_embeddings and config.num_decoder_layers == 6
