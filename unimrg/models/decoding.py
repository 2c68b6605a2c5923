"""Greedy text decoding shared by the adapters' ``answer`` methods.

    answers = model.answer(images_uint8, ["How many objects are there in the image?"], max_new_tokens=16)

Each adapter builds its own prompt embeddings (image features in the model's chat layout, right-padded as
its training code does); :func:`left_align` moves every row's padding to the front so all rows end at the
same column, and :func:`greedy_decode` runs the prompt once into a KV cache and appends the arg-max token
per step. Positions skip the padding, so a batched answer equals the answer alone.

ZeRO-3: every weight is used inside its module's forward. With ``early_stop=False`` the number of
forwards is exactly ``max_new_tokens`` whatever the data, so ranks that decode different questions make
the same collective calls (the in-training evaluation passes this under ZeRO-3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def left_align(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Right-padded (B, L, ...) tensors and their (B, L) bool mask → the same rows rolled so that the
    padding comes first. Returns (mask, *tensors)."""
    b, length = mask.shape
    shift = length - mask.long().sum(dim=1)                                   # (B,)
    idx = (torch.arange(length, device=mask.device)[None] - shift[:, None]) % length   # (B, L)
    out = [mask.gather(1, idx)]
    for t in tensors:
        g = idx.view(b, length, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        out.append(t.gather(1, g))
    return tuple(out)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool (B, 1, Q, K) → float mask with 0 where allowed and the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def greedy_decode(body: Callable, head: Callable, embed: Callable, embeds: torch.Tensor, mask: torch.Tensor,
                  *, max_new_tokens: int, stop_ids: Sequence[int], prefix_mask_4d: torch.Tensor | None = None,
                  early_stop: bool = True, vocab_size: int | None = None) -> list[list[int]]:
    """Arg-max decoding after left-aligned prompt embeddings.

    Args:
        body: the LLM without its head (an HF ``*Model``): inputs_embeds, attention_mask, position_ids,
            cache, use_cache → ``last_hidden_state`` and ``cache``.
        head: hidden (B, H) → logits (B, V). embed: ids (B, 1) → embeddings (B, 1, H).
        embeds: (B, L, H) left-aligned prompt embeddings; mask: (B, L) bool, real tokens.
        prefix_mask_4d: a model-specific (B, 1, L, L) additive mask for the prompt (Show-o's); generated
            tokens then attend to every real token before them.
        stop_ids: token ids that end an answer (not included in it).
        early_stop: stop once every row has ended (False: always ``max_new_tokens`` forwards).
        vocab_size: arg-max over the first ``vocab_size`` logits only (the tokenizer's text tokens; heads
            are often padded, and Show-o's also holds image codes).
    Returns the generated ids of each row, without the stop token.
    """
    b = embeds.shape[0]
    device = embeds.device
    pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    out = body(inputs_embeds=embeds, attention_mask=prefix_mask_4d if prefix_mask_4d is not None else mask.long(),
               position_ids=pos, use_cache=True)
    cache, last = out.cache, out.last_hidden_state[:, -1]
    next_pos = mask.long().sum(dim=1, keepdim=True)                           # (B, 1)
    seen = mask.clone()
    stop = torch.tensor(list(stop_ids), device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    result: list[list[int]] = [[] for _ in range(b)]
    for step in range(max_new_tokens):
        token = head(last)[..., :vocab_size].float().argmax(dim=-1)                            # (B,)
        for i in torch.nonzero(~done & ~torch.isin(token, stop))[:, 0].tolist():
            result[i].append(int(token[i]))
        done |= torch.isin(token, stop)
        if step == max_new_tokens - 1 or (early_stop and bool(done.all())):
            break
        seen = torch.cat([seen, seen.new_ones(b, 1)], dim=1)
        attn = additive_mask(seen[:, None, None, :], embeds.dtype) if prefix_mask_4d is not None else seen.long()
        out = body(inputs_embeds=embed(token[:, None]).to(embeds.dtype), attention_mask=attn,
                   position_ids=next_pos, cache=cache, use_cache=True)
        cache, last = out.cache, out.last_hidden_state[:, -1]
        next_pos = next_pos + 1
    return result


def greedy_answers(tok, body: Callable, head: Callable, embed: Callable, embeds: torch.Tensor,
                   mask: torch.Tensor, *, stop_ids: Sequence[int], max_new_tokens: int, early_stop: bool,
                   prefix_mask_4d: torch.Tensor | None = None) -> list[str]:
    """:func:`greedy_decode` with the tokenizer's vocabulary bound, decoded to stripped strings (the tail
    every adapter's ``answer`` shares)."""
    out = greedy_decode(body, head, embed, embeds, mask, max_new_tokens=max_new_tokens, early_stop=early_stop,
                        vocab_size=len(tok), stop_ids=stop_ids, prefix_mask_4d=prefix_mask_4d)
    return [tok.decode(o, skip_special_tokens=True).strip() for o in out]
