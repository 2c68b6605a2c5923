"""Prompt sampling, schedules and the λ-weighted sum."""

import re

import pytest
import torch

from unimrg.data.batches import GenerationBatch, UnderstandingBatch
from unimrg.objective import (DEPTH_PROMPTS, PIX_PROMPTS, SEG_PROMPTS, Objective, ObjectiveConfig,
                              load_prompt_file)


def gen(task, n=200):
    return GenerationBatch(task=task, images=torch.zeros(n, 3, 8, 8, dtype=torch.uint8),
                           targets=torch.zeros(n, 3, 8, 8))


def test_prompts_come_from_the_task_lists_and_only_pix_is_dropped():
    obj = Objective(ObjectiveConfig(), seed=0)
    depth, seg, pix = (obj.add_prompts(gen(t)).prompts for t in ("depth", "seg", "pix"))
    assert set(depth) <= set(DEPTH_PROMPTS) and len(set(depth)) == len(DEPTH_PROMPTS)
    assert set(seg) <= set(SEG_PROMPTS)
    assert set(pix) - {""} <= set(PIX_PROMPTS)
    dropped = pix.count("") / len(pix)
    assert 0.03 < dropped < 0.2          # p = 0.1


def test_prompt_file_replaces_reconstruction_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Make it again.\n\nCopy this.\n")
    obj = Objective(ObjectiveConfig(prompt_file=str(f), uncond_prob={"pix": 0.0}), seed=0)
    assert set(obj.add_prompts(gen("pix")).prompts) == {"Make it again.", "Copy this."}


def test_prompt_file_reads_recas_consts_py_as_published_without_running_it(tmp_path):
    # RecA's consts.py (HorizonWind2004/reconstruction-alignment) is `def get_recon_prompt_list(): return [...]`;
    # a small stand-in in the same syntax (the real list stays out of the repo). The statement that would
    # create a file if executed proves it is parsed, not run.
    marker = tmp_path / "executed"
    consts = tmp_path / "consts.py"
    consts.write_text(f"open({str(marker)!r}, 'w')\n"
                      "def get_recon_prompt_list():\n"
                      "    return [\"Describe every detail in the image\",\n"
                      "        \"Break down the image\u2019s components thoroughly\",\n]\n",
                      encoding="utf-8")
    obj = Objective(ObjectiveConfig(prompt_file=str(consts), uncond_prob={"pix": 0.0}), seed=0)
    assert set(obj.add_prompts(gen("pix")).prompts) == {"Describe every detail in the image",
                                                         "Break down the image\u2019s components thoroughly"}
    assert not marker.exists()


def test_prompt_file_python_assignments_picks_and_errors(tmp_path):
    two = tmp_path / "two.py"
    two.write_text("OTHER = ['a', 'b']\nRECON_PROMPTS: list = ['Rebuild it.']\nN = 3\n")
    assert load_prompt_file(str(two)) == ("Rebuild it.",)                 # the one named recon*
    assert load_prompt_file(f"{two}::OTHER") == ("a", "b")                  # PATH::NAME picks
    with pytest.raises(ValueError, match="no string list named 'NOPE'.*OTHER, RECON_PROMPTS"):
        load_prompt_file(f"{two}::NOPE")
    many = tmp_path / "many.py"
    many.write_text("A = ['x']\nB = ('y',)\n")
    with pytest.raises(ValueError, match=r"several string lists \(A, B\).*::NAME"):
        ObjectiveConfig(prompt_file=str(many)).validate()
    none = tmp_path / "none.py"
    none.write_text("PROMPTS = [f'{x}' for x in 'ab']\nN = [1, 2]\n")   # nothing literal: not guessed at
    with pytest.raises(ValueError, match=re.escape(str(none)) + ".*holds no list of strings"):
        ObjectiveConfig(prompt_file=str(none)).validate()
    bad = tmp_path / "bad.py"
    bad.write_text("PROMPTS = ['a',\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}: not valid Python")):
        load_prompt_file(str(bad))
    with pytest.raises(FileNotFoundError, match="no such file"):
        ObjectiveConfig(prompt_file=str(tmp_path / "missing.py::X")).validate()


def test_understanding_batch_untouched_and_prompt_rng_resumes():
    obj = Objective(ObjectiveConfig(), seed=3)
    ub = UnderstandingBatch(images=torch.zeros(1, 3, 8, 8, dtype=torch.uint8), conversations=[[]])
    assert obj.add_prompts(ub) is ub
    state = obj.state_dict()
    a = obj.add_prompts(gen("depth", 5)).prompts
    obj.load_state_dict(state)
    assert obj.add_prompts(gen("depth", 5)).prompts == a


def test_schedules_and_weights():
    rr = Objective(ObjectiveConfig(tasks=["seg", "und"]), seed=0)
    assert [rr.micro_step_tasks(m) for m in range(4)] == [["und"], ["seg"], ["und"], ["seg"]]
    joint = Objective(ObjectiveConfig(schedule="joint", weights={"und": 1.0, "pix": 0.5, "depth": 1, "seg": 1}), 0)
    assert joint.micro_step_tasks(0) == ["und", "pix", "depth", "seg"]
    total = joint.total({"und": torch.tensor(2.0), "pix": torch.tensor(4.0)})
    assert total.item() == 4.0
