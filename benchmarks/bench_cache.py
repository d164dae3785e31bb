"""diffusers' cache hooks on chronos-video pipelines: generation time saved, oracle accuracy lost.

    python benchmarks/bench_cache.py [--pipeline pipelines/nano-sora-shapes --pipeline pipelines/chronos-v-shapes]
        [--cache first_block] [--thresholds 0.05 0.2] [--cache-intervals 2 5] [--num-prompts 8] [--steps 20]
        [--guidance 4] [--threads 1] [--output cache.json]

Both backbones carry diffusers' `CacheMixin`, so `pipe.transformer.enable_cache(config)` works as on LTX or
Wan. For each pipeline this script samples the held-out oracle prompts (`evaluate_pipeline`: the same prompts
and seeds for every row) once without a cache and once per cache setting:

* `first_block` (`FirstBlockCacheConfig(threshold=...)`): when the first block's output changed by less than
  `threshold` (relative) since the last full evaluation, the other blocks are skipped and their residual reused.
* `magcache` (`MagCacheConfig(threshold=...)`): skips by a model-specific magnitude-ratio curve, calibrated here
  first on the first batch of prompts with `calibrate=True` (not timed).
* `taylorseer` (`TaylorSeerCacheConfig(cache_interval=...)`): recomputes the attention modules every
  `cache_interval` steps after `--warmup-steps` and extrapolates them in between (Chronos-V's sequence
  mixers are not attention modules, so only its cross-attention is cached).

Columns: generation time of all prompts (sampling only; the oracle is not timed), speed-up against no cache,
full evaluations (model calls in which the cached unit actually ran, out of all model calls), the oracle
accuracies, and the mean absolute pixel difference to the uncached video of the same prompt and seed.
Single-threaded by default (the machine is shared); pass a few prompts and steps for a quick check.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINES = [str(REPO / "pipelines" / "nano-sora-shapes"), str(REPO / "pipelines" / "chronos-v-shapes")]
CACHES = ("first_block", "magcache", "taylorseer")
ORACLE_COLUMNS = (("color", "colour"), ("shape", "shape"), ("size", "size"), ("direction", "direction"), ("speed", "speed"), ("all", "all five"))
# diffusers' default TaylorSeer targets (module names, matched with re.fullmatch).
TAYLORSEER_MODULES = ("^blocks.*attn", "^transformer_blocks.*attn", "^single_transformer_blocks.*attn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", action="append", help="pipeline folder or Hub id; repeat for several (default: both shipped)")
    parser.add_argument("--cache", action="append", choices=CACHES, help="cache method; repeat for several (default: first_block)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.2], help="first_block / magcache thresholds")
    parser.add_argument("--cache-intervals", type=int, nargs="+", default=[2, 5], help="taylorseer cache intervals")
    parser.add_argument("--warmup-steps", type=int, default=3, help="taylorseer: steps computed in full before any reuse")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    args.pipeline = args.pipeline or DEFAULT_PIPELINES
    args.cache = list(dict.fromkeys(args.cache or ["first_block"]))
    for name in ("num_prompts", "steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(interval < 1 for interval in args.cache_intervals):
        parser.error(f"--cache-intervals must be >= 1, got {args.cache_intervals}")
    if any(threshold < 0 for threshold in args.thresholds):
        parser.error(f"--thresholds must be >= 0, got {args.thresholds}")
    return args


class TimedPipeline:
    """Calls the pipeline as `evaluate_pipeline` does, timing generation only and keeping the frames."""

    def __init__(self, pipe):
        self.pipe, self.seconds, self.frames = pipe, 0.0, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        output = self.pipe(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.frames.append(output.frames)
        return output


def computed_marker(transformer, cache: str):
    """A submodule that runs only when the cached unit really computes (the hooks replace the unit's
    forward, so a hook on the unit itself would fire on reused steps too): inside the last block for the
    block-level caches, inside the last attention module for TaylorSeer."""
    if cache == "taylorseer":
        names = [name for name, _ in transformer.named_modules() if any(re.fullmatch(p, name) for p in TAYLORSEER_MODULES)]
        if not names:
            raise ValueError(f"{type(transformer).__name__} has no module TaylorSeer would cache ({TAYLORSEER_MODULES}).")
        unit = transformer.get_submodule(names[-1])
    else:
        unit = transformer.blocks[-1]
    for name in ("modulation", "ff"):  # called on every full evaluation of a chronos-video block
        if getattr(unit, name, None) is not None:
            return getattr(unit, name)
    return next(child for child in unit.children() if any(True for _ in child.parameters()))


def calibrate_magcache(pipe, prompts: list[str], steps: int, guidance: float, seed: int) -> list[float]:
    """MagCache's magnitude ratios for this model: one calibration run, whose result diffusers prints."""
    from diffusers.hooks import MagCacheConfig

    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="latent")
    finally:
        pipe.transformer.disable_cache()
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios; its output was: {printed.getvalue()!r}")
    return [float(ratio) for ratio in ast.literal_eval(lists[-1])]


