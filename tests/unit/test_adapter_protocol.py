"""The adapter protocol (unimrg/models/base.py), checked the same way for every name in the registry:
full-size meta build (parameter counts printed), incomplete full-size loads refused by name, wrapper
prefixes, the tiny official-layout round trip (bit-identical, tied weights kept), seeded sampling, the
eval CLIs, stage-frozen modules in eval mode, and (slow) a real training run → consolidated weights →
export CLI → reload → identical.

    python -m pytest -q -s tests/unit/test_adapter_protocol.py
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from unimrg.config import ConfigError, load_resolved, read_recipe, recipe_path
from unimrg.models import registry
from unimrg.models.base import UMMAdapter
from unimrg.models.official_io import LoadReport, read_state_dict, tied_aliases

NAMES = registry.names()
REPO = Path(__file__).resolve().parents[2]
# Few sampler steps keep the tiny models fast; a model not listed samples with its defaults.
QUICK = {"harmon": {"num_iter": 2}, "openuni": {"num_steps": 2}, "showo": {"steps": 2}}   # janus: 16 codes, defaults


def tiny_overrides(name: str) -> dict:
    """The model section of the model's tiny recipe (launch/recipes/<name>_tiny.yaml)."""
    model = OmegaConf.to_container(read_recipe(recipe_path(name, "tiny")).model)
    model.pop("name", None)
    return model


def build(name: str, seed: int = 0, **fields) -> UMMAdapter:
    cls = registry.adapter_class(name)
    cfg = OmegaConf.merge(OmegaConf.structured(cls.config_class(name=name)), tiny_overrides(name), fields)
    torch.manual_seed(seed)
    return cls(OmegaConf.to_object(cfg))


def frozen_patterns(model: UMMAdapter) -> list[str]:
    return [f"{m}.*" for m in model.frozen_module_names()]


def exported_state(paths: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: read_state_dict(p, k) for k, p in paths.items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: keys differ {sorted(set(a) ^ set(b))[:10]}"
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:5]}"


# ---- full size -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_full_size_meta_build_and_parameter_counts(name):
    cls = registry.adapter_class(name)
    with torch.device("meta"):
        model = cls(cls.config_class(name=name, size="full"))
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}
    counts.update({n: p.numel() for n, p in model.named_parameters(recurse=False)})
    total = sum(p.numel() for p in model.parameters())
    print(f"\n{name} full size: {total / 1e9:.3f} B parameters; "
          + ", ".join(f"{n} {c / 1e6:.1f} M" for n, c in counts.items()))
    assert all(p.is_meta for p in model.parameters())
    assert total > 5e8 and sum(counts.values()) >= total
    assert "checkpoint" in model.official_sources and all(hasattr(model.cfg, f) for f in model.official_sources)


def smallest_checkpoint_key(model: UMMAdapter) -> str:
    """The smallest parameter that ``model.checkpoint`` provides (a one-tensor 'official file')."""
    prefixes = tuple(model.official_sources["checkpoint"])
    own = [(p.numel(), k) for k, p in model.named_parameters() if k.startswith(prefixes)]
    return min(own)[1]


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")   # meta model: no memory
@pytest.mark.parametrize("name", NAMES)
def test_full_size_load_that_leaves_parameters_unloaded_names_keys_fields_and_override(name, tmp_path):
    cls = registry.adapter_class(name)
    with torch.device("meta"):
        model = cls(cls.config_class(name=name, size="full"))
    key = smallest_checkpoint_key(model)
    shape = model.get_parameter(key).shape
    # Saved from a wrapped model (DDP / DeepSpeed: `module.` in front of every key).
    torch.save({"module." + key: torch.zeros(shape)}, tmp_path / "one.pth")
    with pytest.raises(ValueError) as err:
        model.load_official(str(tmp_path / "one.pth"))
    msg = str(err.value)
    for field in model.official_sources:
        if field != "checkpoint":           # e.g. Show-o's magvit_checkpoint, Harmon's vae_path: named
            assert f"model.{field}" in msg, msg[:2000]
    assert "model.allow_missing=[" in msg and "parameters left unloaded" in msg
    some_missing = next(k for k, _ in model.named_parameters() if k != key)
    assert some_missing in msg                                      # the keys themselves, by name
    # A deliberate partial load: allowed explicitly, reported by name, the prefix removed.
    report = model.load_official(str(tmp_path / "one.pth"), allow_missing=["*"])
    assert isinstance(report, LoadReport)
    assert key in report.loaded and not report.unexpected and some_missing in report.missing


