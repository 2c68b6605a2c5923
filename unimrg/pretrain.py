"""python launch/submit.py --job pretrain --model openuni --recipe tiny   (builds or reuses the tiny base)

The in-house tiny *base* models: what the released checkpoints are to the paper, built on generated
scenes in the order the real models were made, so that post-training starts from a model that already
understands and generates instead of random weights behind a random frozen tokenizer:

1. the image tokenizer alone (OpenUni's DC-AE, Harmon's KL-16 VAE, Show-o's MAGVIT-v2 LFQ), trained to
   reconstruct scene images at the size the adapter feeds it, then frozen;
2. the UMM on the released models' base tasks: understanding (the scene questions plus a caption turn)
   and text-to-image generation from captions derived from the scene metadata. Never depth or
   segmentation: those are what UniMRG adds.

The result is written with the adapter's ``export_official`` (plus the tokenizer in its diffusers / release
layout) and read back through ``load_official`` by setting the fields ``export_sources`` names
(``model.checkpoint=...``): a tiny run with ``model.base=tiny`` gets those fields filled in by submit.py.

Cache: ``CACHE/<model>-<key>/`` where CACHE is ``pretrain.cache`` or ``$UNIMRG_CACHE`` or
``~/.cache/unimrg/base`` and the key hashes the model's architecture fields, the ``pretrain`` section and
the source files that shape the result (this module, the adapter package, the scene generator). Built in
``CACHE/.partial-*`` and renamed into place: a killed build never leaves an entry that looks finished.
Single process, plain torch loop, deterministic per ``pretrain.seed`` (the same file hashes on a rebuild).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unimrg.data.batches import GenerationBatch, UnderstandingBatch
from unimrg.data.scenes import Scene, make_scene
from unimrg.tasks import PIX

ROOT = Path(__file__).resolve().parent
BASE_FILE = "base.json"
# Config fields that say where weights come from (or are eval-time only): not part of what is built.
NOT_IN_KEY = {"checkpoint", "base", "init", "allow_missing", "allow_unexpected", "tokenizer", "llm_path",
              "internvl_path", "sana_path", "vae_path", "magvit_checkpoint", "clip_checkpoint",
              "num_sampling_steps", "gradient_checkpointing"}
HELD_OUT = 2_000_000   # first scene index of the tokenizer's held-out set (training uses 0 … scenes − 1)


@dataclass
class PretrainConfig:
    """How the tiny base of ``--job pretrain`` (and ``model.base=tiny``) is built. Every field is part of
    the cache key except ``cache``."""

    seed: int = 0
    scenes: int = 512              # training scenes (indices 0 …), rendered once
    held_out: int = 32             # held-out scenes the tokenizer's recon_psnr is measured on
    tokenizer_steps: int = 1500
    tokenizer_batch: int = 16
    tokenizer_lr: float = 2e-3
    tokenizer_maps: bool = True    # the tokenizer also learns depth renderings and boundary drawings (tokenizer_images)
    umm_steps: int = 400
    umm_batch: int = 8             # per task (understanding, text-to-image) and step
    umm_lr: float = 1e-3
    cache: str = ""                # "" = $UNIMRG_CACHE, else ~/.cache/unimrg/base


def cache_root(p: PretrainConfig) -> Path:
    return Path(p.cache or os.environ.get("UNIMRG_CACHE") or Path.home() / ".cache" / "unimrg" / "base")


def code_version(model: str) -> str:
    """Hash of the sources that decide what a build produces."""
    h = hashlib.sha256()
    files = [ROOT / "pretrain.py", ROOT / "data" / "scenes.py", ROOT / "models" / "base.py",
             ROOT / "models" / "tokenizer.py", *sorted((ROOT / "models" / model).glob("*.py"))]
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(torch.__version__.split("+")[0].encode())
    return h.hexdigest()


def base_key(model_cfg, p: PretrainConfig) -> str:
    fields = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in NOT_IN_KEY}
    spec = {"model": fields, "pretrain": {k: v for k, v in dataclasses.asdict(p).items() if k != "cache"},
            "code": code_version(model_cfg.name)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- scenes

def caption(scene: Scene) -> str:
    """The scene's objects left to right, e.g. "a red sphere, a blue cube and a green cylinder"."""
    objs = sorted(scene.objects, key=lambda o: o.center[0])
    names = [f"a {o.name}" for o in objs]
    return (", ".join(names[:-1]) + " and " + names[-1]) if len(names) > 1 else names[0]


def _stack(arrays: list[np.ndarray], size: int) -> torch.Tensor:
    """(H, W, 3) uint8 arrays → uint8 (N, 3, size, size), resized (bilinear, antialiased) if they differ."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if x.shape[-1] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x


def _images(scenes: list[Scene], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) (scenes rendered at their own size, resized if it differs)."""
    return _stack([s.image for s in scenes], size)


