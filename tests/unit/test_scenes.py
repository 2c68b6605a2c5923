"""Scene generator: exact depth / boundaries / answers, determinism, and the Energon writer."""

import io
import json
import tarfile

import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from unimrg.data import scenes
from unimrg.data.llava import parse_record
from unimrg.data.scenes import (COLOURS, SHAPES, boundary_map, camera_depth, make_scene, normalise_depth,
                                write_scene_datasets)

SIZE = 56
SCENES = [make_scene(seed=0, index=i, size=SIZE) for i in range(12)]


def test_deterministic_per_seed_and_index():
    a, b = make_scene(3, 7, 40), make_scene(3, 7, 40)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.depth, b.depth)
    assert a.conversation == b.conversation
    c = make_scene(4, 7, 40)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("sc", SCENES, ids=lambda s: s.key)
def test_arrays_have_the_promised_types(sc):
    assert sc.image.shape == (SIZE, SIZE, 3) and sc.image.dtype == np.uint8
    assert sc.depth.shape == (SIZE, SIZE) and sc.depth.dtype == np.float32
    assert sc.depth.min() == 0.0 and sc.depth.max() == 1.0
    assert sc.boundary.shape == (SIZE, SIZE, 3) and sc.boundary.dtype == np.uint8
    assert set(np.unique(sc.boundary)) <= {0, 255}
    assert (sc.boundary[..., 0] == sc.boundary[..., 1]).all() and (sc.boundary[..., 0] == sc.boundary[..., 2]).all()
    assert 2 <= len(sc.objects) <= 4
    assert len({o.colour for o in sc.objects}) == len(sc.objects)   # names are unambiguous


def test_normalise_depth_guards_flat_maps():
    assert np.array_equal(normalise_depth(np.full((4, 4), 3.0)), np.zeros((4, 4), np.float32))
    d = normalise_depth(np.array([[2.0, 4.0], [6.0, 3.0]]))
    assert d.min() == 0 and d.max() == 1 and d[0, 1] == pytest.approx(0.5)


@pytest.mark.parametrize("sc", SCENES, ids=lambda s: s.key)
def test_depth_is_the_nearest_surface(sc):
    """Occlusion: where an object's ray hit exists, the visible surface is never farther than it, and
    where the object is the visible one, the z-buffer is exactly its hit depth."""
    rays = scenes._camera_rays(SIZE)
    z = sc.zbuffer.ravel()
    labels = sc.labels.ravel()
    for k, obj in enumerate(sc.objects):
        t, _ = scenes._intersect(obj, scenes.CAM_POS, rays)
        hit = np.isfinite(t)
        assert hit.any()
        assert (z[hit] <= t[hit] + 1e-5).all()
        mine = labels == k
        assert np.allclose(z[mine], t[mine], atol=1e-4)
        # an object hidden behind another at a pixel is behind it in depth there
        hidden = hit & ~mine & (labels >= 0)
        assert (t[hidden] > z[hidden]).all()
    # normalised depth is a decreasing map of the z-buffer (inverse depth, near = bright, as DA-V2)
    order = np.argsort(z)
    assert (np.diff(sc.depth.ravel()[order]) <= 0).all()


