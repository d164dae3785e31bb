#!/usr/bin/env python
"""HRM-Video ablations at equal training wall-clock (issue 12, item 5): gradient, weight sharing, objective, backbone.

    python benchmarks/hrm_ablations.py --minutes 60                      # every variant, 60 training minutes each
    python benchmarks/hrm_ablations.py --steps 1500 --variants hrm-one-step direct-mse
    python benchmarks/hrm_ablations.py --quick                           # tiny smoke run (seconds), for the tests
    python benchmarks/hrm_ablations.py --list                            # the variants and their overrides

Each variant is a set of `training/train.py` overrides on top of a base config (default: the shipped
`training/configs/hrm_shapes.yaml`), trained in its own run:

* **hrm-one-step**: the base config as it is (HRM's one-step gradient, separate H and L modules);
* **trm-full-recursion**: `model.gradient_mode: full_recursion` (TRM: backprop through the last full recursion);
* **shared-weights**: `model.shared_weights: true` (TRM: one network performs both updates; the H module's
  blocks are dropped, so it has fewer parameters at the same compute per step);
* **direct-mse**: the TTV-HRM seed's own objective, `objective: direct` with `model.prediction_type: sample`:
  the clean video regressed from text (input: pure noise at sigma = 1, uninformative about the clip), sampled
  with one Euler step from sigma = 1, which returns exactly the regressed video (`TrainingObjective`);
* **nano-sora**: `architecture: nano-sora` with the same width, heads and total block count (`h_layers +
  l_layers`, or `l_layers` for a shared-weights base), no deep supervision: equal parameters.

Equal wall-clock: `--minutes M` first times a few training steps of every variant (`--timing-steps`, with the
same parallelism as the real runs) and gives each `M * 60 / (s/step)` steps; `--steps N` gives every variant
N steps instead. Each trained pipeline is then scored here, one after another on an otherwise idle process:
oracle accuracy on `--num-prompts` held-out prompts (`evaluate_pipeline`, same prompts and seeds for all),
sampling wall-clock per video (`--eval-steps` Euler steps and `--guidance-scale`; direct-mse one step and
`--direct-guidance-scale`, 1 = the seed's unguided regression; HRM variants with the pipeline's default
halting and warm start), and a frame strip of one prompt per variant (`<output_dir>/<variant>/strip.png`).
Rows go to stdout as one markdown table and, with everything measured, to `<output_dir>/ablations.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "training" / "configs" / "hrm_shapes.yaml"
QUICK_CONFIG = REPO / "training" / "configs" / "hrm_smoke.yaml"
STRIP_PROMPT = "a large blue square moving top to bottom quickly"
HRM_ONLY_KEYS = ("h_layers", "l_layers", "h_cycles", "l_cycles", "max_segments", "min_segments", "shared_weights", "gradient_mode", "halt_threshold")
ORACLE_COLUMNS = (("color", "colour"), ("shape", "shape"), ("size", "size"), ("direction", "direction"), ("speed", "speed"), ("all", "all five"))
DIRECT = ["--objective", "direct", "--model.prediction_type", "sample", "--eval_num_inference_steps", "1"]


def nano_sora_overrides(base_model: dict) -> list[str]:
    """Nano-Sora with the HRM config's width, heads and total block count: equal parameters."""
    blocks = base_model.get("l_layers", 2) + (0 if base_model.get("shared_weights", False) else base_model.get("h_layers", 2))
    model = {k: v for k, v in base_model.items() if k not in HRM_ONLY_KEYS}
    model["num_layers"] = blocks
    return ["--architecture", "nano-sora", "--model", json.dumps(model), "--deep_supervision", "{}"]


def variants(base_model: dict) -> dict[str, tuple[str, list[str]]]:
    return {
        "hrm-one-step": ("the base config: HRM one-step gradient, separate H and L", []),
        "trm-full-recursion": ("TRM gradient through the last full recursion", ["--model.gradient_mode", "full_recursion"]),
        "shared-weights": ("TRM single network for both updates", ["--model.shared_weights", "true"]),
        "direct-mse": ("the seed's objective: MSE regression of the video, no sampling", DIRECT),
        "nano-sora": ("Nano-Sora DiT, same width and block count (equal parameters)", nano_sora_overrides(base_model)),
    }


