"""Evaluation job: one suite on a run's weights, data-parallel over the ranks, merged exactly on rank 0.

    python launch/submit.py --job eval --suite scenes --run-dir RUN --cluster local --cpu-ranks-per-node 2
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m unimrg.eval.job \
        --config RUN/eval/config.yaml --suite mmbench --benchmark /data/MMBench_DEV_EN.tsv

Suites (``SUITES``):

* ``scenes`` — the built-in spatial benchmark: ``--num-scenes`` held-out generated scenes (the in-training
  evaluation's set, ``unimrg.eval.intrain.build_eval_set``: seeded, disjoint from the training scenes) with
  exact answers — accuracy per question type (closer, count, exists, hallucination, left_right) — and
  depth_similarity / seg_boundary_f1 / recon_psnr against the scenes' exact maps.
* with every map metric, ``depth_similarity/other_image`` and ``seg_boundary_f1/other_image``: each generated
  map scored against the *next* item's target in its batch; the gap to the own score is how much the maps
  follow their images (``unimrg.eval.metrics.OTHER_IMAGE``).
* ``depth_similarity`` / ``seg_boundary_f1`` / ``recon_psnr`` — on ``--images``: a prepared data root
  (targets from its ``depth/`` / ``seg/`` datasets) or any image folder, whose targets are made here with
  the project's target makers (``--depth-model``: Depth Anything V2, ``--sam-model``: SAM; HF folders).
* the understanding benchmarks of ``unimrg.eval.benchmarks`` (``--benchmark FILE``), answered greedily
  through the adapter's ``answer``.

Weights (``--weights``): ``auto`` = RUN/final/model.pt if present, else the latest complete checkpoint in
RUN/checkpoints (consolidated from its ZeRO shards), else the official weights of ``model.checkpoint``;
or a file / checkpoint folder; ``none`` = random init (smoke tests).

Same bytes whatever the rank count: the work is cut into fixed batches of ``--batch-size`` (batch j goes
to rank j mod world), so every batch holds the same items, with the same sampler seed (seed + j), at any
world size; rank 0 gathers the per-item results and scores them in item order. Writes
OUT/<suite>.json (metrics, counts, skipped rows), OUT/<suite>.md (the table, also printed) and
OUT/<suite>.answers.jsonl (every answer or per-image score); OUT defaults to RUN/eval.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unimrg.eval import benchmarks as B
from unimrg.eval import metrics as M
from unimrg.tasks import DEPTH, PIX, SEG

# one suite per metric, named after it: the map metrics (M.MAP_METRICS) and the reconstruction's PSNR
MAP_SUITES = {name: task for task, (name, _) in M.MAP_METRICS.items()} | {"recon_psnr": PIX}
SUITES = ("scenes", *MAP_SUITES, *B.BENCHMARKS)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="resolved run config (RUN/config.yaml or RUN/eval/config.yaml)")
    ap.add_argument("--suite", required=True, choices=SUITES)
    ap.add_argument("--weights", default="auto", help="auto | none | a .pt/.safetensors file | a checkpoint folder")
    ap.add_argument("--benchmark", help="the benchmark's file (or folder) in its published format")
    ap.add_argument("--image-root", help="where the benchmark's image files are (default: per benchmark)")
    ap.add_argument("--images", help="map suites: an image folder or a prepared data root")
    ap.add_argument("--depth-model", help="local HF folder of Depth Anything V2 (depth targets for an image folder)")
    ap.add_argument("--sam-model", help="local HF folder of SAM (boundary targets for an image folder)")
    ap.add_argument("--num-scenes", type=int, default=64, help="scenes suite: held-out scenes")
    ap.add_argument("--limit", type=int, default=0, help="first N items only (0 = all)")
    ap.add_argument("--batch-size", type=int, default=4)
    # 32: a scene answer ("The yellow cylinder.") is 20 tokens + end with the tiny byte tokenizers; 16 cut it
    # and scored it wrong. The scenes suite refuses a limit shorter than its longest answer (check_answer_room).
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="output folder (default RUN/eval)")
    return ap.parse_args(argv)


# ---- units of work -----------------------------------------------------------------------------------
class Unit:
    """One item: an answer to produce (``prompt``) or maps to generate and score (``tasks``)."""

    def __init__(self, uid: str, image, where: str, prompt: str | None = None, tasks: Sequence[str] = (),
                 targets: dict | None = None):
        self.uid, self.image, self.where, self.prompt, self.tasks = uid, image, where, prompt, tuple(tasks)
        self.targets = targets or {}   # "depth" / "seg": float (1, H, W) tensor, or "make" (target maker)


def to_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL → uint8 (3, size, size), as ``unimrg.eval.sample.load_images`` feeds the models."""
    return torch.from_numpy(np.asarray(img.resize((size, size), Image.BICUBIC)).copy()).permute(2, 0, 1)


