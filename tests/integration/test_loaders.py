"""Per-task Energon loaders on generated scenes: exact batch sizes, exact targets, rank sharding,
exact resume, and bad input (a corrupt image is skipped + counted + warned; a broken task raises)."""

import io
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from unimrg.data.batches import GenerationBatch, UnderstandingBatch
from unimrg.data.llava import parse_record
from unimrg.data.loaders import (CorruptSampleWarning, DataConfig, TaskDataError, TaskLoaders,
                                 check_data_paths)
from unimrg.data.scenes import make_scene, write_scene_datasets
from unimrg.tasks import TASKS

N_SCENES, SIZE, SEED = 64, 32, 0
# energon always asks for pinned memory (pytest resets the filter unimrg.data.loaders installs)
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("scenes")
    write_scene_datasets(r, N_SCENES, SIZE, SEED, shards=2)
    return r


@pytest.fixture
def loaders():
    """Factory of TaskLoaders that closes them all at teardown (see TaskLoaders.close for why)."""
    made = []

    def make(root, tasks=TASKS, micro_batch=4, image_size=SIZE, rank=0, world_size=1, num_workers=0,
             target_size=None, **kw):
        cfg = DataConfig(root=str(root), num_workers=num_workers, **kw)
        made.append(TaskLoaders(cfg, tasks, micro_batch=micro_batch, image_size=image_size, rank=rank,
                                world_size=world_size, seed=1, target_size=target_size))
        return made[-1]

    yield make
    for tl in made:
        tl.close()


def corrupt(tar_path, suffix, keys=None):
    """Overwrite members' bytes in place (same length, so Energon's index stays valid): bit rot."""
    rng = np.random.default_rng(0)
    hit = []
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(suffix)
                   and (keys is None or m.name.split(".")[0] in keys)]
    with open(tar_path, "r+b") as f:
        for m in members:
            f.seek(m.offset_data)
            f.write(rng.integers(0, 256, m.size, dtype=np.uint8).tobytes())
            hit.append(m.name.split(".")[0])
    return hit


def corrupt_all_images(dataset_dir) -> list[str]:
    """Corrupt every image of every shard of one Energon dataset folder (also used by the trainer test)."""
    return [k for tar in sorted(Path(dataset_dir).glob("*.tar")) for k in corrupt(tar, ".jpg")]


def test_every_batch_has_exactly_micro_batch_samples(root, loaders):
    tl = loaders(root, micro_batch=5)     # 5 does not divide 64 / 32: batches cross epoch ends
    for _ in range(15):
        for task in TASKS:
            b = tl.next(task)
            assert len(b) == 5 and len(b.keys) == 5 and b.task == task
            assert b.images.shape == (5, 3, SIZE, SIZE) and b.images.dtype == torch.uint8
            if task == "und":
                assert isinstance(b, UnderstandingBatch) and len(b.conversations) == 5
                for conv in b.conversations:
                    assert conv[0]["value"].startswith("<image>\n")
                    parse_record({"id": "x", "image": "x.jpg", "conversations": conv})
            else:
                assert isinstance(b, GenerationBatch) and b.prompts == []
                assert b.targets.shape == (5, 3, SIZE, SIZE) and b.targets.dtype == torch.float32
                assert 0.0 <= float(b.targets.min()) and float(b.targets.max()) <= 1.0
    assert tl.skipped() == {t: 0 for t in TASKS}


def test_targets_are_the_exact_maps(root, loaders):
    tl = loaders(root, tasks=("pix", "depth", "seg"))
    for task in ("pix", "depth", "seg"):
        b = tl.next(task)
        assert torch.equal(b.targets[:, 0], b.targets[:, 1]) or task == "pix"
        for i, key in enumerate(b.keys):
            sc = make_scene(SEED, int(key.removeprefix("scene")), SIZE)
            if task == "depth":   # 16 bits survive decoding: error <= half a 16-bit step
                assert np.abs(b.targets[i, 0].numpy() - sc.depth).max() <= 0.5 / 65535 + 1e-6
                assert torch.equal(b.targets[i, 0], b.targets[i, 2])
            elif task == "seg":
                assert np.array_equal(b.targets[i].numpy() * 255, sc.boundary.transpose(2, 0, 1))
            else:
                assert torch.equal(b.targets[i], b.images[i].float() / 255)


def test_resized_targets_stay_in_range_and_binary(root, loaders):
    tl = loaders(root, tasks=("depth", "seg"), image_size=24)
    d, s = tl.next("depth"), tl.next("seg")
    assert d.images.shape == (4, 3, 24, 24) and d.targets.shape == (4, 3, 24, 24)
    assert 0 <= float(d.targets.min()) and float(d.targets.max()) <= 1
    assert set(torch.unique(s.targets).tolist()) <= {0.0, 1.0} and s.targets.max() == 1.0


def test_images_and_targets_come_at_their_own_sizes(root, loaders):
    """A model with two resolutions (OpenUni: InternViT 448 in, SANA 512 out) gets its input images at
    image_size and every target, the pixel-reconstruction one included, decoded at target_size."""
    tl = loaders(root, image_size=24, target_size=40)
    assert tl.next("und").images.shape == (4, 3, 24, 24)
    first = {}
    for task in ("pix", "depth", "seg"):
        first[task] = b = tl.next(task)
        assert b.images.shape == (4, 3, 24, 24) and b.targets.shape == (4, 3, 40, 40), task
    b = first["pix"]
    # From the source bytes, not an upsampled 24-px input: equal to the images of a 40-px loader.
    same = loaders(root, tasks=("pix",), image_size=40).next("pix")
    assert same.keys == b.keys and torch.equal(b.targets, same.images.float() / 255)


