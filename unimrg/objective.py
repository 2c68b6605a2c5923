"""The UniMRG objective: L = Σ_t λ_t · L_t over the enabled tasks, plus the task schedule and prompts.

Understanding is next-token CE; reconstruction, depth and segmentation use the model's own generative
loss, conditioned on the input image's understanding features and a prompt drawn per sample.
"""

from __future__ import annotations

import ast
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unimrg.data.batches import GenerationBatch, TaskBatch
from unimrg.tasks import DEPTH, PIX, SEG, TASKS

# Paper, Appendix (prompt lists for the two new tasks), verbatim.
DEPTH_PROMPTS = (
    "Generate the depth map of this image.",
    "Produce a depth estimation for this image.",
    "Compute the depth map from this photograph.",
    "Extract depth information from this picture.",
    "Show me the depth map.",
    "What is the depth of this image?",
    "Provide the depth estimation.",
    "Perform depth estimation on this image.",
    "Apply monocular depth prediction.",
    "Generate per-pixel depth values.",
)
SEG_PROMPTS = (
    "Generate the segmentation mask of this image.",
    "Create a segmentation map for this image.",
    "Produce a semantic segmentation mask from this image.",
    "Segment this image into different regions.",
    "Predict the object masks in this image.",
    "Compute the segmentation from this photograph.",
    "Produce an object separation mask.",
    "Segment the foreground from background.",
    "Segment everything in this image.",
    "Generate automatic masks for all objects.",
)
# The paper reuses RecA's long list, which it does not reproduce; this is our own short list.
# `objective.prompt_file` replaces it: one prompt per line, or RecA's own consts.py as published
# (HorizonWind2004/reconstruction-alignment, Harmon/src/datasets/text2image/consts.py), read by
# ``load_prompt_file``.
PIX_PROMPTS = (
    "Generate original image for the input image.",
    "Reconstruct this image.",
    "Reproduce the input image exactly.",
    "Regenerate this picture as it is.",
    "Redraw the given image faithfully.",
    "Recreate this photograph.",
    "Output the same image.",
    "Generate an identical copy of this image.",
)

SCHEDULES = ("round_robin", "joint")


@dataclass
class ObjectiveConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})  # λ, all 1 in the paper
    # Official code: reconstruction prompt dropped (unconditional) with p=0.1; depth / seg never.
    uncond_prob: dict[str, float] = field(default_factory=lambda: {PIX: 0.1, DEPTH: 0.0, SEG: 0.0})
    # replaces the reconstruction prompts: a text file (one per line) or a Python file holding a string
    # list (RecA's consts.py; ``PATH::NAME`` picks one of several lists); see ``load_prompt_file``
    prompt_file: str = ""
    # "round_robin": each micro-step is one task's batch, an optimizer step covers every task
    # (the official code). "joint": every micro-step holds all tasks (Show-o, one forward per backward).
    schedule: str = "round_robin"

    def validate(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"objective.tasks={self.tasks}: each must be one of {list(TASKS)}, at least one")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"objective.tasks={self.tasks} lists a task twice")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"objective.schedule={self.schedule!r}: choose one of {SCHEDULES}")
        missing = [t for t in self.tasks if t not in self.weights]
        if missing:
            raise ValueError(f"objective.weights has no λ for {missing}")
        if self.prompt_file:
            path = _split_prompt_file(self.prompt_file)[0]
            if not Path(path).is_file():
                raise FileNotFoundError(f"objective.prompt_file={self.prompt_file}: no such file {path} (give a "
                                        "text file with one reconstruction prompt per line, or RecA's consts.py)")
            load_prompt_file(self.prompt_file)   # a file without prompts fails here (--dry-run), not in a rank


def _split_prompt_file(spec: str) -> tuple[str, str | None]:
    path, sep, name = spec.partition("::")
    return path, (name or None) if sep else None


def _string_list(node: ast.AST | None) -> tuple[str, ...] | None:
    """The strings of a list / tuple literal made only of string constants, else None."""
    if isinstance(node, (ast.List, ast.Tuple)) and node.elts and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return tuple(e.value for e in node.elts)
    return None