@pytest.mark.parametrize("sc", SCENES, ids=lambda s: s.key)
def test_boundaries_are_exactly_the_region_edges(sc):
    lab = sc.labels
    white = sc.boundary[..., 0] == 255
    pad = np.pad(lab, 1, constant_values=-99)         # the frame counts as "outside"
    differs = np.zeros(lab.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= pad[dy:dy + SIZE, dx:dx + SIZE] != lab
    expected = (lab >= 0) & differs
    assert np.array_equal(white, expected)
    assert not white[lab < 0].any()                     # background is black
    # the same rule as the SAM target maker (scipy erosion with a zero border), OR-ed over regions
    ref = np.zeros(lab.shape, bool)
    for k in range(len(sc.objects)):
        m = lab == k
        ref |= m & ~scipy.ndimage.binary_erosion(m, border_value=0)
    assert np.array_equal(white, ref)
    assert np.array_equal(boundary_map(lab), sc.boundary)


@pytest.mark.parametrize("sc", SCENES, ids=lambda s: s.key)
def test_answers_match_the_geometry(sc):
    names = [o.name for o in sc.objects]
    kinds = [qa.kind for qa in sc.qa]
    assert sorted(kinds) == ["closer", "count", "exists", "left_right"]
    for qa in sc.qa:
        if qa.kind == "count":
            assert qa.answer == str(len(sc.objects))
            assert len(np.unique(sc.labels[sc.labels >= 0])) == len(sc.objects)   # all of them visible
        elif qa.kind == "exists":
            (name,) = qa.subjects
            colour, shape = name.split()
            assert colour in COLOURS and shape in SHAPES
            assert qa.answer == ("Yes." if name in names else "No.")
        elif qa.kind == "closer":
            a, b = (names.index(n) for n in qa.subjects)
            za, zb = (camera_depth(sc.objects[i].center) for i in (a, b))
            near = a if za < zb else b
            far = b if near == a else a
            assert qa.answer == f"The {names[near]}."
            # the rendered depth agrees: the closer object's visible pixels are brighter (inverse depth)
            assert np.median(sc.depth[sc.labels == near]) > np.median(sc.depth[sc.labels == far])
        elif qa.kind == "left_right":
            a, b = (names.index(n) for n in qa.subjects)
            col_a, col_b = (np.nonzero(sc.labels == i)[1].mean() for i in (a, b))
            assert qa.answer == ("Left." if col_a < col_b else "Right.")


def test_conversation_is_a_valid_llava_record():
    sc = SCENES[0]
    conv = sc.conversation
    assert conv[0]["value"].startswith("<image>\n")
    assert [t["from"] for t in conv] == ["human", "gpt"] * len(sc.qa)
    rec = parse_record(sc.llava_record(), source="scene")
    assert rec.has_image and rec.conversations == conv and rec.image == f"{sc.key}.jpg"


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_writer_creates_four_energon_datasets(tmp_path):
    root = tmp_path / "data"
    scenes.main(["--out", str(root), "--num-scenes", "6", "--size", "32", "--seed", "5", "--shards", "2"])
    for task in ("und", "pix", "depth", "seg"):
        meta = root / task / ".nv-meta"
        assert (meta / "dataset.yaml").read_text().count("CrudeWebdataset") == 1
        assert (meta / "split.yaml").is_file() and (meta / "index.sqlite").is_file()
        assert sorted(p.name for p in (root / task).glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    ref = make_scene(5, 4, 32)
    depth = {**_members(root / "depth/shard-000000.tar"), **_members(root / "depth/shard-000001.tar")}
    assert len([n for n in depth if n.endswith(".depth.png")]) == 6
    png = Image.open(io.BytesIO(depth[f"{ref.key}.depth.png"]))
    assert png.mode.startswith("I;16")                          # 16 bits, not 8
    stored = np.asarray(png).astype(np.float64) / 65535
    assert np.abs(stored - ref.depth).max() <= 0.5 / 65535 + 1e-9
    assert (np.asarray(png) % 257 != 0).any()                  # not an 8-bit map scaled up
    seg = {**_members(root / "seg/shard-000000.tar"), **_members(root / "seg/shard-000001.tar")}
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(seg[f"{ref.key}.seg.png"]))), ref.boundary)
    und = {**_members(root / "und/shard-000000.tar"), **_members(root / "und/shard-000001.tar")}
    assert json.loads(und[f"{ref.key}.json"]) == ref.llava_record()
    assert json.loads((root / "scenes.json").read_text())["num_scenes"] == 6
    assert not list(root.glob(".scenes-tmp-*"))                 # the staging folder is gone

    with pytest.raises(FileExistsError, match="overwrite"):
        write_scene_datasets(root, 4, 32, 0, 1)
    write_scene_datasets(root, 4, 32, 0, 1, overwrite=True)
    assert [p.name for p in (root / "pix").glob("*.tar")] == ["shard-000000.tar"]

    foreign = tmp_path / "foreign"
    (foreign / "pix").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="refusing"):
        write_scene_datasets(foreign, 4, 32, 0, 1, overwrite=True)
