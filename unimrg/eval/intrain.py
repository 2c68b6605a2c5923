"""In-training evaluation: every ``eval.every`` optimizer steps and at the end of each stage.

    python launch/submit.py --model openuni --recipe tiny --cluster local --run-dir runs/demo eval.every=10 eval.num_images=4

A fixed held-out set of ``eval.num_images`` images goes through the adapter's own sampler
(``unimrg.eval.sample.generate``) for every enabled generation task, and held-out scene questions through
``answer`` (greedy). Rank 0 writes to TensorBoard:

* ``samples/grid``: rows = images; columns input | depth target | depth generated | seg target | seg
  generated | recon (``EVAL_COLUMNS``; a task that is not trained, or has no target, is a black column);
  the same grid and every cell as PNGs in ``RUN/eval/step_NNNNNNN/``;
* ``eval/depth_similarity``, ``eval/seg_boundary_f1``, ``eval/recon_psnr`` (``unimrg.eval.metrics``), the
  first two also as ``…/other_image`` (each map against the next image's target:
  ``unimrg.eval.metrics.OTHER_IMAGE``), and
  ``eval/und_accuracy`` + ``eval/und_accuracy/<question type>`` (closer, count, exists, hallucination,
  left_right), and ``eval/seconds``; the seconds per evaluation are printed.

``eval.source``: ``scenes`` (default) renders scenes of ``data.scene_seed`` at indices from
``HELD_OUT_INDEX`` on, disjoint from the training scenes (indices below ``data.scenes``), with exact depth and
boundary targets; a prepared data root (``depth/`` and/or ``seg/`` Energon datasets, e.g. a held-out split
written by the target job) gives images with their targets; any other folder is read as images (no targets:
only the generated columns). The scene questions are always held-out scenes.

Every rank takes part (the trainer calls :meth:`Evaluator.run` on all ranks): the set is split over the
ranks and gathered on rank 0. That is what ZeRO-3 needs — its hooks gather each submodule's weights
collectively, so all ranks must make the same module calls: every rank gets the same number of equally
sized batches (short shards repeat an item, dropped on merge) and answers run a fixed number of tokens.
The parameters the root module owns itself (no submodule hook gathers them, e.g. OpenUni's meta queries)
are gathered for the duration. The global RNG state is restored afterwards, so training is unchanged.
"""

from __future__ import annotations

import json
import math
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unimrg.tasks import DEPTH, PIX, SEG

EVAL_COLUMNS = ("input", "depth_target", DEPTH, "seg_target", SEG, PIX)
HELD_OUT_INDEX = 1_000_000        # first scene index of the held-out set (training uses 0 … data.scenes − 1)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class EvalConfig:
    """In-training evaluation (``unimrg/eval/intrain.py``)."""

    every: int = 500              # optimizer steps between evaluations, plus one at each stage's end; 0 = off
    num_images: int = 8           # held-out images (and scenes whose questions are asked)
    source: str = "scenes"        # "scenes" | a prepared data root (depth/, seg/) | an image folder
    seed: int = 0                 # sampler seed
    batch_size: int = 4           # images per sampler / answer call on one rank
    max_new_tokens: int = 12      # greedy answer length (scene answers: a few words, ≤ 21 byte tokens)
    sampler: dict[str, Any] = field(default_factory=dict)   # adapter sampler options, e.g. {num_steps: 20}


@dataclass
class EvalSet:
    keys: list[str]
    images: torch.Tensor                       # (N, 3, S, S) uint8
    targets: dict[str, torch.Tensor]           # "depth_target" (N, 1, S, S), "seg_target" (N, 1, S, S), float
    questions: list[tuple[int, str, str, str]]  # (image index into qa_images, type, question, answer)
    qa_images: torch.Tensor                    # (M, 3, S, S) uint8


def _scene_tensors(scenes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes])
    depth = torch.stack([torch.from_numpy(s.depth)[None] for s in scenes])
    seg = torch.stack([torch.from_numpy(s.boundary[..., 0] > 127).float()[None] for s in scenes])
    return images, depth, seg


