"""Seconds per generated video for several flow pipelines, measured interleaved so they share the machine's state.

    python benchmarks/bench_sampling_time.py pipelines/nano-sora-latent-shapes pipelines/nano-sora-shapes \
        [--steps 20] [--guidance 4] [--repeats 5] [--threads 1]

Each pipeline generates one untimed warm-up video, then `--repeats` rounds in which every pipeline generates one
video (batch 1, a new seed per round); the median and the minimum per pipeline are printed. Interleaving keeps a
background load from favouring whichever pipeline runs first. Latent pipelines include their VAE decode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

PROMPTS = ("a small red circle moving left to right slowly", "a large blue square moving top to bottom quickly")


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", help="pipeline folders (any chronos-video flow pipeline)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    torch.set_num_threads(args.threads)
    from chronos_video.cli import load_pipeline

    pipes = {}
    for path in args.pipelines:
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise SystemExit(f"no pipeline at {path!r} (model_index.json missing)")
        pipes[path] = load_pipeline(path)
        pipes[path].set_progress_bar_config(disable=True)

    def generate(pipe, seed: int) -> None:
        pipe(PROMPTS[seed % 2], num_inference_steps=args.steps, guidance_scale=args.guidance, generator=torch.Generator().manual_seed(seed))

    for pipe in pipes.values():
        generate(pipe, 0)  # warm-up: first-call allocations and lazy imports
    seconds: dict[str, list[float]] = {path: [] for path in pipes}
    for round_index in range(args.repeats):
        for path, pipe in pipes.items():
            started = time.perf_counter()
            generate(pipe, round_index + 1)
            seconds[path].append(time.perf_counter() - started)
    print(f"| pipeline | s / video (median of {args.repeats}) | min |")
    print("|---|---:|---:|")
    for path, values in seconds.items():
        print(f"| {path} | {statistics.median(values):.3f} | {min(values):.3f} |")
    return seconds


if __name__ == "__main__":
    main()
