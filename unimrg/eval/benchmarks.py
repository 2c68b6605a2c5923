"""Readers and scorers for the understanding benchmarks of UniMRG Table 1, from local copies in their
published formats (no network, nothing of theirs in git).

    python launch/submit.py --job eval --suite mmbench --benchmark /data/MMBench_DEV_EN.tsv --run-dir RUN
    python -m pytest -q tests/unit/test_eval_benchmarks.py

Each benchmark is a :class:`Benchmark`: ``read(path)`` → the questions as :class:`Item` (prompt, image
source, what scoring needs) plus the rows it had to skip (file, row, why); ``score(items, answers)`` →
the benchmark's own metrics from free-form greedy answers. Scoring is rule-based (no LLM judge): an answer
that names no option, or neither yes nor no, is wrong. Formats and rules, with where they are defined:

* ``mmbench`` — MMBench dev TSV as distributed for VLMEvalKit (``MMBench_DEV_EN.tsv``; columns index,
  question, hint, A–D…, answer, category, image as base64, or another row's index when the image repeats).
  Prompt ``Hint: …\\nQuestion: …\\nOptions:\\nA. …\\nPlease select the correct answer from the options
  above.`` (VLMEvalKit ``ImageMCQDataset.build_prompt``). CircularEval (MMBench paper, §3.2): a question
  counts only if it is answered right under every cyclic shift of its options. A TSV whose indices include
  the shifted copies (index + k·10⁶, as VLMEvalKit's circular TSVs) is scored on those groups; otherwise
  the shifts are generated here. Reports ``circular`` (the leaderboard number), ``vanilla`` (first pass)
  and per-category circular accuracy.
* ``mmvp`` — ``Questions.csv`` (Index, Question, Options like ``(a) Open (b) Closed``, Correct Answer) and
  ``MMVP Images/<Index>.jpg`` (github.com/tsb0601/MMVP). Questions come in pairs (Index 2k−1, 2k, same
  question, opposite answers); MMVP's score is the share of pairs with both right (``pair``), plus
  per-question ``accuracy``.
* ``hallusionbench`` — ``HallusionBench.json`` (github.com/tianyi-lab/HallusionBench; fields category,
  subcategory, set_id, figure_id, question_id, question, gt_answer "1"/"0", visual_input, filename) with
  images relative to the json's folder. Prompt: the question + `` Please answer yes or no.`` aAcc = all
  questions; fAcc = figures (category, subcategory, set_id, figure_id) whose questions are all right,
  leaving out VS questions without a figure; qAcc = questions (category, subcategory, set_id, question_id)
  right on every figure — the official ``get_eval_fig`` / ``get_eval_pair_all`` groupings. An answer that
  is neither yes nor no counts as right only for VS questions without a figure ("uncertain" is right there,
  as in the official ``assign_correctness``). Questions without a figure get a mid-grey image (the models
  here always take one).
* ``realworldqa`` — VLMEvalKit's ``RealWorldQA.tsv`` (multiple choice: scored like ``mmbench`` without
  shifts), or xAI's release as JSON/JSONL records {image, question, answer} whose question already holds
  the options and the instruction; the answer must match the reference (case and a trailing period aside,
  or the option letter it starts with).
* ``vsr`` — Visual Spatial Reasoning JSONL (github.com/cambridgeltl/visual-spatial-reasoning; fields image
  (a COCO 2017 file name), caption, label 0/1, relation); images from ``--image-root`` (default: an
  ``images/`` folder beside the file). Prompt: the caption as a statement to judge true (yes) or false
  (no). Accuracy, and per relation.
* ``cvbench`` — CV-Bench ``test.jsonl`` (huggingface.co/datasets/nyu-visionx/CV-Bench; fields idx, type,
  task, filename under the file's folder, prompt, answer like ``(A)``, source). The prompt field is used as
  is; the predicted option is the first ``(X)`` in the answer, else its first letter. Scores as the dataset
  card defines them: accuracy per source, 2D = mean(ADE20K, COCO), 3D = Omni3D, overall = mean(2D, 3D).
"""

from __future__ import annotations

