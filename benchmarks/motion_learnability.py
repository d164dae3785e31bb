#!/usr/bin/env python
"""Does a training recipe learn *which way* to move, and how soon? Learning curves per variant.

    python benchmarks/motion_learnability.py --variants today centred --steps 1500          # full shapes data
    python benchmarks/motion_learnability.py --variants today --data direction-only --steps 1000
    python benchmarks/motion_learnability.py --list                                          # the variants

Each variant is a set of `training/train.py` overrides on top of a base config (default: the shipped
`training/configs/nano_sora_shapes.yaml`), trained with a constant learning rate (after warm-up) so that
every checkpoint of the curve sees the same optimiser, in its own single-threaded process (`--parallel`
at a time; the 2-core machine this was written on runs two). At every `--eval-every` steps `train.py`
itself (its `validation_num_prompts` / `validation_swap_gap_clips` options) scores the EMA weights:

* **direction / all five**: oracle accuracy of sampled videos (20 Euler steps, guidance 4). On the full
  data the prompts are held-out attribute combinations; on direction-only data they cycle through the
  8 directions of the fixed appearance. Chance for direction is 12.5%.
* **direction gap**: `caption_swap_loss_gaps` for the direction: how much the denoising loss on
  training clips (placed the way the run places them) rises when the caption says the opposite
  direction, relative to the true-caption loss. Zero means the direction words never reach the output.
* **loss**: that true-caption denoising loss (fixed clips, noise and sigma in {0.5, 0.7, 0.9}).
* **s/step**: training seconds per step, validation excluded (parallel runs share the CPU: compare
  rows of one invocation).

Rows go to stdout as one markdown table and, with the raw curves, to `<output_dir>/learnability.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "training" / "configs" / "nano_sora_shapes.yaml"

# Overrides per lever, on top of the base config. "today" is the shipped recipe as it was when issue 10
# was opened (pass `--config` of that commit to rerun it exactly; with the current config it is the
# current recipe). The other rows each add levers to today's recipe.
ABS_POS = ["--model.absolute_pos_embed", "true"]
CENTRED = ["--data.start_spread", "0.0"]
TEXT = ["--text_encoder_pretrain_steps", "300", "--train_text_encoder", "false"]
EOS = ["--model.text_pooling", "last"]
FRAME = ["--model.frame_conditioning", "true"]
HIGH_SIGMA = ["--logit_mean", "0.5", "--logit_std", "1.4"]
CURRICULUM = [
    "--curriculum_data",
    '{"num_clips": 2000, "seed": 1, "attributes": {"color": ["white"], "shape": ["circle", "square"], "size": ["large"], "speed": ["quickly"]}}',
    "--curriculum_steps", "750", "--curriculum_mix", "0.25",
]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "today": ("the base config as it is", []),
    "abs-pos+centred": ("absolute 3D sin-cos positions, paths centred on the frame", ABS_POS + CENTRED),
    "abs-pos+spread0.5": ("absolute positions, starts within the middle half of the valid range", ABS_POS + ["--data.start_spread", "0.5"]),
    "text": ("caption-pretrained, frozen text encoder (mean pooled)", TEXT),
    "text+abs-pos+centred": ("caption-pretrained frozen text encoder, absolute positions, centred paths", TEXT + ABS_POS + CENTRED),
    "text+abs-pos+centred+curriculum": ("... + 750 direction-only steps, then a quarter of each batch", TEXT + ABS_POS + CENTRED + CURRICULUM),
    "text+abs-pos+centred+frame": ("... + per-frame text/time conditioning", TEXT + ABS_POS + CENTRED + FRAME),
    "text-eos+abs-pos+centred": ("... pooled at [EOS] instead of the mean", TEXT + EOS + ABS_POS + CENTRED),
    "text-eos+abs-pos+centred+frame+high-sigma": ("... + per-frame conditioning + logit-normal(0.5, 1.4)", TEXT + EOS + ABS_POS + CENTRED + FRAME + HIGH_SIGMA),
    "text+abs-pos+centred+x0": ("... + clean-sample (x0, JiT) prediction", TEXT + ABS_POS + CENTRED + ["--model.prediction_type", "sample"]),
}

DATA = {
    "full": [],
    # One appearance, every direction: the easiest motion (large, quick). Split "all" keeps all 8
    # directions (every shape has one direction held out of the train split).
    "direction-only": [
        "--data.split", "all",
        "--data.attributes", '{"color": ["white"], "shape": ["square"], "size": ["large"], "speed": ["quickly"]}',
    ],
}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    description, overrides = VARIANTS[name]
    out = Path(args.output_dir) / f"{name}-{args.data}"
    if out.exists():
        shutil.rmtree(out)
    command = [
        sys.executable, str(REPO / "training" / "train.py"), "--config", str(args.config),
        "--output_dir", str(out), "--checkpoint_dir", str(out / "checkpoints"),
        "--max_train_steps", str(args.steps), "--lr_scheduler", "constant_with_warmup",
        "--validation_steps", str(args.eval_every), "--validation_num_prompts", str(args.num_prompts),
        "--validation_swap_gap_clips", str(args.num_clips), "--validation_prompts", "[]",
        "--checkpointing_steps", str(args.steps), "--eval_num_prompts", str(args.num_prompts),
        "--sample_prompts", "[]", "--report_to", "null", "--num_threads", str(args.threads),
        *DATA[args.data], *overrides, *args.extra,
    ]
    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"variant {name!r} failed (exit {result.returncode}); see {log}")
    curve = [json.loads(line) for line in (out / "logs" / "learning_curve.jsonl").read_text().splitlines() if line]
    return {"name": name, "description": description, "data": args.data, "overrides": overrides, "curve": curve}


def format_table(rows: list[dict]) -> str:
    lines = [
        "| variant | data | step | direction | all five | colour | speed | direction gap | loss | s/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for point in row["curve"]:
            lines.append(
                f"| {row['name']} | {row['data']} | {point['step']} | {point.get('oracle/direction', float('nan')):.1%} | "
                f"{point.get('oracle/all', float('nan')):.1%} | {point.get('oracle/color', float('nan')):.1%} | "
                f"{point.get('oracle/speed', float('nan')):.1%} | {point.get('swap_gap/direction', float('nan')):+.1%} | "
                f"{point.get('swap_gap/loss_true', float('nan')):.4f} | {point.get('seconds_per_step', float('nan')):.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["text+abs-pos+centred", "text+abs-pos+centred+curriculum"])
    parser.add_argument("--data", choices=sorted(DATA), default="full")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--num-clips", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--output_dir", type=Path, default=REPO / "outputs" / "motion_learnability")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("extra", nargs="*", help="more train.py overrides after `--`, applied to every variant")
    args = parser.parse_args(argv)
    if args.list:
        for name, (description, overrides) in VARIANTS.items():
            print(f"{name:22s} {description}  {' '.join(overrides)}")
        return 0
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {sorted(VARIANTS)}")
    for flag in ("steps", "eval_every", "num_prompts", "num_clips", "threads", "parallel"):
        if getattr(args, flag) < 1:
            parser.error(f"`--{flag.replace('_', '-')}` must be >= 1")
    if not args.config.is_file():
        parser.error(f"`--config` {args.config} does not exist")
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        rows = list(pool.map(lambda name: run_variant(name, args), args.variants))
    table = format_table(rows)
    print(table)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "learnability.json").write_text(json.dumps({"rows": rows, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
