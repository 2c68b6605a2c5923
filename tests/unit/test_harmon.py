"""Harmon adapter on tiny random configs: losses, gradient routing, freezing, precision, determinism, and
the full-size parameter counts (meta device).

    python -m pytest tests/unit/test_harmon.py -q
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from unimrg.data.batches import GenerationBatch, UnderstandingBatch
from unimrg.models import registry
from unimrg.models.harmon import Harmon, HarmonConfig
from unimrg.models.harmon.adapter import IGNORE_INDEX

SIZE = 64


def tiny_cfg(**kw) -> HarmonConfig:
    base = dict(size="tiny", image_size=SIZE, mar_image_size=SIZE, buffer_size=4, num_sampling_steps="5")
    base.update(kw)
    return HarmonConfig(**base)


def tiny(seed: int = 0, **kw) -> Harmon:
    torch.manual_seed(seed)
    model = Harmon(tiny_cfg(**kw))
    model.apply_freezing()
    return model.train()


def und_batch(b: int = 2, seed: int = 0) -> UnderstandingBatch:
    g = torch.Generator().manual_seed(seed)
    convs = [
        [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A red square."}],
        [{"from": "human", "value": "Colour?\n<image>"}, {"from": "gpt", "value": "Blue"},
         {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}],
    ]
    return UnderstandingBatch(images=torch.randint(0, 256, (b, 3, SIZE, SIZE), dtype=torch.uint8, generator=g),
                              conversations=[convs[i % 2] for i in range(b)], keys=[f"k{i}" for i in range(b)])


def gen_batch(b: int = 2, seed: int = 0, task: str = "depth", prompts=None) -> GenerationBatch:
    g = torch.Generator().manual_seed(seed)
    return GenerationBatch(task=task, images=torch.randint(0, 256, (b, 3, SIZE, SIZE), dtype=torch.uint8, generator=g),
                           targets=torch.rand(b, 3, SIZE, SIZE, generator=g),
                           prompts=prompts if prompts is not None else [["Generate the depth map.", ""][i % 2]
                                                                        for i in range(b)],
                           keys=[f"k{i}" for i in range(b)])


def grads_of(model: Harmon, prefix: str) -> list[torch.Tensor]:
    return [p.grad for n, p in model.named_parameters() if n.startswith(prefix) and p.grad is not None]


def test_registry_and_config_class():
    assert registry.adapter_class("harmon") is Harmon
    assert registry.config_class("harmon") is HarmonConfig
    cfg = HarmonConfig()
    # Defaults follow the released checkpoint/code: 16×16 learned grid + 64 buffers, run at 512.
    assert (cfg.mar_image_size, cfg.buffer_size, cfg.image_size) == (256, 64, 512)


def test_both_losses_finite_and_route_gradients():
    model = tiny()
    loss = model.understanding_loss(und_batch())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    # Understanding reaches the shared MAR encoder and the LLM, never the decoder/head or proj_out.
    assert grads_of(model, "mar.encoder_blocks") and grads_of(model, "llm.model.layers")
    assert not grads_of(model, "mar.decoder_blocks") and not grads_of(model, "mar.diffloss")
    assert not grads_of(model, "proj_out")
    model.zero_grad(set_to_none=True)

    loss = model.generation_loss(gen_batch())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for part in ("mar.encoder_blocks", "mar.decoder_blocks", "mar.diffloss.net", "proj_in", "proj_out",
                 "llm.model.layers"):
        assert grads_of(model, part), part
    assert not grads_of(model, "vae") and not grads_of(model, "mar.class_emb")


def test_freezing_rules():
    model = tiny()
    assert model.frozen_module_names() == ["vae", "mar.class_emb"]
    assert all(not p.requires_grad for p in model.vae.parameters())
    assert all(p.requires_grad for p in model.mar.encoder_blocks.parameters())   # shared: trains
    assert model.llm.model.embed_tokens.weight.requires_grad                    # released code trains it
    assert not model.vae.training and model.mar.training
    paper = tiny(freeze_text_embeddings=True)
    assert not paper.llm.lm_head.weight.requires_grad                            # tied to embed_tokens


def test_understanding_labels_are_the_answers():
    model = tiny()
    ids, labels, mask = model._conversation_ids(und_batch())
    tok = model.tokenizer
    sup = [tok.decode([t for t in row.tolist() if t != IGNORE_INDEX]) for row in labels]
    assert sup == ["A red square.<|im_end|>", "Blue<|im_end|>Yes.<|im_end|>"]
    first = tok.decode(ids[0][mask[0]].tolist())
    # The image sits after "<|im_start|>user\n"; the text continues with "\n{question}" (xtuner qwen_chat).
    assert first == "\nWhat is shown?<|im_end|>\n<|im_start|>assistant\nA red square.<|im_end|>\n"
    second = tok.decode(ids[1][mask[1]].tolist())
    assert "<image>" not in second and "\n<|im_start|>user\nSure?<|im_end|>" in second


def test_empty_prompt_is_the_unconditional_prompt():
    model = tiny()
    # RecA / UniMRG `_process_text`: "\n" + prompt, or the bare "Generate an image." when dropped.
    assert model.prompt_texts(["", "  Make depth. "]) == [
        "Generate an image.<|im_end|>\n<|im_start|>assistant\n",
        "\nMake depth.<|im_end|>\n<|im_start|>assistant\n"]
    feats = torch.zeros(2, 3, model.arch.llm.hidden_size)
    emb, mask, valid = model._prompt_prefix(feats, ["", ""])
    n_head = len(model.tokenizer("<|im_start|>user\n", add_special_tokens=False).input_ids)
    n_text = len(model.tokenizer(model.prompt_texts([""])[0], add_special_tokens=False).input_ids)
    assert valid.tolist() == [n_head + 3 + n_text] * 2 and torch.equal(emb[0], emb[1])


def test_grad_scale_on_understanding_features():
    """The image features' gradient is multiplied by grad_scale before it reaches the MAR encoder."""
    grads = {}
    for scale in (1.0, 0.1):
        model = tiny(grad_scale=scale, attn_dropout=0.0, proj_dropout=0.0)
        model.understanding_loss(und_batch()).backward()
        grads[scale] = model.mar.encoder_blocks[0].mlp.fc1.weight.grad.clone()
        llm_grad = model.llm.model.layers[0].mlp.up_proj.weight.grad.clone()
        grads[(scale, "llm")] = llm_grad
    torch.testing.assert_close(grads[0.1], 0.1 * grads[1.0], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(grads[(0.1, "llm")], grads[(1.0, "llm")])


def test_deterministic_init_per_seed():
    torch.manual_seed(0)
    a = Harmon(tiny_cfg())
    torch.manual_seed(0)
    b = Harmon(tiny_cfg())
    torch.manual_seed(1)
    c = Harmon(tiny_cfg())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_losses_deterministic_per_seed_and_bf16():
    model = tiny()
    torch.manual_seed(3)
    l1 = model.generation_loss(gen_batch())
    torch.manual_seed(3)
    l2 = model.generation_loss(gen_batch())
    assert torch.equal(l1, l2)
    model = model.to(torch.bfloat16)
    for loss in (model.understanding_loss(und_batch()), model.generation_loss(gen_batch())):
        assert torch.isfinite(loss)
        loss.backward()
    assert model.mar.encoder_blocks[0].attn.qkv.weight.grad.dtype == torch.bfloat16


def test_resolution_other_than_position_grid_and_all_masked():
    # Runs at 64 px over a 32 px learned grid (interpolated), without buffer tokens, checkpointing off.
    model = tiny(mar_image_size=32, buffer_size=0, gradient_checkpointing=False)
    assert model.mar.encoder_pos_embed_learned.shape[1] == 4
    model._random_mask = lambda b, n, device: torch.ones(b, n, device=device)     # every token masked
    loss = model.generation_loss(gen_batch())
    assert torch.isfinite(loss)
    loss.backward()
    with pytest.raises(ValueError, match="multiple of 16"):
        Harmon(tiny_cfg(image_size=40))


def test_losses_fall_on_a_fixed_batch():
    model = tiny(attn_dropout=0.0, proj_dropout=0.0)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    ub, gb = und_batch(), gen_batch()
    first, last = {}, {}
    for step in range(25):
        torch.manual_seed(123)   # same mask / noise / t each step: the objective is a fixed function
        losses = {"und": model.understanding_loss(ub), "gen": model.generation_loss(gb)}
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        (first if step == 0 else last).update({k: v.item() for k, v in losses.items()})
    assert last["und"] < 0.5 * first["und"], (first, last)
    assert last["gen"] < 0.9 * first["gen"], (first, last)


def test_full_size_counts_on_meta(capsys):
    with torch.device("meta"):
        model = Harmon(HarmonConfig(size="full"))

    def millions(*mods) -> float:
        seen = {id(p): p.numel() for m in mods for p in m.parameters()}    # tied weights counted once
        return sum(seen.values()) / 1e6

    counts = {"llm": millions(model.llm), "mar": millions(model.mar),
              "proj": millions(model.proj_in, model.proj_out), "vae": millions(model.vae)}
    print("Harmon-1.5B parameters (M): " + ", ".join(f"{k} {v:,.2f}" for k, v in counts.items()))
    for k, v in counts.items():
        ref = model.arch.published_millions[k]
        assert abs(v - ref) / ref < 0.01, (k, v, ref)
    assert tuple(model.mar.encoder_pos_embed_learned.shape) == (1, 320, 1280)