def load_weights(model, cfg, spec: str) -> str:
    """Load ``spec`` into the adapter (see the module docstring); a description for the report."""
    from unimrg.models.official_io import read_state_dict
    run = Path(cfg.run.dir)
    if spec == "none":
        return "random init"
    if spec == "auto":
        from unimrg.trainer import find_checkpoint
        final = run / "final" / "model.pt"
        ckpt = None if final.is_file() else find_checkpoint(run / "checkpoints", "latest")
        if final.is_file():
            spec = str(final)
        elif ckpt is not None:
            spec = str(ckpt)
        elif cfg.model.checkpoint:
            return f"official {cfg.model.checkpoint}"   # registry.build_model loaded it
        else:
            raise FileNotFoundError(f"--weights auto: no {final}, no complete checkpoint in {run / 'checkpoints'} "
                                    "and no model.checkpoint=... (official weights): nothing to evaluate")
    path = Path(spec)
    # a DeepSpeed checkpoint (a tag folder with *model_states.pt, or checkpoints/ with `latest`), else weight files
    if path.is_dir() and ((path / "latest").is_file() or any(path.glob("*model_states.pt"))):
        from unimrg.engine import consolidated_state_dict
        state = consolidated_state_dict(path)
    else:
        state = read_state_dict(path, "--weights")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"--weights {spec} does not match {cfg.model.name}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]} (is model.size right?)")
    return spec


def build_units(args, cfg) -> tuple[list[Unit], list[B.Skip], object]:
    """The suite's items (same list on every rank), the rows skipped while reading, and the scorer."""
    size = cfg.model.image_size
    if args.suite in B.BENCHMARKS:
        if not args.benchmark:
            raise ValueError(f"--suite {args.suite} needs --benchmark FILE (see README: Evaluation jobs)")
        bench = B.get(args.suite)
        items, skipped = bench.read(Path(args.benchmark), Path(args.image_root) if args.image_root else None)
        items = sorted(items, key=lambda it: it.uid)
        if args.limit:
            items = items[:args.limit]
        return [Unit(it.uid, it.image, it.where, prompt=it.prompt) for it in items], skipped, (bench, items)
    if args.suite == "scenes":
        from unimrg.eval.intrain import EvalConfig, build_eval_set
        d = build_eval_set(EvalConfig(num_images=args.num_scenes), size, cfg.data.scene_seed)
        units = [Unit(f"map/{k}", d.images[i], f"scene {k}", tasks=(DEPTH, SEG, PIX),
                      targets={DEPTH: d.targets["depth_target"][i], SEG: d.targets["seg_target"][i]})
                 for i, k in enumerate(d.keys)]
        units += [Unit(f"qa/{j:06d}", d.qa_images[q[0]], f"scene {d.keys[q[0]]} question {q[2]!r}", prompt=q[2])
                  for j, q in enumerate(d.questions)]
        return units, [], d.questions
    task = MAP_SUITES[args.suite]
    if not args.images:
        raise ValueError(f"--suite {args.suite} needs --images (an image folder or a prepared data root)")
    root = Path(args.images)
    if (root / DEPTH).is_dir() or (root / SEG).is_dir():
        from unimrg.eval.intrain import _read_prepared
        keys, images, targets = _read_prepared(root, args.limit or 10**9, size)
        name = {DEPTH: "depth_target", SEG: "seg_target"}.get(task)
        if name and name not in targets:
            raise ValueError(f"--images {root}: a prepared root without {task}/ targets for {args.suite}")
        return [Unit(f"{k}", images[i], f"{root} sample {k}", tasks=(task,),
                     targets={task: targets[name][i]} if name else {}) for i, k in enumerate(keys)], [], None
    from unimrg.eval.intrain import IMAGE_SUFFIXES
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    files = files[:args.limit] if args.limit else files
    if not files:
        raise ValueError(f"--images {root}: no images ({', '.join(IMAGE_SUFFIXES)}) and no depth/ or seg/ datasets")
    flag = {DEPTH: "--depth-model", SEG: "--sam-model"}.get(task)
    if flag and not getattr(args, flag[2:].replace("-", "_")):
        raise ValueError(f"--suite {args.suite} on an image folder makes its targets: pass {flag} PATH "
                         "(or --images a prepared data root)")
    return [Unit(str(p.relative_to(root)), p, str(p), tasks=(task,), targets={task: "make"} if flag else {})
            for p in files], [], None


