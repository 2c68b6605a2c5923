"""One Energon savable loader per task, so every micro-batch of a task has exactly ``micro_batch`` samples.

A blend of the four streams cannot give fixed per-task counts (notes/energon.md), so each task has
its own dataset, loader and state; the objective asks for the task it needs (``next(task)``), and a
checkpoint stores the dict of per-task loader states.

Datasets are Energon ``CrudeWebdataset``s (the scene generator writes them; ``energon prepare
--sample-type CrudeWebdataset`` prepares any other webdataset). Energon's decoder is off: this module
decodes every part itself, because the default decoder turns a 16-bit depth PNG into 8 bits.

Parts per task: und ``jpg|jpeg|png`` + ``json`` (a LLaVA record, see unimrg.data.llava); pix the
image; depth the image + ``depth.png`` (16-bit or 8-bit grey); seg the image + ``seg.png`` (boundary map).
Images and targets reach the model's sizes through its released transforms (``transforms``, from
``UMMAdapter.image_transforms``; unimrg/data/transforms.py): und images by the understanding one, a
generation task's condition image and targets by theirs, the maps through their picture's geometry.

Text-only conversations. ``ROOT/und_text`` (``<key>.json`` only: the text-only LLaVA records the
ingestion sets apart, e.g. the ~40K ShareGPT turns of Mix-665K) is blended into the und stream
sample by sample (Energon dataset weights, so the mix is part of the loader state and resumes
exactly). ``data.und_text_ratio`` is the expected fraction of text-only samples: "source" (default)
the fraction the prepared data has (its sample counts; 0 when there is no und_text), a float in
[0, 1) for a fixed share, 0 to leave them out. Such a sample has a zero placeholder image and
``UnderstandingBatch.has_image`` False; each adapter trains it through its text-only path.

Bad input. A sample whose parts cannot be decoded (corrupt image, bad JSON, missing part) is skipped
in the worker -- Energon keeps collecting until the batch is full -- and reported *in-band*: the batch
carries the (key, shard, error) of every sample skipped while it was collected, so the counts are
exact with any number of worker processes and survive resume (a restored loader re-collects the same
batches). The main process counts and warns (``CorruptSampleWarning``, naming task, key and shard).
More than ``max_consecutive_failures`` undecodable samples in a row raise ``TaskDataError`` naming the
task and the failing shard: a broken task stops training instead of silently vanishing. Any other
exception is re-raised (``global_error_handler=reraise_exception``): Energon's default handler would
log and drop it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from megatron.energon import (
    Batch,
    Cooker,
    DefaultTaskEncoder,
    Sample,
    SkipSample,
    WorkerConfig,
    basic_sample_keys,
    cooker,
    edataclass,
    get_savable_loader,
    get_train_dataset,
    load_dataset,
    reraise_exception,
    stateless,
)

from megatron.energon.metadataset.loader_interface import DatasetBlendMode

from unimrg.data import images
from unimrg.data.batches import GenerationBatch, UnderstandingBatch
from unimrg.data.llava import LlavaFormatError, parse_record_bytes
from unimrg.data.transforms import STRETCH, STRETCH_ALL, Fit, ImageTransforms, uint8_resize
from unimrg.signals import data_worker_init
from unimrg.tasks import DEPTH, PIX, SEG, TASKS, UND

UND_TEXT = "und_text"   # folder of the text-only understanding records (read by the und stream)

# energon's loader always asks torch for pinned memory; on a CPU-only machine torch warns at every
# loader start. Only that message is silenced.
warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no accelerator",
                        category=UserWarning)

IMAGE_PARTS = ("jpg", "jpeg", "png", "webp")
TARGET_PART = {DEPTH: "depth.png", SEG: "seg.png"}
STATE_FORMAT = 1


@dataclass
class DataConfig:
    """Where the four task datasets are and how they are read."""

    root: str = ""                                         # holds und/ pix/ depth/ seg/
    paths: dict[str, str] = field(default_factory=dict)   # per-task overrides of root/<task>
    num_workers: int = 1               # loader processes per task and rank; resume needs the same value
    shuffle_buffer_size: int = 64
    max_samples_per_sequence: int = 64  # samples read in a row from one shard slice before switching
    max_consecutive_failures: int = 16  # more undecodable samples in a row: the task is broken
    scenes: int = 0                    # > 0: generate this many scenes into a missing root (launcher)
    scene_size: int = 64
    scene_seed: int = 0
    scene_shards: int = 2
    # expected share of text-only samples in the und stream (ROOT/und_text): "source" = as prepared
    # (their sample counts), a float in [0, 1), 0 = none; see the module docstring
    und_text_ratio: str = "source"

    def path(self, task: str) -> Path:
        """Dataset folder of ``task`` (or of ``und_text``, the text-only understanding records)."""
        if task in self.paths:
            return Path(self.paths[task])
        if not self.root:
            raise ValueError(f"data.root is empty and data.paths has no entry for task {task!r}; "
                             f"set data.root=DIR (generate one with: python -m unimrg.data.scenes --out DIR)")
        return Path(self.root) / task


def _prepared(path: Path) -> bool:
    return (path / ".nv-meta" / "dataset.yaml").is_file()


def und_text_ratio(cfg: DataConfig) -> float | None:
    """The configured text-only share: a float in [0, 1), or None for "source"; raises naming the field."""
    raw = str(cfg.und_text_ratio).strip()
    if raw == "source":
        return None
    try:
        r = float(raw)
    except ValueError:
        r = -1.0
    if not 0.0 <= r < 1.0:
        raise ValueError(f"data.und_text_ratio={cfg.und_text_ratio!r}: use 'source' (the share the prepared "
                         f"data has), a fraction in [0, 1) of text-only understanding samples, or 0 for none")
    return r


def check_data_paths(cfg: DataConfig, tasks: Sequence[str]) -> None:
    """Fail early (e.g. in --dry-run) if a task's dataset is missing or not prepared for Energon."""
    problems = []
    for task in tasks:
        if task not in TASKS:
            problems.append(f"unknown task {task!r} (expected one of {TASKS})")
            continue
        p = cfg.path(task)
        if not _prepared(p):
            problems.append(f"task {task!r}: {p} is not a prepared Energon dataset (no .nv-meta/dataset.yaml)")
        elif not os.access(p, os.R_OK | os.X_OK):
            problems.append(f"task {task!r}: {p} is not readable by this user")
    ratio = und_text_ratio(cfg)
    if UND in tasks and ratio and not _prepared(cfg.path(UND_TEXT)):
        problems.append(f"data.und_text_ratio={ratio} but {cfg.path(UND_TEXT)} (text-only understanding records) "
                        "is not a prepared Energon dataset; ingest them with unimrg.targets.ingest, or set "
                        "data.und_text_ratio=source (uses them if present) / 0")
    if problems:
        raise FileNotFoundError("; ".join(problems) + ". Generate scene data with `python -m "
                                "unimrg.data.scenes --out DIR` (or set data.scenes=N) or run `energon "
                                "prepare DIR --sample-type CrudeWebdataset` on your shards.")


