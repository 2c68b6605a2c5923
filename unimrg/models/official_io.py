"""Reading and writing official checkpoints: find the weight file(s), load with key checks, report by name.

Shared by the adapters' ``load_official`` / ``export_official`` (one copy of each helper; adapters hold
only their key maps). Nothing here knows a model: an adapter maps official keys to its own (often the
identity) and calls :func:`load_checked`, which refuses shape mismatches and returns a :class:`LoadReport`
naming every loaded, missing, unexpected and ignored key; :func:`check_report` turns a report with
unloaded parameters into an error naming the keys, the config field that provides them and the
``allow_missing`` override. :func:`load_adapter_state` loads the trainer's consolidated ``model.pt``
(tied weights and ``module.`` prefixes handled) for the export / sample CLIs and stage transitions.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
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
        state.update(strip_wrapper_prefixes(part))
    return state


# Prefixes that wrappers put in front of every key: DDP / DeepSpeed (`module.`), torch.compile (`_orig_mod.`).
# No adapter or release has a top-level module by these names, so they are always safe to remove.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``module.llm.x`` → ``llm.x`` (repeatedly: ``module._orig_mod.`` too). A file saved from a wrapped
    model otherwise loads nothing and leaves the model at its random initialisation."""
    out = {}
    for k, v in state.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """Parameter names that are another parameter (tied weights): alias → the name ``named_parameters()``
    lists. Reads no values (works on meta / ZeRO-3 partitioned models)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def complete_tied(module: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus every tied alias of ``module`` (e.g. Harmon's ``llm.lm_head.weight``), so that a
    consolidated state dict built from ``named_parameters()`` holds every key ``state_dict()`` has."""
    out = dict(state)
    for alias, name in tied_aliases(module).items():
        if alias not in out and name in out:
            out[alias] = out[name]
    return out


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load a state dict in the adapter's own layout (the trainer's consolidated ``model.pt``) strictly:
    tied aliases may be absent (either name of a tied pair is enough), wrapper prefixes are removed,
    anything else missing or unexpected is an error naming the keys."""
    state = strip_wrapper_prefixes(state)
    aliases = tied_aliases(model)
    for alias, name in aliases.items():
        if name not in state and alias in state:
            state[name] = state[alias]
    state = {k: v for k, v in state.items() if k not in aliases}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and k not in aliases)
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise ValueError(f"{what} does not match the model ({type(model).__name__}): {len(missing)} missing "
                         f"{missing[:10]}, {len(unexpected)} unexpected {unexpected[:10]}; is it this model's "
                         "consolidated state dict (RUN/final/model.pt), and are model.size / the architecture "
                         "fields the ones it was trained with?")
    model.load_state_dict(state, strict=False)


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
class LoadReport:
    """What loading official weights found, by name: keys loaded, keys the model wanted but no file had
    (missing), keys a file had but the model has no place for (unexpected), and keys deliberately skipped
    (ignored, e.g. a text tower we do not use). Names are the model's own keys (missing, loaded) or the
    file's (unexpected, ignored). Adapters return one report for everything ``load_official`` loaded."""

    what: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    parts: dict[str, LoadReport] = field(default_factory=dict)   # per component, when merged

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    @classmethod
    def merge(cls, what: str, parts: Mapping[str, LoadReport], own_keys: Iterable[str]) -> LoadReport:
        """One report over components loaded into disjoint parts of a model: ``own_keys`` (the model's
        state-dict keys) minus everything loaded is what is missing."""
        loaded = [k for r in parts.values() for k in r.loaded]
        done = set(loaded)
        return cls(what, loaded=loaded, missing=sorted(k for k in own_keys if k not in done),
                   unexpected=[k for r in parts.values() for k in r.unexpected],
                   ignored=[k for r in parts.values() for k in r.ignored], parts=dict(parts))

    def __str__(self) -> str:
        lines = [f"{self.what}: loaded {len(self.loaded)} tensors, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.ignored)} ignored"]
        if self.missing:
            lines.append("  missing (left at their initial values): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append("  unexpected (not loaded): " + ", ".join(self.unexpected))
        return "\n".join(lines)


# Before the rename: names that other helpers (and older branches) import.
KeyReport = LoadReport


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                 rename: Callable[[str], str | None] = lambda k: k, prefix: str = "") -> LoadReport:
    """Load ``state`` into ``module`` after mapping each key with ``rename`` (None = ignore the key).

    Refuses shape mismatches (naming each key and both shapes) and parameters already partitioned by
    ZeRO-3 (load before the engine wraps the model); logs and returns a :class:`LoadReport` whose loaded /
    missing names carry ``prefix`` (the module's path in the adapter, e.g. ``vq_model.``). A file with a
    tied pair may hold either name (the other is not missing).
    """
    own = module.state_dict()
    aliases = tied_aliases(module)
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        raise RuntimeError(f"{what}: the model's parameters are already partitioned by ZeRO-3; load official "
                           "weights before deepspeed.initialize / outside zero.Init")
    report, mapped = LoadReport(what), {}
    for key, tensor in strip_wrapper_prefixes(state).items():
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
    for alias, name in aliases.items():   # either name of a tied pair is enough; load the pair once
        if alias in mapped and name not in mapped:
            mapped[name] = mapped[alias]
        mapped.pop(alias, None)
    module.load_state_dict(mapped, strict=False)
    done = set(mapped) | {a for a, n in aliases.items() if n in mapped}
    report.loaded = sorted(prefix + k for k in done)
    report.missing = sorted(prefix + k for k in own if k not in done)
    (log.info if report.ok else log.warning)(str(report))
    return report


