import pytest

from fedjax_fm.models import LoraConfig, T5Config, preset


def test_presets_have_real_flan_t5_dimensions():
    small = preset("google/flan-t5-small")
    assert (small.d_model, small.d_ff, small.num_layers, small.num_heads) == (512, 1024, 8, 6)
    xl = preset("flan-t5-xl")
    assert (xl.d_model, xl.d_ff, xl.num_layers, xl.num_heads) == (2048, 5120, 24, 32)
    assert not small.tie_word_embeddings and small.is_gated


def test_hf_dict_round_trip():
    cfg = preset("tiny")
    again = T5Config.from_hf_dict(cfg.to_hf_dict())
    assert again == cfg


def test_bad_config_is_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="not a T5 model"):
        T5Config.from_hf_dict({"model_type": "bart"})
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="swiglu")
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("flan-t5-huge")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoraConfig(target_modules=("query",))


def test_transformers5_head_flag_decides_tying():
    # transformers 5 writes tie_word_embeddings=true for every T5 and keeps the head type here.
    flan = T5Config.from_hf_dict({"model_type": "t5", "tie_word_embeddings": True, "scale_decoder_outputs": False})
    assert not flan.tie_word_embeddings
    assert preset("tiny").to_hf_dict()["scale_decoder_outputs"] is False
