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
TINY = {"harmon": {"image_size": 64, "mar_image_size": 64}, "showo": {"image_size": 32}, "openuni": {"image_size": 56}}


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
