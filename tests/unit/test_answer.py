"""``answer(images, questions, max_new_tokens)`` for every registered model at tiny size: greedy, batched,
deterministic per seed.

    python -m pytest -q tests/unit/test_answer.py
"""

from __future__ import annotations

import pytest
import torch

from unimrg.data.scenes import make_scene
from unimrg.models import registry

# the tiny recipes' sizes (launch/recipes/*_tiny.yaml)
TINY = {"harmon": {"image_size": 64, "mar_image_size": 64}, "showo": {"image_size": 32}, "openuni": {"image_size": 56},
        "janus": {"image_size": 32}}


def build(name: str, seed: int):
    torch.manual_seed(seed)
    cls = registry.config_class(name)
    model = registry.build_model(cls(name=name, size="tiny", **TINY.get(name, {})))
    return model.train()


def scene_batch() -> tuple[torch.Tensor, list[str]]:
    scenes = [make_scene(0, 1_000_000 + i, 56) for i in range(3)]
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes])
    return images, [s.qa[0].question for s in scenes]


@pytest.mark.parametrize("name", registry.names())
def test_answer_is_greedy_batched_and_deterministic(name):
    images, questions = scene_batch()
    model = build(name, seed=0)
    a = model.answer(images, questions, max_new_tokens=6)
    assert isinstance(a, list) and len(a) == 3 and all(isinstance(x, str) for x in a)
    assert model.training, "answer() must restore train mode"
    assert model.answer(images, questions, max_new_tokens=6) == a
    assert build(name, seed=0).answer(images, questions, max_new_tokens=6) == a            # same seed
    # batching and padding do not change an answer (questions of different lengths → different padding)
    assert [model.answer(images[i:i + 1], questions[i:i + 1], max_new_tokens=6)[0] for i in range(3)] == a
    assert model.answer(images, questions, max_new_tokens=6, early_stop=False) == a
    with pytest.raises(ValueError, match="questions"):
        model.answer(images, questions[:2])


def test_greedy_decode_equals_recomputing_the_whole_sequence():
    """The KV-cached, left-aligned decoder picks the tokens a full forward over prompt + answer picks."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from unimrg.models.decoding import greedy_decode, left_align
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), True
    embeds = lm.model.embed_tokens(ids)
    mask_l, embeds_l = left_align(mask, embeds)
    assert mask_l.tolist()[1] == [False, False, False, True, True]
    got = greedy_decode(lm.model, lm.lm_head, lm.model.embed_tokens, embeds_l, mask_l, max_new_tokens=6,
                        stop_ids=[0], vocab_size=40)
    for p, g in zip(prompts, got):
        seq = list(p)
        with torch.no_grad():
            for _ in range(6):
                nxt = int(lm(input_ids=torch.tensor([seq])).logits[0, -1, :40].argmax())
                if nxt == 0:
                    break
                seq.append(nxt)
        assert g == seq[len(p):] and len(g) > 0