def _read_prepared(root: Path, n: int, size: int) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    """The first ``n`` keys (sorted shards, tar order) of root/depth (else root/seg) with their targets."""
    from unimrg.data.loaders import decode_boundary, decode_depth, decode_rgb
    parts: dict[str, dict[str, dict[str, bytes]]] = {}
    for task, suffix in ((DEPTH, ".depth.png"), (SEG, ".seg.png")):
        found: dict[str, dict[str, bytes]] = {}
        for shard in sorted((root / task).glob("*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    if m.isfile() and (ext == suffix[1:] or ext in ("jpg", "jpeg", "png")):
                        found.setdefault(key, {})[suffix if ext == suffix[1:] else "image"] = tar.extractfile(m).read()
            if sum(suffix in v and "image" in v for v in found.values()) >= n:
                break
        parts[task] = {k: v for k, v in found.items() if suffix in v and "image" in v}
    lead = parts[DEPTH] or parts[SEG]
    keys = list(lead)[:n]
    if not keys:
        raise ValueError(f"eval.source={root}: no samples with targets in {root}/depth or {root}/seg "
                         "(expected Energon tar shards with <key>.jpg + <key>.depth.png / <key>.seg.png)")
    images = torch.stack([decode_rgb(lead[k]["image"], size) for k in keys])
    targets = {}
    if all(k in parts[DEPTH] for k in keys):
        targets["depth_target"] = torch.stack([decode_depth(parts[DEPTH][k][".depth.png"], size) for k in keys])
    if all(k in parts[SEG] for k in keys):
        targets["seg_target"] = torch.stack([decode_boundary(parts[SEG][k][".seg.png"], size) for k in keys])
    return keys, images, targets


def build_eval_set(cfg: EvalConfig, size: int, scene_seed: int = 0) -> EvalSet:
    """The held-out set; the same on every rank and at every evaluation."""
    from unimrg.data.scenes import make_scene
    from unimrg.eval.metrics import question_type
    if cfg.num_images < 1:
        raise ValueError(f"eval.num_images={cfg.num_images} must be ≥ 1 (or eval.every=0 to disable evaluation)")
    scenes = [make_scene(scene_seed, HELD_OUT_INDEX + i, max(size, 16)) for i in range(cfg.num_images)]
    qa_images, depth, seg = _scene_tensors(scenes)
    questions = [(i, question_type(qa.kind, qa.answer), qa.question, qa.answer)
                 for i, s in enumerate(scenes) for qa in sorted(s.qa, key=lambda q: q.kind)]
    if cfg.source == "scenes":
        return EvalSet([s.key for s in scenes], qa_images, {"depth_target": depth, "seg_target": seg},
                       questions, qa_images)
    root = Path(cfg.source)
    if not root.is_dir():
        raise ValueError(f"eval.source={cfg.source}: not 'scenes' and not a folder")
    if (root / DEPTH).is_dir() or (root / SEG).is_dir():
        keys, images, targets = _read_prepared(root, cfg.num_images, size)
        return EvalSet(keys, images, targets, questions, qa_images)
    from unimrg.eval.sample import load_images
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:cfg.num_images]
    if not files:
        raise ValueError(f"eval.source={root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    return EvalSet([p.stem for p in files], load_images(files, size), {}, questions, qa_images)


def answer_room(model, answers: Sequence[str], max_new_tokens: int) -> tuple[int, int, str]:
    """How many reference ``answers`` do not fit in ``max_new_tokens`` greedy tokens with the model's
    tokenizer (each needs its end token too), the tokens the longest needs, and that answer. (0, 0, "")
    for a model without a tokenizer."""
    tok = getattr(model, "tokenizer", None)
    if tok is None or not answers:
        return 0, 0, ""
    needs = [(len(tok(a, add_special_tokens=False)["input_ids"]) + 1, a) for a in answers]
    need, longest = max(needs)
    return sum(n > max_new_tokens for n, _ in needs), need, longest


def _shard(n: int, rank: int, world: int) -> list[int]:
    """Indices for ``rank``: every world-th item, padded (repeating its last, or item 0) so that every
    rank holds ceil(n / world) items — the same number of module calls on all ranks."""
    mine = list(range(rank, n, world))
    per = math.ceil(n / world)
    return mine + [mine[-1] if mine else 0] * (per - len(mine))


def _batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


class Evaluator:
    """Built by the trainer on every rank; ``run`` is collective."""

    def __init__(self, cfg: EvalConfig, tasks: list[str], image_size: int, scene_seed: int, run_dir: Path,
                 rank: int, world: int, writer=None, zero3: bool = False):
        self.cfg, self.tasks, self.size, self.scene_seed = cfg, [t for t in (DEPTH, SEG, PIX) if t in tasks], \
            image_size, scene_seed
        self.run_dir, self.rank, self.world, self.writer, self.zero3 = run_dir, rank, world, writer, zero3
        self.data: EvalSet | None = None
        self.seconds: list[float] = []
        self.cut = 0                              # reference answers longer than eval.max_new_tokens

    def due(self, step: int, last: int) -> bool:
        return self.cfg.every > 0 and (step % self.cfg.every == 0 or step == last)

    def run(self, engine, step: int) -> float:
        """Evaluate at ``step`` on all ranks; returns the wall seconds it took (same on every rank)."""
        import torch.distributed as dist

        from unimrg.eval import sample as S
        t0 = time.time()
        d, cfg, model = self.data, self.cfg, engine.module
        if d is None:
            d = self.data = build_eval_set(self.cfg, self.size, self.scene_seed)
            self.cut = self.warn_cut_answers(model)
        prompts = S.default_prompts()
        own = [p for p in model.parameters(recurse=False)]
        gen, answers = {}, {}
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), engine.gathered(own):
            for batch in _batches(_shard(len(d.keys), self.rank, self.world), cfg.batch_size):
                if self.tasks:
                    out = S.generate(model, d.images[batch], prompts, cfg.seed, tasks=self.tasks, **cfg.sampler)
                    for j, i in enumerate(batch):
                        gen[i] = {t: o[j].half() for t, o in out.items()}
            for batch in _batches(_shard(len(d.questions), self.rank, self.world), cfg.batch_size * 4):
                qs = [d.questions[i] for i in batch]
                got = model.answer(d.qa_images[[q[0] for q in qs]], [q[2] for q in qs],
                                   max_new_tokens=cfg.max_new_tokens, early_stop=not self.zero3)
                answers.update(zip(batch, got))
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object((gen, answers), parts, dst=0)
        if self.rank == 0:
            for g, a in parts[1:]:
                gen.update(g)
                answers.update(a)
            self.report(step, gen, answers, time.time() - t0)
        dist.barrier()
        seconds = torch.tensor([time.time() - t0], dtype=torch.float64)
        dist.broadcast(seconds, src=0)
        return float(seconds.item())

    def warn_cut_answers(self, model) -> int:
        """Training goes on with a short ``eval.max_new_tokens`` (it is the user's time budget), but the
        und_accuracy it prints then scores answers that cannot fit as wrong: say so once, with the number
        that fits. Returns how many reference answers are cut (also in each metrics.json)."""
        answers = [q[3] for q in self.data.questions]
        cut, need, longest = answer_room(model, answers, self.cfg.max_new_tokens)
        if cut and self.rank == 0:
            print(f"eval: eval.max_new_tokens={self.cfg.max_new_tokens} cuts {cut} of {len(answers)} reference "
                  f"answers ({longest!r} needs {need} tokens with its end token): und_accuracy scores them wrong; "
                  f"eval.max_new_tokens={need} leaves room", flush=True)
        return cut

    def report(self, step: int, gen: dict[int, dict[str, torch.Tensor]], answers: dict[int, str],
               seconds: float) -> dict[str, float]:
        """Rank 0: metrics, grid and PNGs, TensorBoard, one printed line. Returns the scalars."""
        from PIL import Image

        from unimrg.eval import metrics as M
        from unimrg.eval.sample import grid
        d = self.data
        n = len(d.keys)
        outputs = {t: torch.stack([gen[i][t].float() for i in range(n)]) for t in self.tasks}
        scalars: dict[str, float] = {}
        for task, (name, metric) in M.MAP_METRICS.items():
            t = d.targets.get(f"{task}_target")
            if task in outputs and t is not None:
                scalars[f"eval/{name}"] = M.mean(metric(outputs[task], t))
                if n > 1:   # each map against the next image's target (M.OTHER_IMAGE)
                    scalars[f"eval/{name}{M.OTHER_IMAGE}"] = M.mean(metric(outputs[task], t.roll(-1, 0)))
        if PIX in outputs:
            scalars["eval/recon_psnr"] = M.mean(M.recon_psnr(outputs[PIX], d.images.float() / 255))
        acc = M.und_accuracy((d.questions[i][1], answers[i], d.questions[i][3]) for i in range(len(d.questions)))
        for kind, v in acc.items():
            scalars["eval/und_accuracy" if kind == "all" else f"eval/und_accuracy/{kind}"] = v
        scalars["eval/seconds"] = seconds

        folder = self.run_dir / "eval" / f"step_{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        cells = {**d.targets, **outputs}
        img = grid(d.images, cells, EVAL_COLUMNS)
        img.save(folder / "grid.png")
        for i, key in enumerate(d.keys):
            for col, t in cells.items():
                x = t[i].float().expand(3, -1, -1).clamp(0, 1)
                Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{key}_{col}.png")
        (folder / "metrics.json").write_text(json.dumps({
            "step": step, **scalars, "answers_cut_by_max_new_tokens": self.cut, "answers": [
                {"type": q[1], "question": q[2], "reference": q[3], "answer": answers[i]}
                for i, q in enumerate(d.questions)]}, indent=1))
        if self.writer is not None:
            import numpy as np
            self.writer.add_image("samples/grid", np.asarray(img), step, dataformats="HWC")
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        self.seconds.append(seconds)
        shown = " | ".join(f"{k[5:]} {v:.3f}" for k, v in scalars.items() if k.count("/") == 1 and k != "eval/seconds")
        print(f"eval step {step}: {shown} | {seconds:.1f} s per eval ({folder})", flush=True)
        return scalars
