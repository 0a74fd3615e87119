"""The SentencePiece tokenizer: lossless on hard text, digits split, byte fallback."""

import random

import pytest

from llamatrain.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    SEP_PIECE,
    UNK_ID,
    load_tokenizer,
    train_tokenizer,
)

WORDS = ["def", "return", "class", "import", "self", "value", "index"]
WORDS += ["total", "print", "while", "for", "in", "if", "else"]


def corpus_lines(n: int, seed: int = 0) -> list[str]:
    """Code-like ASCII lines with numbers and indentation; no CJK or emoji (those fall back)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        indent = " " * rng.choice([0, 4, 8])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        lines.append(f"{indent}{words} = {rng.randint(0, 99999)}  # note")
    return lines


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus_lines(3000), vocab_size=400)


HARD_TEXTS = [
    "def f(x):\n\treturn x\t# tab\n",
    "line one\r\nline two\r\n\r\n",
    "    four leading spaces and   runs     of spaces   ",
    " leading space",
    "  \n\n\n  trailing blank lines\n\n",
    "中文字符和日本語のテキスト, 한국어",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷",
    "ligature ﬁ, full-width ＡＢＣ, combining e\u0301 vs é, no-break\u00a0space",
    "\ufeffBOM first, zero\u200bwidth, nul\x00 byte, bell\x07",
    "numbers 3.14159 and 2024-01-01 and 1,000,000",
    "",
]


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_decode_of_encode_gives_back_the_same_bytes(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids).encode() == text.encode()
    # With BOS/EOS around it, as documents are stored.
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


def test_special_ids_and_vocabulary_size_are_as_configured(tok):
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert tok.sp.pad_id() == -1
    assert tok.vocab_size == 400
    assert tok.sp.id_to_piece(tok.sep_id) == SEP_PIECE


def test_numbers_are_split_into_single_digits(tok):
    pieces = tok.sp.encode("x = 1234567890 = 42", out_type=str)
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert "".join(digits).replace("\u2581", "") == "123456789042"
    assert all(sum(c.isdigit() for c in p) == 1 for p in digits)
    assert len(digits) == 12


def test_unknown_characters_fall_back_to_utf8_bytes(tok):
    pieces = tok.sp.encode("😀", out_type=str)
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    ids = tok.encode("中文 😀 한국어 \u2603")
    assert UNK_ID not in ids
    assert tok.decode(ids) == "中文 😀 한국어 \u2603"


def test_the_separator_is_never_produced_from_text(tok):
    ids = tok.encode(f"a {SEP_PIECE} b")
    assert tok.sep_id not in ids
    assert tok.decode(ids) == f"a {SEP_PIECE} b"
    assert tok.decode([tok.sep_id]) == ""


def test_saved_model_loads_with_the_same_ids_and_hash(tok, tmp_path):
    tok.save(tmp_path / "t.model")
    loaded = load_tokenizer(tmp_path / "t.model")
    assert loaded.sha256 == tok.sha256
    assert loaded.encode("return value 12") == tok.encode("return value 12")


def test_training_is_deterministic(tok):
    assert train_tokenizer(corpus_lines(3000), vocab_size=400).sha256 == tok.sha256


def test_too_small_a_vocabulary_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(corpus_lines(10), vocab_size=100)


def test_a_vocabulary_the_sample_cannot_fill_is_a_value_error():
    with pytest.raises(ValueError, match="vocab_size=5000 cannot be trained"):
        train_tokenizer(["tiny corpus"], vocab_size=5000)


def test_loading_a_missing_or_broken_model_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")
