"""Benchmark readers and scorers on tiny fixtures written here in each benchmark's published schema; the
expected scores are worked out by hand in the comments.

    python -m pytest -q tests/unit/test_eval_benchmarks.py
"""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from unimrg.eval import benchmarks as B


def png(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def write_tsv(path, rows, fields):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})


MMB_FIELDS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
              "comment", "split"]


def mmbench_rows():
    img = base64.b64encode(png()).decode()
    return [
        {"index": 1, "question": "Which animal?", "hint": "A farm.", "A": "cat", "B": "dog", "C": "cow", "D": "pig",
         "answer": "B", "category": "animals", "image": img, "split": "dev"},
        {"index": 2, "question": "Is it red?", "A": "yes", "B": "no", "answer": "A", "category": "color",
         "image": img, "split": "dev"},
        # image given as the index of the row that holds it (VLMEvalKit's repeated-image convention)
        {"index": 3, "question": "How many?", "A": "one", "B": "two", "C": "three", "answer": "C",
         "category": "count", "image": "1", "split": "dev"},
        {"index": 4, "question": "No answer field", "A": "x", "B": "y", "category": "count", "image": img},
    ]


def test_mmbench_prompt_shifts_and_circular_score(tmp_path):
    path = tmp_path / "MMBench_DEV_EN.tsv"
    write_tsv(path, mmbench_rows(), MMB_FIELDS)
    bench = B.get("mmbench")
    items, skipped = bench.read(path)
    assert [s.where for s in skipped] == [f"{path} row 5"] and "answer" in skipped[0].reason
    by = {it.uid: it for it in items}
    assert len(items) == 4 + 2 + 3   # one item per cyclic shift of the options
    assert by["000000001.0"].prompt == ("Hint: A farm.\nQuestion: Which animal?\nOptions:\nA. cat\nB. dog\nC. cow\n"
                                        "D. pig\nPlease select the correct answer from the options above. \n")
    # shift 1: A shows option B's text ("dog"), so the right letter becomes A
    assert "A. dog\nB. cow\nC. pig\nD. cat\n" in by["000000001.1"].prompt and by["000000001.1"].meta["answer"] == "A"
    assert by["000000003.0"].image == by["000000001.0"].image        # resolved through row 1
    assert B.open_image(by["000000003.2"].image, "x").size == (8, 8)
    answers = {}
    for k in range(4):   # question 1: the right option's text every time → right under all shifts
        answers[f"000000001.{k}"] = "It is a dog."
    answers["000000002.0"] = "A"          # right
    answers["000000002.1"] = "A"          # wrong: after the shift the right letter is B
    answers["000000003.0"] = "The answer is (C)."   # right
    answers["000000003.1"] = "I don't know"         # names no option: wrong
    answers["000000003.2"] = "C"                    # after shift 2 the right letter is A: wrong
    got = bench.score(items, answers)
    # vanilla: first pass of 1, 2, 3 all right = 3/3; circular: only question 1 survives = 1/3
    assert got["vanilla"] == 1.0
    assert got["circular"] == pytest.approx(1 / 3)
    assert got["circular/animals"] == 1.0 and got["circular/color"] == 0.0 and got["circular/count"] == 0.0


def test_mmbench_tsv_with_circular_copies(tmp_path):
    img = base64.b64encode(png()).decode()
    rows = [{"index": 7, "question": "Q", "A": "red", "B": "blue", "answer": "A", "category": "c", "image": img},
            {"index": 1_000_007, "question": "Q", "A": "blue", "B": "red", "answer": "B", "category": "c",
             "image": "7"},
            {"index": 8, "question": "Q2", "A": "up", "B": "down", "answer": "B", "category": "c", "image": img},
            {"index": 1_000_008, "question": "Q2", "A": "down", "B": "up", "answer": "A", "category": "c",
             "image": "8"}]
    path = tmp_path / "mmb.tsv"
    write_tsv(path, rows, MMB_FIELDS)
    bench = B.get("mmbench")
    items, skipped = bench.read(path)
    assert not skipped and len(items) == 4   # the copies are the shifts: none generated
    # question 7: right, then wrong on its copy; question 8: right on both → circular 1/2, vanilla 2/2
    got = bench.score(items, {"000000007": "A", "001000007": "A", "000000008": "B", "001000008": "A"})
    assert got["vanilla"] == 1.0 and got["circular"] == 0.5


