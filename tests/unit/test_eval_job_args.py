"""``--job eval`` argument handling without starting ranks: refusals name what is wrong, the run's config is
resolved into RUN/eval/config.yaml, and the SLURM task object pickles.

    python -m pytest -q tests/unit/test_eval_job_args.py
"""

from __future__ import annotations

import pickle

import pytest
from PIL import Image

from launch.evaluate import job_argv, write_config
from launch.slurm import EvalJob
from launch.submit import main, parse_args
from unimrg.config import load_resolved
from unimrg.eval.job import build_units, parse_args as job_args


def test_refusals_are_named(tmp_path, capsys):
    assert main(["--job", "eval", "--suite", "nope", "--run-dir", str(tmp_path)]) == 2
    assert "--suite, one of scenes" in capsys.readouterr().err
    assert main(["--job", "eval", "--suite", "scenes"]) == 2
    assert "--run-dir" in capsys.readouterr().err
    assert main(["--job", "eval", "--suite", "scenes", "--run-dir", str(tmp_path), "model.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_run_config_with_overrides_and_job_arguments(tmp_path):
    run = tmp_path / "run"
    args = parse_args(["--job", "eval", "--suite", "mmbench", "--benchmark", "b.tsv", "--run-dir", str(run),
                       "--gpus-per-node", "0", "model.image_size=64", "--", "--limit", "5"])
    cfg_path = write_config(args, run)               # a new RUN: --model / --recipe (tiny) + overrides
    cfg = load_resolved(cfg_path)
    assert cfg.model.image_size == 64 and cfg.run.dir == str(run)
    (run / "config.yaml").write_text(cfg_path.read_text())
    args.overrides = ["model.image_size=32"]          # an existing RUN: its config, overrides on top
    assert load_resolved(write_config(args, run)).model.image_size == 32
    argv = job_argv(args, cfg_path)
    assert argv == ["--config", str(cfg_path), "--suite", "mmbench", "--weights", "auto", "--benchmark", "b.tsv",
                    "--limit", "5"]
    assert pickle.loads(pickle.dumps(EvalJob(argv))).argv == argv   # submitit pickles what each task runs


def test_map_suite_on_a_folder_needs_its_target_maker(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    cfg_path = write_config(parse_args(["--job", "eval", "--suite", "scenes", "--run-dir", str(tmp_path / "r"),
                                        "--gpus-per-node", "0"]), tmp_path / "r")
    cfg = load_resolved(cfg_path)
    with pytest.raises(ValueError, match="--depth-model"):
        build_units(job_args(["--config", "x", "--suite", "depth_similarity", "--images", str(tmp_path)]), cfg)
    units, _, _ = build_units(job_args(["--config", "x", "--suite", "recon_psnr", "--images", str(tmp_path)]), cfg)
    assert [u.uid for u in units] == ["a.png"] and units[0].tasks == ("pix",)
    with pytest.raises(ValueError, match="needs --benchmark"):
        build_units(job_args(["--config", "x", "--suite", "vsr"]), cfg)


@pytest.mark.parametrize("model", ["openuni", "harmon", "showo", "janus"])
def test_scenes_suite_refuses_a_token_limit_that_cuts_its_answers(model):
    """A limit below the longest scene answer scored right answers wrong (closer accuracy 12 %): refused, with
    the number to use; the default and the demo's in-training limit leave room."""
    from unimrg.config import load_config, recipe_path
    from unimrg.data.scenes import make_scene
    from unimrg.eval.job import check_answer_room
    from unimrg.models import registry
    cfg = load_config(recipe_path(model, "tiny"), ["model.base=none"], model=model)
    m = registry.adapter_class(model)(cfg.model)
    answers = [t["value"] for i in range(64) for t in make_scene(0, 1_000_000 + i, 16).conversation[1::2]]
    answers.append("The yellow cylinder.")   # the longest answer the scenes can have
    with pytest.raises(ValueError, match=r"--max-new-tokens 16 cuts scene answers: .* use --max-new-tokens \d+"):
        check_answer_room(m, answers, 16)
    suite_default = job_args(["--config", "x", "--suite", "scenes"]).max_new_tokens
    demo_in_training = load_config(recipe_path("openuni", "demo"), []).eval.max_new_tokens
    check_answer_room(m, answers, suite_default)
    check_answer_room(m, answers, demo_in_training)