class Worker:
    """What one rank does with its batches."""

    def __init__(self, args, cfg, model, device: str):
        self.args, self.cfg, self.model, self.device = args, cfg, model, device
        self.size = cfg.model.image_size
        # Questions see the model's released understanding transform (as in training); generation inputs
        # stay whole-image squares, so a generated map covers the same view as its full-image target.
        self.und_fit = type(model).image_transforms(cfg.model).understanding
        self.makers: dict[str, object] = {}

    def maker(self, task: str):
        if task not in self.makers:
            if task == DEPTH:
                from unimrg.targets.depth import DepthTargetMaker
                self.makers[task] = DepthTargetMaker.from_pretrained(self.args.depth_model, self.device)
            else:
                from unimrg.targets.segmentation import SegmentationTargetMaker
                self.makers[task] = SegmentationTargetMaker.from_pretrained(self.args.sam_model, self.device)
        return self.makers[task]

    def make_target(self, task: str, pil: Image.Image) -> torch.Tensor:
        """(1, H, W) float target at the image's own size (the metrics resize the prediction to it)."""
        if task == DEPTH:
            return torch.from_numpy(self.maker(DEPTH)(pil))[None].float()
        return self.maker(SEG).boundary(pil).float()[None]

    def image(self, u: Unit) -> tuple[torch.Tensor, Image.Image | None]:
        if isinstance(u.image, torch.Tensor):
            return u.image, None
        pil = B.open_image(u.image, u.where)
        if u.prompt is not None:
            return torch.from_numpy(np.asarray(self.und_fit.rgb(pil, self.size)).copy()).permute(2, 0, 1), pil
        return to_uint8(pil, self.size), pil

    def run_batch(self, units: list[Unit], seed: int) -> dict[str, dict]:
        out: dict[str, dict] = {}
        ready = []
        for u in units:
            try:
                x, pil = self.image(u)
                targets = {t: self.make_target(t, pil) if v == "make" else v for t, v in u.targets.items()}
                ready.append((u, x, targets))
            except (B.RowError, ValueError, OSError) as e:
                out[u.uid] = {"skipped": str(e).removeprefix(f"{u.where}: ")}
        qa = [r for r in ready if r[0].prompt is not None]
        if qa:
            got = self.model.answer(torch.stack([r[1] for r in qa]).to(self.device), [r[0].prompt for r in qa],
                                    max_new_tokens=self.args.max_new_tokens)
            out.update({r[0].uid: {"answer": a} for r, a in zip(qa, got)})
        gen = [r for r in ready if r[0].tasks]
        if gen:
            from unimrg.eval.sample import default_prompts, generate
            tasks = gen[0][0].tasks
            images = torch.stack([r[1] for r in gen]).to(self.device)
            outputs = generate(self.model, images, default_prompts(), seed, tasks=tasks, **self.cfg.eval.sampler)
            for j, (u, x, targets) in enumerate(gen):
                scores = {}
                for task, (name, metric) in M.MAP_METRICS.items():
                    if task in outputs and task in targets:
                        scores[name] = float(metric(outputs[task][j], targets[task]))
                if PIX in outputs:
                    scores["recon_psnr"] = float(M.recon_psnr(outputs[PIX][j], x.float() / 255))
                other = gen[(j + 1) % len(gen)][2]          # the next item's targets (M.OTHER_IMAGE)
                for task, (name, metric) in M.MAP_METRICS.items():
                    if len(gen) > 1 and task in outputs and task in other:
                        scores[name + M.OTHER_IMAGE] = float(metric(outputs[task][j], other[task]))
                out[u.uid] = scores
        return out


# ---- rank 0: scores and report ---------------------------------------------------------------------------
def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else round(v, 6) if isinstance(v, float) else v


