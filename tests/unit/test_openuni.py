"""Tiny OpenUni adapter: losses, freezing, determinism, prompts, bf16.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_openuni.py -q -x
"""

from __future__ import annotations

import pytest
import torch

from unimrg.data.batches import GenerationBatch, UnderstandingBatch
from unimrg.models.openuni import OpenUni, OpenUniConfig
from unimrg.models.openuni.adapter import IGNORE_INDEX

SIZE = 56


def build(seed: int = 0, **kw) -> OpenUni:
    torch.manual_seed(seed)
    model = OpenUni(OpenUniConfig(size="tiny", image_size=SIZE, **kw))
    model.apply_freezing()
    return model.train()


def images(b: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)


def und_batch(imgs: torch.Tensor) -> UnderstandingBatch:
    convs = [[{"from": "human", "value": "<image>\nIs the cube left of the ball?"}, {"from": "gpt", "value": "Yes."}],
             [{"from": "human", "value": "How many shapes?"}, {"from": "gpt", "value": "Three."},
              {"from": "human", "value": "Which is closest?"}, {"from": "gpt", "value": "The red cube."}]]
    return UnderstandingBatch(images=imgs, conversations=convs[:len(imgs)], keys=[f"s{i}" for i in range(len(imgs))])


def gen_batch(imgs: torch.Tensor, task: str = "depth", prompts=None) -> GenerationBatch:
    g = torch.Generator().manual_seed(2)
    targets = torch.rand(len(imgs), 1, SIZE, SIZE, generator=g).expand(-1, 3, -1, -1).contiguous()
    prompts = ["Generate the depth map of this image."] * len(imgs) if prompts is None else prompts
    return GenerationBatch(task=task, images=imgs, targets=targets, prompts=prompts,
                           keys=[f"s{i}" for i in range(len(imgs))])


@pytest.fixture(scope="module")
def model() -> OpenUni:
    return build()


def grads(model: OpenUni) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_frozen_modules_are_vision_encoder_and_vae(model):
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(("lmm.model.vision_tower.", "vae."))}
    assert frozen == expected and expected
    assert not model.lmm.model.vision_tower.training and not model.vae.training  # eval even in train()
    assert model.lmm.model.language_model.training and model.transformer.training


def test_losses_finite_and_grads_only_on_trainable(model):
    imgs = images()
    model.zero_grad(set_to_none=True)
    loss = model.understanding_loss(und_batch(imgs))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    und_grads = grads(model)
    assert any(n.startswith("lmm.model.multi_modal_projector.") for n in und_grads)
    assert "lmm.lm_head.weight" in und_grads
    assert not any(n.startswith(("transformer.", "connector.", "projector.", "meta_queries")) for n in und_grads)

    model.zero_grad(set_to_none=True)
    loss = model.generation_loss(gen_batch(imgs))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    gen_grads = grads(model)
    for prefix in ("transformer.", "connector.", "projector.", "meta_queries", "lmm.model.language_model."):
        assert any(n.startswith(prefix) for n in gen_grads), prefix
    # OpenUni extracts the condition under no_grad: mlp1 learns from understanding only (by default).
    assert not any(n.startswith("lmm.model.multi_modal_projector.") for n in gen_grads)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert (und_grads | gen_grads) == trainable  # every trainable parameter learns from some task
    model.zero_grad(set_to_none=True)


def test_generation_grad_to_projector_option():
    model = build(generation_grad_to_projector=True)
    model.generation_loss(gen_batch(images())).backward()
    assert any(n.startswith("lmm.model.multi_modal_projector.") for n in grads(model))
    assert not any(n.startswith(("lmm.model.vision_tower.", "vae.")) for n in grads(model))


def test_train_flow_shift_moves_the_training_sigmas_toward_noise():
    """``model.train_flow_shift`` maps the same uniform draw u to σ' = sσ / (1 + (s − 1)σ) (diffusers'
    flow shift); 1 leaves OpenUni's schedule. Checked on the timesteps the loss hands SANA."""
    def timesteps_seen(model: OpenUni) -> torch.Tensor:
        seen = []
        hook = model.transformer.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True)
        torch.manual_seed(5)
        model.generation_loss(gen_batch(images(4)))
        hook.remove()
        return torch.cat(seen)

    plain, shifted = timesteps_seen(build()), timesteps_seen(build(train_flow_shift=6.0))
    s1, s6 = plain / 1000, shifted / 1000
    assert torch.allclose(s6, 6 * s1 / (1 + 5 * s1), atol=2e-3)
    assert (s6 >= s1).all() and s6.mean() > s1.mean()
    with pytest.raises(ValueError, match="train_flow_shift"):
        build(train_flow_shift=0.0)


