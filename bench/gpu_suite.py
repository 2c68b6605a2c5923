"""One prepared GPU run: every model at full size (random init, bf16) under DeepSpeed at world size 1.

    python bench/gpu_suite.py                       # one H100/H200, ≤ 8 min; writes bench/results/gpu_suite.{json,md}
    python bench/gpu_suite.py --smoke               # tiny models on CPU (tests/integration/test_gpu_suite.py)
    python bench/gpu_suite.py --models harmon --layouts 2 --steps 5 --out /tmp/suite

Per model, one subprocess per ZeRO layout (a fresh CUDA context, so peak memory is the layout's own):
the paper recipe's per-task micro-batch and schedule (round-robin: one task per micro-step; joint:
all tasks) with ``train.batch_policy=fixed_per_gpu`` (the recipe's per-GPU micro-steps, not the
8-GPU global batch squeezed onto one GPU), ``model.init=random``, synthetic scenes at the recipe's
image size. Layouts: ZeRO-2 (the recipes' JSON) and the one bench/scale_plan.py picks at 64 GPUs
(at world size 1 only its ZeRO stage differs). A micro-batch that runs out of memory is recorded as
such, then halved (accumulation doubled: the same samples per step) until it fits.

Reported: optimizer-step time (median of ``--steps`` after two warm-up steps), samples/s, peak
allocated memory vs the plan's prediction (unimrg.memory model states + bench/scale_plan.py's
activation estimate), and MFU. FLOPs are *counted*, per model, with ``torch.utils.flop_counter.
FlopCounterMode`` over one whole optimizer step (forward + backward of every micro-step: matmuls,
convolutions, attention; elementwise ops and the optimizer are not counted). Recomputation under
activation checkpointing (Harmon's default) is counted too, so for Harmon the figure is hardware-
FLOPs utilisation, a little above MFU. Peak: ``--peak-tflops``, else dense bf16 by device name
(H100/H200 SXM 989 TFLOP/s).

Full-size models load their tokenizer from a local folder that a GPU machine without network does not
have: the suite gives each a stand-in byte tokenizer whose special tokens sit at the released ids
(``stand_in_tokenizer``); byte tokens make text ~3-4× longer than BPE would, so text-heavy tasks are
slightly pessimistic.

Targets: Depth Anything V2-L and SAM-H (``SamModel`` ViT-H) at real sizes with random weights: our
target makers vs the transformers pipelines (``depth-estimation``, ``mask-generation``) on the same
images, images/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GiB = 1024 ** 3
# Dense bf16 peak (no sparsity), by substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0}


# ---- stand-in tokenizers for full-size models ---------------------------------------------------------
def released_special_ids(model: str) -> dict[str, int]:
    """Special tokens at their ids in the released tokenizers (what the full-size embeddings expect)."""
    if model == "openuni":   # InternVL3-2B (Qwen2.5 vocabulary + InternVL's image tokens)
        from unimrg.models.openuni.arch import ENDOFTEXT, IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START
        return {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645, IMG_START: 151665, IMG_END: 151666,
                IMG_CONTEXT: 151667}
    if model == "harmon":    # Qwen2.5-1.5B-Instruct
        from unimrg.models.harmon.arch import ENDOFTEXT, IM_END, IM_START
        return {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}
    if model == "showo":     # Phi-1.5 (50,295 tokens) + Show-o's ten tokens right after it
        from unimrg.models.showo.arch import ENDOFTEXT, NEW_SPECIAL_TOKENS
        return {ENDOFTEXT: 50256, **{t: 50295 + j for j, t in enumerate(NEW_SPECIAL_TOKENS)}}
    if model == "janus":     # Janus-Pro (DeepSeek-LLM vocabulary; <image_placeholder> at the config's image_token_id)
        from unimrg.models.janus import BOI, BOS, EOI, EOS, IMAGE, PAD
        return {BOS: 100000, EOS: 100001, PAD: 100015, BOI: 100016, IMAGE: 100581, EOI: 100593}
    raise KeyError(model)


def stand_in_tokenizer(model: str):
    """Byte-level tokenizer (ids 0..255) whose special tokens have the released ids; filler tokens
    between. Only for timing: real runs load the model's own tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = released_special_ids(model)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    by_id = {i: t for t, i in special.items()}
    for i in range(len(vocab), max(special.values()) + 1):
        vocab[by_id.get(i, f"<filler_{i}>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": list(special)})
    if model == "showo":
        from unimrg.models.showo.arch import PAD
        fast.pad_token, fast.eos_token = PAD, "<|endoftext|>"
    elif model == "janus":
        from unimrg.models.janus import BOS, EOS, PAD
        fast.pad_token, fast.eos_token, fast.bos_token = PAD, EOS, BOS
    else:
        fast.pad_token, fast.eos_token = "<|endoftext|>", "<|im_end|>"
    assert all(fast.convert_tokens_to_ids(t) == i for t, i in special.items())
    return fast


