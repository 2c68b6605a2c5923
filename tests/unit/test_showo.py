"""Show-o adapter at tiny size: joint one-pass losses, Show-o's attention pattern, freezing, sampling.

    python -m pytest tests/unit/test_showo.py -q
"""

from __future__ import annotations

import pytest
import torch

from unimrg.data.batches import GenerationBatch, UnderstandingBatch
from unimrg.models import registry
from unimrg.models.showo import Showo, ShowoConfig
from unimrg.models.showo.adapter import attention_mask
from unimrg.tasks import DEPTH, PIX, SEG, UND

SIZE = 56  # the loaders' tiny image size


def tiny(seed: int = 0, **kw) -> Showo:
    torch.manual_seed(seed)
    return Showo(ShowoConfig(size="tiny", **kw))


def und_batch(n: int = 2, seed: int = 0) -> UnderstandingBatch:
    g = torch.Generator().manual_seed(seed)
    convs = [[{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red cube."}],
             [{"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Blue."},
              {"from": "human", "value": "And the floor?"}, {"from": "gpt", "value": "Grey, with a long shadow."}]]
    return UnderstandingBatch(images=torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g),
                              conversations=[convs[i % 2] for i in range(n)], keys=[f"u{i}" for i in range(n)])


def gen_batch(task: str, n: int = 2, seed: int = 1, prompts: list[str] | None = None) -> GenerationBatch:
    """Default prompts alternate a real prompt and "" (unconditional)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    prompts = prompts if prompts is not None else [("Reconstruct this image.", "")[i % 2] for i in range(n)]
    return GenerationBatch(task=task, images=images, targets=torch.rand(n, 3, SIZE, SIZE, generator=g),
                           prompts=prompts, keys=[f"{task}{i}" for i in range(n)])


def all_tasks() -> list:
    return [und_batch(), gen_batch(PIX, seed=1), gen_batch(DEPTH, seed=2), gen_batch(SEG, seed=3)]


def test_registry_names_the_adapter():
    assert registry.adapter_class("showo") is Showo
    assert registry.config_class("showo") is ShowoConfig
    assert ShowoConfig().codebook_size == 8192   # the released MAGVIT-v2, not the paper text's 4,096


def test_joint_schedule_is_one_llm_pass_with_a_loss_per_task():
    model = tiny()
    model.apply_freezing()
    calls = []
    model.showo.model.register_forward_hook(lambda *a: calls.append(1))
    losses = model(all_tasks())
    assert len(calls) == 1
    assert set(losses) == {UND, PIX, DEPTH, SEG}
    for t, v in losses.items():
        assert v.ndim == 0 and torch.isfinite(v), t
    # Untrained: every loss is near ln(vocab) (CE over the whole 58k-style vocabulary, here 8,460).
    assert all(abs(v.item() - torch.log(torch.tensor(8460.0)).item()) < 1.0 for v in losses.values())


def test_packing_does_not_leak_between_samples_or_tasks():
    """One joint pass gives the same per-task losses as separate passes: padding, the other tasks'
    sequences and their lengths do not change any scored logit."""
    model = tiny()
    torch.manual_seed(5)
    joint = model([und_batch(), gen_batch(PIX)])
    torch.manual_seed(5)
    alone_und = model([und_batch()])[UND]
    alone_pix = model([gen_batch(PIX)])[PIX]     # same RNG draws: the mask sampling comes first either way
    torch.testing.assert_close(joint[UND], alone_und, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(joint[PIX], alone_pix, atol=1e-5, rtol=1e-5)


def test_attention_pattern():
    # Sequence: t t [c c] t [soi i i eoi] pad — c = CLIP slots, block 1 = image tokens.
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    clip = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    block = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 0]])
    allowed = attention_mask(valid, block, clip, torch.float32)[0, 0] == 0
    assert allowed[0, 2] and allowed[0, 3]            # CLIP features visible to earlier text (Show-o mmu mask)
    assert not allowed[1, 4] and allowed[4, 1]        # text is causal
    assert allowed[5, 8] and allowed[6, 7] and allowed[8, 5]   # full attention inside the image block
    assert not allowed[4, 5]                          # text before the image does not see it
    assert not allowed[:, 9][:9].any() and allowed[9, 9]       # nobody attends padding; pad row sees itself


def test_image_tokens_attend_both_ways_text_stays_causal():
    model = tiny().eval()
    b = gen_batch(PIX, n=1, prompts=["make it"])
    feats = model.image_features(b.images)
    codes = model.encode_targets(b.targets)[0]
    none = torch.zeros_like(codes, dtype=torch.bool)
    s = model._generation_seq(PIX, "make it", codes, none)
    ids, clip, valid, block = model._pack([s])
    h0 = model._run_llm(ids, clip, valid, block, feats)
    last = s.block[1] - 2                         # the last image token
    ids2 = ids.clone()
    ids2[0, last] = model.mask_id
    h1 = model._run_llm(ids2, clip, valid, block, feats)
    first = s.block[0] + 1
    assert not torch.allclose(h0[0, first], h1[0, first])            # earlier image token sees a later one
    assert torch.equal(h0[0, :s.block[0]], h1[0, :s.block[0]])      # text before the image does not


def test_sequence_layouts():
    model = tiny()
    tok = model.tokenizer
    (s,) = model._understanding_seqs(und_batch(1))
    assert s.ids[0] == model.mmu_id and s.ids[1] == model.soi_id      # tiny: no system prompt
    nc = model.arch.num_clip_tokens
    assert s.ids[s.clip_start + nc] == model.eoi_id
    text = tok.decode(s.ids[s.clip_start + nc + 1:])
    assert text == "USER: What is this? ASSISTANT: A red cube.<|endoftext|>"
    # Each scored position predicts the next token: the answer and its <|endoftext|>.
    assert tok.decode(s.targets) == " A red cube.<|endoftext|>"
    assert all(s.ids[p + 1] == t for p, t in zip(s.preds, s.targets))

    codes = torch.arange(model.arch.num_image_tokens)
    mask = torch.zeros_like(codes, dtype=torch.bool)
    mask[3] = True
    g = model._generation_seq(PIX, "", codes, mask)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert g.ids[:2] == [model.t2i_id, model.soi_id]
    # Empty prompt = Show-o's unconditional text (<bos><eos>); the image condition stays.
    assert g.ids[g.clip_start + nc:g.block[0]] == [model.eoi_id, eos, eos]
    assert g.ids[g.block[0]] == model.soi_id and g.ids[g.block[1] - 1] == model.eoi_id
    # Scored (Show-o's loss_t2i labels from the first image token on): the masked code and <|eoi|>.
    assert g.preds == [g.block[0] + 1 + 3, g.block[1] - 1]
    assert g.targets == [3 + model.image_offset, model.eoi_id]
    assert g.ids[g.preds[0]] == model.mask_id and g.ids[g.preds[0] + 1] == 4 + model.image_offset


def official_loss_t2i(model: Showo, batch: GenerationBatch, seed: int) -> torch.Tensor:
    """Show-o's `loss_t2i`, rebuilt from its label layout (showlab/Show-o training/prompting_utils.py
    `t2i_prompt`: labels = [text, <|soi|>, codes with the unmasked ones at -100, <|eoi|>];
    models/modeling_showo.py: CE over logits / labels[:, max_seq_length + 1:], i.e. from the first image
    token to <|eoi|>, mean over the non-ignored). Runs the model's own pieces for the logits of every
    position, then labels them independently of the adapter's `preds` / `targets`."""
    torch.manual_seed(seed)   # the same draws as the adapter's forward: image features, codes, masks
    feats = model.image_features(batch.images)
    codes = model.encode_targets(batch.targets)
    masks = model._sample_masks(codes.shape[0], codes.device)
    seqs = [model._generation_seq(batch.task, p, codes[i], masks[i]) for i, p in enumerate(batch.prompts)]
    ids, clip, valid, block = model._pack(seqs)
    logits = model.showo.lm_head(model._run_llm(ids, clip, valid, block, feats)).float()
    all_logits, all_labels = [], []
    for i, s in enumerate(seqs):
        first, eoi = s.block[0] + 1, s.block[1] - 1           # first image token, <|eoi|>
        labels = torch.where(masks[i], codes[i] + model.image_offset, -100).tolist() + [model.eoi_id]
        assert ids[i, eoi] == model.eoi_id and len(labels) == eoi + 1 - first
        all_logits.append(logits[i, first:eoi + 1])
        all_labels.append(torch.tensor(labels))
    return torch.nn.functional.cross_entropy(torch.cat(all_logits), torch.cat(all_labels), ignore_index=-100)


