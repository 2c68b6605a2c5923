"""The paper's Table 3 (ablation over training tasks) from finished run folders, mean ± std over seeds.

    python -m unimrg.eval.table runs/t3_harmon                 (a `--sweep table3` folder: its sweep.json)
    python -m unimrg.eval.table runs/t3_harmon/und/seed0 runs/other_run ...   (run folders)
    python -m unimrg.eval.table runs/t3_harmon --markdown table.md

Rows are the task sets the runs trained (``objective.tasks`` of each RUN/config.yaml) in the paper's order
(und; und + pix; und + pix + depth; und + pix + depth + seg), one per model; the runs of a row are its
seeds. Columns come from each run's end-of-run ``scenes`` suite (RUN/eval/scenes.json, unimrg/eval/job.py)
on the held-out generated scenes; ``COLUMNS`` says how the question types of ``unimrg.data.scenes`` are
grouped:

* spatial       = mean of the ``closer`` (which of two objects is nearer) and ``left_right`` accuracies
* counting      = the ``count`` accuracy
* hallucination = mean of the ``exists`` (an object that is there: "yes") and ``hallucination`` (an object
  that is not: "no", ``unimrg.eval.metrics.question_type``) accuracies — POPE-style, so a model that
  always answers "yes" (or always "no") scores 50 %
* depth sim / seg F1 / recon PSNR = depth_similarity, seg_boundary_f1, recon_psnr of the generated maps
  (every row generates all three, also for the tasks it did not train)

A run is finished when it has final weights (RUN/final/model.pt) and RUN/eval/scenes.json. Every run given
(or listed in a sweep.json) that is not is named below the table with what it lacks (never started, the
step it reached, no evaluation), its row is marked with ``*`` and counts only its finished seeds, and the
command exits with status 1 (0 when every run is finished; 2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from unimrg.tasks import TASKS

# column -> (header, scenes.json metrics averaged into it, scale for display, unit)
COLUMNS = {
    "spatial": ("spatial", ("und_accuracy/closer", "und_accuracy/left_right"), 100, "%"),
    "counting": ("counting", ("und_accuracy/count",), 100, "%"),
    "hallucination": ("halluc.", ("und_accuracy/exists", "und_accuracy/hallucination"), 100, "%"),
    "depth_similarity": ("depth sim", ("depth_similarity",), 100, "%"),
    "seg_boundary_f1": ("seg F1", ("seg_boundary_f1",), 100, "%"),
    "recon_psnr": ("recon PSNR", ("recon_psnr",), 1, "dB"),
}


@dataclass
class Run:
    path: Path
    model: str = "?"
    tasks: tuple[str, ...] = ()
    seed: int | None = None
    values: dict[str, float] = field(default_factory=dict)
    missing: str = ""            # empty when finished


def column_values(metrics: dict) -> dict[str, float]:
    """scenes.json metrics → the table's columns (a column whose metrics are all absent is left out)."""
    out = {}
    for col, (_, keys, _, _) in COLUMNS.items():
        vals = [metrics[k] for k in keys if metrics.get(k) is not None]
        if vals:
            out[col] = sum(vals) / len(vals)
    return out


def read_run(path: Path, expect: dict | None = None) -> Run:
    """One run folder; ``expect`` (a sweep.json job) names the row and seed of a run that never started."""
    from omegaconf import OmegaConf
    run = Run(path)
    if expect:
        run.model, run.seed = expect["model"], expect["seed"]
        run.tasks = tuple(expect["tasks"])
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        run.missing = "never started (no config.yaml)"
        return run
    cfg = OmegaConf.load(cfg_path)
    run.model = str(cfg.model.name)
    run.tasks = tuple(t for t in TASKS if t in list(cfg.objective.tasks))
    run.seed = int(cfg.train.get("seed", 0))
    if not (path / "final" / "model.pt").is_file():
        run.missing = f"training unfinished (reached step {last_step(path)} of {cfg.train.steps}; no final/model.pt)"
        return run
    scenes = path / "eval" / "scenes.json"
    if not scenes.is_file():
        run.missing = ("not evaluated (no eval/scenes.json: python launch/submit.py --job eval --suite scenes "
                       f"--run-dir {path} --cluster local)")
        return run
    try:
        run.values = column_values(json.loads(scenes.read_text())["metrics"])
    except (ValueError, KeyError, TypeError) as e:   # cut short or hand-edited: name it, as a missing run
        run.missing = f"unreadable eval/scenes.json ({type(e).__name__}: {e}); re-run the scenes suite"
    return run


def last_step(path: Path) -> int:
    """The last step rank 0 logged (0 if none)."""
    log = path / "metrics" / "rank0.jsonl"
    step = 0
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                step = max(step, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue
    return step


def collect(paths: list[Path]) -> list[Run]:
    """Runs from run folders and sweep folders (every job of their sweep.json, started or not)."""
    runs = []
    for p in paths:
        manifest = p / "sweep.json"
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            runs += [read_run(Path(job["run_dir"]), {"model": m["model"], **job}) for job in m["jobs"]]
        else:   # a run folder, started or not (then named as missing)
            runs.append(read_run(p))
    return runs


def fmt(vals: list[float], scale: float) -> str:
    if not vals:
        return "n/a"
    vals = [v * scale for v in vals]
    mean = sum(vals) / len(vals)
    digits = 1
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def row_key(run: Run) -> tuple:
    # paper order: by model, then by how many tasks (und; +pix; +depth; +seg), then the task order itself
    return (run.model, len(run.tasks), [TASKS.index(t) for t in run.tasks])


def render(runs: list[Run]) -> str:
    """The Markdown table, then the missing runs (if any)."""
    rows: dict[tuple, list[Run]] = {}
    for r in sorted(runs, key=row_key):
        rows.setdefault((r.model, r.tasks), []).append(r)
    heads = ["model", *TASKS, *(COLUMNS[c][0] + (" (dB)" if COLUMNS[c][3] == "dB" else " (%)") for c in COLUMNS),
             "seeds"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for (model, tasks), rs in rows.items():
        done = [r for r in rs if not r.missing]
        cells = [model + (" *" if len(done) < len(rs) else ""), *("✓" if t in tasks else "" for t in TASKS)]
        for c, (_, _, scale, _) in COLUMNS.items():
            cells.append(fmt([r.values[c] for r in done if c in r.values], scale))
        seeds = sorted(r.seed for r in done if r.seed is not None)
        cells.append(f"{len(done)}/{len(rs)}" + (f" ({','.join(map(str, seeds))})" if seeds else ""))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\nmean ± sample std over the finished seeds (one seed: its value); " \
        "spatial = closer + left_right, hallucination = exists + absent-object (POPE-style), accuracies on " \
        "held-out generated scenes (unimrg/eval/table.py)\n"
    missing = [r for r in runs if r.missing]
    if missing:
        text += f"\n* incomplete row: {len(missing)} run(s) missing or unfinished, not in the numbers above:\n"
        text += "".join(f"  - {r.path} ({r.model}, {' + '.join(r.tasks) or '?'}, seed {r.seed}): {r.missing}\n"
                        for r in missing)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders and/or `--sweep` folders (with sweep.json)")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    a = ap.parse_args(argv)
    try:
        runs = collect(a.runs)
    except (ValueError, KeyError, OSError) as e:   # an unreadable sweep.json
        print(f"unimrg.eval.table: error: {e}", file=sys.stderr)
        return 2
    text = render(runs)
    print(text, end="")
    if a.markdown:
        a.markdown.write_text(text)
    return 1 if any(r.missing for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
