"""python -m unimrg.data.scenes --out DIR --num-scenes 64 --size 56 --seed 0 [--shards 2]

The embedded default data: simple 3-D scenes (2-4 spheres / cubes / cylinders of named colours on a
floor in front of a wall), ray-cast with a pinhole camera, so every target is exact:

* the RGB image (Lambert shading, no anti-aliasing, so pixels, depth and boundaries align exactly);
* the depth map in Depth Anything V2's convention, so scene targets and real targets mean the same:
  *inverse* depth (1 / the z-buffer's camera-space depth, near = bright), min-max normalised to
  [0, 1] with a guard for flat maps, as the paper normalises DA-V2 outputs (Appendix B.2);
* the boundary map: 1-pixel white boundaries of every visible object region on black, 3 channels,
  {0, 255} -- ``mask & ~erode(mask)`` per region with a zero border, the rule the SAM target maker
  uses (notes/preprocessing.md); floor and wall are background, not regions;
* a LLaVA-style multi-turn conversation whose answers follow from the scene geometry: which object is
  closer, is there an X, how many objects, is A left or right of B.

``write_scene_datasets`` writes four Energon datasets (webdataset tar shards, prepared with the
Python API, ``CrudeWebdataset`` so that unimrg.data.loaders decodes every part itself -- the default
decoder would turn the 16-bit depth PNG into 8 bits):

    ROOT/und    <key>.jpg + <key>.json  (a LLaVA-665K record: {"id", "image", "conversations"})
    ROOT/pix    <key>.jpg
    ROOT/depth  <key>.jpg + <key>.depth.png  (uint16 grey, depth * 65535)
    ROOT/seg    <key>.jpg + <key>.seg.png    (RGB, {0, 255})
    ROOT/scenes.json  the generation parameters (marks ROOT as generated, so --overwrite may replace it)

Scene ``i`` depends only on (seed, i, size): more scenes never change the earlier ones.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from unimrg.data.loaders import prepare_dataset
from unimrg.tasks import DEPTH, SEG, TASKS, UND

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 35),
    "green": (45, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
    "cyan": (40, 195, 205),
}
SHAPES = ("sphere", "cube", "cylinder")

# Camera and room (world: y up, floor y = 0, camera looks along +z, pitched down).
CAM_POS = np.array([0.0, 2.0, 0.0])
CAM_PITCH = math.radians(-18.0)
FOV_Y = math.radians(45.0)
WALL_Z = 13.0
LIGHT = np.array([-0.45, 0.8, -0.4]) / np.linalg.norm([-0.45, 0.8, -0.4])
AMBIENT = 0.35
_cp, _sp = math.cos(CAM_PITCH), math.sin(CAM_PITCH)
CAM_ROT = np.array([[1, 0, 0], [0, _cp, _sp], [0, -_sp, _cp]])   # camera -> world (pitch about x)
CAM_FWD = CAM_ROT @ np.array([0.0, 0.0, 1.0])

FLOOR, WALL = -1, -2  # labels of the background; objects are 0..n-1

# Answer-ambiguity margins: a question is only asked about a pair that a viewer can judge.
MIN_DEPTH_GAP = 1.2        # world units between centre depths for "which is closer"
MIN_X_GAP = 0.12           # fraction of the image width between centres for "left or right"
MAX_TRIES = 200


@dataclass(frozen=True)
class SceneObject:
    shape: str                          # "sphere" | "cube" | "cylinder"
    colour: str                         # a key of COLOURS
    center: tuple[float, float, float]  # world coordinates
    size: float                         # sphere / cylinder radius, cube half-edge
    height: float                       # half-height (sphere: = size)
    angle: float                        # rotation about the vertical axis (cubes), radians

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class QA:
    kind: str                 # "closer" | "exists" | "count" | "left_right"
    question: str
    answer: str
    subjects: tuple[str, ...]  # object names the question is about


@dataclass
class Scene:
    key: str
    objects: list[SceneObject]
    image: np.ndarray        # (H, W, 3) uint8
    zbuffer: np.ndarray      # (H, W) float32, camera-space depth of the first hit (world units)
    depth: np.ndarray        # (H, W) float32 in [0, 1], min-max normalised 1 / zbuffer (near = 1, as DA-V2)
    labels: np.ndarray       # (H, W) int16: WALL, FLOOR, or the index of the visible object
    boundary: np.ndarray     # (H, W, 3) uint8 in {0, 255}
    qa: list[QA] = field(default_factory=list)

    @property
    def conversation(self) -> list[dict[str, str]]:
        """LLaVA turns; the first human turn starts with the ``<image>`` placeholder."""
        turns: list[dict[str, str]] = []
        for i, qa in enumerate(self.qa):
            turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + qa.question})
            turns.append({"from": "gpt", "value": qa.answer})
        return turns

    def llava_record(self) -> dict:
        return {"id": self.key, "image": f"{self.key}.jpg", "conversations": self.conversation}


# ---------------------------------------------------------------------------------------- render

def _camera_rays(size: int) -> np.ndarray:
    """World-space ray directions (H*W, 3) whose camera-forward component is exactly 1, so the ray
    parameter t of a hit *is* its camera-space depth (the z-buffer value)."""
    half = math.tan(FOV_Y / 2)
    c = (np.arange(size) + 0.5) / size * 2 - 1                    # pixel centres in [-1, 1]
    xs, ys = np.meshgrid(c * half, -c * half)                     # image y goes down
    d_cam = np.stack([xs, ys, np.ones_like(xs)], -1).reshape(-1, 3)
    return d_cam @ CAM_ROT.T


def _project(p: np.ndarray, size: int) -> tuple[float, float]:
    """World point -> (column, row) in pixels (continuous; pixel centres at k + 0.5)."""
    q = CAM_ROT.T @ (np.asarray(p) - CAM_POS)                      # camera coordinates
    half = math.tan(FOV_Y / 2)
    return float((q[0] / q[2] / half + 1) / 2 * size), float((1 - q[1] / q[2] / half) / 2 * size)


def camera_depth(p: np.ndarray | tuple[float, float, float]) -> float:
    """Camera-space depth (the z-buffer quantity) of a world point."""
    return float(np.dot(np.asarray(p) - CAM_POS, CAM_FWD))



def _intersect(obj: SceneObject, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest positive hit of rays o + t d with one object: t (N,) (inf = miss) and normals (N, 3)."""
    n = d.shape[0]
    t = np.full(n, np.inf)
    normal = np.zeros((n, 3))
    c = np.asarray(obj.center)
    if obj.shape == "sphere":
        oc = o - c
        a = np.einsum("ij,ij->i", d, d)
        b = d @ oc
        disc = b * b - a * (oc @ oc - obj.size ** 2)
        hit = disc > 0
        th = (-b[hit] - np.sqrt(disc[hit])) / a[hit]
        ok = th > 1e-6
        idx = np.nonzero(hit)[0][ok]
        t[idx] = th[ok]
        normal[idx] = (o + th[ok, None] * d[idx] - c) / obj.size
        return t, normal
    # cube and cylinder: work in the object's frame (rotated about y by obj.angle)
    ca, sa = math.cos(obj.angle), math.sin(obj.angle)
    rot = np.array([[ca, 0, -sa], [0, 1, 0], [sa, 0, ca]])        # world -> local
    ol = rot @ (o - c)
    dl = d @ rot.T
    if obj.shape == "cube":
        half = np.array([obj.size, obj.height, obj.size])
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / dl
            t0 = (-half - ol) * inv
            t1 = (half - ol) * inv
        tmin, tmax = np.minimum(t0, t1), np.maximum(t0, t1)
        tmin = np.where(np.isnan(tmin), -np.inf, tmin)
        tmax = np.where(np.isnan(tmax), np.inf, tmax)
        t_near, axis = tmin.max(1), tmin.argmax(1)
        t_far = tmax.min(1)
        hit = (t_near <= t_far) & (t_near > 1e-6)
        t[hit] = t_near[hit]
        nl = np.zeros((n, 3))
        nl[np.arange(n), axis] = -np.sign(dl[np.arange(n), axis])
        normal[hit] = nl[hit] @ rot                                  # local -> world
        return t, normal
    if obj.shape == "cylinder":                                      # vertical axis, with caps
        r, h = obj.size, obj.height
        a = dl[:, 0] ** 2 + dl[:, 2] ** 2
        b = ol[0] * dl[:, 0] + ol[2] * dl[:, 2]
        cc = ol[0] ** 2 + ol[2] ** 2 - r * r
        disc = b * b - a * cc
        with np.errstate(divide="ignore", invalid="ignore"):
            ts = np.where((disc > 0) & (a > 0), (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
            ys = ol[1] + ts * dl[:, 1]
            ts = np.where((ts > 1e-6) & (np.abs(ys) <= h), ts, np.inf)
            # caps: the one facing the ray origin
            cap_y = np.where(dl[:, 1] < 0, h, -h)
            tc = (cap_y - ol[1]) / dl[:, 1]
            xc, zc = ol[0] + tc * dl[:, 0], ol[2] + tc * dl[:, 2]
            tc = np.where((tc > 1e-6) & (xc ** 2 + zc ** 2 <= r * r), tc, np.inf)
        side = ts <= tc
        t = np.minimum(ts, tc)
        hit = np.isfinite(t)
        p = ol + t[:, None] * dl
        nl = np.where(side[:, None], np.stack([p[:, 0], np.zeros(n), p[:, 2]], -1) / r,
                      np.stack([np.zeros(n), np.sign(cap_y), np.zeros(n)], -1))
        normal[hit] = nl[hit] @ rot
        t[~hit] = np.inf
        return t, normal
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def _erode(m: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion with a zero border: scipy.ndimage.binary_erosion(m, border_value=0)."""
    p = np.pad(m, 1)
    return m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def boundary_map(labels: np.ndarray) -> np.ndarray:
    """(H, W) region labels (objects >= 0) -> (H, W, 3) uint8 {0, 255}: each object region's
    1-pixel inner boundary, OR-ed over regions (the SAM-mask boundary rule)."""
    edge = np.zeros(labels.shape, bool)
    for k in np.unique(labels[labels >= 0]):
        m = labels == k
        edge |= m & ~_erode(m)
    return np.repeat((edge * 255).astype(np.uint8)[..., None], 3, axis=2)


def normalise_depth(z: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a flat map (max == min) becomes all zeros instead of NaN."""
    z = z.astype(np.float64)
    lo, hi = float(z.min()), float(z.max())
    if hi - lo < 1e-12:
        return np.zeros(z.shape, np.float32)
    return ((z - lo) / (hi - lo)).astype(np.float32)


def render(objects: list[SceneObject], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray-cast the room with ``objects``: image (H,W,3) uint8, zbuffer (H,W) float32, labels (H,W) int16."""
    d = _camera_rays(size)
    n = d.shape[0]
    o = CAM_POS
    with np.errstate(divide="ignore"):
        t_floor = np.where(d[:, 1] < 0, -o[1] / d[:, 1], np.inf)
        t_wall = np.where(d[:, 2] > 0, (WALL_Z - o[2]) / d[:, 2], np.inf)
    t_best = np.minimum(t_floor, t_wall)
    labels = np.where(t_floor <= t_wall, FLOOR, WALL).astype(np.int16)
    normal = np.where((t_floor <= t_wall)[:, None], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0])
    for k, obj in enumerate(objects):
        t, nk = _intersect(obj, o, d)
        closer = t < t_best
        t_best = np.where(closer, t, t_best)
        labels[closer] = k
        normal[closer] = nk[closer]
    assert np.isfinite(t_best).all(), "every ray must hit the floor or the wall"

    p = o + t_best[:, None] * d
    base = np.empty((n, 3))
    checker = (np.floor(p[:, 0]) + np.floor(p[:, 2])) % 2 == 0
    base[:] = np.where(checker[:, None], (175, 170, 160), (140, 135, 128))      # floor tiles
    base[labels == WALL] = (205, 195, 175)
    for k, obj in enumerate(objects):
        base[labels == k] = COLOURS[obj.colour]
    shade = AMBIENT + (1 - AMBIENT) * np.clip(normal @ LIGHT, 0, 1)
    image = np.clip(base * shade[:, None], 0, 255).round().astype(np.uint8)
    return (image.reshape(size, size, 3), t_best.reshape(size, size).astype(np.float32),
            labels.reshape(size, size))


# ------------------------------------------------------------------------------------ generation

def _sample_objects(rng: np.random.Generator) -> list[SceneObject]:
    count = int(rng.integers(2, 5))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    objs: list[SceneObject] = []
    footprint: list[tuple[float, float, float]] = []   # (x, z, radius of the horizontal footprint)
    for colour in colours:
        for _ in range(50):
            shape = str(rng.choice(SHAPES))
            size = float(rng.uniform(0.45, 0.85))
            z = float(rng.uniform(4.0, 10.5))
            x = float(rng.uniform(-0.28, 0.28) * z)      # inside the horizontal field of view
            height = size if shape != "cylinder" else size * float(rng.uniform(0.8, 1.4))
            angle = float(rng.uniform(0, math.pi / 2)) if shape == "cube" else 0.0
            reach = size * (math.sqrt(2) if shape == "cube" else 1.0)
            if all(math.hypot(x - fx, z - fz) > reach + fr + 0.1 for fx, fz, fr in footprint):
                footprint.append((x, z, reach))
                objs.append(SceneObject(shape, str(colour), (x, height, z), size, height, angle))
                break
    return objs


def _questions(rng: np.random.Generator, objs: list[SceneObject], labels: np.ndarray,
               size: int) -> list[QA] | None:
    """One question of each kind, in random order; None if no pair is unambiguous enough."""
    n = len(objs)
    depth = [camera_depth(o.center) for o in objs]
    col = [_project(np.asarray(o.center), size)[0] for o in objs]
    # the visible-pixel centroid must agree with the projected centre (occlusion can move it)
    vis_col = [float(np.nonzero(labels == k)[1].mean()) for k in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    closer = [(i, j) for i, j in pairs if abs(depth[i] - depth[j]) >= MIN_DEPTH_GAP]
    side = [(i, j) for i, j in pairs
            if abs(col[i] - col[j]) >= MIN_X_GAP * size
            and (col[i] < col[j]) == (vis_col[i] < vis_col[j])]
    if not closer or not side:
        return None
    out: list[QA] = []

    i, j = closer[int(rng.integers(len(closer)))]
    a, b = objs[i].name, objs[j].name
    near = a if depth[i] < depth[j] else b
    out.append(QA("closer", f"Which is closer to the camera, the {a} or the {b}?", f"The {near}.", (a, b)))

    present = {(o.colour, o.shape) for o in objs}
    if rng.random() < 0.5:
        o = objs[int(rng.integers(n))]
        out.append(QA("exists", f"Is there a {o.name} in the image?", "Yes.", (o.name,)))
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        c, s = absent[int(rng.integers(len(absent)))]
        out.append(QA("exists", f"Is there a {c} {s} in the image?", "No.", (f"{c} {s}",)))

    out.append(QA("count", "How many objects are there in the image?", str(n), ()))

    i, j = side[int(rng.integers(len(side)))]
    a, b = objs[i].name, objs[j].name
    ans = "Left." if col[i] < col[j] else "Right."
    out.append(QA("left_right", f"Is the {a} to the left or to the right of the {b}?", ans, (a, b)))

    order = rng.permutation(len(out))
    return [out[k] for k in order]


def make_scene(seed: int, index: int, size: int) -> Scene:
    """Scene ``index`` of the dataset with ``seed``: deterministic, independent of other indices."""
    if size < 16:
        raise ValueError(f"scene size {size} is too small to show 2-4 objects; use --size >= 16")
    rng = np.random.default_rng([seed, index])
    min_pixels = max(6, int(0.004 * size * size))
    for _ in range(MAX_TRIES):
        objs = _sample_objects(rng)
        if len(objs) < 2:
            continue
        image, zbuf, labels = render(objs, size)
        counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(objs))
        if (counts < min_pixels).any():       # every object must be clearly visible to be counted
            continue
        qa = _questions(rng, objs, labels, size)
        if qa is None:
            continue
        return Scene(key=f"scene{index:07d}", objects=objs, image=image, zbuffer=zbuf,
                     depth=normalise_depth(1.0 / zbuf), labels=labels, boundary=boundary_map(labels), qa=qa)
    raise RuntimeError(f"could not place a valid scene (seed={seed}, index={index}, size={size}) "
                       f"in {MAX_TRIES} tries; use a larger --size")


# ---------------------------------------------------------------------------------------- writer

def _encode(arr: np.ndarray, fmt: str) -> bytes:
    bio = io.BytesIO()
    Image.fromarray(arr).save(bio, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return bio.getvalue()


def depth_to_png16(depth: np.ndarray) -> bytes:
    """[0, 1] float -> 16-bit grey PNG (mode I;16)."""
    return _encode(np.round(np.clip(depth, 0, 1) * 65535).astype(np.uint16), "PNG")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0          # byte-identical shards for the same seed
    tar.addfile(info, io.BytesIO(data))


MARKER = "scenes.json"


def write_scene_datasets(root: str | os.PathLike, num_scenes: int, size: int, seed: int, shards: int,
                         *, overwrite: bool = False) -> None:
    """Render ``num_scenes`` scenes and write ROOT/{und,pix,depth,seg} as prepared Energon datasets.

    The datasets are built in a temporary folder next to ROOT and moved into place at the end, so an
    interrupted run never leaves a half-written dataset that looks complete.

    Args:
        overwrite: replace existing datasets in ROOT, only if ROOT was written by this function
            (ROOT/scenes.json exists); other data is never deleted.
    """
    root = Path(root)
    if num_scenes < 1 or shards < 1:
        raise ValueError(f"num_scenes ({num_scenes}) and shards ({shards}) must be >= 1")
    shards = min(shards, num_scenes)
    existing = [t for t in TASKS if (root / t).exists()]
    if existing:
        if not overwrite:
            raise FileExistsError(f"{root}: datasets {existing} exist; pass overwrite=True (--overwrite) "
                                  f"to regenerate them or choose another --out")
        if not (root / MARKER).exists():
            raise FileExistsError(f"{root}: {existing} exist but {root / MARKER} does not, so they were not "
                                  f"generated here; refusing to delete them. Choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".scenes-tmp-", dir=root))
    try:
        tars: dict[str, list[tarfile.TarFile]] = {}
        for task in TASKS:
            (tmp / task).mkdir()
            tars[task] = [tarfile.open(tmp / task / f"shard-{s:06d}.tar", "w") for s in range(shards)]
        for i in range(num_scenes):
            sc = make_scene(seed, i, size)
            s = i * shards // num_scenes
            jpg = _encode(sc.image, "JPEG")
            for task in TASKS:
                _add(tars[task][s], f"{sc.key}.jpg", jpg)
            _add(tars[UND][s], f"{sc.key}.json", json.dumps(sc.llava_record()).encode())
            _add(tars[DEPTH][s], f"{sc.key}.depth.png", depth_to_png16(sc.depth))
            _add(tars[SEG][s], f"{sc.key}.seg.png", _encode(sc.boundary, "PNG"))
        for task in TASKS:
            for t in tars[task]:
                t.close()
            prepare_dataset(tmp / task, [f"shard-{s:06d}.tar" for s in range(shards)])
        for task in TASKS:
            if (root / task).exists():
                shutil.rmtree(root / task)
            os.replace(tmp / task, root / task)
        (root / MARKER).write_text(json.dumps(
            {"num_scenes": num_scenes, "size": size, "seed": seed, "shards": shards,
             "depth": "inverse z-buffer, min-max [0,1], near=1 (Depth Anything V2 convention)", "generator": "unimrg.data.scenes"}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="root folder; und/ pix/ depth/ seg/ are written inside")
    ap.add_argument("--num-scenes", type=int, default=64)
    ap.add_argument("--size", type=int, default=56, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=2, help="tar shards per dataset")
    ap.add_argument("--overwrite", action="store_true", help="replace datasets generated here before")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    write_scene_datasets(args.out, args.num_scenes, args.size, args.seed, args.shards, overwrite=args.overwrite)
    print(f"wrote {args.num_scenes} scenes ({args.size} px) x {len(TASKS)} datasets "
          f"({', '.join(TASKS)}) to {args.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