def test_generation_loss_is_shows_official_loss_t2i():
    model = tiny()
    model.apply_freezing()
    batch = gen_batch(PIX, n=3, prompts=["Reconstruct this image.", "", "Copy it."])
    torch.manual_seed(5)
    ours = model([batch])[PIX]
    want = official_loss_t2i(model, batch, seed=5)
    assert torch.allclose(ours, want, rtol=1e-5, atol=1e-6), (ours, want)
    # Scoring the masked codes alone (the earlier behaviour) is a different number.
    torch.manual_seed(5)
    codes = model.encode_targets(batch.targets)
    masks = model._sample_masks(codes.shape[0], codes.device)
    scored = int(masks.sum()) + len(batch)
    assert sum(len(model._generation_seq(PIX, p, codes[i], masks[i]).preds)
               for i, p in enumerate(batch.prompts)) == scored


def test_bad_inputs_name_the_sample():
    model = tiny()
    b = und_batch(1)
    b.conversations = [[{"from": "human", "value": "hi"}]]
    with pytest.raises(ValueError, match="u0.*no human→gpt"):
        model([b])
    g = gen_batch(PIX)
    g.prompts = []
    with pytest.raises(ValueError, match="fill GenerationBatch.prompts"):
        model([g])
    g = gen_batch(PIX)
    g.images = g.images.float()
    with pytest.raises(TypeError, match="uint8"):
        model([g])