@pytest.mark.parametrize("name", NAMES)
def test_a_file_that_loads_nothing_is_an_error_at_any_size(name, tmp_path):
    model = build(name)
    torch.save({"not_a_model.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="nothing loaded"):
        model.load_official(str(tmp_path / "other.pth"))


# ---- tiny round trip -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_official_layout_round_trip_is_bit_identical(name, tmp_path):
    a = build(name, seed=1)
    paths = a.export_official(tmp_path / "a")
    assert isinstance(paths, dict) and paths and all(isinstance(p, Path) and p.exists() for p in paths.values())
    files = exported_state(paths)

    b = build(name, seed=2, **a.export_sources(paths))
    report = b.load_official(b.cfg.checkpoint, allow_missing=frozen_patterns(b))
    assert isinstance(report, LoadReport) and report.loaded and not report.unexpected, str(report)
    # Everything training changes is in the export: only frozen modules may come from elsewhere.
    assert all(any(fnmatch.fnmatchcase(k, p) for p in frozen_patterns(b)) for k in report.missing), report.missing
    sa, sb = a.state_dict(), b.state_dict()
    loaded = [k for k in sa if k not in report.missing]
    assert_same_tensors({k: sa[k] for k in loaded}, {k: sb[k] for k in loaded}, f"{name} reloaded")
    for alias, target in tied_aliases(a).items():           # tied weights stay one tensor
        assert b.get_parameter(alias) is b.get_parameter(target), alias
    again = exported_state(b.export_official(tmp_path / "b"))
    for k in files:
        assert_same_tensors(files[k], again[k], f"{name} export {k}")


def release_key_sets(name: str, model: UMMAdapter, tmp: Path) -> dict[str, set[str]]:
    """Per exported component, the keys of the synthetic release file that the model's own official-layout
    test writes from the official key lists (not from ``export_official``)."""
    if name == "openuni":          # openuni_*_blip3o60k.pth: queries, connector, projector, SANA
        from tests.unit.test_openuni_weights import write_official_folders
        return {"openuni": set(torch.load(write_official_folders(model, tmp)["release"]))}
    if name == "showo":            # show-o-w-clip-vit, magvitv2, the vision half of clip-vit-large-patch14-336
        from tests.unit.test_showo_official import official_clip_folder, official_magvit_state, official_showo_state
        clip = official_clip_folder(model.arch, tmp / "clip")
        return {"showo": set(official_showo_state(model.arch)), "vq_model": set(official_magvit_state(model.arch)),
                "vision_tower": {k for k in clip if k.startswith("vision_model.") and not k.endswith("position_ids")}}
    if name == "harmon":           # harmon_1.5b.pth (both tied LLM keys)
        from tests.unit.test_harmon_official import synthetic_harmon_pth
        return {"harmon": set(synthetic_harmon_pth(model))}
    if name == "janus":            # an HF Janus folder (deepseek-community/Janus-Pro-*): transformers' own keys
        from transformers import JanusForConditionalGeneration
        return {"janus": set(JanusForConditionalGeneration(model.config).state_dict())}
    pytest.skip(f"{name}: add its synthetic release key set to release_key_sets")


@pytest.mark.parametrize("name", NAMES)
def test_exported_files_hold_exactly_the_release_keys(name, tmp_path):
    a = build(name, seed=1)
    release = release_key_sets(name, a, tmp_path / "release")
    files = exported_state(a.export_official(tmp_path / "export"))
    for part, keys in release.items():
        assert set(files[part]) == keys, f"{name} {part}: differs in {sorted(set(files[part]) ^ keys)[:10]}"


# ---- sampling and the CLIs -------------------------------------------------------------------------
def images(n: int, size: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("name", NAMES)
def test_sample_is_deterministic_per_seed(name):
    model = build(name).eval()
    x, prompts = images(2), ["Generate the depth map of this image.", ""]
    first = model.sample(x, prompts, seed=0, **QUICK.get(name, {}))
    assert first.shape[:2] == (2, 3) and first.shape[2] == first.shape[3]
    assert first.dtype == torch.float32 and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, model.sample(x, prompts, seed=0, **QUICK.get(name, {})))
    assert not torch.equal(first, model.sample(x, prompts, seed=1, **QUICK.get(name, {})))


@pytest.mark.parametrize("name", NAMES)
def test_sample_cli_runs_for_every_model(name, tmp_path):
    from PIL import Image

    from unimrg.eval import sample
    Image.fromarray(images(1)[0].permute(1, 2, 0).numpy()).save(tmp_path / "in.png")
    opts = [a for k, v in QUICK.get(name, {}).items() for a in ("--opt", f"{k}={v}")]
    fields = [f"model.{k}={v}" for k, v in tiny_overrides(name).items()]
    out = sample.main(["--model", name, "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "g.png"),
                       "--device", "cpu", "--dtype", "fp32", *opts, *fields])
    assert set(out) == {"depth", "seg", "pix"} and (tmp_path / "g.png").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_export_cli_takes_a_wrapped_state_dict_without_tied_aliases(name, tmp_path):
    """What a ZeRO consolidation or a DDP save gives: `module.` in front, a tied weight under one name."""
    from unimrg.eval import export
    a = build(name, seed=1)
    aliases = tied_aliases(a)
    state = {"module." + k: v for k, v in a.state_dict().items() if k not in aliases}
    torch.save(state, tmp_path / "consolidated.pt")
    fields = [f"model.{k}={v}" for k, v in tiny_overrides(name).items()]
    paths = export.main(["--model", name, "--state-dict", str(tmp_path / "consolidated.pt"),
                         "--out", str(tmp_path / "out"), *fields])
    files = exported_state(paths)
    ref = exported_state(a.export_official(tmp_path / "ref"))
    for k in ref:
        assert_same_tensors(ref[k], files[k], f"{name} export {k}")
    del state[next(iter(state))]
    torch.save(state, tmp_path / "incomplete.pt")
    with pytest.raises(ValueError, match="1 missing"):
        export.main(["--model", name, "--state-dict", str(tmp_path / "incomplete.pt"), "--out",
                     str(tmp_path / "out2"), *fields])


def test_unknown_model_lists_the_registered_names(tmp_path, capsys):
    from unimrg.eval import export, sample
    for main, extra in ((export.main, ["--state-dict", "x.pt", "--out", "o"]),
                        (sample.main, ["--image", "x.png", "--out", "o.png"])):
        with pytest.raises(SystemExit):
            main(["--model", "nosuch", *extra])
        err = capsys.readouterr().err
        assert "invalid choice: 'nosuch'" in err and all(f"'{n}'" in err for n in NAMES), err
    with pytest.raises(ConfigError, match="registered models: " + ", ".join(NAMES)):
        recipe_path("nosuch", "tiny")


def parts(model: UMMAdapter) -> list[tuple[str, torch.nn.Module]]:
    """The coarsest modules that the paper's rule freezes or trains whole: the top-level children, split
    further where a frozen module sits inside one (OpenUni's `lmm.model.vision_tower`, Janus' everything
    inside one HF model `janus`)."""
    frozen = model.frozen_module_names()
    out = []

    def walk(prefix: str, module: torch.nn.Module) -> None:
        for n, child in module.named_children():
            path = prefix + n
            if path in frozen or not any(f.startswith(path + ".") for f in frozen):
                out.append((path, child))
            else:
                walk(path + ".", child)
    walk("", model)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_stage_frozen_modules_stay_in_eval_mode(name):
    model = build(name)
    extra = next(n for n, _ in parts(model) if n not in model.frozen_module_names())
    model.apply_freezing([extra])
    model.train()
    assert not model.get_submodule(extra).training
    assert all(not model.get_submodule(n).training for n in model.frozen_module_names())
    assert any(m.training for n, m in parts(model) if n != extra and n not in model.frozen_module_names())
    assert not any(p.requires_grad for p in model.get_submodule(extra).parameters())


# ---- a real run ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["harmon"])   # the tied-weight model; ~2 min each, so one model in CI
def test_trained_weights_export_and_reload_identically(name, tmp_path):
    """Two ranks, two stages of one step (the stage transition loads the first stage's consolidated
    weights; the second stage adds a task, whose loader starts fresh there), final/model.pt →
    `python -m unimrg.eval.export` → load_official → identical."""
    from tests.conftest import run_submit
    run = tmp_path / "run"
    res = run_submit(["--model", name, "--recipe", "tiny", "--cluster", "local", "--run-dir", str(run),
                      "train.steps=2", "train.checkpoint_every=1",
                      "train.stages=[{steps: 1, tasks: [pix]}, {steps: 1}]",
                      "objective.tasks=[pix,depth]", "train.grad_accum=2", "train.micro_batch_per_task=1",
                      "data.scenes=4", "data.scene_shards=1", "run.tensorboard=false"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    rows = [json.loads(line) for line in (run / "metrics" / "rank0.jsonl").read_text().splitlines()]
    assert [sorted(r["losses"]) for r in rows] == [["pix"], ["depth", "pix"]], rows
    final = torch.load(run / "final" / "model.pt", weights_only=True)
    cfg = load_resolved(run / "config.yaml").model
    model = build(name, **tiny_overrides(name))
    assert sorted(final) == sorted(model.state_dict())              # tied weights under both names
    fields = [f"model.{k}={v}" for k, v in tiny_overrides(name).items()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "unimrg.eval.export", "--model", name, "--state-dict",
                          str(run / "final" / "model.pt"), "--out", str(tmp_path / "export"), *fields],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    paths = {k: Path(v.strip()) for k, _, v in (line.partition(": ") for line in out.stdout.splitlines() if ": " in line)}
    assert paths and all(p.exists() for p in paths.values()), out.stdout
    back = build(name, seed=5, **model.export_sources(paths))
    report = back.load_official(back.cfg.checkpoint, allow_missing=frozen_patterns(back))
    trained = [k for k in final if k not in report.missing]
    sb = back.state_dict()
    assert_same_tensors({k: final[k] for k in trained}, {k: sb[k] for k in trained}, f"{name} trained → export → reload")
    assert cfg.name == name
