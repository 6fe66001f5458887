"""Tokenizer: deterministic offline SentencePiece training with T5's special ids, and loading."""

from __future__ import annotations

import random

import pytest

transformers = pytest.importorskip("transformers")

from fedjax_fm.models.tokenizer import EOS_ID, PAD_ID, UNK_ID, load_tokenizer, train_sentencepiece_tokenizer  # noqa: E402

NAMES = ["Alice", "Bob", "Carol", "Dmitri", "Eve", "Farah"]
WORDS = (
    "are we still meeting for lunch tomorrow ? i will be late , the train is delayed . "
    "can you send me the report please thanks sure no problem see you at the office at 5 pm"
).split()


def _dialogues(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        "\n".join(
            f"{rng.choice(NAMES)}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            for _ in range(rng.randint(2, 5))
        )
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _dialogues(2000)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    return directory, train_sentencepiece_tokenizer(corpus, directory, vocab_size=128, extra_ids=8)


def test_training_is_byte_identical(corpus, trained, tmp_path):
    directory, _ = trained
    train_sentencepiece_tokenizer(corpus, tmp_path, vocab_size=128, extra_ids=8)
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (directory / name).read_bytes(), name


def test_t5_special_ids_and_sentinels(trained):
    directory, tokenizer = trained
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert len(tokenizer) <= 128
    # Sentinels sit above the pieces, <extra_id_0> highest, as in FLAN-T5's tokenizer.
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1
    assert tokenizer.convert_tokens_to_ids("<extra_id_7>") == len(tokenizer) - 8
    # transformers' T5 class reads the directory directly too.
    assert isinstance(transformers.T5Tokenizer.from_pretrained(str(directory)), transformers.T5Tokenizer)


def test_encode_appends_eos_and_decodes_back(trained):
    _, tokenizer = trained
    text = "Alice: are we still meeting for lunch tomorrow?"
    ids = tokenizer(text).input_ids
    assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1]
    assert UNK_ID not in ids  # every character of the text is in the corpus
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    batch = tokenizer(["Bob: sure", "Eve: see you at the office at 5 pm"], padding=True)
    assert batch.input_ids[0][-1] == PAD_ID and batch.attention_mask[0][-1] == 0


def test_unseen_characters_map_to_unk(trained):
    _, tokenizer = trained
    assert UNK_ID in tokenizer("Zürich").input_ids


def test_load_tokenizer_on_saved_directory(trained, tmp_path):
    directory, tokenizer = trained
    text = "Farah: can you send me the report please"
    assert load_tokenizer(directory)(text).input_ids == tokenizer(text).input_ids
    tokenizer.save_pretrained(str(tmp_path / "saved"))
    reloaded = load_tokenizer(tmp_path / "saved")
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert len(reloaded) == len(tokenizer)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tokenizer files in '{tmp_path}'"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found: .*nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_training_errors(tmp_path):
    with pytest.raises(ValueError, match="no non-empty text"):
        train_sentencepiece_tokenizer(["", "  \n "], tmp_path)
    with pytest.raises(ValueError, match="vocab_size=10 leaves 2 pieces after 8 sentinels"):
        train_sentencepiece_tokenizer(["hello"], tmp_path, vocab_size=10, extra_ids=8)
    with pytest.raises(TypeError, match="texts must be strings"):
        train_sentencepiece_tokenizer([b"bytes"], tmp_path)


def test_transformers_ids_equal_sentencepiece_ids(trained):
    """transformers' converted tokenizer segments exactly like the trained spiece.model."""
    import sentencepiece as spm

    directory, tokenizer = trained
    processor = spm.SentencePieceProcessor(model_file=str(directory / "spiece.model"))
    texts = _dialogues(50, seed=7) + ["  spaces  around ", "tab\tand\nnewline", "Zürich 5€", "a.b,c!d?"]
    for text in texts:
        assert tokenizer(text).input_ids == processor.encode(text) + [EOS_ID], repr(text)