def python_string_lists(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Module-level string lists of a Python file, by name, found by parsing it (never executed):
    ``NAME = [...]`` (also annotated / tuple) and ``def NAME(): return [...]`` (the form of RecA's
    ``get_recon_prompt_list``)."""
    source = Path(path).read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as e:
        raise ValueError(f"objective.prompt_file={path}: not valid Python (line {e.lineno}: {e.msg}); give "
                         "RecA's consts.py as published or a text file with one prompt per line") from None
    found: dict[str, tuple[str, ...]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            values = _string_list(node.value)
            for target in node.targets:
                if values and isinstance(target, ast.Name):
                    found[target.id] = values
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if (values := _string_list(node.value)):
                found[node.target.id] = values
        elif isinstance(node, ast.FunctionDef):
            returns = [n for n in node.body if isinstance(n, ast.Return)]
            if len(returns) == 1 and (values := _string_list(returns[0].value)):
                found[node.name] = values
    return found


def load_prompt_file(spec: str) -> tuple[str, ...]:
    """Reconstruction prompts from ``objective.prompt_file``.

    A ``.py`` file (or ``PATH::NAME``) is parsed with ``ast``, never imported: RecA's ``consts.py`` as
    published (``def get_recon_prompt_list(): return [...]``) or any module-level ``NAME = [...]``. With
    several string lists the one whose name mentions "recon" is taken; ``PATH::NAME`` picks explicitly.
    Any other file: one prompt per line, blank lines skipped."""
    path, name = _split_prompt_file(spec)
    if name is None and Path(path).suffix != ".py":
        prompts = tuple(line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
        if not prompts:
            raise ValueError(f"objective.prompt_file={path}: no prompts (expected one reconstruction prompt per line)")
        return prompts
    lists = python_string_lists(path)
    if not lists:
        raise ValueError(f"objective.prompt_file={spec}: {path} holds no list of strings (expected NAME = [\"...\", "
                         "...] or def NAME(): return [...], as RecA's consts.py; or use a text file, one prompt per line)")
    if name is None:
        picks = [n for n in lists if "recon" in n.lower()] if len(lists) > 1 else list(lists)
        if len(picks) != 1:
            raise ValueError(f"objective.prompt_file={spec}: {path} holds several string lists ({', '.join(lists)}); "
                             f"pick one with objective.prompt_file={path}::NAME")
        name = picks[0]
    if name not in lists:
        raise ValueError(f"objective.prompt_file={spec}: {path} has no string list named {name!r} "
                         f"(it has: {', '.join(lists)})")
    prompts = tuple(p.strip() for p in lists[name] if p.strip())
    if not prompts:
        raise ValueError(f"objective.prompt_file={spec}: the list {name} in {path} holds only empty strings")
    return prompts


class Objective:
    """Owns the task order, prompt sampling (seeded, checkpointed) and the λ-weighted sum."""

    def __init__(self, cfg: ObjectiveConfig, seed: int):
        cfg.validate()
        self.cfg = cfg
        # Keep the canonical task order whatever order the recipe lists them in.
        self.tasks = [t for t in TASKS if t in cfg.tasks]
        self.prompts = {PIX: load_prompt_file(cfg.prompt_file) if cfg.prompt_file else PIX_PROMPTS,
                        DEPTH: DEPTH_PROMPTS, SEG: SEG_PROMPTS}
        self.rng = random.Random(seed)

    def micro_step_tasks(self, micro: int) -> list[str]:
        """Tasks whose batches make up micro-step ``micro`` of an optimizer step."""
        if self.cfg.schedule == "joint":
            return list(self.tasks)
        return [self.tasks[micro % len(self.tasks)]]

    def add_prompts(self, batch: TaskBatch) -> TaskBatch:
        if isinstance(batch, GenerationBatch):
            p_uncond = self.cfg.uncond_prob.get(batch.task, 0.0)
            batch.prompts = ["" if self.rng.random() < p_uncond else self.rng.choice(self.prompts[batch.task])
                             for _ in range(len(batch))]
        return batch

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.cfg.weights[t] * loss for t, loss in losses.items())

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])


def samples_per_task_per_step(cfg: ObjectiveConfig, micro_batch_per_task: int, grad_accum: int) -> int:
    """How many samples of each enabled task one rank sees in one optimizer step."""
    n = len(cfg.tasks)
    if cfg.schedule == "joint":
        return micro_batch_per_task * grad_accum
    return micro_batch_per_task * grad_accum // n

