#!/usr/bin/env python
"""Chronos-V ablations at an equal small training budget.

    python benchmarks/bench_chronos_ablations.py                      # every variant, 2 at a time
    python benchmarks/bench_chronos_ablations.py --max_train_steps 50 --variants full "1 order"

Each variant trains `training/configs/chronos_v_ablation.yaml` with `training/train.py` (same seed,
data, batches, noise and step count; one model flag changed) in its own single-threaded process,
`--parallel` at a time. Reported per variant:

* parameters and training seconds (compare within one run only: parallel processes share the
  machine);
* the held-out denoising loss (`chronos_video.evaluation.heldout_denoising_loss`: fixed clips from
  held-out attribute combinations, fixed noise, sigma in {0.1, 0.3, 0.5, 0.7, 0.9, 0.97}), which
  separates variants long before their samples are recognisable;
* the oracle accuracy that `train.py` measured on the saved pipeline (held-out prompts);
* for gated models, the share of video tokens the gate skipped during the loss evaluation (eval
  mode gathers the kept tokens, so those tokens really bypass the mixers).

The table is printed as markdown and written with the raw numbers to `<output_dir>/ablations.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "training" / "configs" / "chronos_v_ablation.yaml"

# name -> command-line overrides of the ablation config (the first entry is the reference model)
VARIANTS: dict[str, list[str]] = {
    "full (4 orders, complex A, RoPE, gate)": [],
    "2 scan orders": ["--model.num_scan_orders", "2"],
    "1 scan order": ["--model.num_scan_orders", "1"],
    "real A": ["--model.complex_state", "false"],
    "no RoPE": ["--model.use_rope", "false"],
    "no wavelet gate": ["--model.use_wavelet_gate", "false"],
    "text as scan prefix": ["--model.text_conditioning", "scan_prefix"],
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def resolve_variants(requested: list[str] | None) -> dict[str, list[str]]:
    if not requested:
        return dict(VARIANTS)
    chosen = {}
    for query in requested:
        matches = [name for name in VARIANTS if name == query or name.startswith(query) or slug(name) == query]
        if not matches:
            raise SystemExit(f"error: unknown variant {query!r}; choose from {list(VARIANTS)}")
        chosen[matches[0]] = VARIANTS[matches[0]]
    return chosen


def train_variant(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    output = Path(args.output_dir) / slug(name)
    command = [
        sys.executable, str(REPO / "training" / "train.py"), "--config", str(CONFIG),
        "--output_dir", str(output), "--checkpoint_dir", str(output / "checkpoints"),
        "--max_train_steps", str(args.max_train_steps), "--num_threads", "1",
        "--eval_num_prompts", str(args.num_prompts), "--seed", str(args.seed), *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    with open(output.parent / f"{slug(name)}.log", "w") as log:
        completed = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"variant {name!r} failed (exit {completed.returncode}); see {output.parent / (slug(name) + '.log')}")
    return {"name": name, "output": str(output), "wall_seconds": seconds}


def score_variant(record: dict, num_clips: int) -> dict:
    import torch

    from chronos_video.cli import load_pipeline
    from chronos_video.evaluation import heldout_denoising_loss

    torch.set_num_threads(1)
    pipe = load_pipeline(record["output"])
    model = pipe.transformer
    skipped: list[float] = []
    hook = model.register_forward_hook(
        lambda module, inputs, output: skipped.append(module.last_gate_stats["skipped_fraction"])
        if module.last_gate_stats and module.last_gate_stats["mode"] != "off" else None
    )
    try:
        loss = heldout_denoising_loss(pipe, num_clips=num_clips)
    finally:
        hook.remove()
    oracle = json.loads((Path(record["output"]) / "oracle_scores.json").read_text())
    summary = json.loads((Path(record["output"]) / "training_summary.json").read_text())
    return {
        **record,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": summary["train_seconds"],
        "heldout_loss": loss,
        "oracle": oracle,
        "gate_skipped_fraction": sum(skipped) / len(skipped) if skipped else None,
    }


def format_table(rows: list[dict]) -> str:
    sigmas = [key for key in rows[0]["heldout_loss"] if key.startswith("loss@")]
    header = ["variant", "params", "train s", "held-out loss", *[f"loss σ={key[5:]}" for key in sigmas],
              "colour", "shape", "direction", "all", "gate skipped"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        loss, oracle = row["heldout_loss"], row["oracle"]
        skipped = "-" if row["gate_skipped_fraction"] is None else f"{100 * row['gate_skipped_fraction']:.1f}%"
        cells = [row["name"], f"{row['parameters'] / 1e3:.0f} k", f"{row['train_seconds']:.0f}", f"{loss['loss']:.4f}",
                 *[f"{loss[key]:.4f}" for key in sigmas],
                 *[f"{100 * oracle[key]:.1f}%" for key in ("color", "shape", "direction", "all")], skipped]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", help="names (or prefixes) of the variants to run; default all")
    parser.add_argument("--max_train_steps", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=2, help="variants trained at the same time, one thread each")
    parser.add_argument("--num_prompts", type=int, default=32, help="held-out prompts for the oracle")
    parser.add_argument("--num_clips", type=int, default=64, help="held-out clips for the denoising loss")
    parser.add_argument("--seed", type=int, default=0, help="training seed (init, batches, noise); rerun with another to see the spread")
    parser.add_argument("--output_dir", default="outputs/ablations")
    args = parser.parse_args()
    for name in ("max_train_steps", "parallel", "num_prompts", "num_clips"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    variants = resolve_variants(args.variants)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        records = list(pool.map(lambda item: train_variant(*item, args), variants.items()))
    rows = [score_variant(record, args.num_clips) for record in records]
    table = format_table(rows)
    print(f"\nChronos-V ablations: {args.max_train_steps} steps of {CONFIG.relative_to(REPO)} each, seed {args.seed}\n")
    print(table)
    out = Path(args.output_dir) / "ablations.json"
    out.write_text(json.dumps({"max_train_steps": args.max_train_steps, "seed": args.seed, "rows": rows}, indent=2))
    print(f"\nraw numbers: {out}")


if __name__ == "__main__":
    main()
