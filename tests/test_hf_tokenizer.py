"""The Hugging Face export of our SentencePiece tokenizer encodes and decodes as SentencePiece."""

from __future__ import annotations

import random

import pytest
import transformers
from conftest import WORDS

from llamatrain.data.hf_tokenizer import (
    HARD_STRINGS,
    build_hf_tokenizer,
    check_hf_tokenizer,
    save_hf_tokenizer,
)
from llamatrain.data.tokenizer import load_tokenizer, train_tokenizer


def _texts(seed: int = 0) -> list[str]:
    """Hard strings plus random mixtures of words, digits, whitespace and non-ASCII characters."""
    rng = random.Random(seed)
    alphabet = [*WORDS, " ", "  ", "\n", "\t", "0", "42", "3.14", "é", "中", "😀", "\u200b", "</s>"]
    return [*HARD_STRINGS, *("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
                             for _ in range(400))]


@pytest.fixture(scope="module")
def unicode_tokenizer():
    """A 600-piece model that learned pieces with CJK, accents and emoji."""
    rng = random.Random(1)
    extra = ["中文字符 测试 日本語", "café ñandú naïve", "emoji 😀🎉 party", "x = 12345"]
    lines = [" ".join(rng.choice(WORDS + extra) for _ in range(12)) for _ in range(3000)]
    return train_tokenizer(lines, vocab_size=600)


@pytest.fixture(params=["corpus", "unicode"])
def sp_tokenizer(request, prepared_data, unicode_tokenizer):
    if request.param == "corpus":
        return load_tokenizer(prepared_data / "tokenizer.model")
    return unicode_tokenizer


def test_tokenizer_json_encodes_exactly_as_sentencepiece(sp_tokenizer):
    hf = build_hf_tokenizer(sp_tokenizer)
    for text in _texts():
        ids = sp_tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert hf.decode(ids) == sp_tokenizer.decode(ids), text


def test_auto_tokenizer_loads_the_export_with_bos_and_special_tokens(sp_tokenizer, tmp_path):
    save_hf_tokenizer(sp_tokenizer, tmp_path, max_length=128)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert hf.model_max_length == 128
    for text in _texts(seed=1)[:200]:
        ids = sp_tokenizer.encode(text)
        assert hf.encode(text) == [1, *ids], text
        assert hf.decode(ids) == sp_tokenizer.decode(ids), text
    # The text of a special token is text, as SentencePiece reads it, not the token.
    assert 2 not in hf.encode("a </s> b")
    assert hf.decode([1, *sp_tokenizer.encode("ok"), 2], skip_special_tokens=True) == "ok"


def test_a_tokenizer_that_encodes_differently_is_refused(prepared_data):
    tok = load_tokenizer(prepared_data / "tokenizer.model")
    hf = build_hf_tokenizer(tok)
    from tokenizers import normalizers

    hf.normalizer = normalizers.Replace(" ", "▁")  # no dummy prefix
    with pytest.raises(ValueError, match="tokenizer.json encodes ' ' as"):
        check_hf_tokenizer(hf, tok)