def score(args, units: list[Unit], results: dict[str, dict], extra) -> dict[str, float]:
    done = {uid: r for uid, r in results.items() if "skipped" not in r}
    if args.suite in B.BENCHMARKS:
        bench, items = extra
        return bench.score(items, {uid: r["answer"] for uid, r in done.items()})
    metrics: dict[str, float] = {}
    maps = [done[u.uid] for u in units if u.tasks and u.uid in done]
    for name in [n for name, _ in M.MAP_METRICS.values() for n in (name, name + M.OTHER_IMAGE)] + ["recon_psnr"]:
        vals = [r[name] for r in maps if name in r]
        if vals:
            metrics[name] = math.fsum(vals) / len(vals)
    if args.suite == "scenes":
        from unimrg.eval.metrics import und_accuracy
        questions = extra
        records = [(q[1], done[f"qa/{j:06d}"]["answer"], q[3]) for j, q in enumerate(questions)
                   if f"qa/{j:06d}" in done]
        for kind, v in und_accuracy(records).items():
            metrics["und_accuracy" if kind == "all" else f"und_accuracy/{kind}"] = v
    return metrics


def markdown(report: dict) -> str:
    lines = [f"### {report['suite']} — {report['model']} ({report['weights']})", "",
             f"{report['scored']} of {report['items']} items scored; {len(report['skipped'])} skipped", "",
             "| metric | value |", "|---|---|"]
    for k, v in report["metrics"].items():
        shown = "n/a" if v is None else f"{100 * v:.2f} %" if "psnr" not in k else f"{v:.2f} dB"
        lines.append(f"| {k} | {shown} |")
    for s in report["skipped"][:20]:
        lines.append(f"\nskipped: {s['where']}: {s['reason']}")
    return "\n".join(lines) + "\n"


def check_answer_room(model, answers: Sequence[str], max_new_tokens: int) -> None:
    """Greedy answers stop at ``max_new_tokens``: a limit shorter than a reference answer scores a right
    answer wrong (the scenes suite's closer accuracy read 12 % for that reason alone). Refuse it."""
    from unimrg.eval.intrain import answer_room
    cut, need, longest = answer_room(model, answers, max_new_tokens)
    if cut:
        raise ValueError(f"--max-new-tokens {max_new_tokens} cuts scene answers: {longest!r} takes {need} tokens "
                         f"(with its end token) with {model.cfg.name}'s tokenizer; use --max-new-tokens {need} "
                         "or more")


def main(argv: Sequence[str] | None = None) -> int:
    import torch.distributed as dist

    from unimrg.config import load_resolved
    from unimrg.models import registry
    args = parse_args(argv)
    cfg = load_resolved(args.config)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")   # only objects are gathered; the models run on their own
    rank = dist.get_rank() if world > 1 else 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    t0 = time.time()
    units, skipped, extra = build_units(args, cfg)
    torch.manual_seed(args.seed)   # the same model on every rank (and every run) with --weights none
    model = registry.build_model(cfg.model)
    weights = load_weights(model, cfg, args.weights)
    model = model.to(device=device, dtype=dtype).eval()
    if args.suite == "scenes":
        check_answer_room(model, [q[3] for q in extra], args.max_new_tokens)
    worker = Worker(args, cfg, model, device)
    batches = [units[i:i + args.batch_size] for i in range(0, len(units), args.batch_size)]
    mine: dict[str, dict] = {}
    with torch.no_grad():
        for j in range(rank, len(batches), world):
            mine.update(worker.run_batch(batches[j], args.seed + j))
    parts = [mine]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
    if rank == 0:
        results = {k: v for p in parts for k, v in p.items()}
        skips = [s.as_dict() for s in skipped] + [{"where": u.where, "reason": results[u.uid]["skipped"]}
                                                  for u in units if "skipped" in results[u.uid]]
        report = {"suite": args.suite, "model": cfg.model.name, "weights": weights,
                  "source": args.benchmark or args.images or f"scenes seed {cfg.data.scene_seed}",
                  "items": len(units) + len(skipped), "scored": sum("skipped" not in r for r in results.values()),
                  "skipped": skips,
                  "metrics": {k: _clean(v) for k, v in score(args, units, results, extra).items()}}
        out = Path(args.out or Path(cfg.run.dir) / "eval")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.suite}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{args.suite}.answers.jsonl").write_text("".join(
            json.dumps({"uid": u.uid, **{k: _clean(v) for k, v in results[u.uid].items()}}) + "\n" for u in units))
        table = markdown(report)
        (out / f"{args.suite}.md").write_text(table)
        print(table + f"\nwrote {out / (args.suite + '.json')} ({world} rank(s), {time.time() - t0:.1f} s)", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
