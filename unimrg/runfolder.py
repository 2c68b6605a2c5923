"""The run folder contract: the first launch freezes the resolved config, a resume reuses it exactly.

    python launch/submit.py --model openuni --recipe tiny --run-dir runs/demo train.steps=8
    python launch/submit.py --run-dir runs/demo --resume latest train.steps=12   # extend: an amendment

RUN/config.yaml is what every rank reads. The first launch writes it from the recipe and the
overrides; ``--resume`` loads it back instead of resolving the recipe again (a recipe or default that
changed since would otherwise change a run half-way), applies the overrides given at resume on top,
and refuses any that change the run unless the field is in ``RESUMABLE``; those are recorded as
amendments (the field, old and new value, and the step after which the new value holds) in
RUN/submission.json and at the top of config.yaml. A folder that holds a checkpoint is never started
afresh. RUN/submission.json keeps one entry per launch. Import-light: no torch, no DeepSpeed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from unimrg.config import Config, ConfigError, load_resolved, to_yaml

COMPLETE = "COMPLETE"   # written into a checkpoint folder once every rank's state is on disk

# Fields a resume may change, and why that is safe: none of them changes the weights up to the step
# the run resumes from, the data order or the optimizer state.
RESUMABLE = {
    "train.steps": "extend (or shorten) a single-stage run; the cosine schedule is re-spread over the new "
                   "length from the resumed step on",
    "train.checkpoint_every": "how often checkpoints are written",
    "train.keep_checkpoints": "how many checkpoints are kept",
    "train.log_every": "how often rank 0 prints a step line",
    "train.export_final": "whether RUN/final/model.pt is written at the end",
    "run.tensorboard": "whether TensorBoard events are written",
}
# Fields that describe one launch, not the run: taken from this launch (stop_after: 0 and the
# debug_fault test hook: none, unless given again).
PER_LAUNCH = ("run.dir", "run.resume", "train.stop_after", "train.debug_fault")


def find_checkpoint(ckpt_dir: Path, resume: str) -> Path | None:
    """``latest`` → the folder named in ckpt_dir/latest if complete, else the newest complete one."""
    if resume not in ("", "latest"):
        path = Path(resume)
        if not (path / COMPLETE).exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        return path
    if resume == "" or not ckpt_dir.is_dir():
        return None
    latest = ckpt_dir / "latest"
    if latest.is_file() and (ckpt_dir / latest.read_text().strip() / COMPLETE).exists():
        return ckpt_dir / latest.read_text().strip()
    complete = sorted(p for p in ckpt_dir.glob("step_*") if (p / COMPLETE).exists())
    return complete[-1] if complete else None


def checkpoint_step(folder: Path) -> int:
    """The optimizer step a checkpoint folder (``step_NNNNNNN``) holds."""
    return int(Path(folder).name.split("_")[-1])


def checkpoint_world(folder: Path) -> int:
    """How many ranks wrote a checkpoint (its COMPLETE marker); a resume needs the same number."""
    return int((Path(folder) / COMPLETE).read_text().split()[0])


def _flat(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node
    walk(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True), "")
    return out


def override_keys(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].strip().lstrip("+") for o in overrides}


def resume_config(run_dir: Path, overrides: list[str], resume: str) -> tuple[Config, list[dict], Path | None]:
    """RUN/config.yaml with this launch's overrides on top: (config, amendments, checkpoint resumed).

    Raises ConfigError naming every field an override would change that a resume may not."""
    frozen_path = run_dir / "config.yaml"
    frozen = load_resolved(frozen_path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(frozen), OmegaConf.from_dotlist(list(overrides)))
        cfg: Config = OmegaConf.to_object(merged)
    except Exception as e:
        raise ConfigError(f"{frozen_path} + overrides {list(overrides)}: {e}") from None
    if "train.stop_after" not in override_keys(overrides):
        cfg.train.stop_after = 0          # a previous launch's stop is not this one's
    if "train.debug_fault" not in override_keys(overrides):
        cfg.train.debug_fault = ""        # nor its injected fault (a test hook)
    cfg.run.resume = resume
    before, after = _flat(frozen), _flat(cfg)
    changed = run_changes(before, after, f"resume of {run_dir}", f"reuses {frozen_path} exactly")
    ckpt = find_checkpoint(run_dir / "checkpoints", resume)
    step = checkpoint_step(ckpt) if ckpt else 0
    if "train.steps" in changed:
        if cfg.train.stages:
            raise ConfigError(f"train.steps={cfg.train.steps}: this run has train.stages "
                              f"{[s.steps for s in cfg.train.stages]}; only single-stage runs can be extended")
        if cfg.train.steps < step:
            raise ConfigError(f"train.steps={cfg.train.steps} is below step {step} of the checkpoint "
                              f"{ckpt} this resume starts from")
    # (a train.stop_after at or below `step` is no error: a SLURM requeue repeats the first start's
    # overrides, and the ranks then stop at once, saying so)
    amendments = [{"field": k, "from": before.get(k), "to": after.get(k), "after_step": step} for k in changed]
    return cfg, amendments, ckpt


def run_changes(before: dict[str, Any] | Config, after: dict[str, Any] | Config, what: str, how: str) -> list[str]:
    """The fields that differ (launch-scoped ones aside); ConfigError naming those a resume may not change."""
    before = before if isinstance(before, dict) else _flat(before)
    after = after if isinstance(after, dict) else _flat(after)
    changed = [k for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k) and k not in PER_LAUNCH]
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        fields = "; ".join(f"{k}={after.get(k)!r} (this run has {before.get(k)!r})" for k in refused)
        raise ConfigError(
            f"{what} refused: {fields}. A resume {how}; only {', '.join(RESUMABLE)} (and train.stop_after) "
            "may change at resume. Drop the override to resume as the run was launched, or start a new run "
            "with a new --run-dir")
    return changed


def check_checkpoint_config(ckpt: Path, cfg: Config) -> None:
    """On a rank, before resuming: the config this launch has may differ from the one that wrote the
    checkpoint (its ``config.yaml``) only in resumable fields — whoever started the ranks."""
    saved = Path(ckpt) / "config.yaml"
    if saved.is_file():
        run_changes(load_resolved(saved), cfg, f"resuming {ckpt}",
                    f"continues the run that wrote it ({saved}) with the same config")


def refuse_fresh_launch(run_dir: Path) -> None:
    """A launch without --resume into a folder that holds a checkpoint would train from scratch on top
    of it (metrics twice, overlapping TensorBoard files): an error naming both ways out."""
    ckpt = find_checkpoint(run_dir / "checkpoints", "latest")
    if ckpt is not None:
        raise ConfigError(
            f"{run_dir} already holds a run (checkpoint {ckpt.name}). Either resume it: add --resume latest "
            f"(sbatch slurm/*.sh: the override run.resume=latest), or start a new run: choose a new --run-dir "
            f"(sbatch: RUN_DIR=...)")


def read_history(run_dir: Path) -> dict:
    """RUN/submission.json as {"launches": [...], "amendments": [...]} (a single-launch file of an
    older layout becomes the first entry)."""
    path = run_dir / "submission.json"
    if not path.is_file():
        return {"launches": [], "amendments": []}
    data = json.loads(path.read_text())
    if "launches" not in data:
        data = {"launches": [data], "amendments": []}
    data.setdefault("amendments", [])
    return data


def write_launch(run_dir: Path, cfg: Config, entry: dict, amendments: list[dict]) -> None:
    """Write config.yaml (with the run's amendments as a header) and append this launch to the history."""
    history = read_history(run_dir)
    launch = len(history["launches"]) + 1
    entry = {"launch": launch, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **entry, "amendments": amendments}
    for a in amendments:
        a.setdefault("launch", launch)
    if entry.get("kind") != "resume":
        history["amendments"] = []        # a fresh start: earlier amendments described another config
    history["launches"].append(entry)
    history["amendments"] += amendments
    header = "".join(f"# amended at launch {a['launch']}: {a['field']} {a['from']!r} -> {a['to']!r} "
                     f"from step {a['after_step'] + 1} on\n" for a in history["amendments"])
    if header:
        header = "# Frozen at the first launch; every change since is listed here and in submission.json.\n" + header
    _atomic_write(run_dir / "config.yaml", header + to_yaml(cfg))
    _atomic_write(run_dir / "submission.json", json.dumps(history, indent=2, default=str) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
