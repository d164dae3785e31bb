"""H3: does constraint transport preserve high-frequency content over long rollouts?

    python benchmarks/bench_wavefront.py [--pipeline pipelines/nano-sora-shapes] [--num_prompts 4]
        [--rollouts 8] [--steps 20] [--threads 1]

A long video is generated clip by clip: clip 0 is sampled freely; clip k+1 is sampled with its
first frame constrained to the last frame of clip k (a keyframe constraint), for `--rollouts`
clips. The seed claims that "hyperbolic" constraint transport preserves the wavefront set (sharp
edges) where diffusion-style sampling annihilates it, i.e. that high-frequency energy decays over
long rollouts without it and not with it.

Metric: the fraction of each frame's (mean-removed) 2D FFT energy above half the Nyquist
frequency (radial frequency > 0.25 cycles / pixel), summed over colour channels, averaged over
the frames of a clip (black frames are skipped) and over prompts, per rollout index. Real clips
(`render_clip` for the same prompts) give the reference value. The seam RMS (clip k's first frame
vs clip k-1's last frame) says whether a rollout actually continues the previous clip, and the
background RMS (pixels more than 2 px from anything bright, black in real clips) says how much of
the high-frequency energy is residual sampling noise rather than edges.

Rows: ours (natural gradient + CBF + final projection), DPS-style and RePaint-style conditioning
(no projection), and independent clips (no conditioning at all: the "without" baseline whose
high-frequency content cannot decay through the chain). Clip 0 is shared by all rows.
Single-threaded by default (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_constraints import DEFAULT_PIPELINE, generate, load, real_clip  # noqa: E402

CONDITIONING: dict[str, dict | None] = {
    "ours (natural + CBF)": {"method": "natural", "cbf": True},
    "DPS-style": {"method": "dps", "cbf": False, "finalize_iters": 0},
    "RePaint-style": {"method": "repaint", "cbf": False, "finalize_iters": 0},
    "independent clips (no conditioning)": None,
}


def high_frequency_fraction(video: torch.Tensor, cutoff: float = 0.25) -> float:
    """Mean over non-black frames of the share of 2D FFT energy above `cutoff` cycles / pixel.

    `video` is (F, C, H, W) in [0, 1]; each frame's per-channel mean is removed first (the DC term
    would otherwise dominate a mostly black frame), and energy is summed over channels.
    """
    frames = video.double()
    frames = frames - frames.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(frames).abs().square().sum(dim=1)  # (F, H, W)
    fy = torch.fft.fftfreq(frames.shape[-2], dtype=torch.float64)
    fx = torch.fft.fftfreq(frames.shape[-1], dtype=torch.float64)
    high = (fy[:, None].square() + fx[None, :].square()).sqrt() > cutoff
    total = power.sum(dim=(-2, -1))
    keep = total > 1e-8
    if not bool(keep.any()):
        return float("nan")
    return float((power[:, high].sum(dim=-1)[keep] / total[keep]).mean())


def background_rms(video: torch.Tensor, threshold: float = 0.3, margin: int = 2) -> float:
    """RMS of the pixels at least `margin` pixels away from anything brighter than `threshold`:
    residual noise in what should be black background (0 for real clips)."""
    bright = (video.amax(dim=1, keepdim=True) > threshold).float()  # (F, 1, H, W)
    near = torch.nn.functional.max_pool2d(bright, 2 * margin + 1, stride=1, padding=margin) > 0
    background = (~near).expand_as(video)
    if not bool(background.any()):
        return float("nan")
    return float(video[background].double().square().mean().sqrt())


def rollout(pipe, prompt: str, first: torch.Tensor, seed: int, args, settings) -> tuple[list[torch.Tensor], list[float], float]:
    """Clips 1..K-1 continuing `first` (clip 0). Returns the clips, seam RMS per clip and seconds."""
    from chronos_video.guidance import RegionConstraint

    clips, seams, seconds = [first], [], 0.0
    num_frames = first.shape[0]
    for k in range(1, args.rollouts):
        previous_last = clips[-1][-1:]
        constraint = RegionConstraint.keyframes(previous_last, [0], num_frames=num_frames, epsilon=args.epsilon)
        sample = generate(pipe, prompt, seed + k, args.steps, args.guidance, constraint, settings)
        clips.append(sample.video)
        seams.append(float((sample.video[0] - previous_last[0]).square().mean().sqrt()))
        seconds += sample.seconds
    return clips, seams, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    parser.add_argument("--num_prompts", type=int, default=4)
    parser.add_argument("--rollouts", type=int, default=8, help="clips per long video (clip 0 included)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.rollouts < 2:
        raise SystemExit("--rollouts must be >= 2")
    torch.set_num_threads(args.threads)

    from chronos_video.data import heldout_prompts

    pipe = load(args.pipeline)
    num_frames, height, width = pipe.default_size
    prompts = heldout_prompts(args.num_prompts, seed=args.seed)
    print(f"## H3: high-frequency energy over long rollouts ({args.pipeline})\n")
    print(
        f"{len(prompts)} held-out prompts, {args.rollouts} clips of {num_frames}x{height}x{width} per long video "
        f"({args.rollouts * num_frames} frames), {args.steps} Euler steps, guidance {args.guidance}, keyframe epsilon "
        f"{args.epsilon}, torch threads {args.threads}. Cell = fraction of FFT energy above half Nyquist (mean over prompts).\n"
    )

    real_clips = [real_clip(attrs, num_frames, height, width, seed=args.seed * 1000 + i)[0] for i, (_, attrs) in enumerate(prompts)]
    real = [high_frequency_fraction(clip) for clip in real_clips]
    real_noise = float(np.nanmean([background_rms(clip) for clip in real_clips]))
    firsts = [generate(pipe, prompt, args.seed * 1000 + 100 * i, args.steps, args.guidance).video for i, (prompt, _) in enumerate(prompts)]

    header = ["conditioning"] + [f"clip {k}" for k in range(args.rollouts)] + ["last / first", "mean seam RMS", "background RMS", "s / clip"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, settings in CONDITIONING.items():
        per_clip = np.zeros((len(prompts), args.rollouts))
        seams, noise, seconds = [], [], 0.0
        for i, (prompt, _) in enumerate(prompts):
            seed = args.seed * 1000 + 100 * i
            if settings is None:  # independent clips: same seeds, no link to the previous clip
                clips = [firsts[i]]
                for k in range(1, args.rollouts):
                    sample = generate(pipe, prompt, seed + k, args.steps, args.guidance)
                    clips.append(sample.video)
                    seams.append(float((sample.video[0] - clips[-2][-1]).square().mean().sqrt()))
                    seconds += sample.seconds
            else:
                clips, clip_seams, clip_seconds = rollout(pipe, prompt, firsts[i], seed, args, settings)
                seams += clip_seams
                seconds += clip_seconds
            per_clip[i] = [high_frequency_fraction(c) for c in clips]
            noise += [background_rms(c) for c in clips]
        mean = np.nanmean(per_clip, axis=0)
        cells = [f"{v:.4f}" for v in mean]
        lines.append("| " + " | ".join([name, *cells, f"{mean[-1] / mean[0]:.2f}", f"{np.mean(seams):.4f}", f"{np.nanmean(noise):.4f}",
                                         f"{seconds / (len(prompts) * (args.rollouts - 1)):.2f}"]) + " |")
        print(f"  {name}: done", file=sys.stderr, flush=True)
    real_mean = float(np.nanmean(real))
    lines.append("| " + " | ".join(["real clips (reference)", *([f"{real_mean:.4f}"] + ["-"] * (args.rollouts - 1)), "-", "-", f"{real_noise:.4f}", "-"]) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