import base64
import csv
import json
import re
import string
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CIRCULAR_OFFSET = 1_000_000   # VLMEvalKit: the k-th shifted copy of question i has index i + k·10⁶
BLANK = "blank"               # image source for questions without a figure


@dataclass
class Item:
    uid: str                  # unique; results are merged and scored in sorted uid order
    prompt: str
    image: Any                # Path | bytes (encoded file) | BLANK
    where: str                # "FILE row N", for messages
    meta: dict = field(default_factory=dict)


@dataclass
class Skip:
    where: str
    reason: str

    def as_dict(self) -> dict:
        return {"where": self.where, "reason": self.reason}


class RowError(ValueError):
    pass


def _need(row: dict, fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if row.get(f) is None or str(row.get(f)).strip() in ("", "nan")]
    if missing:
        raise RowError(f"missing field(s) {', '.join(missing)}")


def _present(value) -> bool:
    return value is not None and str(value).strip() not in ("", "nan", "None")


# ---- answer matching ---------------------------------------------------------------------------------
def match_option(answer: str, options: dict[str, str]) -> str | None:
    """The option an answer names, or None. First the letter: exactly one option letter standing alone
    ("B", "(B)", "B.", "Answer: B"); then the text: exactly one option's text inside the answer. The two
    rules VLMEvalKit tries before its LLM judge (``can_infer_option`` / ``can_infer_text``)."""
    letters = {m for m in re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", answer) if m in options}
    if len(letters) == 1:
        return letters.pop()
    low = answer.lower()
    hits = [k for k, v in options.items() if v and v.lower().strip() in low]
    return hits[0] if len(hits) == 1 else None


def yes_no(answer: str) -> str | None:
    """"yes" / "no" from the answer's words (the first that occurs), else None."""
    for w in re.findall(r"[a-z]+", answer.lower()):
        if w in ("yes", "no"):
            return w
    return None


def _acc(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ---- image sources -----------------------------------------------------------------------------------
def _b64(value: str, where: str) -> bytes:
    try:
        return base64.b64decode(value, validate=False)
    except (ValueError, TypeError) as e:
        raise RowError(f"image is not base64: {e}") from None


def _read_tsv(path: Path) -> list[dict]:
    csv.field_size_limit(sys.maxsize)   # base64 images are megabytes long
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _read_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else data.get("data", [])


# ---- multiple choice TSV (MMBench, RealWorldQA) --------------------------------------------------------
def mcq_prompt(question: str, options: dict[str, str], hint: str | None) -> str:
    text = f"Hint: {hint}\n" if hint else ""
    text += f"Question: {question}\n"
    text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
    return text + "Please select the correct answer from the options above. \n"


class MCQTable:
    """VLMEvalKit's multiple-choice TSV; ``circular`` adds MMBench's CircularEval."""

    name = "mcq"
    circular = False

    def read(self, path: Path, image_root: Path | None = None) -> tuple[list[Item], list[Skip]]:
        rows = _read_tsv(path)
        images = {str(r.get("index", "")).strip(): r.get("image") for r in rows}
        items, skipped = [], []
        has_copies = any(_present(r.get("index")) and str(r["index"]).strip().isdigit()
                         and int(r["index"]) >= CIRCULAR_OFFSET for r in rows)
        for n, row in enumerate(rows, start=2):   # row 1 is the header
            where = f"{path} row {n}"
            try:
                _need(row, ("index", "question", "answer", "image", "A", "B"), where)
                index = int(str(row["index"]).strip())
                options = {k: str(row[k]).strip() for k in string.ascii_uppercase if _present(row.get(k))}
                answer = str(row["answer"]).strip()
                if answer not in options:
                    raise RowError(f"answer {answer!r} is not one of the options {sorted(options)}")
                img = str(row["image"]).strip()
                if len(img) <= 64 and img in images:   # VLMEvalKit: a repeated image names its row's index
                    img = str(images[img]).strip()
                image = _b64(img, where)
                hint = str(row["hint"]).strip() if _present(row.get("hint")) else None
            except (RowError, ValueError) as e:
                skipped.append(Skip(where, str(e)))
                continue
            meta = {"answer": answer, "category": str(row.get("category") or "").strip(), "options": options}
            shifts = [0] if has_copies or not self.circular else range(len(options))
            for k in shifts:
                letters = list(options)
                # shift k: option letter j shows the text of option j + k (cyclic)
                shown = {letters[j]: options[letters[(j + k) % len(letters)]] for j in range(len(letters))}
                ans = letters[(letters.index(answer) - k) % len(letters)]
                group = index % CIRCULAR_OFFSET if has_copies else index
                uid = f"{index:09d}" if has_copies else f"{index:09d}.{k}"
                items.append(Item(uid, mcq_prompt(str(row["question"]).strip(), shown, hint), image, where,
                                  {**meta, "options": shown, "answer": ans, "group": group,
                                   "first": index < CIRCULAR_OFFSET and k == 0}))
        return items, skipped

    def correct(self, item: Item, answer: str) -> bool:
        return match_option(answer, item.meta["options"]) == item.meta["answer"]

    def score(self, items: Sequence[Item], answers: dict[str, str]) -> dict[str, float]:
        ok = {it.uid: self.correct(it, answers[it.uid]) for it in items if it.uid in answers}
        first = [ok[it.uid] for it in items if it.uid in ok and it.meta["first"]]
        out = {"vanilla": _acc(first)}
        if not self.circular:
            return {"accuracy": out["vanilla"]}
        groups: dict[int, list[bool]] = defaultdict(list)
        category: dict[int, str] = {}
        incomplete = set()
        for it in items:
            if it.uid not in ok:
                incomplete.add(it.meta["group"])   # a skipped shift: the question cannot be scored
            else:
                groups[it.meta["group"]].append(ok[it.uid])
                category.setdefault(it.meta["group"], it.meta["category"])
        circ = {g: all(v) for g, v in groups.items() if g not in incomplete}
        out["circular"] = _acc(list(circ.values()))
        by_cat: dict[str, list[bool]] = defaultdict(list)
        for g, v in circ.items():
            by_cat[category[g]].append(v)
        out.update({f"circular/{c}": _acc(v) for c, v in sorted(by_cat.items()) if c})
        return out


class MMBench(MCQTable):
    name = "mmbench"
    circular = True


class RealWorldQA(MCQTable):
    """VLMEvalKit TSV (multiple choice), or xAI's JSON/JSONL records."""

    name = "realworldqa"

    def read(self, path: Path, image_root: Path | None = None) -> tuple[list[Item], list[Skip]]:
        if path.suffix == ".tsv":
            return super().read(path, image_root)
        root = image_root or path.parent
        items, skipped = [], []
        for n, row in enumerate(_read_records(path), start=1):
            where = f"{path} record {n}"
            try:
                _need(row, ("image", "question", "answer"), where)
            except RowError as e:
                skipped.append(Skip(where, str(e)))
                continue
            items.append(Item(f"{n:09d}", str(row["question"]), root / str(row["image"]), where,
                              {"answer": str(row["answer"]).strip(), "first": True}))
        return items, skipped

    def correct(self, item: Item, answer: str) -> bool:
        if "options" in item.meta:
            return super().correct(item, answer)
        ref = item.meta["answer"].lower().rstrip(".")
        got = answer.strip().lower().rstrip(".")
        if len(ref) == 1 and ref.isalpha():   # a letter answer: the letter the answer starts with
            m = re.match(r"\(?([a-z])\b", got)
            return bool(m) and m.group(1) == ref
        return got == ref


# ---- MMVP ----------------------------------------------------------------------------------------------
class MMVP:
    name = "mmvp"
    instruction = "Answer with the option's letter from the given choices directly."

    def read(self, path: Path, image_root: Path | None = None) -> tuple[list[Item], list[Skip]]:
        csv_path = path / "Questions.csv" if path.is_dir() else path
        root = image_root or csv_path.parent / "MMVP Images"
        with csv_path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        items, skipped = [], []
        for n, row in enumerate(rows, start=2):
            where = f"{csv_path} row {n}"
            try:
                _need(row, ("Index", "Question", "Options", "Correct Answer"), where)
                index = int(str(row["Index"]).strip())
                options = {k.upper(): v.strip() for k, v in
                           re.findall(r"\(([a-z])\)\s*(.*?)\s*(?=\([a-z]\)|$)", row["Options"].strip())}
                answer = re.sub(r"[()\s]", "", row["Correct Answer"]).upper()
                if len(options) < 2 or answer not in options:
                    raise RowError(f"Options {row['Options']!r} / Correct Answer {row['Correct Answer']!r} "
                                   "are not '(a) … (b) …' / '(a)'")
            except (RowError, ValueError) as e:
                skipped.append(Skip(where, str(e)))
                continue
            prompt = f"{row['Question'].strip()} {row['Options'].strip()}\n{self.instruction}"
            items.append(Item(f"{index:06d}", prompt, root / f"{index}.jpg", where,
                              {"answer": answer, "options": options, "pair": (index - 1) // 2}))
        return items, skipped

    def score(self, items: Sequence[Item], answers: dict[str, str]) -> dict[str, float]:
        ok, pairs = {}, defaultdict(list)
        for it in items:
            if it.uid in answers:
                a = answers[it.uid]
                m = re.search(r"\(([a-zA-Z])\)", a)   # "(a)" first, then the option rules
                got = m.group(1).upper() if m and m.group(1).upper() in it.meta["options"] else \
                    match_option(a.upper() if len(a.strip()) == 1 else a, it.meta["options"])
                ok[it.uid] = got == it.meta["answer"]
            pairs[it.meta["pair"]].append(ok.get(it.uid))
        whole = [all(v) for v in pairs.values() if len(v) == 2 and None not in v]
        return {"pair": _acc(whole), "accuracy": _acc(list(ok.values()))}


# ---- HallusionBench -------------------------------------------------------------------------------------
class HallusionBench:
    name = "hallusionbench"

    def read(self, path: Path, image_root: Path | None = None) -> tuple[list[Item], list[Skip]]:
        root = image_root or path.parent
        items, skipped = [], []
        for n, row in enumerate(_read_records(path), start=1):
            where = f"{path} record {n}"
            try:
                _need(row, ("category", "subcategory", "set_id", "figure_id", "question_id", "question",
                            "gt_answer", "visual_input"), where)
                has_figure = str(row["visual_input"]).strip() != "0"
                if has_figure:
                    _need(row, ("filename",), where)
                if str(row["gt_answer"]).strip() not in ("0", "1"):
                    raise RowError(f"gt_answer {row['gt_answer']!r} is not '0' or '1'")
            except RowError as e:
                skipped.append(Skip(where, str(e)))
                continue
            image = root / str(row["filename"]).lstrip("./") if has_figure else BLANK
            key = (row["category"], row["subcategory"], str(row["set_id"]))
            items.append(Item(f"{n:06d}", f"{row['question'].strip()} Please answer yes or no.", image, where, {
                "gt": "yes" if str(row["gt_answer"]).strip() == "1" else "no",
                "figure": (*key, str(row["figure_id"])), "question": (*key, str(row["question_id"])),
                "no_figure": row["category"] == "VS" and str(row["figure_id"]) == "0"}))
        return items, skipped

    def score(self, items: Sequence[Item], answers: dict[str, str]) -> dict[str, float]:
        ok, figs, qs = [], defaultdict(list), defaultdict(list)
        for it in items:
            if it.uid not in answers:
                continue
            got = yes_no(answers[it.uid])
            right = got == it.meta["gt"] or (got is None and it.meta["no_figure"])
            ok.append(right)
            qs[it.meta["question"]].append(right)
            if not it.meta["no_figure"]:
                figs[it.meta["figure"]].append(right)
        return {"aAcc": _acc(ok), "fAcc": _acc([all(v) for v in figs.values()]),
                "qAcc": _acc([all(v) for v in qs.values()])}


# ---- VSR -----------------------------------------------------------------------------------------------
class VSR:
    name = "vsr"

    def read(self, path: Path, image_root: Path | None = None) -> tuple[list[Item], list[Skip]]:
        root = image_root or path.parent / "images"
        items, skipped = [], []
        for n, row in enumerate(_read_records(path), start=1):
            where = f"{path} record {n}"
            try:
                _need(row, ("image", "caption", "label"), where)
                label = int(row["label"])
            except (RowError, ValueError) as e:
                skipped.append(Skip(where, str(e)))
                continue
            prompt = (f"Is the following statement about the image true? \"{row['caption'].strip()}\" "
                      "Please answer yes or no.")
            items.append(Item(f"{n:06d}", prompt, root / str(row["image"]), where,
                              {"gt": "yes" if label == 1 else "no", "relation": str(row.get("relation", ""))}))
        return items, skipped

    def score(self, items: Sequence[Item], answers: dict[str, str]) -> dict[str, float]:
        ok, by_rel = [], defaultdict(list)
        for it in items:
            if it.uid in answers:
                right = yes_no(answers[it.uid]) == it.meta["gt"]
                ok.append(right)
                by_rel[it.meta["relation"]].append(right)
        return {"accuracy": _acc(ok), **{f"accuracy/{r}": _acc(v) for r, v in sorted(by_rel.items()) if r}}


# ---- CV-Bench ------------------------------------------------------------------------------------------
class CVBench:
    name = "cvbench"

    def read(self, path: Path, image_root: Path | None = None) -> tuple[list[Item], list[Skip]]:
        path = path / "test.jsonl" if path.is_dir() else path
        root = image_root or path.parent
        items, skipped = [], []
        for n, row in enumerate(_read_records(path), start=1):
            where = f"{path} record {n}"
            try:
                _need(row, ("idx", "filename", "prompt", "answer", "source", "task"), where)
            except RowError as e:
                skipped.append(Skip(where, str(e)))
                continue
            items.append(Item(f"{int(row['idx']):06d}", str(row["prompt"]), root / str(row["filename"]), where,
                              {"answer": str(row["answer"]).strip().strip("()").upper(), "source": row["source"],
                               "task": row["task"]}))
        return items, skipped

    @staticmethod
    def predicted(answer: str) -> str | None:
        m = re.search(r"\(([A-Za-z])\)", answer)
        if m:
            return m.group(1).upper()
        s = answer.strip()
        return s[0].upper() if s else None

    def score(self, items: Sequence[Item], answers: dict[str, str]) -> dict[str, float]:
        by_src, by_task = defaultdict(list), defaultdict(list)
        for it in items:
            if it.uid in answers:
                right = self.predicted(answers[it.uid]) == it.meta["answer"]
                by_src[it.meta["source"]].append(right)
                by_task[it.meta["task"]].append(right)
        src = {s: _acc(v) for s, v in by_src.items()}
        two_d = _acc([src[s] for s in ("ADE20K", "COCO") if s in src]) if {"ADE20K", "COCO"} & set(src) \
            else float("nan")
        three_d = src.get("Omni3D", float("nan"))
        overall = (two_d + three_d) / 2
        return {"overall": overall, "2D": two_d, "3D": three_d, **{f"source/{s}": v for s, v in sorted(src.items())},
                **{f"task/{t}": _acc(v) for t, v in sorted(by_task.items())}}


BENCHMARKS = {b.name: b for b in (MMBench, MMVP, HallusionBench, RealWorldQA, VSR, CVBench)}


def get(name: str):
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]()


def open_image(source, where: str):
    """An item's image as an RGB PIL image; ``RowError`` names the row when it cannot be read."""
    from PIL import Image

    from unimrg.data.images import decode_rgb, read_rgb
    try:
        if source == BLANK:
            return Image.new("RGB", (448, 448), (128, 128, 128))
        if isinstance(source, bytes):
            return decode_rgb(source, "the row's image")
        return read_rgb(source)[1]
    except (OSError, ValueError) as e:
        # no object addresses (PIL names its BytesIO): the report must not depend on the process
        raise RowError(f"{where}: unreadable image: {re.sub(r' ?<[^<>]* at 0x[0-9a-fA-F]+>', '', str(e))}") from None