def check_report(report: LoadReport, sources: Mapping[str, Sequence[str]], strict: bool,
                 allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = ()) -> LoadReport:
    """Refuse a load that left parameters unloaded or found keys with no place, unless every such key
    matches an ``allow_missing`` / ``allow_unexpected`` fnmatch pattern (deliberate partial loads).

    ``sources`` maps each config field that names weights (e.g. ``magvit_checkpoint``) to the adapter-key
    prefixes it provides; the error names the field for each group of missing keys. ``strict`` False
    (tiny models, tests) only logs, except when nothing at all was loaded from a non-empty file."""
    allow_missing, allow_unexpected = list(allow_missing), list(allow_unexpected)
    missing = [k for k in report.missing if not any(fnmatch.fnmatchcase(k, p) for p in allow_missing)]
    unexpected = [k for k in report.unexpected if not any(fnmatch.fnmatchcase(k, p) for p in allow_unexpected)]
    nothing = not report.loaded and bool(report.unexpected)
    if not (missing or unexpected) or not (strict or nothing):
        return report
    lines = [f"{report.what}: {len(missing)} parameters left unloaded, {len(unexpected)} unexpected keys"
             + (" (nothing loaded: is this the right file?)" if nothing else "")]
    groups: dict[str, list[str]] = {}
    for k in missing:
        fields = [f for f, prefixes in sources.items() if k.startswith(tuple(prefixes))]
        groups.setdefault(" or ".join(f"model.{f}" for f in fields) or "no weight field", []).append(k)
    for fields, keys in groups.items():
        tops = sorted({k.split(".")[0] for k in keys})
        lines.append(f"missing {', '.join(t + '.*' for t in tops)} ({len(keys)} keys; set {fields}): "
                     + ", ".join(keys))
    if unexpected:
        lines.append("unexpected (the model has no place for them): " + ", ".join(unexpected))
    tops = sorted({k.split(".")[0] + ".*" for k in missing})
    lines.append(f"For a deliberate partial load: model.allow_missing=[{','.join(tops)}] "
                 "(fnmatch patterns; allow_unexpected likewise)")
    raise ValueError("\n".join(lines))