def test_ranks_read_disjoint_shards(root, loaders):
    seen = []
    for rank in (0, 1):   # data-parallel world size 2, no torch.distributed needed
        # no shuffle buffer (it would mix epochs): the first 8 batches are exactly one epoch of the
        # rank's part (energon still shuffles the shard slices)
        tl = loaders(root, tasks=("pix",), rank=rank, world_size=2, shuffle_buffer_size=1,
                     max_samples_per_sequence=8)
        seen.append([k for _ in range(N_SCENES // 2 // 4) for k in tl.next("pix").keys])
    a, b = set(seen[0]), set(seen[1])
    assert len(a) == len(b) == N_SCENES // 2 and not a & b
    assert len(a | b) == N_SCENES


def _snapshot(batch):
    return (batch.keys, batch.images.clone(),
            batch.conversations if isinstance(batch, UnderstandingBatch) else batch.targets.clone())


def _equal(x, y):
    return x[0] == y[0] and torch.equal(x[1], y[1]) and (
        x[2] == y[2] if isinstance(x[2], list) else torch.equal(x[2], y[2]))


def test_resume_reproduces_the_uninterrupted_run_with_workers(root, tmp_path, loaders):
    data = tmp_path / "data"
    shutil.copytree(root, data)
    assert corrupt(data / "pix" / "shard-000001.tar", ".jpg", keys={"scene0000040"}) == ["scene0000040"]
    tasks = ("und", "pix")   # one understanding and one generation stream; each task is independent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        a = loaders(data, tasks=tasks, num_workers=1)
        for _ in range(7):
            for task in tasks:
                a.next(task)
        state = a.state_dict()
        buf = io.BytesIO()
        torch.save(state, buf)          # a checkpoint holds plain types only
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        ref = [{t: _snapshot(a.next(t)) for t in tasks} for _ in range(12)]
        b = loaders(data, tasks=tasks, num_workers=1)
        b.load_state_dict(state)
        got = [{t: _snapshot(b.next(t)) for t in tasks} for _ in range(12)]
    assert all(_equal(r[t], g[t]) for r, g in zip(ref, got) for t in tasks)
    # the corrupt image was met after the save point, and the restored loader counted it identically
    assert a.skipped()["pix"] > state["skipped"]["pix"]
    assert b.skipped() == a.skipped()
    with pytest.raises(ValueError, match="num_workers=1, this run has 0"):
        loaders(data, tasks=tasks, num_workers=0).load_state_dict(state)


def test_a_stage_may_add_a_task_but_a_plain_resume_may_not(root, loaders):
    """A curriculum stage adds a task: the kept task continues where it stopped, the new one starts at
    its beginning. Anywhere else a task without a saved position is refused, naming the tasks."""
    a = loaders(root, tasks=("pix",))
    for _ in range(3):
        a.next("pix")
    state = a.state_dict()
    pix_next = _snapshot(a.next("pix"))
    with pytest.raises(ValueError, match=r"no entry for tasks \['depth'\] \(it has \['pix'\]\)"):
        loaders(root, tasks=("pix", "depth")).load_state_dict(state)
    b = loaders(root, tasks=("pix", "depth"))
    b.load_state_dict(state, new_tasks=("pix", "depth"))
    assert _equal(_snapshot(b.next("pix")), pix_next)
    assert _equal(_snapshot(b.next("depth")), _snapshot(loaders(root, tasks=("depth",)).next("depth")))


def test_corrupt_image_is_skipped_counted_and_warned(root, tmp_path, loaders):
    data = tmp_path / "data"
    shutil.copytree(root, data)
    (key,) = corrupt(data / "depth" / "shard-000000.tar", ".jpg", keys={"scene0000003"})
    # decoding happens in a worker process; no shuffle buffer, so the first 16 batches are one epoch + 1
    tl = loaders(data, tasks=("depth", "seg"), num_workers=1, shuffle_buffer_size=1)
    with pytest.warns(CorruptSampleWarning) as record:
        batches = [tl.next("depth") for _ in range(N_SCENES // 4)]
        for _ in range(3):
            tl.next("seg")
    seen = [k for b in batches for k in b.keys]
    assert all(len(b) == 4 for b in batches) and key not in seen
    assert set(seen) == {f"scene{i:07d}" for i in range(N_SCENES)} - {key}   # 64 good need all 63 + 1
    skipped = tl.skipped()
    assert skipped["seg"] == 0 and 1 <= skipped["depth"] <= 2
    messages = [str(w.message) for w in record if issubclass(w.category, CorruptSampleWarning)]
    assert len(messages) == skipped["depth"]
    assert all("'depth'" in m and key in m and "depth/shard-000000.tar" in m for m in messages)


def test_a_task_whose_images_are_all_corrupt_stops_with_task_and_file(root, tmp_path, loaders):
    data = tmp_path / "data"
    shutil.copytree(root, data)
    assert len(corrupt_all_images(data / "seg")) == N_SCENES
    tl = loaders(data, tasks=("pix", "seg"), num_workers=1, max_consecutive_failures=3)
    assert len(tl.next("pix")) == 4            # the healthy task is unaffected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        with pytest.raises(TaskDataError) as e:
            tl.next("seg")
    msg = str(e.value)
    assert "task 'seg'" in msg and "4 samples in a row" in msg and "/seg/shard-00000" in msg


def test_missing_data_is_named_before_loading(tmp_path, root):
    with pytest.raises(FileNotFoundError, match=r"task 'depth'.*python -m unimrg.data.scenes"):
        check_data_paths(DataConfig(root=str(root), paths={"depth": str(tmp_path / "nope")}), ("und", "depth"))
    with pytest.raises(ValueError, match="data.root is empty"):
        check_data_paths(DataConfig(), ("und",))
