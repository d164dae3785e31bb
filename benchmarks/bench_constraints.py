"""H1: does constraint transport meet keyframe / region constraints better than the baselines?

    python benchmarks/bench_constraints.py [--pipeline pipelines/nano-sora-shapes] [--num_prompts 12]
        [--steps 20] [--epsilon 0.05] [--threads 1]

For each held-out prompt a real clip is rendered with `render_clip` for the prompt's attributes
(random start), and two constraint tasks are built from it:

* keyframe: the first and last frames of the clip are given (whole frames);
* region:   a box of half the frame size, centred on the middle of the object's path, is given on
            every frame.

Every method samples the same prompts with the same seeds and the same strength (λ = 1):

* ours           natural gradient (pullback metric) + CBF safety filter + final projection (the pipeline default)
* ours, no proj  the same without the final projection (`finalize_iters=0`): what the sampler itself achieves
* DPS            plain gradient step through x̂0 (velocity frozen), no projection
* RePaint        replace Ω of x̂0 by the target and re-noise with the model's noise estimate, no projection
* projection     no guidance during sampling, only the final projection (`method="none"`)
* unconstrained  no constraint at all

Metrics: PSNR on the mask, IoU on the mask (foreground = max RGB > 0.3, generated vs target,
pooled over the masked pixels of all frames; PSNR capped at 60 dB, which is what an exact match
shows), violation rate (fraction of videos whose RMS error
over the mask exceeds epsilon), oracle accuracy outside the mask (keyframe task: the interior
frames; region task: the whole video, since the box cannot be cut out of the pixels) against the
prompt's labels, the distance of the detected object from where the real clip has it on those
frames (the constraints pin the trajectory, so a method that propagates them should land close),
and wall-clock seconds per video. Single-threaded (`--threads 1`, the machine is
shared); compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

DEFAULT_PIPELINE = "pipelines/nano-sora-shapes"
FOREGROUND = 0.3  # the oracle's brightness threshold
PSNR_CAP = 60.0  # dB; an exact match (MSE 0) is shown as the cap, below 8-bit quantization error (~59 dB)

# name -> constraint_settings (None = no constraint at all)
METHODS: dict[str, dict | None] = {
    "ours (natural + CBF)": {"method": "natural", "cbf": True},
    "ours, no final projection": {"method": "natural", "cbf": True, "finalize_iters": 0},
    "DPS-style": {"method": "dps", "cbf": False, "finalize_iters": 0},
    "RePaint-style": {"method": "repaint", "cbf": False, "finalize_iters": 0},
    "projection only": {"method": "none", "cbf": False},
    "unconstrained": None,
}


def load(path: str):
    """The pipeline at `path` (any chronos-video class), progress bars off."""
    from chronos_video.cli import load_pipeline

    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise SystemExit(f"no pipeline at {path!r} (model_index.json missing); train one or pass --pipeline")
    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def video_size(pipe) -> tuple[int, int, int]:
    return pipe.default_size


def real_clip(attrs, num_frames: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """A real clip for `attrs` as (F, 3, H, W) float in [0, 1], and its true centres (F, 2)."""
    from chronos_video.data import render_clip

    frames, centers = render_clip(attrs, num_frames, height, width, rng=seed)
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0, centers


def keyframe_constraint(clip: torch.Tensor, epsilon: float):
    from chronos_video.guidance import RegionConstraint

    return RegionConstraint.keyframes(clip, [0, clip.shape[0] - 1], epsilon=epsilon)


def region_constraint(clip: torch.Tensor, centers: np.ndarray, epsilon: float):
    """A half-size box, centred on the middle of the object's path, on every frame."""
    from chronos_video.guidance import RegionConstraint

    _, _, height, width = clip.shape
    box_h, box_w = height // 2, width // 2
    cx, cy = centers.mean(axis=0)
    top = int(np.clip(round(cy - box_h / 2), 0, height - box_h))
    left = int(np.clip(round(cx - box_w / 2), 0, width - box_w))
    return RegionConstraint.box(clip, top, left, box_h, box_w, epsilon=epsilon)


@dataclass
class Sample:
    video: torch.Tensor  # (F, 3, H, W) in [0, 1]
    seconds: float


def generate(pipe, prompt: str, seed: int, steps: int, guidance: float, constraint=None, settings=None, **kwargs) -> Sample:
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    out = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="pt",
        precision=None,
        constraints=None if settings is None else [constraint],
        constraint_settings=settings,
        **kwargs,
    )
    return Sample(out.frames[0].float().cpu(), time.perf_counter() - start)


def mask_metrics(video: torch.Tensor, constraint) -> dict[str, float]:
    """PSNR, RMS and foreground IoU of `video` against the constraint target on its mask."""
    mask, target = constraint.mask, constraint.target
    error = (video[mask] - target[mask]).double()
    mse = float(error.square().mean())
    rms = mse**0.5
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)
    pixel_mask = mask.any(dim=1)  # (F, H, W): a pixel counts if any of its channels is constrained
    fg_video = video.amax(dim=1) > FOREGROUND
    fg_target = target.amax(dim=1) > FOREGROUND
    inter = int((fg_video & fg_target & pixel_mask).sum())
    union = int(((fg_video | fg_target) & pixel_mask).sum())
    iou = 1.0 if union == 0 else inter / union
    return {"psnr": psnr, "rms": rms, "iou": iou}