def tokenizer_images(scenes: list[Scene], size: int, maps: bool = True) -> torch.Tensor:
    """What the tokenizer learns to reconstruct, uint8 (4N, 3, size, size): each scene's picture twice, its
    depth rendering and its boundary drawing (``maps=False``: the pictures alone, (N, 3, size, size)). A released tokenizer (DC-AE, KL-16, MAGVIT-v2) was trained on
    web-scale images and reconstructs grey gradients and line drawings as well as photos; one trained on
    scene pictures alone does not (measured: 0.88 depth_similarity of its own depth-map reconstructions,
    below a constant mean depth map's 0.95), and a frozen tokenizer that cannot draw a depth map caps what
    post-training can show. The UMM itself never sees a depth or segmentation prompt before post-training."""
    pictures = _images(scenes, size)
    if not maps:
        return pictures
    depth = _stack([np.repeat((s.depth * 255).round().astype(np.uint8)[..., None], 3, axis=2) for s in scenes], size)
    return torch.cat([pictures, pictures, depth, _stack([s.boundary for s in scenes], size)])


# ---------------------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """The adapter's frozen image tokenizer seen as an autoencoder on [0, 1] images at its own size."""

    def __init__(self, model):
        self.name = model.cfg.name
        if self.name == "openuni":
            self.module, self.size = model.vae, model.arch.gen_image_size
        elif self.name == "harmon":
            self.module, self.size = model.vae, model.cfg.image_size
        elif self.name == "showo":
            self.module, self.size = model.vq_model, model.arch.magvit.resolution
        else:
            raise ValueError(f"no tiny base recipe for model {self.name!r} (unimrg/pretrain.py Tokenizer)")

    def roundtrip(self, x01: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction in [-1, 1] and the regulariser (KL / LFQ commitment; 0 for DC-AE)."""
        x = x01 * 2 - 1
        m = self.module
        zero = x.new_zeros(())
        if self.name == "openuni":
            return m.decode(m.encode(x).latent).sample, zero
        if self.name == "harmon":
            post = m.encode(x).latent_dist
            z = post.sample() if train else post.mode()
            return m.decode(z).sample, post.kl().mean() if train else zero
        z = m.encoder(x)                       # LFQ: the sign of each channel, straight-through
        q = torch.where(z > 0, 1.0, -1.0)
        commit = F.mse_loss(z, q.detach())
        return m.decoder(z + (q - z).detach()), commit

    @torch.no_grad()
    def psnr(self, images_u8: torch.Tensor) -> float:
        from unimrg.eval.metrics import recon_psnr
        self.module.eval()
        x = images_u8.float() / 255
        out = []
        for i in range(0, len(x), 16):
            rec, _ = self.roundtrip(x[i:i + 16], train=False)
            out.append(recon_psnr(((rec.float() + 1) / 2).clamp(0, 1), x[i:i + 16]))
        return float(torch.cat(out).mean())


def _aux_weight(name: str) -> float:
    # KL: LDM's KL-f16 weight order (tiny: latents must stay informative); LFQ commitment as MAGVIT-v2's 0.25.
    return {"harmon": 1e-6, "showo": 0.25}.get(name, 0.0)


def train_tokenizer(model, p: PretrainConfig, images: torch.Tensor, held_out: torch.Tensor, bar=None) -> dict:
    tok = Tokenizer(model)
    for q in tok.module.parameters():
        q.requires_grad_(True)
    opt = torch.optim.AdamW(tok.module.parameters(), lr=p.tokenizer_lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.tokenizer_lr, total_steps=max(1, p.tokenizer_steps),
                                                pct_start=0.05)
    g = torch.Generator().manual_seed(p.seed)
    x_all = images.float() / 255
    tok.module.train()
    loss_v = float("nan")
    for step in range(p.tokenizer_steps):
        idx = torch.randint(len(x_all), (p.tokenizer_batch,), generator=g)
        x = x_all[idx]
        flip = torch.rand(len(x), generator=g) < 0.5          # mirror images: the scenes are left-right symmetric
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        rec, aux = tok.roundtrip(x, train=True)
        loss = F.l1_loss(rec, x * 2 - 1) + F.mse_loss(rec, x * 2 - 1) + _aux_weight(tok.name) * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.module.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        if bar is not None:
            bar.set_postfix_str(f"tokenizer loss {loss_v:.4f}", refresh=False)
            bar.update(1)
    for q in tok.module.parameters():
        q.requires_grad_(False)
    tok.module.eval()
    return {"tokenizer_loss": loss_v, "tokenizer_recon_psnr": tok.psnr(held_out), "tokenizer_size": tok.size}


# ---------------------------------------------------------------------------------------- the UMM

def conversations(scene: Scene) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The scene's two understanding samples (the released models' captioning + VQA data): a caption turn
    then the questions, and the questions alone (the way the ``scenes`` suite and benchmarks ask).

    The caption never follows the questions: they name the objects, so a blind LLM could copy the names,
    and the tiny base did (its held-out captions were not words; docs/tiny_demo.md, "Session 6")."""
    c, questions = caption(scene), scene.conversation     # (a property: builds the turns on each access)
    after_caption = [{"from": t["from"], "value": t["value"].replace("<image>\n", "")} for t in questions]
    captioned = [{"from": "human", "value": "<image>\nDescribe the image."},
                 {"from": "gpt", "value": c[0].upper() + c[1:] + "."}] + after_caption
    return captioned, questions


def t2i_prompt(scene: Scene) -> str:
    return f"Generate an image of {caption(scene)}."


def _tokenizer_prefix(name: str) -> str:
    return {"openuni": "vae.", "harmon": "vae.", "showo": "vq_model."}[name]


def train_umm(model, p: PretrainConfig, scenes: list[Scene], images: torch.Tensor, targets: torch.Tensor,
              bar=None) -> dict:
    """Understanding + text-to-image on the scenes, everything but the (frozen) tokenizer trained: the
    understanding encoders of the released models were trained too (the paper freezes them afterwards)."""
    prefix = _tokenizer_prefix(model.cfg.name)
    params = [q for n, q in model.named_parameters() if not n.startswith(prefix)]
    for n, q in model.named_parameters():
        q.requires_grad_(not n.startswith(prefix))
    opt = torch.optim.AdamW(params, lr=p.umm_lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.umm_lr, total_steps=max(1, p.umm_steps),
                                                pct_start=0.05)
    g = torch.Generator().manual_seed(p.seed + 1)
    convs = [conversations(s) for s in scenes]
    prompts = [t2i_prompt(s) for s in scenes]
    blank = torch.zeros_like(images[:p.umm_batch])    # text-to-image: no condition image
    model.train()
    last: dict[str, float] = {}
    for step in range(p.umm_steps):
        a = torch.randint(len(scenes), (p.umm_batch,), generator=g).tolist()
        b = torch.randint(len(scenes), (p.umm_batch,), generator=g).tolist()
        # even slots the captioned conversation, odd slots the questions alone (``conversations``)
        und = UnderstandingBatch(images=images[a], conversations=[convs[i][k % 2] for k, i in enumerate(a)],
                                 keys=[scenes[i].key for i in a])
        gen = GenerationBatch(task=PIX, images=blank, targets=targets[b], prompts=[prompts[i] for i in b],
                              keys=[scenes[i].key for i in b])
        losses = model([und, gen])
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        last = {"und_loss": float(losses["und"].detach()), "t2i_loss": float(losses[PIX].detach())}
        if bar is not None:
            bar.set_postfix_str(f"und {last['und_loss']:.3f} t2i {last['t2i_loss']:.3f}", refresh=False)
            bar.update(1)
    model.eval()
    for q in model.parameters():
        q.requires_grad_(True)
    return last


# ---------------------------------------------------------------------------------------- the cache

@dataclass
class BaseEntry:
    """A finished base: its folder, the config fields that load it, metrics, file hashes."""

    path: Path
    sources: dict[str, str]      # model.<field> → absolute path
    info: dict
    trained: bool                # False: found in the cache

    def file_hash(self) -> str:
        return self.info["files_sha256"]


def _hash_files(folder: Path) -> tuple[str, dict[str, str]]:
    files = {}
    for f in sorted(q for q in folder.rglob("*") if q.is_file() and q.name != BASE_FILE):
        files[str(f.relative_to(folder))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(), files


def read_entry(folder: Path) -> BaseEntry:
    info = json.loads((folder / BASE_FILE).read_text())
    return BaseEntry(folder, {k: str(folder / v) for k, v in info["sources"].items()}, info, trained=False)


def entry_dir(model_cfg, p: PretrainConfig) -> Path:
    return cache_root(p) / f"{model_cfg.name}-{base_key(model_cfg, p)}"


def ensure_base(cfg, progress: bool = True, log=print) -> BaseEntry:
    """The cached base of ``cfg`` (a Config: model, data.scene_size, pretrain), built when missing."""
    folder = entry_dir(cfg.model, cfg.pretrain)
    if (folder / BASE_FILE).is_file():
        entry = read_entry(folder)
        log(f"tiny base: cached {folder} (recon_psnr {entry.info['tokenizer_recon_psnr']:.2f} dB)")
        return entry
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".partial-{folder.name}-*"):   # left by a build that was killed -9
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    partial = folder.parent / f".partial-{folder.name}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    log(f"tiny base: building {folder} (no cache entry; `--job pretrain` builds it ahead)")
    try:
        info = build(cfg, partial, progress=progress)
        (partial / BASE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(partial, folder)
        except OSError:                  # another build finished first: theirs is as good (same key)
            if not (folder / BASE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    entry = read_entry(folder)
    entry.trained = True
    log(f"tiny base: wrote {folder} in {info['wall_s']:.0f} s (tokenizer recon_psnr "
        f"{info['tokenizer_recon_psnr']:.2f} dB on {cfg.pretrain.held_out} held-out scenes)")
    return entry


def build(cfg, out: Path, progress: bool = True) -> dict:
    """Train the tokenizer, then the UMM, and write the release layout into ``out``."""
    import random

    from tqdm import tqdm

    from unimrg.models import registry
    p, m = cfg.pretrain, cfg.model
    if m.size != "tiny":
        raise ValueError(f"model.size={m.size!r}: the in-house base is built for tiny models only")
    t0 = time.time()
    random.seed(p.seed)
    np.random.seed(p.seed)
    torch.manual_seed(p.seed)
    clean = dataclasses.replace(m, **{k: None for k in ("checkpoint", "vae_path", "magvit_checkpoint",
                                                          "clip_checkpoint", "internvl_path", "sana_path")
                                      if hasattr(m, k)}, base="")
    model = registry.adapter_class(m.name)(clean)
    tok = Tokenizer(model)
    render = max(cfg.data.scene_size, m.image_size, m.target_size, tok.size)
    scenes = [make_scene(p.seed, i, render) for i in range(p.scenes)]
    held = [make_scene(p.seed, HELD_OUT + i, render) for i in range(p.held_out)]
    bar = tqdm(total=p.tokenizer_steps + p.umm_steps, desc=f"tiny base {m.name}", unit="step",
               disable=not progress, mininterval=2.0, smoothing=0.1)
    try:
        info = train_tokenizer(model, p, tokenizer_images(scenes, tok.size, p.tokenizer_maps), _images(held, tok.size),
                               bar)
        targets = _images(scenes, m.target_size).float() / 255
        info |= train_umm(model, p, scenes, _images(scenes, m.image_size), targets, bar)
    finally:
        bar.close()
    out.mkdir(parents=True)
    paths = model.export_official(out)
    sources = dict(model.export_sources(paths))
    if m.name in ("openuni", "harmon"):      # their exports leave the (released, frozen) VAE out: ours is new
        model.vae.save_pretrained(out / "vae")
        sources["vae_path"] = str(out / "vae")
    info["sources"] = {k: str(Path(v).relative_to(out)) for k, v in sources.items()}
    info["files_sha256"], info["files"] = _hash_files(out)
    info |= {"model": m.name, "key": base_key(m, p), "pretrain": dataclasses.asdict(p) | {"cache": None},
             "wall_s": round(time.time() - t0, 1), "torch": torch.__version__}
    return info


def apply_base(cfg, build: bool = True, log=print) -> BaseEntry | None:
    """``model.base``: "" / "none" = random init; "tiny" = the cached base (built if missing, unless
    ``build`` is False: a dry run only says so), whose weight fields are written into ``cfg.model`` (what
    the ranks' ``load_official`` then reads)."""
    m = cfg.model
    if m.base in ("", "none"):
        return None
    from unimrg.config import ConfigError
    if m.base != "tiny":
        raise ConfigError(f"model.base={m.base!r}: use 'tiny' (the in-house base, built by --job pretrain) or "
                          "'none' (random init)")
    if m.size != "tiny":
        raise ConfigError(f"model.base=tiny with model.size={m.size!r}: the in-house base exists for tiny models "
                          "only; full-size runs load released weights (model.checkpoint=...)")
    from unimrg.models import registry
    given = [f for f in registry.adapter_class(m.name).official_sources if getattr(m, f, None)]
    if given:
        raise ConfigError(f"model.base=tiny and model.{given[0]}={getattr(m, given[0])!r} both give weights: "
                          "set model.base=none to load your own files")
    if not build and not (entry_dir(m, cfg.pretrain) / BASE_FILE).is_file():
        log(f"model.base=tiny: no cache entry {entry_dir(m, cfg.pretrain)} yet; the launch builds it first")
        return None
    entry = ensure_base(cfg, log=log)
    for field_name, path in entry.sources.items():
        setattr(m, field_name, path)
    return entry
