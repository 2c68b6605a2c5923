"""Prompt sampling, schedules and the λ-weighted sum."""

import torch

from unimrg.data.batches import GenerationBatch, UnderstandingBatch
from unimrg.objective import DEPTH_PROMPTS, PIX_PROMPTS, SEG_PROMPTS, Objective, ObjectiveConfig


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
