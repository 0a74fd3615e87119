"""SentencePiece BPE tokenizer of Llama 2 (§2.2): training on a bounded sample of a corpus, loading.

The settings below were measured lossless (FACTS.md): digits are split, unknown UTF-8 falls back to
bytes, nothing is normalised, whitespace is kept, so decode(encode(text)) == text for any text.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# The SFT separator between prompt and answer (§3.1: "a special token"). A control symbol, not a
# user-defined one: encode() never produces it from text, so a prompt that contains the string
# "<sep>" cannot fake a separator, and pretraining text tokenises exactly as without it.
SEP_PIECE = "<sep>"

TRAINER_SETTINGS: dict[str, object] = {
    "model_type": "bpe",
    "split_digits": True,
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": True,
    "allow_whitespace_only_pieces": True,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_id": -1,
    "control_symbols": [SEP_PIECE],
    # Rare characters go to byte pieces rather than taking vocabulary slots.
    "character_coverage": 0.9995,
}
# SentencePiece's trainer drops longer sentences; dropping them here keeps the sample count honest.
MAX_SENTENCE_BYTES = 4192
# 256 byte pieces, unk/bos/eos and <sep>, and at least one piece learned from the text.
MIN_VOCAB_SIZE = 261


@dataclass
class Tokenizer:
    """A loaded SentencePiece model with the ids the data pipeline needs."""

    model_proto: bytes = field(repr=False)
    sp: spm.SentencePieceProcessor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def sep_id(self) -> int:
        """`<sep>` when the model has it (all models trained here do), else EOS (e.g. Meta's)."""
        sep = self.sp.piece_to_id(SEP_PIECE)
        return sep if sep != self.sp.unk_id() else self.eos_id

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_proto).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS/EOS."""
        return self.sp.encode(text)

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of text that continues a document cut after a newline: as encode() would
        give them inside the whole document, without the dummy prefix of a document's start.
        Encoded after a newline whose own tokens are then dropped (no piece of a model trained
        here spans a newline, so nothing merges across it)."""
        lead = self.sp.encode("\n")
        ids = self.sp.encode("\n" + text)
        return ids[len(lead) :] if ids[: len(lead)] == lead else self.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: the data pipeline parallelises across processes instead.
        return self.sp.encode(texts, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; BOS, EOS and <sep> decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a SentencePiece model file; a missing or broken file is a ValueError naming it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"tokenizer: {str(path)!r} is not a file; expected a SentencePiece .model")
    try:
        return Tokenizer(p.read_bytes())
    except RuntimeError as e:
        raise ValueError(f"tokenizer: {str(path)!r} is not a SentencePiece model ({e})") from None


def train_tokenizer(sentences: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Train a BPE model with the lossless Llama 2 settings on already-sampled sentences.

    The caller bounds the sample (see data_prepare.sample_sentences), so memory and time stay
    bounded whatever the size of the corpus.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small; allowed: >= {MIN_VOCAB_SIZE}")
    sample = [s for s in sentences if s.strip() and len(s.encode()) <= MAX_SENTENCE_BYTES]
    if not sample:
        raise ValueError("tokenizer: no non-empty sentences to train on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model,
            vocab_size=vocab_size,
            # The thread count is stored in the model, so it would change the tokenizer's
            # sha256 with the machine; BPE training on a bounded sample is quick on one.
            num_threads=1,
            minloglevel=2,
            **TRAINER_SETTINGS,
        )
    except RuntimeError as e:
        # SentencePiece refuses a vocabulary the sample cannot fill; say which knob to turn.
        raise ValueError(
            f"vocab_size={vocab_size} cannot be trained on {len(sample)} sentences ({e}); "
            "allowed: a smaller vocab_size or a larger corpus / tokenizer_sample"
        ) from None
    return Tokenizer(model.getvalue())
