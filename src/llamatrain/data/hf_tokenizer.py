"""Our SentencePiece BPE model as a Hugging Face `tokenizers` tokenizer (tokenizer.json) that
encodes every string to exactly the ids SentencePiece gives, for complete Hugging Face exports.

SentencePiece BPE (as §2.2 trains it: identity normalisation, whitespace kept, a dummy "▁" prefix,
digits split, byte fallback) maps to a `tokenizers` BPE model with the same vocabulary, where a
merge (a, b) exists for every split of a learned piece into two pieces of the vocabulary, ranked by
the learned piece's score: SentencePiece merges the best-scored adjacent pair first, and so does
BPE by rank. The normaliser always prepends "▁" and replaces spaces by "▁" (transformers' own
Llama tokenizer uses a Metaspace pre-tokenizer instead, which adds no "▁" before a leading space,
and that is not what SentencePiece does). Control pieces (<s>, </s>, <sep>) and <unk> are special
tokens that text never produces: tokenizer_config.json sets `split_special_tokens`, so the string
"</s>" in a document is encoded as text, as SentencePiece does.
"""

from __future__ import annotations

import json
from pathlib import Path

from llamatrain.data.tokenizer import Tokenizer

# Strings that have broken SentencePiece <-> tokenizers conversions before: leading, trailing and
# repeated whitespace, tabs and CRLF, digits, characters outside the vocabulary (byte fallback),
# CJK, emoji, combining marks, zero-width characters and the text of the special tokens.
HARD_STRINGS = (
    "", " ", "  ", "\n", "\t", "\r\n", "hello world", " leading space", "  two leading",
    "trailing space ", "a  b   c    d", "line one\nline two\n\n  indented\n",
    "def f(x):\n\treturn x ** 2  # squared\r\n", "12345 678.90 -3e-7 0x1F 2023-11-29",
    "中文字符 测试", "日本語のテキスト", "emoji 😀🎉👍🏽 x", "ñandú e\u0301 café",
    "zero\u200bwidth\u00a0nbsp", "<s> </s> <unk> <sep> [INST]", "\x00\x01\x7f", "▁ already ▁▁",
    "x" * 60, "Question: What is 7 + 5?\nAnswer: 12", "    return self.value  \n",
)


def build_hf_tokenizer(tok: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes as `tok` does (checked by `check_hf_tokenizer`)."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    sp = tok.sp
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    learned = [i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i)
                                           or sp.is_byte(i) or sp.is_unused(i))]
    merges = []
    for i in sorted(learned, key=lambda i: (-sp.get_score(i), i)):
        piece = sp.id_to_piece(i)
        merges += [(piece[:k], piece[k:]) for k in range(1, len(piece))
                   if piece[:k] in vocab and piece[k:] in vocab]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(sp.unk_id()),
                                fuse_unk=True, byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                           for i in special])
    hf.encode_special_tokens = True  # as SentencePiece: "</s>" in a text is text
    bos = sp.id_to_piece(tok.bos_id)
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)])
    return hf


def check_hf_tokenizer(hf, tok: Tokenizer, texts=HARD_STRINGS) -> None:
    """Raise ValueError naming the first text that `hf` encodes differently from SentencePiece."""
    for text in texts:
        theirs = hf.encode(text, add_special_tokens=False).ids
        ours = tok.encode(text)
        if theirs != ours:
            raise ValueError(f"tokenizer.json encodes {text!r} as {theirs[:12]}, SentencePiece as "
                             f"{ours[:12]}: not exported (is the model a SentencePiece BPE model "
                             "trained with llamatrain's settings?)")


def tokenizer_config(tok: Tokenizer, *, max_length: int) -> dict:
    """tokenizer_config.json: the special tokens, BOS added by default, special-token text kept."""
    piece = tok.sp.id_to_piece
    return {
        # The generic class loads tokenizer.json as it is; LlamaTokenizer would rebuild the
        # pre-tokenizer and prepend no "▁" before a leading space.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
        "unk_token": piece(tok.sp.unk_id()),
        "add_bos_token": True, "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "padding_side": "left",
    }


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path, *, max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and tokenizer.model,
    after checking on HARD_STRINGS that tokenizer.json encodes exactly as SentencePiece."""
    out = Path(out_dir)
    hf = build_hf_tokenizer(tok)
    check_hf_tokenizer(hf, tok)
    out.mkdir(parents=True, exist_ok=True)
    hf.save(str(out / "tokenizer.json"))
    config = tokenizer_config(tok, max_length=max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    tok.save(out / "tokenizer.model")