def steps_for_budget(minutes: float, seconds_per_step: float) -> int:
    """Training steps that fit `minutes` of wall-clock at `seconds_per_step` (at least one)."""
    if minutes <= 0 or seconds_per_step <= 0:
        raise ValueError(f"`minutes` and `seconds_per_step` must be > 0, got {minutes} and {seconds_per_step}.")
    return max(1, math.floor(minutes * 60.0 / seconds_per_step))


def train_command(args: argparse.Namespace, overrides: list[str], out: Path, steps: int, timing: bool = False) -> list[str]:
    """`train.py` arguments of one run: the variant's overrides, `steps` steps, no validation, a minimal
    final evaluation (the runner scores every pipeline itself afterwards)."""
    command = [
        "--config", str(args.config), "--output_dir", str(out), "--checkpoint_dir", str(out / "checkpoints"),
        "--max_train_steps", str(steps), "--checkpointing_steps", str(steps), "--validation_steps", "0",
        "--validation_prompts", "[]", "--eval_num_prompts", "1", "--sample_prompts", "[]", "--report_to", "null",
        "--num_threads", str(args.threads), *overrides, *args.extra,
    ]
    if timing:  # the text encoder's pretraining and the final evaluation do not change the cost of a step
        command += ["--text_encoder_pretrain_steps", "0", "--eval_num_inference_steps", "1"]
    return command


