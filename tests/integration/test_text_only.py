"""Text-only LLaVA conversations (ROOT/und_text) in the understanding stream: the loader's blend, each
adapter's text-only path, and a real two-rank run that trains on them.

    OMP_NUM_THREADS=1 python -m pytest -q tests/integration/test_text_only.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.integration.test_train_openuni import metrics, train
from unimrg.config import ConfigError, load_config, recipe_path, validate
from unimrg.data.batches import UnderstandingBatch
from unimrg.data.loaders import UND_TEXT, DataConfig, TaskLoaders, check_data_paths, prepare_dataset
from unimrg.models.registry import build_model, config_class
from unimrg.targets.shards import AtomicTar
from unimrg.tasks import UND

pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")

N_TEXT = 24   # the scene root has 32 und samples: "source" gives 24 / 56 text-only


def text_record(i: int) -> dict:
    return {"id": f"t{i}", "conversations": [{"from": "human", "value": f"Count to {i % 5 + 1}."},
                                             {"from": "gpt", "value": " ".join(str(k) for k in range(i % 5 + 2))}]}


def write_und_text(folder: Path, n: int, shards: int = 2) -> None:
    """An und_text dataset as the ingestion writes it: ``<key>.json`` only, prepared for Energon."""
    names = []
    for s in range(shards):
        tar = AtomicTar(folder / f"shard-{s:06d}.tar")
        for i in range(s, n, shards):
            tar.add(f"t{i:05d}", {"json": json.dumps(text_record(i)).encode()})
        tar.commit()
        names.append(tar.path.name)
    prepare_dataset(folder, names)


@pytest.fixture(scope="module")
def text_root(scene_root, tmp_path_factory):
    """A copy of the scene data root with ROOT/und_text."""
    root = tmp_path_factory.mktemp("with-text") / "data"
    shutil.copytree(scene_root, root)
    write_und_text(root / UND_TEXT, N_TEXT)
    return root


def und_batches(root, n_batches, micro_batch=4, **kw):
    cfg = DataConfig(root=str(root), num_workers=0, shuffle_buffer_size=8, max_samples_per_sequence=4, **kw)
    with TaskLoaders(cfg, [UND], micro_batch=micro_batch, image_size=32, rank=0, world_size=1, seed=0) as tl:
        return tl.text_ratio, [tl.next(UND) for _ in range(n_batches)]


def test_loader_mixes_text_only_records_by_ratio(text_root, scene_root):
    ratio, batches = und_batches(text_root, 20)                       # "source" (the default)
    assert ratio == pytest.approx(N_TEXT / (N_TEXT + 32))
    mask = torch.cat([b.image_mask() for b in batches])
    assert mask.shape == (80,) and 15 <= int((~mask).sum()) <= 55      # ~34 expected
    for b in batches:
        assert b.images.shape == (4, 3, 32, 32)
        for i, has in enumerate(b.image_mask().tolist()):
            first = b.conversations[i][0]["value"]
            assert has == first.startswith("<image>")                  # scene records carry <image>
            assert has or (b.images[i] == 0).all()                     # text-only: zero placeholder

    assert und_batches(text_root, 5, und_text_ratio="0")[0] == 0.0
    assert all(b.text_only() == 0 for b in und_batches(text_root, 5, und_text_ratio="0")[1])
    assert und_batches(scene_root, 1)[0] == 0.0                        # "source" without und_text: none
    r, mostly_text = und_batches(text_root, 10, und_text_ratio="0.9")
    assert r == 0.9 and sum(b.text_only() for b in mostly_text) >= 28

    with pytest.raises(ValueError, match="und_text_ratio"):
        check_data_paths(DataConfig(root=str(text_root), und_text_ratio="1.5"), [UND])
    with pytest.raises(FileNotFoundError, match="und_text"):
        check_data_paths(DataConfig(root=str(scene_root), und_text_ratio="0.2"), [UND])
    with pytest.raises(ConfigError, match="und_text_ratio"):            # --dry-run names the field
        validate(load_config(recipe_path("openuni", "tiny"), ["data.und_text_ratio=lots"]), dp_size=2)


def test_loader_resume_keeps_the_mix(text_root):
    cfg = DataConfig(root=str(text_root), num_workers=1, shuffle_buffer_size=8, max_samples_per_sequence=4,
                     und_text_ratio="0.5")
    make = lambda c: TaskLoaders(c, [UND], micro_batch=4, image_size=32, rank=0, world_size=1, seed=0)
    with make(cfg) as a:
        for _ in range(3):
            a.next(UND)
        state = a.state_dict()
        expected = [(a.next(UND).keys) for _ in range(4)]
    with make(cfg) as b:
        b.load_state_dict(state)
        assert [b.next(UND).keys for _ in range(4)] == expected
    with make(DataConfig(**{**cfg.__dict__, "und_text_ratio": "0.25"})) as c:
        with pytest.raises(ValueError, match="und_text_ratio"):
            c.load_state_dict(state)


# ---------------------------------------------------------------- each adapter's text-only path

def _answer_tokens(model, batch: UnderstandingBatch) -> int:
    """Supervised tokens of a batch, as each adapter labels them."""
    if model.cfg.name == "showo":
        return sum(len(s.targets) for s in model._understanding_seqs(batch))
    return int((model._conversation_ids(batch)[1] >= 0).sum())


IMAGE_PARTS = {"openuni": "lmm.model.multi_modal_projector", "harmon": "mar.", "showo": "mm_projector.",
               "janus": "janus.model.aligner."}


@pytest.mark.parametrize("name", ["openuni", "harmon", "showo", "janus"])
def test_adapter_trains_text_only_conversations(name):
    torch.manual_seed(0)
    model = build_model(config_class(name)(name=name, size="tiny"))
    model.eval()                                          # no dropout: losses compare exactly
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 56, 56), dtype=torch.uint8, generator=gen)
    with_image = [{"from": "human", "value": "<image>\nWhat colour is the ball?"},
                  {"from": "gpt", "value": "The ball is red and the cube is blue."}]
    text = text_record(3)["conversations"]

    def batch(images, convs, has):
        return UnderstandingBatch(images=images, conversations=convs, keys=[f"k{i}" for i in range(len(convs))],
                                  has_image=torch.tensor(has))

    blank = torch.zeros_like(image)
    noise = torch.randint(0, 256, image.shape, dtype=torch.uint8, generator=gen)
    lt = model.understanding_loss(batch(blank, [text], [False]))
    # the placeholder image of a text-only sample is never looked at
    assert torch.equal(lt, model.understanding_loss(batch(noise, [text], [False])))
    # ... and the text is not laid out as an image conversation (no image tokens / features)
    assert not torch.allclose(lt, model.understanding_loss(batch(noise, [text], [True])))

    li = model.understanding_loss(batch(image, [with_image], [True]))
    mixed = batch(torch.cat([image, blank]), [with_image, text], [True, False])
    lm = model.understanding_loss(mixed)
    # token-mean CE of the mixed batch = the two samples' losses weighted by their answer tokens
    ni, nt = (_answer_tokens(model, batch(image, [c], [h])) for c, h in ((with_image, True), (text, False)))
    assert ni > 0 and nt > 0
    torch.testing.assert_close(lm, (li * ni + lt * nt) / (ni + nt), rtol=1e-4, atol=1e-5)

    # a batch of text only trains the language model; the image-side modules run (every rank runs the
    # same modules, for ZeRO): the parameters an image batch trains all get a gradient, of zero
    model.train()

    def grads_of(b):
        model.zero_grad(set_to_none=True)
        model.understanding_loss(b).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    image_side = [n for n, g in grads_of(batch(image, [with_image], [True])).items()
                  if n.startswith(IMAGE_PARTS[name]) and g is not None and g.any()]
    grads = grads_of(batch(torch.cat([blank, blank]), [text, text_record(4)["conversations"]], [False, False]))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if not n.startswith(IMAGE_PARTS[name]))
    assert image_side and all(grads[n] is not None and not grads[n].any() for n in image_side)


# ---------------------------------------------------------------- a real run

@pytest.mark.slow
def test_trainer_run_trains_on_text_only_samples(tmp_path, text_root):
    """openuni tiny, two CPU ranks under ZeRO-3 (the strictest about every rank running the same
    modules): the und stream counts text-only samples per step, also when the ranks' mixes differ."""
    train(tmp_path, text_root, "train.steps=3", "train.export_final=false", "train.checkpoint_every=100",
          "train.zero_stage=3", "train.ds_config=ds_configs/zero3_tiny.json", "data.und_text_ratio=0.5")
    rows = {rank: metrics(tmp_path, rank) for rank in (0, 1)}
    for rank in (0, 1):
        assert len(rows[rank]) == 3
        assert all(r["samples"]["und"] == 2 and 0 <= r["samples"][UND_TEXT] <= 2 for r in rows[rank])
        assert all(torch.isfinite(torch.tensor(r["losses"]["und"])) for r in rows[rank])
    seen = [[r["samples"][UND_TEXT] for r in rows[rank]] for rank in (0, 1)]
    assert sum(map(sum, seen)) > 0, "no text-only sample reached the model in 12 understanding samples at ratio 0.5"
    assert seen[0] != seen[1], f"the ranks drew the same mixes {seen}: the test does not cover differing ones"