def test_option_matching_rules():
    opts = {"A": "red apple", "B": "green pear", "C": "blue sky"}
    assert B.match_option("B", opts) == "B"
    assert B.match_option("(C) blue sky", opts) == "C"
    assert B.match_option("Answer: A.", opts) == "A"
    assert B.match_option("it is a green pear", opts) == "B"   # lower-case "a" is an article, not option A
    assert B.match_option("A or B", opts) is None               # two letters: nothing inferred
    assert B.match_option("purple", opts) is None


def test_mmvp_pairs(tmp_path):
    (tmp_path / "MMVP Images").mkdir()
    rows = [("1", "Is the door open or closed?", "(a) Open (b) Closed", "(a)"),
            ("2", "Is the door open or closed?", "(a) Open (b) Closed", "(b)"),
            ("3", "Which way does the arrow point?", "(a) Left (b) Right", "(b)"),
            ("4", "Which way does the arrow point?", "(a) Left (b) Right", "(a)"),
            ("5", "Missing answer", "(a) x (b) y", "")]
    with (tmp_path / "Questions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index", "Question", "Options", "Correct Answer"])
        w.writerows(rows)
    bench = B.get("mmvp")
    items, skipped = bench.read(tmp_path)
    assert len(items) == 4 and skipped[0].where == f"{tmp_path / 'Questions.csv'} row 6"
    assert items[0].image == tmp_path / "MMVP Images" / "1.jpg"
    assert items[0].prompt.startswith("Is the door open or closed? (a) Open (b) Closed\n")
    # pair 1 both right ("(a)", "b"); pair 2: right then wrong → pair 1/2, questions 3/4
    got = bench.score(items, {"000001": "(a)", "000002": "b", "000003": "(b) Right", "000004": "Right"})
    assert got == {"pair": 0.5, "accuracy": 0.75}


def test_hallusionbench_three_accuracies(tmp_path):
    def rec(cat, sub, set_id, fig, q, gt, vis=1):
        return {"category": cat, "subcategory": sub, "visual_input": str(vis), "set_id": str(set_id),
                "figure_id": str(fig), "sample_note": "", "question_id": str(q), "question": f"Q{q}?",
                "gt_answer_details": "", "gt_answer": str(gt),
                "filename": f"./hallusion_bench/{cat}/{sub}/{set_id}_{fig}.png" if vis else None}
    data = [rec("VD", "illusion", 0, 0, 0, 1), rec("VD", "illusion", 0, 1, 0, 0),
            rec("VD", "illusion", 0, 0, 1, 1), rec("VD", "illusion", 0, 1, 1, 1),
            rec("VS", "chart", 1, 0, 0, 1, vis=0), rec("VS", "chart", 1, 1, 0, 0)]
    bad = rec("VD", "illusion", 2, 0, 0, 1)
    del bad["question"]
    path = tmp_path / "HallusionBench.json"
    path.write_text(json.dumps(data + [bad]))
    bench = B.get("hallusionbench")
    items, skipped = bench.read(path)
    assert len(items) == 6 and skipped[0].where == f"{path} record 7" and "question" in skipped[0].reason
    assert items[0].image == tmp_path / "hallusion_bench/VD/illusion/0_0.png" and items[4].image == B.BLANK
    assert items[0].prompt == "Q0? Please answer yes or no."
    answers = dict(zip([it.uid for it in items],
                       ["Yes", "Yes", "yes, it is", "Yes", "I am not sure", "No."]))
    # right: ✓ ✗ ✓ ✓ ✓(no figure, uncertain) ✓ → aAcc 5/6
    # figures (VS without figure left out): VD/0/fig0 {✓✓} ✓, VD/0/fig1 {✗✓} ✗, VS/1/fig1 {✓} ✓ → fAcc 2/3
    # questions: VD/0/q0 {✓✗} ✗, VD/0/q1 {✓✓} ✓, VS/1/q0 {✓✓} ✓ → qAcc 2/3
    got = bench.score(items, answers)
    assert got == pytest.approx({"aAcc": 5 / 6, "fAcc": 2 / 3, "qAcc": 2 / 3})