def test_deterministic_init():
    a, b, c = build(seed=3).state_dict(), build(seed=3).state_dict(), build(seed=4).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_official_top_level_prefixes(model):
    tops = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert tops == {"lmm", "meta_queries", "connector", "projector", "transformer", "vae"}


def test_condition_uses_image_and_prompt_and_unconditional_works(model):
    imgs = images()
    with torch.no_grad():
        cond = model.condition(imgs, ["Generate the depth map of this image.", ""])
        assert cond.shape == (2, model.arch.num_queries, model.arch.sana["caption_channels"])
        swapped = model.condition(imgs.flip(0), ["Generate the depth map of this image.", ""])
        same = model.condition(imgs, ["Generate the depth map of this image.", ""])
        other_prompt = model.condition(imgs, ["Segment everything in this image.", ""])
    assert torch.equal(cond, same)                       # eval-free path is deterministic
    assert not torch.allclose(cond[1], swapped[1])      # "" prompt: image features still condition
    assert not torch.allclose(cond[0], other_prompt[0])  # the prompt conditions
    assert torch.allclose(cond[1], other_prompt[1], atol=1e-6)  # right padding does not leak across rows
    loss = model.generation_loss(gen_batch(imgs, task="pix", prompts=["", ""]))
    assert torch.isfinite(loss)


def test_understanding_labels_only_on_assistant_turns(model):
    batch = und_batch(images())
    ids, labels, mask = model._conversation_ids(batch)
    tok = model.tokenizer
    answer = tok.decode([t for t in labels[1].tolist() if t != IGNORE_INDEX])
    assert answer == "Three.<|im_end|>\nThe red cube.<|im_end|>\n"
    text = tok.decode(ids[1][mask[1]])
    assert text.startswith("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * model.arch.image_seq_length + "</img>\n")
    assert (labels[mask.logical_not()] == IGNORE_INDEX).all()
    # the image conditions the answer
    with torch.no_grad():
        l1 = model.understanding_loss(batch)
        l2 = model.understanding_loss(UnderstandingBatch(images=batch.images.flip(0),
                                                         conversations=batch.conversations))
    assert not torch.isclose(l1, l2)


def test_understanding_loss_is_hfs_full_logit_loss(model):
    """The head runs only on scored positions; the loss must stay InternVL's own (labels shifted by one,
    mean over the scored tokens), for a batch with an image and for a text-only row beside one."""
    batch = und_batch(images())
    mixed = UnderstandingBatch(images=batch.images, conversations=batch.conversations, keys=batch.keys,
                               has_image=torch.tensor([True, False]))
    for b in (batch, mixed):
        ids, labels, mask = model._conversation_ids(b)
        with torch.no_grad():
            cfg = model.lmm.config
            image = model.lmm.model.get_image_features(
                pixel_values=model._vit_pixels(b.images, torch.device("cpu"), torch.float32),
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy)
            image.pooler_output = image.pooler_output[b.image_mask()]
            hf = model.lmm(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": image}, labels=labels,
                           use_cache=False).loss
            ours = model.understanding_loss(b)
        torch.testing.assert_close(ours, hf, rtol=1e-6, atol=1e-6)


def test_bad_batches_fail_clearly(model):
    with pytest.raises(ValueError, match="prompts"):
        model.generation_loss(gen_batch(images(), prompts=["only one"]))
    bad = UnderstandingBatch(images=images(1), conversations=[[{"from": "human", "value": "hi"},
                                                               {"from": "human", "value": "again"}]], keys=["k7"])
    with pytest.raises(ValueError, match="k7"):
        model.understanding_loss(bad)


def test_forward_returns_a_loss_per_task(model):
    imgs = images()
    losses = model([und_batch(imgs), gen_batch(imgs, task="seg")])
    assert set(losses) == {"und", "seg"} and all(torch.isfinite(v) for v in losses.values())


def test_bf16():
    model = build().to(torch.bfloat16)
    imgs = images()
    und = model.understanding_loss(und_batch(imgs))
    gen = model.generation_loss(gen_batch(imgs, task="pix", prompts=["", "Keep the image as it is."]))
    (und + gen).backward()
    assert torch.isfinite(und) and torch.isfinite(gen)
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.grad is not None)
    assert not any(p.grad is not None for p in model.vae.parameters())