def ensure_scene_data(cfg: DataConfig, tasks: Sequence[str]) -> None:
    """If ``cfg.scenes > 0`` and the root has no datasets yet, generate scenes there (call once, before
    the ranks start); then check every task's dataset exists."""
    if cfg.scenes > 0 and cfg.root and not any((Path(cfg.root) / t).exists() for t in TASKS):
        from unimrg.data.scenes import write_scene_datasets

        write_scene_datasets(cfg.root, cfg.scenes, cfg.scene_size, cfg.scene_seed, cfg.scene_shards)
    check_data_paths(cfg, tasks)


def prepare_dataset(path: Path, tars: list[str]) -> None:
    """Index ``tars`` (relative to ``path``) with energon's Python API (no TTY) and declare the
    ``CrudeWebdataset`` this module reads; the scene generator and the preprocessing job both call it."""
    import yaml
    from megatron.energon.flavors.webdataset.base_webdataset import BaseWebdatasetFactory

    with contextlib.redirect_stdout(io.StringIO()):   # energon prints progress lines naming the temp dir
        BaseWebdatasetFactory.prepare_dataset(
            path, tars, split_parts_ratio=[("train", 1.0), ("val", 0.0), ("test", 0.0)],
            shuffle_seed=None, workers=1, progress_fn=lambda it, length=None: it)
    # same content as `energon prepare --sample-type CrudeWebdataset` writes (tools/prepare.py)
    (path / ".nv-meta" / "dataset.yaml").write_text(
        yaml.safe_dump({"__module__": "megatron.energon", "__class__": "CrudeWebdataset"}, sort_keys=False))