def test_realworldqa_vsr_cvbench(tmp_path):
    (tmp_path / "rw.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"image": "a.jpg", "question": "Which? A. x B. y Please answer directly with only the letter.",
         "answer": "A"},
        {"image": "b.jpg", "question": "Which? A. x B. y", "answer": "B"},
        {"image": "c.jpg", "answer": "B"}]) + "\n")
    rw = B.get("realworldqa")
    items, skipped = rw.read(tmp_path / "rw.jsonl")
    assert len(items) == 2 and "question" in skipped[0].reason
    assert rw.score(items, {"000000001": "A.", "000000002": "C"}) == {"accuracy": 0.5}   # 1 of 2

    (tmp_path / "vsr.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"image": "1.jpg", "caption": "The cat is on the table.", "label": 1, "relation": "on"},
        {"image": "2.jpg", "caption": "The dog is left of the car.", "label": 0, "relation": "left of"},
        {"image": "3.jpg", "caption": "The cup is on the book.", "label": 1, "relation": "on"},
        {"image": "4.jpg", "caption": "no label"}]) + "\n")
    vsr = B.get("vsr")
    items, skipped = vsr.read(tmp_path / "vsr.jsonl")
    assert len(items) == 3 and skipped[0].where.endswith("record 4")
    assert items[0].image == tmp_path / "images" / "1.jpg" and '"The cat is on the table."' in items[0].prompt
    got = vsr.score(items, {"000001": "yes", "000002": "Yes.", "000003": "Yes"})
    assert got == pytest.approx({"accuracy": 2 / 3, "accuracy/left of": 0.0, "accuracy/on": 1.0})

    recs = [(0, "ADE20K", "Count", "(A)", "(A) 3"), (1, "ADE20K", "Relation", "(B)", "A"),
            (2, "COCO", "Count", "(C)", "C"), (3, "Omni3D", "Depth", "(A)", "The answer is (A)"),
            (4, "Omni3D", "Distance", "(B)", "(A)")]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps({
        "idx": i, "type": "3D" if s == "Omni3D" else "2D", "task": t, "image": f"img/{i}.png",
        "filename": f"img/{i}.png", "question": "q", "choices": ["x", "y", "z"], "answer": a,
        "prompt": f"q{i}\nAnswer with the option's letter from the given choices directly.", "source": s,
        "source_dataset": s, "source_filename": "", "target_class": None, "target_size": None, "bbox": None})
        for i, s, t, a, _ in recs) + "\n")
    cv = B.get("cvbench")
    items, skipped = cv.read(tmp_path)
    assert len(items) == 5 and not skipped and items[0].image == tmp_path / "img/0.png"
    got = cv.score(items, {f"{i:06d}": p for i, *_, p in recs})
    # ADE20K 1/2, COCO 1/1 → 2D 0.75; Omni3D 1/2 → 3D 0.5; overall 0.625
    assert got["2D"] == 0.75 and got["3D"] == 0.5 and got["overall"] == 0.625
    assert got["task/Count"] == 1.0 and got["task/Relation"] == 0.0


def test_unreadable_image_names_the_row(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(B.RowError, match="row 3"):
        B.open_image(tmp_path / "broken.jpg", "bench.tsv row 3")
    with pytest.raises(B.RowError, match="row 4"):
        B.open_image(b"\x00garbage", "bench.tsv row 4")
