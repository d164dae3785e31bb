#!/usr/bin/env python
"""HRM-Video: what adaptive halting and the warm-started carry save, and what they cost in oracle accuracy.

    python benchmarks/bench_hrm_halting.py --pipeline pipelines/hrm-shapes [--num-prompts 64] [--steps 20]
        [--guidance-scale 4] [--seed 0] [--batch-size 8] [--threads 1] [--halt-thresholds 0.3 0.7 0.9]
        [--single-segment-above-sigma 0.65] [--no-warm-start] [--output halting.json]

An `HRMVideoPipeline` runs the backbone's recursion segment by segment at every sampling step. Two call
arguments may shorten it: `halting` (each sample stops once its halting head fires, at most `max_segments`)
and `warm_start` (each evaluation starts from the previous one's carry (z_H, z_L) instead of zeros). This
script samples the same held-out prompts with the same seeds (`evaluate_pipeline`) in four settings:

* **max segments**: `halting=False, warm_start=False`, every evaluation runs `max_segments` segments;
* **halting**: `halting=True, warm_start=False` (the pipeline's default);
* **warm start**: `halting=False, warm_start=True`;
* **halting + warm start**: both (`--no-warm-start` leaves out the two warm-start rows);
* with `--halt-thresholds`, one more halting row per value of the halting head's threshold (the model's own is 0.5);
* with `--single-segment-above-sigma`, one more row per value: halting off, one segment per evaluation while the
  noise level is above the value and the maximum below it (the pipeline's `single_segment_above_sigma`).

Columns: mean segments per sampling step and video (from the per-step `trace`; conditional rows, and under
classifier-free guidance the unconditional rows separately), segments saved against the maximum, generation
wall-clock per video (sampling only, after one untimed warm-up call; the oracle is not timed), the oracle
accuracies on held-out prompts, the change of "all five" against the first row in points, and the mean
absolute pixel difference to the first row's videos. Single-threaded by default (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINE = REPO / "pipelines" / "hrm-shapes"
SETTINGS = (
    ("max segments", {"halting": False, "warm_start": False}),
    ("halting", {"halting": True, "warm_start": False}),
    ("warm start", {"halting": False, "warm_start": True}),
    ("halting + warm start", {"halting": True, "warm_start": True}),
)
ORACLE_COLUMNS = (("color", "colour"), ("shape", "shape"), ("size", "size"), ("direction", "direction"), ("speed", "speed"), ("all", "all five"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=str(DEFAULT_PIPELINE), help="HRMVideoPipeline folder (or Hub id)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-segments", type=int, default=None, help="most segments per evaluation (default: the model's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--halt-thresholds", type=float, nargs="*", default=[],
                        help="extra halting rows with the halting head's threshold set to each value (default: the model's only)")
    parser.add_argument("--single-segment-above-sigma", type=float, nargs="*", default=[],
                        help="extra rows, halting off: one segment per evaluation while sigma is above each value, the maximum below")
    parser.add_argument("--no-warm-start", action="store_true", help="leave out the two warm-start rows")
    parser.add_argument("--output", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    for threshold in args.halt_thresholds:
        if not 0.0 < threshold < 1.0:
            parser.error(f"--halt-thresholds must lie in (0, 1), got {threshold}")
    for sigma in args.single_segment_above_sigma:
        if not 0.0 <= sigma <= 1.0:
            parser.error(f"--single-segment-above-sigma must lie in [0, 1], got {sigma}")
    for name in ("num_prompts", "steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_segments is not None and args.max_segments < 1:
        parser.error(f"--max-segments must be >= 1, got {args.max_segments}")
    return args


class TracedPipeline:
    """Calls the pipeline as `evaluate_pipeline` does; times generation, keeps frames and per-step segments."""

    def __init__(self, pipe):
        self.pipe, self.seconds, self.frames, self.segments, self.segments_unconditional = pipe, 0.0, [], [], []
        self.by_step: dict[int, list[int]] = {}

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        output = self.pipe(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.frames.append(output.frames)
        for step, record in enumerate(output.trace):
            self.segments.extend(record["segments"])
            self.by_step.setdefault(step, []).extend(record["segments"])
            self.segments_unconditional.extend(record.get("segments_unconditional", []))
        return output


def measure(pipe, args, name: str, setting: dict, baseline: dict | None) -> dict:
    """One row: every held-out prompt sampled with `setting` (same prompts and seeds for every row)."""
    from chronos_video.evaluation.pipeline_eval import evaluate_pipeline

    traced = TracedPipeline(pipe)
    scores, _ = evaluate_pipeline(
        traced, num_prompts=args.num_prompts, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        seed=args.seed, batch_size=args.batch_size, max_segments=args.max_segments, **setting,
    )
    frames = np.concatenate(traced.frames)
    max_segments = args.max_segments or pipe.transformer.config.max_segments
    mean_segments = float(np.mean(traced.segments))
    row = {
        "setting": name, **setting, "max_segments": max_segments,
        "segments_per_step": mean_segments,
        "segments_per_step_unconditional": float(np.mean(traced.segments_unconditional)) if traced.segments_unconditional else None,
        "segments_saved": 1.0 - mean_segments / max_segments,
        "segments_by_step": [float(np.mean(traced.by_step[i])) for i in sorted(traced.by_step)],  # which sampling steps halt
        "seconds_per_video": traced.seconds / args.num_prompts,
        "oracle": {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))},
        "frames": frames,
    }
    row["all_five_change_points"] = 0.0 if baseline is None else 100.0 * (row["oracle"].get("all", 0.0) - baseline["oracle"].get("all", 0.0))
    row["mean_abs_pixel_diff"] = 0.0 if baseline is None else float(np.abs(frames - baseline["frames"]).mean())
    row["speedup"] = 1.0 if baseline is None else baseline["seconds_per_video"] / max(row["seconds_per_video"], 1e-9)
    return row


def format_table(rows: list[dict]) -> str:
    header = ["setting", "segments / step", "uncond. segments / step", "segments saved", "s / video", "speed-up",
              *(title for _, title in ORACLE_COLUMNS), "Δ all five (points)", "mean abs Δpixel"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        uncond = row["segments_per_step_unconditional"]
        cells = [row["setting"], f"{row['segments_per_step']:.2f} / {row['max_segments']}", "-" if uncond is None else f"{uncond:.2f}",
                 f"{row['segments_saved']:.1%}", f"{row['seconds_per_video']:.3f}", f"{row['speedup']:.2f}x",
                 *(f"{row['oracle'].get(key, float('nan')):.1%}" for key, _ in ORACLE_COLUMNS),
                 f"{row['all_five_change_points']:+.1f}", f"{row['mean_abs_pixel_diff']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import chronos_video
    from chronos_video.cli import load_pipeline

    pipe = load_pipeline(args.pipeline)
    if not isinstance(pipe, chronos_video.HRMVideoPipeline):
        raise SystemExit(f"bench_hrm_halting.py: error: --pipeline {args.pipeline} holds a {type(pipe).__name__}, not an HRMVideoPipeline.")
    pipe.set_progress_bar_config(disable=True)
    pipe("a small red circle moving left to right slowly", num_inference_steps=1, output_type="latent")  # untimed warm-up
    rows: list[dict] = []
    default_threshold = pipe.transformer.config.halt_threshold
    extra = [(f"halting, threshold {t:g}", {"halting": True, "warm_start": False}, t) for t in args.halt_thresholds]
    extra += [(f"one segment above sigma {v:g}", {"halting": False, "warm_start": False, "single_segment_above_sigma": v}, default_threshold)
              for v in args.single_segment_above_sigma]
    settings = [(n, s, default_threshold) for n, s in SETTINGS if not (args.no_warm_start and s["warm_start"])]
    for name, setting, threshold in settings + extra:
        pipe.transformer.register_to_config(halt_threshold=threshold)
        row = measure(pipe, args, name, setting, rows[0] if rows else None)
        row["halt_threshold"] = threshold
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "frames"}), flush=True)
    pipe.transformer.register_to_config(halt_threshold=default_threshold)
    for row in rows:
        row.pop("frames")
    print()
    print(f"{Path(args.pipeline).name}: {args.num_prompts} held-out prompts, {args.steps} steps, guidance {args.guidance_scale:g}, "
          f"seed {args.seed}, batch {args.batch_size}, {args.threads} thread(s)")
    print(format_table(rows))
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
