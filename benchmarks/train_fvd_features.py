"""Train the FVD-local feature network (`chronos_video.evaluation.fvd_local.VideoFeatureNet`) from scratch.

The objective needs no downloads and no labels beyond the clips' own captions: five linear heads on
the pooled features predict colour, shape, size, direction and speed of training-split shapes clips,
so the features must encode appearance and motion. Everything is fixed (data seed, init seed, batch
order, one CPU thread, deterministic kernels), so the same torch version rebuilds the shipped file
byte for byte; about 4 minutes on one CPU thread.

    python benchmarks/train_fvd_features.py --output src/chronos_video/evaluation/weights/fvd_local_shapes.safetensors

It prints the file's SHA-256 (put it in `FVD_LOCAL_WEIGHTS_SHA256`) and the attribute accuracy on
held-out-combination clips, which the `fvd_local` module docstring records.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chronos_video.data import ATTRIBUTE_NAMES, COLORS, DIRECTIONS, ShapeAttributes, build_shapes_dataset
from chronos_video.data.shapes import _VOCABULARY
from chronos_video.evaluation.fvd_local import VideoFeatureNet, attribute_accuracy, videos_to_tensor


def shapes_clips(num_clips: int, split: str, seed: int) -> tuple[np.ndarray, list[ShapeAttributes]]:
    """uint8 clips (N, 16, 32, 32, 3) with paths anywhere they fit, and their attributes (the dataset's columns)."""
    dataset = build_shapes_dataset(num_clips, num_frames=16, height=32, width=32, split=split, seed=seed, start_spread=1.0)
    frames = np.asarray(dataset.with_format("numpy", columns=["frames"])["frames"], dtype=np.uint8)
    columns = {name: dataset[name] for name in ATTRIBUTE_NAMES}
    return frames, [ShapeAttributes(**{name: columns[name][i] for name in ATTRIBUTE_NAMES}) for i in range(num_clips)]


_REVERSED = torch.tensor(  # index of the opposite direction, for clips played backwards
    [list(DIRECTIONS.values()).index((-dx + 0.0, -dy + 0.0)) for dx, dy in DIRECTIONS.values()]
)
_PALETTE_PEAK = {name: max(rgb) / 255.0 for name, rgb in COLORS.items()}


def recolour(frames: torch.Tensor, colors: list[str], generator: torch.Generator) -> torch.Tensor:
    """The same clips (uint8 (B, F, H, W, 3)) drawn in random bright colours, as float in [0, 1].

    Clips are coverage x palette colour, so dividing the brightest channel by the colour's peak
    recovers the coverage exactly. The shape, size, direction and speed heads only ever see
    recoloured clips, so they cannot lean on which colours each shape had in the training split
    (e.g. never a red triangle) and still read held-out combinations right.
    """
    peak = torch.tensor([_PALETTE_PEAK[c] for c in colors]).view(-1, 1, 1, 1)
    coverage = (frames.float().amax(-1) / 255.0 / peak).clamp(0.0, 1.0)
    rgb = torch.rand(len(colors), 3, generator=generator).clamp_min(0.05)
    rgb = rgb / rgb.amax(-1, keepdim=True) * (0.6 + 0.4 * torch.rand(len(colors), 1, generator=generator))
    return coverage[..., None] * rgb.view(-1, 1, 1, 1, 3)


def train(args: argparse.Namespace) -> VideoFeatureNet:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    frames_np, attrs = shapes_clips(args.num_clips, "train", args.data_seed)
    frames = torch.from_numpy(frames_np)
    colors = [a.color for a in attrs]
    targets = {name: torch.tensor([_VOCABULARY[name].index(getattr(a, name)) for a in attrs]) for name in ATTRIBUTE_NAMES}
    net = VideoFeatureNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.learning_rate, total_steps=args.steps, pct_start=0.1)
    order = torch.Generator().manual_seed(args.seed)
    permutation, cursor, started = torch.randperm(len(frames), generator=order), 0, time.time()
    half = args.batch_size // 2
    for step in range(args.steps):
        if cursor + args.batch_size > len(frames):
            permutation, cursor = torch.randperm(len(frames), generator=order), 0
        index = permutation[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        # First half as rendered, for the colour head; second half recoloured and, at random, played
        # backwards (the path reversed, a valid clip of the opposite direction) for the other heads.
        plain, other = index[:half], index[half:]
        moved = recolour(frames[other], [colors[i] for i in other], order)
        backwards = torch.rand(len(other), generator=order) < 0.5
        moved[backwards] = moved[backwards].flip(1)
        direction = torch.where(backwards, _REVERSED[targets["direction"][other]], targets["direction"][other])
        logits = net(torch.cat([videos_to_tensor(frames[plain]), videos_to_tensor(moved)]))
        loss = F.cross_entropy(logits["color"][:half], targets["color"][plain])
        loss = loss + F.cross_entropy(logits["direction"][half:], direction)
        loss = loss + sum(F.cross_entropy(logits[name][half:], targets[name][other]) for name in ("shape", "size", "speed"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - started:.0f}s", flush=True)
    return net.eval().requires_grad_(False)


def save_weights(net: VideoFeatureNet, path: Path, settings: dict) -> None:
    """safetensors with one metadata entry: safetensors writes several entries in hash-map order, which
    would change the file's bytes (and so its SHA-256) from one run to the next."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    about = {"model": "VideoFeatureNet", "torch": torch.__version__.split("+")[0], "training": settings}
    metadata = {"chronos_video": json.dumps(about, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="safetensors file to write")
    parser.add_argument("--num_clips", type=int, default=8000)
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--eval_clips", type=int, default=1024)
    args = parser.parse_args()
    for name in ("num_clips", "steps", "batch_size", "eval_clips"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 2 or args.batch_size > args.num_clips:
        parser.error(f"--batch_size must be in [2, --num_clips={args.num_clips}], got {args.batch_size}")

    net = train(args)
    output = Path(args.output)
    save_weights(net, output, {k: v for k, v in vars(args).items() if k not in ("output", "eval_clips")})
    print(f"wrote {output} ({output.stat().st_size / 1024:.0f} KiB), sha256 {hashlib.sha256(output.read_bytes()).hexdigest()}")
    results = {}
    for label, split, seed in (("held-out combinations", "heldout", 1), ("training combinations, unseen clips", "train", 2)):
        frames, attrs = shapes_clips(args.eval_clips, split, seed)
        results[label] = attribute_accuracy(net, frames, attrs)
    print(f"| clips ({args.eval_clips} each) | " + " | ".join([*ATTRIBUTE_NAMES, "all"]) + " |")
    print("|---|" + "---:|" * (len(ATTRIBUTE_NAMES) + 1))
    for label, scores in results.items():
        print(f"| {label} | " + " | ".join(f"{100 * scores[k]:.1f}%" for k in [*ATTRIBUTE_NAMES, "all"]) + " |")


if __name__ == "__main__":
    main()