# ---- one (model, layout) in its own process ----------------------------------------------------------
def ds_json(cfg, stage: int, smoke: bool) -> str:
    """The recipe's ZeRO JSON when it has this stage, else the generic one."""
    if cfg.train.zero_stage == stage and cfg.train.ds_config:
        return cfg.train.ds_config
    return f"ds_configs/zero{stage}{'_tiny' if smoke else ''}.json"


def load_run_config(model: str, stage: int, micro: int | None, accum: int | None, smoke: bool):
    from unimrg.config import load_config, recipe_path, stage_config, stage_plans
    base = load_config(recipe_path(model, "tiny" if smoke else "paper"), ["run.dir=/tmp/unused"])
    over = ["run.dir=/tmp/unused", "model.init=random", "train.batch_policy=fixed_per_gpu",
            f"train.zero_stage={stage}", f"train.ds_config={ds_json(base, stage, smoke)}"]
    if micro:
        over += [f"train.micro_batch_per_task={micro}", f"train.grad_accum={accum}"]
    if smoke:
        over.append("train.precision=fp32")   # bf16 matmuls on CPU are slow and say nothing
    cfg = load_config(recipe_path(model, "tiny" if smoke else "paper"), over)
    return stage_config(cfg, stage_plans(cfg)[0][2])   # OpenUni: stage 1 (all four tasks)


def worker(args) -> None:
    """Runs ``args.jobs`` ([[model, stage, micro|null, accum|null], ...]) in this process; writes a row each."""
    from unimrg import engine as eng
    eng.init_distributed()
    rows = [measure(args, *job) for job in json.loads(args.jobs)]
    Path(args.row).write_text(json.dumps(rows, indent=1, default=str))