def cache_settings(args, cache: str, pipe, prompts: list[str]):
    """(setting label, diffusers cache config) for every setting of `cache`."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if cache == "first_block":
        return [(f"threshold {t:g}", FirstBlockCacheConfig(threshold=t)) for t in args.thresholds]
    if cache == "magcache":
        ratios = calibrate_magcache(pipe, prompts, args.steps, args.guidance, args.seed)
        return [(f"threshold {t:g}", MagCacheConfig(threshold=t, mag_ratios=ratios, num_inference_steps=args.steps)) for t in args.thresholds]
    return [
        (f"interval {k}", TaylorSeerCacheConfig(cache_interval=k, disable_cache_before_step=args.warmup_steps, taylor_factors_dtype=torch.float32))
        for k in args.cache_intervals
    ]


def measure(pipe, args, label: str, cache: str | None, setting: str, config, marker, baseline: dict | None) -> dict:
    """One row: sample every evaluation prompt with `config` enabled (None = no cache)."""
    from chronos_video.evaluation.pipeline_eval import evaluate_pipeline

    counts = {"full": 0, "calls": 0}
    handles = [
        marker.register_forward_hook(lambda *_: counts.__setitem__("full", counts["full"] + 1)),
        pipe.transformer.register_forward_hook(lambda *_: counts.__setitem__("calls", counts["calls"] + 1)),
    ]
    timed = TimedPipeline(pipe)
    if config is not None:
        pipe.transformer.enable_cache(config)
    try:
        scores, _ = evaluate_pipeline(
            timed, num_prompts=args.num_prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
            seed=args.seed, batch_size=args.batch_size,
        )
    finally:
        if config is not None:
            pipe.transformer.disable_cache()
        for handle in handles:
            handle.remove()
    frames = np.concatenate(timed.frames)
    row = {
        "pipeline": label, "cache": cache or "off", "setting": setting, "generate_s": timed.seconds,
        "full_evaluations": counts["full"], "model_calls": counts["calls"],
        "oracle": {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))},
        "mean_abs_pixel_diff": 0.0 if baseline is None else float(np.abs(frames - baseline["frames"]).mean()),
        "frames": frames,
    }
    row["speedup"] = 1.0 if baseline is None else baseline["generate_s"] / max(row["generate_s"], 1e-9)
    return row


def format_table(rows: list[dict]) -> str:
    header = ["pipeline", "cache", "setting", "generate s", "speed-up", "full evaluations",
              *(title for _, title in ORACLE_COLUMNS), "mean abs Δpixel vs off"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for row in rows:
        cells = [row["pipeline"], row["cache"], row["setting"], f"{row['generate_s']:.2f}", f"{row['speedup']:.2f}x",
                 f"{row['full_evaluations']}/{row['model_calls']}",
                 *(f"{row['oracle'].get(key, float('nan')):.3f}" for key, _ in ORACLE_COLUMNS), f"{row['mean_abs_pixel_diff']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from chronos_video.cli import load_pipeline
    from chronos_video.evaluation.pipeline_eval import evaluation_prompts

    prompts = [caption for caption, _ in evaluation_prompts(min(args.num_prompts, args.batch_size), seed=args.seed)]
    rows: list[dict] = []
    for path in args.pipeline:
        pipe = load_pipeline(path)
        pipe.set_progress_bar_config(disable=True)
        label = Path(path).name
        pipe(prompts[0], num_inference_steps=1, output_type="latent")  # warm-up, so the first row pays no first-call cost
        baseline = measure(pipe, args, label, None, "-", None, computed_marker(pipe.transformer, "first_block"), None)
        rows.append(baseline)
        print(json.dumps({k: v for k, v in baseline.items() if k != "frames"}), flush=True)
        for cache in args.cache:
            marker = computed_marker(pipe.transformer, cache)
            for setting, config in cache_settings(args, cache, pipe, prompts):
                row = measure(pipe, args, label, cache, setting, config, marker, baseline)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "frames"}), flush=True)
    for row in rows:
        row.pop("frames")
    print()
    print(f"{args.num_prompts} held-out prompts, {args.steps} steps, guidance {args.guidance:g}, {args.threads} thread(s)")
    print(format_table(rows))
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