def oracle_scores(videos: list[torch.Tensor], labels, height: int, width: int, centers=None) -> dict[str, float]:
    """Oracle accuracy ("all" five attributes right, mean per-attribute) and, with true centres,
    the mean distance of the detected object from where the real clip has it (px)."""
    from chronos_video.evaluation import ShapesOracle

    oracle = ShapesOracle(height=height, width=width)
    scores = oracle.score([v.permute(0, 2, 3, 1).numpy() for v in videos], labels, centers=centers)
    attrs = ("color", "shape", "size", "direction", "speed")
    return {
        "all": scores["all"],
        "mean_attr": float(np.mean([scores[a] for a in attrs])),
        "center_error": scores.get("center_error", float("nan")),
    }


def fmt(value: float, digits: int = 2) -> str:
    if value is None or not np.isfinite(value):
        return "inf" if value == float("inf") else "n/a"
    return f"{value:.{digits}f}"


def run_task(pipe, task: str, prompts, args, methods: dict) -> list[list[str]]:
    num_frames, height, width = video_size(pipe)
    rows = []
    constraints, labels, oracle_clips, true_centers = [], [], [], []
    outside = (lambda v: v[1:-1]) if task == "keyframe" else (lambda v: v)
    for index, (_, attrs) in enumerate(prompts):
        clip, centers = real_clip(attrs, num_frames, height, width, seed=args.seed * 1000 + index)
        if task == "keyframe":
            constraints.append(keyframe_constraint(clip, args.epsilon))
        else:
            constraints.append(region_constraint(clip, centers, args.epsilon))
        oracle_clips.append(outside(clip))
        true_centers.append(outside(centers))
        labels.append(attrs)
    for name, settings in methods.items():
        metrics, videos, seconds = [], [], []
        for index, (prompt, _) in enumerate(prompts):
            sample = generate(pipe, prompt, args.seed * 1000 + index, args.steps, args.guidance, constraints[index], settings)
            metrics.append(mask_metrics(sample.video, constraints[index]))
            videos.append(outside(sample.video))
            seconds.append(sample.seconds)
        oracle = oracle_scores(videos, labels, height, width, true_centers)
        psnr = [m["psnr"] for m in metrics]
        rows.append([
            name,
            fmt(float(np.mean(np.minimum(psnr, PSNR_CAP)))),
            fmt(float(np.mean([m["iou"] for m in metrics])), 3),
            fmt(float(np.mean([m["rms"] for m in metrics])), 4),
            f"{100.0 * np.mean([m['rms'] > args.epsilon * (1 + 1e-6) for m in metrics]):.0f}%",
            f"{100.0 * oracle['all']:.0f}%",
            f"{100.0 * oracle['mean_attr']:.0f}%",
            fmt(oracle["center_error"]),
            fmt(float(np.mean(seconds))),
        ])
        print(f"  [{task}] {name}: done", file=sys.stderr, flush=True)
    ceiling = oracle_scores(oracle_clips, labels, height, width, true_centers)
    rows.append([
        "real target clip (oracle ceiling)", "-", "-", "-", "-", f"{100.0 * ceiling['all']:.0f}%",
        f"{100.0 * ceiling['mean_attr']:.0f}%", fmt(ceiling["center_error"]), "-",
    ])
    return rows


def table(rows: list[list[str]]) -> str:
    header = ["method", "PSNR on Ω (dB)", "IoU on Ω", "RMS on Ω", "violation rate", "oracle all-5 outside Ω", "oracle mean attr outside Ω", "centre err outside Ω (px)", "s / video"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    parser.add_argument("--num_prompts", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--epsilon", type=float, default=0.05, help="RMS tolerance over the mask, pixel units")
    parser.add_argument("--tasks", nargs="+", default=["keyframe", "region"], choices=["keyframe", "region"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from chronos_video.data import heldout_prompts

    pipe = load(args.pipeline)
    num_frames, height, width = video_size(pipe)
    prompts = heldout_prompts(args.num_prompts, seed=args.seed)
    methods = {name: METHODS[name] for name in args.methods}
    print(f"## H1: constraint transport vs baselines ({args.pipeline})\n")
    print(
        f"{len(prompts)} held-out prompts, {num_frames}x{height}x{width} videos, {args.steps} Euler steps, guidance "
        f"{args.guidance}, epsilon {args.epsilon} (RMS, pixels in [0, 1]), strength 1.0 for every method, "
        f"torch threads {args.threads}, seeds {args.seed}*1000 + prompt index.\n"
    )
    for task in args.tasks:
        title = "keyframes: first and last frame of a real clip" if task == "keyframe" else "region: half-size box on every frame"
        print(f"### {title}\n")
        print(table(run_task(pipe, task, prompts, args, methods)))
        print()


if __name__ == "__main__":
    main()