def run_training(args: argparse.Namespace, command: list[str], log: Path) -> None:
    """One `train.py` run: in a subprocess of its own, or in this process with `--parallel 1`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if args.parallel == 1:
        import importlib.util

        spec = importlib.util.spec_from_file_location("chronos_hrm_ablation_train", REPO / "training" / "train.py")
        train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)
        train.main(command)
        return
    with log.open("w") as handle:
        result = subprocess.run([sys.executable, str(REPO / "training" / "train.py"), *command], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"training failed (exit {result.returncode}); see {log}")


def time_variant(name: str, overrides: list[str], args: argparse.Namespace) -> float:
    """Seconds per training step of a variant, from a short run (training loop only, as `train.py` reports it)."""
    out = Path(args.output_dir) / "timing" / name
    shutil.rmtree(out, ignore_errors=True)
    run_training(args, train_command(args, overrides, out, args.timing_steps, timing=True), out.parent / f"{name}.log")
    summary = json.loads((out / "training_summary.json").read_text())
    return summary["train_seconds"] / summary["steps"]


def train_variant(name: str, overrides: list[str], steps: int, args: argparse.Namespace) -> dict:
    out = Path(args.output_dir) / name
    shutil.rmtree(out, ignore_errors=True)
    run_training(args, train_command(args, overrides, out, steps), Path(args.output_dir) / f"{name}.log")
    summary = json.loads((out / "training_summary.json").read_text())
    return {"name": name, "overrides": overrides, "steps": steps, "train_seconds": summary["train_seconds"],
            "seconds_per_step": summary["train_seconds"] / steps, "pipeline": str(out)}


def score_variant(row: dict, args: argparse.Namespace) -> dict:
    """Oracle accuracy, sampling time per video and a frame strip of a trained variant."""
    import numpy as np
    import torch
    from PIL import Image

    from diffusers.utils import logging as diffusers_logging

    from chronos_video.cli import load_pipeline
    from chronos_video.evaluation.pipeline_eval import evaluate_pipeline

    diffusers_logging.disable_progress_bar()
    pipe = load_pipeline(row["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    direct = row["name"] == "direct-mse"
    steps, guidance = (1, args.direct_guidance_scale) if direct else (args.eval_steps, args.guidance_scale)
    pipe(STRIP_PROMPT, num_inference_steps=1, output_type="latent")  # untimed warm-up
    seconds = [0.0]

    def timed(*call_args, **call_kwargs):
        start = time.perf_counter()
        output = pipe(*call_args, **call_kwargs)
        seconds[0] += time.perf_counter() - start
        return output

    scores, _ = evaluate_pipeline(timed, num_prompts=args.num_prompts, num_inference_steps=steps, guidance_scale=guidance, seed=args.seed)
    video = pipe(STRIP_PROMPT, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(args.seed)).frames[0]
    strip = np.concatenate(list(video), axis=1)  # frames side by side: (H, F*W, C)
    scale = max(1, 64 // strip.shape[0])
    strip = (strip.repeat(scale, axis=0).repeat(scale, axis=1) * 255).round().astype(np.uint8)
    Image.fromarray(strip).save(Path(row["pipeline"]) / "strip.png")
    return {
        **row, "sampling_steps": steps, "guidance_scale": guidance,
        "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "oracle": {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))},
        "seconds_per_video": seconds[0] / args.num_prompts, "strip": str(Path(row["pipeline"]) / "strip.png"),
    }


def format_table(rows: list[dict]) -> str:
    header = ["variant", "params (M)", "steps", "s/step", "train min", *(title for _, title in ORACLE_COLUMNS), "sampling steps", "s / video"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["name"], f"{row['parameters'] / 1e6:.3f}", str(row["steps"]), f"{row['seconds_per_step']:.2f}", f"{row['train_seconds'] / 60:.1f}",
                 *(f"{row['oracle'].get(key, float('nan')):.1%}" for key, _ in ORACLE_COLUMNS),
                 f"{row['sampling_steps']} (cfg {row['guidance_scale']:g})", f"{row['seconds_per_video']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=None, help="default: all")
    parser.add_argument("--config", type=Path, default=None, help=f"base config (default {DEFAULT_CONFIG.relative_to(REPO)})")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="training wall-clock per variant (converted to steps by a short timing run)")
    budget.add_argument("--steps", type=int, help="training steps per variant")
    parser.add_argument("--timing-steps", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--direct-guidance-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2, help="variants trained at a time (1: in this process)")
    parser.add_argument("--output_dir", type=Path, default=REPO / "outputs" / "hrm_ablations")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: hrm_smoke.yaml, 2 steps, 2 prompts, 2 sampling steps")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("extra", nargs="*", help="more train.py overrides after `--`, applied to every variant")
    args = parser.parse_args(argv)
    if args.quick:
        args.config = args.config or QUICK_CONFIG
        args.steps = args.steps or 2
        args.num_prompts, args.eval_steps, args.parallel = min(args.num_prompts, 2), min(args.eval_steps, 2), 1
        args.extra = [*args.extra, "--data.num_clips", "16", "--use_ema", "false"]
    args.config = args.config or DEFAULT_CONFIG
    if args.minutes is None and args.steps is None:
        parser.error("give a budget: --minutes M (equal wall-clock) or --steps N")
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes must be > 0, got {args.minutes}")
    for flag in ("steps", "timing_steps", "num_prompts", "eval_steps", "threads", "parallel"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not args.config.is_file():
        parser.error(f"--config {args.config} does not exist")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import yaml

    base = yaml.safe_load(args.config.read_text())
    if base.get("architecture") != "hrm":
        raise SystemExit(f"hrm_ablations.py: error: --config {args.config} must train architecture 'hrm', not {base.get('architecture')!r}")
    table = variants(base.get("model", {}))
    if args.list:
        for name, (description, overrides) in table.items():
            print(f"{name:20s} {description}  {' '.join(overrides)}")
        return []
    names = args.variants or list(table)
    unknown = [name for name in names if name not in table]
    if unknown:
        raise SystemExit(f"hrm_ablations.py: error: unknown variant {unknown[0]!r}; choose from {sorted(table)}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        if args.minutes is not None:
            timings = dict(zip(names, pool.map(lambda name: time_variant(name, table[name][1], args), names)))
            budget = {name: steps_for_budget(args.minutes, timings[name]) for name in names}
            print(json.dumps({"seconds_per_step": timings, "steps": budget}), flush=True)
        else:
            budget = {name: args.steps for name in names}
        trained = list(pool.map(lambda name: train_variant(name, table[name][1], budget[name], args), names))
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for row in trained:  # one at a time, so sampling times are comparable
        rows.append(score_variant(row, args))
        print(json.dumps(rows[-1]), flush=True)
    text = format_table(rows)
    budget_text = f"{args.minutes:g} min of training" if args.minutes is not None else f"{args.steps} steps"
    print()
    print(f"{args.config.name}, {budget_text} per variant, {args.num_prompts} held-out prompts, seed {args.seed}, {args.threads} thread(s)")
    print(text)
    (args.output_dir / "ablations.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "table": text}, indent=2))
    return rows


if __name__ == "__main__":
    main()
