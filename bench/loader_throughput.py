"""Four-task Energon loaders vs a plain torch DataLoader over the same prepared files and decode work.

    python bench/loader_throughput.py                           # 256-px scenes, micro 16, 1 and 2 workers
    python bench/loader_throughput.py --root /data/unimrg --size 512 --workers 1 2 4 8 --rounds 40

Both sides read the same Energon shards (ROOT/{und,pix,depth,seg}), decode the same parts with the same
functions (unimrg.data.loaders: decode_rgb / decode_depth / decode_boundary, the LLaVA record parser),
post-process the same way (pix targets to float, depth/seg expanded to 3 channels) and use ``--workers``
processes *per task* (data.num_workers). They are consumed as the trainer does: one micro-batch of each
task in turn. The plain side is a ``torch.utils.data.DataLoader`` over an IterableDataset that streams
each worker's shards in order (no shuffle buffer, no resumable state: the floor Energon's extras cost
against). Prints samples/s of each, the ratio Energon / plain (goal ≥ 0.95) and, per worker count, how
many GPUs' worth of the paper's consumption one rank's loaders feed (``--need``: Harmon's 455 samples/s
over 8 GPUs ≈ 57 samples/s per GPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from unimrg.data.llava import parse_record_bytes  # noqa: E402
from unimrg.data.loaders import (IMAGE_PARTS, TARGET_PART, DataConfig, TaskLoaders, decode_boundary,  # noqa: E402
                                 decode_depth, decode_rgb)
from unimrg.tasks import DEPTH, PIX, TASKS, UND  # noqa: E402


class PlainShards(torch.utils.data.IterableDataset):
    """Each worker streams its share of the task's tar shards, forever, decoding like TaskEncoder."""

    def __init__(self, task: str, root: Path, size: int):
        self.task, self.size = task, size
        self.shards = sorted(str(p) for p in (root / task).rglob("*.tar"))

    def samples(self, shard: str):
        group, key = {}, None
        with tarfile.open(shard) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                k, _, part = m.name.partition(".")
                if key is not None and k != key:
                    yield group
                    group = {}
                key = k
                group[part] = tf.extractfile(m).read()
        if group:
            yield group

    def decode(self, parts: dict):
        img = decode_rgb(parts[next(p for p in IMAGE_PARTS if p in parts)], self.size)
        if self.task == UND:
            return img, None, parse_record_bytes(parts["json"], source="bench").conversations
        if self.task in TARGET_PART:
            dec = decode_depth if self.task == DEPTH else decode_boundary
            return img, dec(parts[TARGET_PART[self.task]], self.size), None
        return img, None, None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards[info.id::info.num_workers] if info else self.shards
        mine = mine or self.shards   # more workers than shards: share
        while True:
            for shard in mine:
                for parts in self.samples(shard):
                    yield self.decode(parts)


def collate(task: str):
    def f(samples):
        images = torch.stack([s[0] for s in samples])
        if task == UND:
            return images, [s[2] for s in samples]
        if task == PIX:
            return images, images.float() / 255.0
        return images, torch.stack([s[1] for s in samples]).expand(-1, 3, -1, -1).contiguous()
    return f


def time_rounds(next_batch, rounds: int) -> float:
    for t in TASKS:          # warm-up: workers started, first batches decoded
        next_batch(t)
    t0 = time.perf_counter()
    for _ in range(rounds):
        for t in TASKS:
            next_batch(t)
    return time.perf_counter() - t0


def measure(root: Path, size: int, micro: int, workers: int, rounds: int) -> dict[str, float]:
    cfg = DataConfig(root=str(root), num_workers=workers)
    n = rounds * len(TASKS) * micro
    with TaskLoaders(cfg, TASKS, micro, size, 0, 1, seed=0) as loaders:
        t_energon = time_rounds(loaders.next, rounds)
    plain = {t: iter(torch.utils.data.DataLoader(PlainShards(t, root, size), batch_size=micro, num_workers=workers,
                                                 collate_fn=collate(t), persistent_workers=workers > 0))
             for t in TASKS}
    t_plain = time_rounds(lambda t: next(plain[t]), rounds)
    plain.clear()   # stop the workers before the next worker count
    return {"energon": n / t_energon, "plain": n / t_plain}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, help="prepared ROOT/{und,pix,depth,seg}; default: generated scenes")
    ap.add_argument("--scenes", type=int, default=256)
    ap.add_argument("--size", type=int, default=256, help="image side the loaders resize to")
    ap.add_argument("--micro", type=int, default=16, help="samples per task micro-batch (Harmon's paper recipe)")
    ap.add_argument("--workers", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=10, help="timed micro-batches per task")
    ap.add_argument("--need", type=float, default=455 / 8, help="samples/s one GPU consumes (paper recipes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            from unimrg.data.scenes import write_scene_datasets
            root = Path(tmp)
            write_scene_datasets(root, num_scenes=args.scenes, size=args.size, seed=0, shards=8)
        out = []
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.size}-px images, "
              f"micro-batch {args.micro} per task, {args.rounds} rounds of the four tasks")
        for w in args.workers:
            r = measure(root, args.size, args.micro, w, args.rounds)
            ratio = r["energon"] / r["plain"]
            out.append({"workers": w, **r, "ratio": ratio})
            print(f"  {w} worker(s) per task: Energon {r['energon']:.1f} samples/s, plain DataLoader "
                  f"{r['plain']:.1f} samples/s, ratio {ratio:.3f} (goal >= 0.95); feeds "
                  f"{r['energon'] / args.need:.2f} GPUs at {args.need:.0f} samples/s/GPU")
    return out


if __name__ == "__main__":
    main()