def test_freezing_and_training_leave_clip_and_magvit_bit_identical():
    model = tiny()
    model.apply_freezing()
    model.train()
    assert not model.vision_tower.training and not model.vq_model.training and model.showo.training
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vision_tower.", "vq_model."))}
    opt = torch.optim.AdamW(list(model.trainable_parameters()), lr=1e-2)
    first = None
    for _ in range(8):
        torch.manual_seed(0)    # the same masks each step: the losses must fall
        losses = model(all_tasks())
        first = first or {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is None for p in model.vision_tower.parameters())
        assert model.mm_projector[0].weight.grad is not None     # the projector trains (both task kinds)
        opt.step()
    assert all(losses[t].item() < first[t] for t in first), (first, losses)
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_deterministic_init_per_seed():
    a, b, c = tiny(seed=3).state_dict(), tiny(seed=3).state_dict(), tiny(seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["showo.model.embed_tokens.weight"], c["showo.model.embed_tokens.weight"])


def test_bf16_forward_backward():
    model = tiny().to(torch.bfloat16)
    model.apply_freezing()
    losses = model(all_tasks())
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()
    assert model.showo.lm_head.weight.grad.dtype == torch.bfloat16


def test_sampling_is_deterministic_per_seed_and_decodes_to_pixels():
    model = tiny().eval()
    images = gen_batch(PIX).images
    kw = dict(steps=4, guidance_scale=2.0)
    a = model.generate_codes(images, ["Reconstruct.", "Depth."], seed=7, **kw)
    b = model.generate_codes(images, ["Reconstruct.", "Depth."], seed=7, **kw)
    c = model.generate_codes(images, ["Reconstruct.", "Depth."], seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, model.arch.num_image_tokens) and a.min() >= 0 and a.max() < model.arch.codebook_size
    pixels = model.generate(images, ["", "Depth."], seed=7, steps=3, guidance_scale=0.0)
    side = model.arch.magvit.resolution
    assert pixels.shape == (2, 3, side, side) and pixels.min() >= 0 and pixels.max() <= 1
