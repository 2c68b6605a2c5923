"""A byte-level tokenizer built in code, for tiny models in tests and the demo.

No tokenizer can be downloaded here, and a learned vocabulary is not needed to test training: every
UTF-8 byte is one token (no merges), followed by the special tokens a model's chat format needs.
Deterministic, so every rank and every run gets the same ids. Real runs load the model's own
tokenizer folder instead (``AutoTokenizer.from_pretrained(local_dir)``).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def _byte_alphabet() -> list[str]:
    # The printable stand-ins GPT-2's byte-level BPE uses for the 256 byte values.
    return pre_tokenizers.ByteLevel.alphabet()


def build_byte_tokenizer(special_tokens: Sequence[str], pad_token: str | None = None,
                         eos_token: str | None = None) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0..255 are bytes (in a fixed order), then ``special_tokens``."""
    alphabet = sorted(_byte_alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    if pad_token is not None:
        fast.pad_token = pad_token
    if eos_token is not None:
        fast.eos_token = eos_token
    return fast
