"""Token-sequence helpers shared by the adapters' understanding / generation batch builders.

    ids, mask = pad_right([[1, 2, 3], [4]], value=0)      # (2, 3) ids and the real-token mask

One place for these, so that adapters do not each carry a copy (CONVENTIONS: one obvious place).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def pad_right(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest (at least 1): (B, L) long tensor and (B, L) bool mask of real tokens."""
    n = max(1, max(len(s) for s in seqs))
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return out, mask


def cut_conversation(key: str, ids: list[int], labels: list[int], max_length: int, field: str = "max_length",
                     image_token_id: int | None = None, image_tokens: int = 0) -> tuple[list[int], list[int]]:
    """Cut an understanding sample to ``max_length`` tokens; refuse (naming the sample and ``model.<field>``)
    a cut that drops image tokens (``image_tokens`` of ``image_token_id`` expected) or leaves no answer."""
    if len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
        if image_tokens and ids.count(image_token_id) != image_tokens:
            raise ValueError(f"understanding sample {key!r}: {field}={max_length} cuts the image tokens; "
                             f"raise model.{field}")
    if all(x == IGNORE_INDEX for x in labels):
        raise ValueError(f"understanding sample {key!r}: no answer tokens left within {field}={max_length}; "
                         f"raise model.{field}")
    return ids, labels


def next_token_loss(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy as transformers computes it (``labels`` (B, L) aligned with ``hidden`` (B, L, H),
    shifted by one; mean over the scored tokens; fp32 logits), with ``head`` applied only where a token is
    scored: full logits are (B, L, vocab) -- 1.2 GB per 2,048-token sample at Qwen's 151K vocabulary in fp32 --
    for the few dozen answer tokens a conversation has."""
    labels = labels[:, 1:].to(hidden.device)
    picked = labels != IGNORE_INDEX
    logits = head(hidden[:, :-1][picked])                                    # (n, vocab)
    return torch.nn.functional.cross_entropy(logits.float(), labels[picked])