class TaskDataError(RuntimeError):
    """A task's data is broken (too many undecodable samples in a row) or its loader failed."""


class CorruptSampleWarning(UserWarning):
    """A sample was skipped because its parts could not be decoded."""


# ------------------------------------------------------------------ energon sample / batch types

@edataclass
class RawSample(Sample):
    parts: dict  # part name ("jpg", "json", "depth.png", ...) -> bytes, undecoded


@stateless
@cooker
def cook_raw(sample: dict) -> RawSample:
    """Keep the bytes: decoding happens after the shuffle buffer, in encode_sample, so that a skipped
    sample is reported with the batch that was collected around it."""
    return RawSample(**basic_sample_keys(sample),
                     parts={k: v for k, v in sample.items() if not k.startswith("__")})


@edataclass
class EncodedSample(Sample):
    image: torch.Tensor                 # (3, S, S) uint8, S = image_size
    target: Optional[torch.Tensor]      # (C, T, T) float32 in [0, 1], T = target_size (pix C=3, depth / seg
                                        # C=1); None for und
    conversation: Optional[list]        # und: [{"from", "value"}, ...]
    has_image: bool = True              # False: a text-only und record (``image`` is a zero placeholder)


@edataclass
class RawTaskBatch(Batch):
    images: torch.Tensor                # (B, 3, S, S) uint8
    targets: Optional[torch.Tensor]     # (B, C, T, T) float32 (pix C=3, depth / seg C=1); None for und
    conversations: list
    has_image: torch.Tensor             # (B,) bool
    skipped: list                       # [(key, shard, error)] skipped while collecting this batch


class DataDecodeError(ValueError):
    """A sample's parts are missing or cannot be decoded."""


def _shard_of(sample: Sample) -> str:
    src = (sample.__sources__ or ())
    if not src:
        return "<unknown shard>"
    s = src[0]
    return f"{s.dataset_path}/{s.shard_name}"


def _open_image(data: bytes) -> Image.Image:
    return images.open_image(data)  # fully decoded: a truncated file fails here, not later in a resize


def decode_rgb(data: bytes, size: int, fit: Fit = STRETCH) -> torch.Tensor:
    """Image bytes -> (3, size, size) uint8 through the shared decoder (unimrg.data.images: 16-bit,
    CMYK, alpha, EXIF orientation exactly as the target job saw the image), brought to the square by
    ``fit`` (the model's released transform, unimrg.data.transforms; default: stretched, bicubic)."""
    img = fit.rgb(images.decode_rgb(data), size)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def decode_depth(data: bytes, size: int, fit: Fit = STRETCH) -> torch.Tensor:
    """Depth PNG (16-bit or 8-bit grey) -> (1, size, size) float32 in [0, 1].

    Resized as a float map with bilinear filtering: it is how the paper brings Depth Anything's
    prediction back to the image size (Appendix B.2), and bilinear weights are non-negative, so the
    result stays in [0, 1] with no ringing (bicubic overshoots); nearest would make steps of the
    smooth floor and wall gradients. ``fit``: the same geometry as the picture's (pad / crop), so the map
    stays aligned with it."""
    img = _open_image(data)
    a = np.asarray(img)
    if a.ndim == 3:
        a = np.asarray(img.convert("L"))
    if a.dtype == np.uint8:
        d = a.astype(np.float32) / 255.0
    elif a.dtype in (np.uint16, np.int32, np.uint32) or img.mode.startswith("I"):
        d = a.astype(np.float32) / 65535.0   # 16-bit PNG (Pillow may report mode I / int32)
    else:
        raise DataDecodeError(f"depth map has unsupported mode {img.mode} / dtype {a.dtype}; "
                              f"expected an 8- or 16-bit grey PNG")
    d = fit.depth(d, size)
    return torch.from_numpy(np.clip(d, 0.0, 1.0).astype(np.float32))[None]