def measure(args, model_name: str, zero: int, micro: int | None, accum: int | None) -> dict:
    """One (model, ZeRO stage) at world size 1: build, two warm-up steps (the first one FLOP-counted),
    ``args.steps`` timed optimizer steps."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.scale_plan import activation_bytes
    from bench.step_overhead import batches
    from unimrg import engine as eng
    from unimrg.config import batch_arithmetic, validate
    from unimrg.memory import model_state_bytes, param_stats
    from unimrg.models.registry import build_model
    from unimrg.objective import Objective
    from unimrg.trainer import lr_lambda

    row: dict = {"model": model_name, "zero_stage": zero}
    engine = None
    try:
        cfg = load_run_config(model_name, zero, micro, accum, args.smoke)
        validate(cfg, 1)
        plan = batch_arithmetic(cfg, 1)
        stats = param_stats(cfg.model)
        row.update(micro_per_task=plan.micro_per_task, grad_accum=plan.grad_accum, schedule=plan.schedule,
                   image_size=cfg.model.image_size, samples_per_step=plan.micro_batch * plan.grad_accum,
                   params=stats, ds_config=cfg.train.ds_config)
        states = model_state_bytes(stats, zero, 1)
        act = activation_bytes(model_name, plan.micro_batch, smoke=args.smoke)
        row.update(predicted_states_gib=states / GiB, predicted_activations_gib=act / GiB,
                   predicted_peak_gib=(states + act) / GiB)

        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        with torch.device("cuda" if gpu else "cpu"):   # random init on the GPU: seconds, not minutes
            model = build_model(cfg.model)
        if cfg.model.size != "tiny":
            model.tokenizer = stand_in_tokenizer(model_name)
        optimizer = torch.optim.AdamW(model.optimizer_groups(cfg.optim.weight_decay), lr=plan.lr,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        engine = eng.Engine(model, eng.resolve_ds_config(cfg, plan), optimizer, lr_lambda(cfg, cfg.train.steps))
        objective = Objective(cfg.objective, seed=0)
        data = {b.task: b for b in batches(cfg.model.image_size, plan.micro_per_task)}

        def opt_step() -> None:
            for micro_step in range(plan.grad_accum):
                tasks = plan.micro_step_tasks(0, micro_step)
                losses = engine([data[t] for t in tasks])
                engine.backward(objective.total(losses) * plan.loss_scale)
                engine.step()

        def sync() -> None:
            if gpu:
                torch.cuda.synchronize()

        with FlopCounterMode(display=False) as counter:   # warm-up 1, counted
            opt_step()
        flops = counter.get_total_flops()
        opt_step()                                         # warm-up 2
        sync()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            opt_step()
            sync()
            times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        row.update(status="ok", step_s=step, step_times_s=times, samples_per_s=row["samples_per_step"] / step,
                   flops_per_step=flops, achieved_tflops=flops / step / 1e12)
        if gpu:
            name = torch.cuda.get_device_name()
            peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
            row.update(device=name, peak_gib=torch.cuda.max_memory_allocated() / GiB,
                       peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB,
                       mfu=flops / step / (peak * 1e12) if peak else None)
        else:   # CPU (smoke): no allocator statistics; the process's peak RSS says little, so none
            row.update(device="cpu", peak_gib=None, mfu=None)
    except torch.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).splitlines()[0])
    except Exception as e:   # recorded, so that one model's failure does not hide the others' numbers
        import traceback
        row.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
    finally:
        if engine is not None:
            engine.close()
    return row


# ---- the driver -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_jobs(jobs: list, args, timeout: float) -> list[dict]:
    """``jobs`` in one worker process (rank 0 of a world of 1); a row per job."""
    with tempfile.TemporaryDirectory() as tmp:
        row = Path(tmp) / "rows.json"
        cmd = [sys.executable, __file__, "--worker", "--jobs", json.dumps(jobs), "--row", str(row),
               "--steps", str(args.steps)] + (["--smoke"] if args.smoke else []) + \
              (["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
        t0 = time.perf_counter()
        fail = [{"model": j[0], "zero_stage": j[1]} for j in jobs]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            return [{**f, "status": "timeout", "error": f"over {timeout:.0f} s"} for f in fail]
        if not row.is_file():
            return [{**f, "status": "error", "error": f"worker exited {proc.returncode}: "
                     f"{(proc.stderr or proc.stdout)[-2000:]}"} for f in fail]
        rows = json.loads(row.read_text())
        for r in rows:
            r["wall_s"] = (time.perf_counter() - t0) / len(rows)
        return rows


def plan_stage(model: str, smoke: bool) -> int:
    """The ZeRO stage bench/scale_plan.py picks for ``model`` at 64 GPUs (NVLink + 400 Gb/s IB)."""
    from bench.scale_plan import pick
    return pick(model, 64, smoke=smoke)["zero"]


def run_targets(args) -> dict:
    """Our depth / segmentation target makers vs the transformers pipelines, random weights, real sizes."""
    import torch
    import bench.targets_throughput as tt
    from unimrg.targets.depth import DepthTargetMaker

    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = tt.synthetic_images(args.target_images + 1, 640, 480)
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        depth_dir, sam_dir = target_model_dirs(Path(tmp), args.smoke)
        # depth: ours vs pipeline("depth-estimation"), alternating image by image
        from transformers import pipeline
        ours = DepthTargetMaker.from_pretrained(depth_dir, device=device)
        pipe = pipeline("depth-estimation", model=str(depth_dir), device=device)
        ours(images[0]), pipe(images[0])
        t_ours = t_pipe = 0.0
        for img in images[1:]:
            t0 = time.perf_counter()
            ours(img)
            if device == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            pipe(img)
            if device == "cuda":
                torch.cuda.synchronize()
            t_ours, t_pipe = t_ours + t1 - t0, t_pipe + time.perf_counter() - t1
        n = len(images) - 1
        res["depth"] = {"model": "Depth Anything V2-L (random)" if not args.smoke else "tiny DA-V2 (random)",
                        "ours_img_s": n / t_ours, "pipeline_img_s": n / t_pipe, "ratio": t_pipe / t_ours}
        del ours, pipe
        ratio = tt.main(["--sam-model", str(sam_dir), "--calibrate", "--images", str(args.target_images),
                         "--device", device, "--points-per-side", str(4 if args.smoke else 32)])
        res["sam"] = {"model": "SAM ViT-H (random)" if not args.smoke else "tiny SAM (random)", "ratio": ratio,
                      **getattr(tt, "LAST", {})}
    return res


def target_model_dirs(tmp: Path, smoke: bool) -> tuple[Path, Path]:
    """HF folders of Depth Anything V2-L and SAM ViT-H with random weights (tiny ones with --smoke)."""
    from transformers import (DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor,
                              SamConfig, SamModel, SamVisionConfig)

    from unimrg.targets.tiny import save_tiny_models
    # Depth-Anything-V2-Large-hf preprocessor_config.json (the pipeline needs it; our maker does its own).
    processor = DPTImageProcessor(do_resize=True, size={"height": 518, "width": 518}, keep_aspect_ratio=True,
                                  ensure_multiple_of=14, resample=3, do_pad=False,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    if smoke:
        depth_dir, sam_dir = save_tiny_models(tmp)
        processor.save_pretrained(depth_dir)
        return depth_dir, sam_dir
    from unimrg.targets.segmentation import sam_image_processor
    # Depth-Anything-V2-Large-hf config.json: ViT-L/14 DINOv2 backbone, out_indices 5/12/18/24, DPT head.
    backbone = Dinov2Config(image_size=518, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                            num_attention_heads=16, out_indices=[5, 12, 18, 24], reshape_hidden_states=False)
    depth = DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=1024, neck_hidden_sizes=[256, 512, 1024, 1024],
        fusion_hidden_size=256, head_hidden_size=32, depth_estimation_type="relative"))
    depth.save_pretrained(tmp / "da2l")
    processor.save_pretrained(tmp / "da2l")
    # facebook/sam-vit-huge: 32 layers, 1280 wide, 16 heads, global attention at 7/15/23/31.
    sam = SamModel(SamConfig(vision_config=SamVisionConfig(hidden_size=1280, num_hidden_layers=32,
                                                           num_attention_heads=16,
                                                           global_attn_indexes=[7, 15, 23, 31])))
    sam.save_pretrained(tmp / "samh")
    sam_image_processor().save_pretrained(tmp / "samh")
    return tmp / "da2l", tmp / "samh"


def markdown(result: dict) -> str:
    lines = [f"# GPU suite — {result['device']}", "", f"{result['when']}, git {result['git']}, "
             f"total {result['total_s']:.0f} s", "",
             "| model | ZeRO | micro/task × accum | step s | samples/s | peak GiB | predicted GiB | TFLOP/step "
             "| MFU | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        ok = r.get("status") == "ok"
        f = (lambda k, fmt: format(r[k], fmt) if ok and r.get(k) is not None else "–")
        lines.append(f"| {r['model']} | {r['zero_stage']} | {r.get('micro_per_task', '–')} × {r.get('grad_accum', '–')} "
                     f"| {f('step_s', '.2f')} | {f('samples_per_s', '.1f')} | {f('peak_gib', '.1f')} "
                     f"| {r['predicted_peak_gib']:.1f} | {r['flops_per_step'] / 1e12 if ok else 0:.0f} "
                     f"| {f('mfu', '.1%')} | {r.get('status')}{': ' + r['error'][:80] if r.get('error') else ''} |"
                     if 'predicted_peak_gib' in r else f"| {r['model']} | {r['zero_stage']} | | | | | | | | "
                     f"{r.get('status')}: {r.get('error', '')[:120]} |")
    for k, t in result.get("targets", {}).items():
        if "error" in t:
            lines.append(f"\n{k}: error {t['error'][:200]}")
        else:
            lines.append(f"\n{t.get('model', k)}: ours / pipeline = {t['ratio']:.2f}× "
                         + (f"({t['ours_img_s']:.2f} vs {t['pipeline_img_s']:.2f} images/s)" if "ours_img_s" in t else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from unimrg.models import registry
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU, seconds (CI)")
    ap.add_argument("--models", nargs="*", default=registry.names())
    ap.add_argument("--layouts", nargs="*", default=["2", "plan"], help="ZeRO stages; 'plan' = scale_plan's pick")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after 2 warm-up steps)")
    ap.add_argument("--budget-s", type=float, default=360, help="stop starting runs after this (targets excluded)")
    ap.add_argument("--target-images", type=int, default=2)
    ap.add_argument("--no-targets", action="store_true")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: by device name)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    # worker-only
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.smoke:   # CI: one timed step and one target image are enough to prove the path runs
        args.steps, args.target_images = 1, 1

    import torch
    t_start = time.perf_counter()
    runs = []
    jobs = []
    device_gib = (torch.cuda.get_device_properties(0).total_memory / GiB if torch.cuda.is_available()
                  else float("inf"))
    # Every model's ZeRO-2 first, then the plan's layouts; small models first within each, so that an
    # out-of-memory retry of the largest cannot starve the others of the time budget.
    from bench.scale_plan import stats_for
    models = sorted(args.models, key=lambda m: stats_for(m, "tiny" if args.smoke else "full")["trainable"])
    for lay in args.layouts:
        for model in models:
            stage = plan_stage(model, args.smoke) if lay == "plan" else int(lay)
            if [model, stage, None, None] not in jobs:
                jobs.append([model, stage, None, None])
    if args.smoke:   # tiny models: one process for all (its imports cost more than the runs)
        runs = run_jobs(jobs, args, args.budget_s)
    for job in ([] if args.smoke else jobs):   # full size: a process each, so peak memory is its own
        while True:
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < 20:
                runs.append({"model": job[0], "zero_stage": job[1], "status": "skipped", "error": "budget spent"})
                break
            r = run_jobs([job], args, left)[0]
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("traceback", "params", "step_times_s")}),
                  flush=True)
            if r.get("status") != "oom" or not r.get("micro_per_task") or r["micro_per_task"] <= 1:
                break
            if r.get("predicted_states_gib", 0) > device_gib:   # model states alone: no micro-batch fits
                r["error"] += f" (model states alone {r['predicted_states_gib']:.0f} GiB > {device_gib:.0f} GiB)"
                break
            # the same samples per optimizer step in smaller micro-batches
            job = [job[0], job[1], r["micro_per_task"] // 2, r["grad_accum"] * 2]
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)",
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip(), "smoke": args.smoke, "runs": runs}
    if not args.no_targets:
        try:
            result["targets"] = run_targets(args)
        except Exception as e:
            result["targets"] = {"error": {"error": f"{type(e).__name__}: {e}"}}
    result["total_s"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_suite_smoke" if args.smoke else "gpu_suite"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out / stem}.json and .md")
    bad = [r for r in runs if r.get("status") in ("error", "timeout")]
    if args.smoke and (bad or "error" in result.get("targets", {})):
        sys.exit(f"smoke run failed: {bad or result['targets']}")
    return result


if __name__ == "__main__":
    main()
