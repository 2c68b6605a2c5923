"""Reading and writing official checkpoints: find the weight file(s), load with key checks, report by name.

Shared by the adapters' ``load_official`` / ``export_official``. Nothing here knows a model: an adapter
maps official keys to its own (often the identity) and calls :func:`load_checked`, which refuses shape
mismatches and returns a :class:`KeyReport` naming every missing and unexpected key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# Names a released folder may store its weights under, in the order they are preferred.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def weight_files(path: str | Path, what: str = "checkpoint") -> list[Path]:
    """The weight file(s) of a checkpoint: a file as is, or a folder's single / sharded weights."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: {p} does not exist (give a local file or folder; nothing is downloaded)")
    for name in INDEX_FILES:
        if (p / name).is_file():
            shards = sorted(set(json.loads((p / name).read_text())["weight_map"].values()))
            return [p / s for s in shards]
    for name in WEIGHT_FILES:
        if (p / name).is_file():
            return [p / name]
    found = sorted(q.name for q in p.iterdir())[:20]
    raise FileNotFoundError(f"{what}: no weights in {p} (looked for {', '.join(WEIGHT_FILES)} or a sharded "
                            f"index); the folder holds {found}")


def read_state_dict(path: str | Path, what: str = "checkpoint", unwrap: Iterable[str] = ("state_dict", "model")
                    ) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or folder, on CPU. A training checkpoint that nests the weights
    under one of ``unwrap`` (e.g. ``{"model": state_dict}``) is unwrapped."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path, what):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file
            part = load_file(str(f), device="cpu")
        elif f.suffix in TORCH_SUFFIXES:
            try:
                part = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{what}: cannot read {f} as a tensor-only torch checkpoint ({e}); re-save "
                                 "its state dict with torch.save(model.state_dict(), ...)") from None
        else:
            raise ValueError(f"{what}: {f} has an unknown weight format (expected .safetensors or "
                             f"{'/'.join(TORCH_SUFFIXES)})")
        for key in unwrap:
            if isinstance(part, Mapping) and key in part and isinstance(part[key], Mapping):
                part = part[key]
        bad = [k for k, v in part.items() if not torch.is_tensor(v)]
        if bad:
            raise ValueError(f"{what}: {f} holds non-tensor entries {bad[:5]}; expected a flat state dict")
        state.update(part)
    return state


def write_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write tensors (contiguous CPU clones) as safetensors or a torch pickle, by the file's suffix."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(p), metadata={"format": "pt"})
    else:
        torch.save(state, p)
    return p


@dataclass
class KeyReport:
    """What loading one component found: keys the model wanted but the file lacked, keys the file had
    but the model has no place for, and keys deliberately skipped (e.g. a text tower we do not use)."""

    what: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        lines = [f"{self.what}: loaded {self.loaded} tensors, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.ignored)} ignored"]
        if self.missing:
            lines.append("  missing (left at their initial values): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append("  unexpected (not loaded): " + ", ".join(self.unexpected))
        return "\n".join(lines)


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                 rename: Callable[[str], str | None] = lambda k: k) -> KeyReport:
    """Load ``state`` into ``module`` after mapping each key with ``rename`` (None = ignore the key).

    Refuses shape mismatches (naming each key and both shapes) and parameters already partitioned by
    ZeRO-3 (load before the engine wraps the model); logs and returns a :class:`KeyReport`.
    """
    own = module.state_dict()
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        raise RuntimeError(f"{what}: the model's parameters are already partitioned by ZeRO-3; load official "
                           "weights before deepspeed.initialize / outside zero.Init")
    report, mapped = KeyReport(what), {}
    for key, tensor in state.items():
        new = rename(key)
        if new is None:
            report.ignored.append(key)
        elif new not in own:
            report.unexpected.append(key)
        else:
            mapped[new] = tensor
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in mapped.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{what}: shape mismatch, the checkpoint does not match this architecture "
                         f"(check model.size and the architecture fields): " + "; ".join(bad[:10]))
    module.load_state_dict(mapped, strict=False)
    report.loaded = len(mapped)
    report.missing = sorted(k for k in own if k not in mapped)
    (log.info if report.ok else log.warning)(str(report))
    return report