def decode_boundary(data: bytes, size: int, fit: Fit = STRETCH) -> torch.Tensor:
    """Boundary PNG (grey or RGB, white on black) -> (1, size, size) float32 in {0, 1}.
    Resized with ``images.resize_boundary`` (max over each output pixel's source pixels): binary like
    NEAREST, but no outline is lost at small training resolutions (NEAREST keeps ~19 % at 56 px);
    ``fit``'s pad / crop geometry as the picture's."""
    img = _open_image(data).convert("L")
    b = fit.boundary(np.asarray(img) >= 128, size)
    return torch.from_numpy(b.astype(np.float32))[None]


def decode_task_parts(task: str, parts: dict, img_part: str, image_size: int, target_size: int,
                      t: ImageTransforms = STRETCH_ALL) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One sample's (input image, target) through the model's released transforms ``t``: und images by
    ``t.understanding``; a generation task's targets by ``t.target`` (depth / seg maps through the same
    geometry as the pix picture, so they stay aligned with the condition image) and its condition image
    by ``t.condition`` (or, when None, the target-size picture resized by ``t.condition_resize``)."""
    if task == UND:
        return decode_rgb(parts[img_part], image_size, t.understanding), None
    target = None
    if task in TARGET_PART:
        name = TARGET_PART[task]
        if name not in parts:
            raise DataDecodeError(f"no {name!r} part among {sorted(parts)}")
        decode = decode_depth if task == DEPTH else decode_boundary
        target = decode(parts[name], target_size, t.target)
    picture = None
    if task == PIX or t.condition is None:   # the target-side picture, from the source bytes (never upsampled)
        picture = decode_rgb(parts[img_part], target_size, t.target)
        if task == PIX:
            target = picture.float() / 255.0
    if t.condition is None:
        image = uint8_resize(picture, image_size, t.condition_resize)
    elif picture is not None and t.condition == t.target and image_size == target_size:
        image = picture                      # one decode serves both
    else:
        image = decode_rgb(parts[img_part], image_size, t.condition)
    return image, target


class TaskEncoder(DefaultTaskEncoder[RawSample, EncodedSample, RawTaskBatch, RawTaskBatch]):
    """Decodes one task's samples; skips (and records) undecodable ones.

    The skip log and the failure run live in the worker's copy of this encoder. Both are reset at
    every batch: a batch ends right after a successful sample, so no failure run crosses a batch
    boundary and a restored loader starts with the same (empty) log the original had."""

    cookers = [Cooker(cook_raw)]

    def __init__(self, task: str, image_size: int, max_consecutive_failures: int, target_size: int | None = None,
                 transforms: ImageTransforms = STRETCH_ALL):
        super().__init__()
        self.decoder = None  # raw bytes reach cook_raw; see the module docstring
        self.task = task
        self.image_size = image_size
        self.target_size = target_size or image_size
        self.transforms = transforms
        self.max_consecutive_failures = max_consecutive_failures
        self._skipped: list[tuple[str, str, str]] = []
        self._failure_run = 0

    def _decode(self, s: RawSample) -> EncodedSample:
        parts = s.parts
        img_part = next((p for p in IMAGE_PARTS if p in parts), None)
        target, conversation = None, None
        if self.task == UND:
            if "json" not in parts:
                raise DataDecodeError(f"no 'json' part (LLaVA record) among {sorted(parts)}")
            rec = parse_record_bytes(parts["json"], source=f"{_shard_of(s)}:{s.__key__}.json")
            if not rec.has_image and img_part is None:   # text-only (und_text): a placeholder image
                blank = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
                return EncodedSample.derive_from(s, image=blank, target=None, conversation=rec.conversations,
                                                 has_image=False)
            if not rec.has_image:
                raise DataDecodeError("the LLaVA record has no 'image' (text-only) but the sample has an "
                                      "image part; add the record's image path or drop the image")
            conversation = rec.conversations
        if img_part is None:
            raise DataDecodeError(f"no image part ({'/'.join(IMAGE_PARTS)}) among {sorted(parts)}")
        image, target = decode_task_parts(self.task, parts, img_part, self.image_size, self.target_size,
                                          self.transforms)
        return EncodedSample.derive_from(s, image=image, target=target, conversation=conversation)

    @stateless
    def encode_sample(self, sample: RawSample) -> EncodedSample:
        try:
            out = self._decode(sample)
        # PIL raises OSError (truncated / unidentified), SyntaxError (some broken PNG headers),
        # ValueError, EOFError; DecompressionBombError is an Exception subclass of its own.
        except (OSError, SyntaxError, ValueError, EOFError, KeyError, LlavaFormatError,
                Image.DecompressionBombError) as e:
            shard = _shard_of(sample)
            self._failure_run += 1
            err = f"{type(e).__name__}: {e}"
            if self._failure_run > self.max_consecutive_failures:
                raise TaskDataError(
                    f"task {self.task!r}: {self._failure_run} samples in a row could not be decoded "
                    f"(more than data.max_consecutive_failures={self.max_consecutive_failures}); the "
                    f"last one is {sample.__key__} in {shard}: {err}. The task's data is broken: check or "
                    f"regenerate that dataset.") from e
            self._skipped.append((str(sample.__key__), shard, err))
            raise SkipSample() from e
        self._failure_run = 0
        return out

    @stateless
    def batch(self, samples: list[EncodedSample]) -> RawTaskBatch:
        skipped, self._skipped, self._failure_run = self._skipped, [], 0
        targets = samples[0].target
        return RawTaskBatch.from_samples(
            samples,
            images=torch.stack([s.image for s in samples]),
            targets=None if targets is None else torch.stack([s.target for s in samples]),
            conversations=[s.conversation for s in samples],
            has_image=torch.tensor([s.has_image for s in samples], dtype=torch.bool),
            skipped=skipped,
        )


# ------------------------------------------------------------------------------------- loaders

class TaskLoaders:
    """One Energon savable loader per task: every micro-batch of task t has exactly micro_batch samples."""

    def __init__(self, cfg: DataConfig, tasks: Sequence[str], micro_batch: int, image_size: int,
                 rank: int, world_size: int, seed: int, target_size: int | None = None,
                 transforms: ImageTransforms = STRETCH_ALL):
        """Args: rank / world_size are the *data-parallel* ones; seed offsets the shuffling; images come
        at ``image_size``, generation targets at ``target_size`` (default ``image_size``), both through
        ``transforms`` (the model's released ones: ``UMMAdapter.image_transforms``)."""
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"data-parallel rank {rank} is outside world size {world_size}")
        check_data_paths(cfg, tasks)
        self.cfg, self.tasks = cfg, tuple(tasks)
        self.micro_batch, self.image_size = micro_batch, image_size
        self.target_size = target_size or image_size
        self.transforms = transforms
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._skipped = {t: 0 for t in self.tasks}
        self.text_ratio = self._resolve_text_ratio()   # expected share of text-only und samples
        self._loaders = {t: self._build(t) for t in self.tasks}
        self._iters: dict[str, Any] = {}

    def _build(self, task: str):
        # A distinct shuffle seed per task: with one seed, the four streams of the scene data (same
        # keys, same shards) would show the same scene to every task at every step.
        wc = WorkerConfig(rank=self.rank, world_size=self.world_size, num_workers=self.cfg.num_workers,
                          seed_offset=self.seed * len(TASKS) + TASKS.index(task),
                          global_error_handler=reraise_exception)
        encoder = TaskEncoder(task, self.image_size, self.cfg.max_consecutive_failures, self.target_size,
                              self.transforms)
        common = dict(worker_config=wc, batch_size=self.micro_batch, shuffle_buffer_size=self.cfg.shuffle_buffer_size)
        if task == UND and self.text_ratio > 0:
            loader = get_savable_loader(self._und_blend(encoder, common))
        else:
            loader = get_savable_loader(get_train_dataset(
                str(self.cfg.path(task)), max_samples_per_sequence=self.cfg.max_samples_per_sequence,
                task_encoder=encoder, repeat=True, **common))
        # energon passes no worker_init_fn through: wrap its own (workers must survive a preemption
        # signal so that the rank can checkpoint; unimrg/signals.py)
        loader.worker_init_fn = functools.partial(data_worker_init, loader.worker_init_fn)
        return loader

    def _und_parts(self, wc: WorkerConfig | None = None) -> list:
        """Energon's loaded datasets of und and und_text (their lengths are the sample counts)."""
        wc = wc or WorkerConfig(rank=self.rank, world_size=self.world_size, num_workers=self.cfg.num_workers)
        parts = []
        for name in (UND, UND_TEXT):
            loaded = load_dataset(str(self.cfg.path(name))).get_datasets(
                training=True, split_part="train", worker_config=wc, decoder=None,
                max_samples_per_sequence=self.cfg.max_samples_per_sequence, shuffle_over_epochs_multiplier=1)
            parts.extend(loaded.datasets)
        return parts

    def _resolve_text_ratio(self) -> float:
        """The share of text-only und samples this run draws (0 without ROOT/und_text under "source")."""
        ratio = und_text_ratio(self.cfg)
        if UND not in self.tasks or ratio == 0.0:
            return 0.0
        if ratio is None:                  # "source": as many as the prepared data holds
            if not _prepared(self.cfg.path(UND_TEXT)):
                return 0.0
            n_img, n_text = (len(p.dataset) for p in self._und_parts())
            return n_text / (n_img + n_text)
        return ratio

    def _und_blend(self, encoder: "TaskEncoder", common: dict):
        """und + und_text blended sample by sample with weights (1 - r, r): Energon draws the source of
        every sample from its own (checkpointed) RNG, so the mix resumes exactly."""
        parts = self._und_parts(common["worker_config"])
        for part, weight in zip(parts, (1.0 - self.text_ratio, self.text_ratio)):
            part.weight = weight
        return encoder.build_train_datasets(datasets=parts, blend_mode=DatasetBlendMode.DATASET_WEIGHT,
                                            repeat=True, **common)

    def next(self, task: str) -> UnderstandingBatch | GenerationBatch:
        if task not in self._loaders:
            raise KeyError(f"task {task!r} has no loader; enabled tasks: {self.tasks}")
        if task not in self._iters:
            self._iters[task] = iter(self._loaders[task])
        try:
            # A torch DataLoader draws its workers' base seed from the global RNG when its iterator
            # starts (at the first next(), energon's iterator being a generator). Fork, so that a
            # resumed run, whose iterators start later, keeps the same training noise.
            with torch.random.fork_rng(devices=[]):
                raw: RawTaskBatch = next(self._iters[task])
        except TaskDataError:
            raise
        except Exception as e:  # a worker failure arrives re-wrapped; name the task and dataset
            raise TaskDataError(f"task {task!r}: loading from {self.cfg.path(task)} failed: "
                                f"{type(e).__name__}: {e}") from e
        for key, shard, err in raw.skipped:
            self._skipped[task] += 1
            warnings.warn(f"task {task!r}: skipped undecodable sample {key} in {shard} ({err}); "
                          f"{self._skipped[task]} skipped so far", CorruptSampleWarning, stacklevel=2)
        keys = [str(k) for k in raw.__key__]
        if len(keys) != self.micro_batch:   # the promise the trainer relies on
            raise TaskDataError(f"task {task!r}: got a batch of {len(keys)}, expected {self.micro_batch}")
        if task == UND:
            return UnderstandingBatch(images=raw.images, conversations=raw.conversations, keys=keys,
                                      has_image=raw.has_image)
        targets = raw.targets.expand(-1, 3, -1, -1).contiguous()  # (B, 3, T, T); depth / seg: equal channels
        return GenerationBatch(task=task, images=raw.images, targets=targets, keys=keys)

    def close(self) -> None:
        """Stop the loader worker processes now (also called when the object is deleted).

        Why this exists: an energon savable loader sits in a reference cycle (it keeps its own epoch
        generator). When the garbage collector breaks the cycle it first finalises the index queues,
        so torch's shutdown signal is never sent and every worker lingers for torch's 5 s status
        timeout before being killed -- 20 s for four tasks. Closing the generator and shutting
        the torch iterator down explicitly avoids that."""
        for it in self._iters.values():
            it.close()
        self._iters.clear()
        for loader in self._loaders.values():
            torch_iter = getattr(loader, "_iterator", None)   # persistent workers live here
            if torch_iter is not None and hasattr(torch_iter, "_shutdown_workers"):
                torch_iter._shutdown_workers()
            loader._iterator = None
        self._loaders.clear()

    def __del__(self) -> None:
        if getattr(self, "_loaders", None):
            self.close()

    def __enter__(self) -> "TaskLoaders":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def skipped(self) -> dict[str, int]:
        """Undecodable samples skipped so far, per task (carried across resume)."""
        return dict(self._skipped)

    def state_dict(self) -> dict:
        """Per-task loader states. Plain types only (the energon state is pickled to bytes), so a
        checkpoint loads with ``torch.load(weights_only=True)``."""
        return {
            "format": STATE_FORMAT,
            "num_workers": self.cfg.num_workers, "world_size": self.world_size, "rank": self.rank,
            "micro_batch": self.micro_batch, "und_text_ratio": self.text_ratio,
            "loaders": {t: pickle.dumps(l.save_state_rank()) for t, l in self._loaders.items()},
            "skipped": dict(self._skipped),
        }

    def load_state_dict(self, state: dict, new_tasks: tuple[str, ...] = ()) -> None:
        """Restore the loaders' positions; call before the first ``next``. ``new_tasks`` may be missing
        from ``state`` and start from their beginning: tasks a new training stage adds."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r}, expected {STATE_FORMAT}")
        # energon needs the same worker count (else a bare AssertionError); the others change the data order
        for name, now in (("num_workers", self.cfg.num_workers), ("world_size", self.world_size),
                          ("rank", self.rank), ("micro_batch", self.micro_batch)):
            if state[name] != now:
                raise ValueError(f"loader state was saved with {name}={state[name]}, this run has {now}; "
                                 f"resume with the same value (data.{name} / launch settings)")
        if UND in self.tasks and abs(state.get("und_text_ratio", 0.0) - self.text_ratio) > 1e-9:
            raise ValueError(f"loader state was saved with a text-only und share of {state.get('und_text_ratio', 0.0):.4f}, "
                             f"this run has {self.text_ratio:.4f}; resume with the same data.und_text_ratio and "
                             f"the same und_text dataset")
        missing = [t for t in self.tasks if t not in state["loaders"] and t not in new_tasks]
        if missing:
            raise ValueError(f"loader state has no entry for tasks {missing} (it has "
                             f"{sorted(state['loaders'])}); resume with the same task set")
        if self._iters:
            raise RuntimeError("load_state_dict must be called before the first next()")
        for t in self.tasks:
            if t not in state["loaders"]:
                continue                 # new in this stage: its loader starts at the beginning
            self._loaders[t].restore_state_rank(pickle.loads(state["loaders"][t]))
            self._skipped[t] = int(state["skipped"].get(t, 0))
