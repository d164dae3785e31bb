#!/usr/bin/env python
"""How much of an FSQ video tokenizer's codebook held-out clips use, as a function of how many clips are read.

    python benchmarks/bench_codebook_usage.py [--video_tokenizer pipelines/ar-shapes/video_tokenizer]
        [--clips 64 128 256 512 1024 4096] [--train_clips 16000] [--threads 1] [--output usage.json]

"Codebook usage" is the share of codes that occur at least once, so it depends on how many tokens are read: a
code for a rare patch (the edge of a small triangle in one colour) may not occur in 64 clips and still be used
for it. This script encodes `max(--clips)` held-out shapes clips (the same draw as the tokenizer's own evaluation:
split "heldout", seed 1) and reports the usage after the first N of them for each N, then the same for
`--train_clips` training clips (`--train_start_spread`, the AR LM's data) with the perplexity of their code
distribution (exp of its entropy: how many codes the data effectively uses) and how many codes occur fewer
than 10 times. The tokenizer's card reports usage on its 64 evaluation clips; this shows where that number stands.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video_tokenizer", default=str(REPO / "pipelines" / "ar-shapes" / "video_tokenizer"))
    parser.add_argument("--clips", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 4096], help="held-out clip counts")
    parser.add_argument("--train_clips", type=int, default=16000, help="training clips to count codes on (0: skip)")
    parser.add_argument("--train_start_spread", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache_dir", help="where the rendered clips are cached (default: the library's)")
    parser.add_argument("--output", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if min(args.clips) < 1 or args.train_clips < 0 or args.batch_size < 1 or args.threads < 1:
        parser.error("--clips, --batch_size and --threads must be >= 1 and --train_clips >= 0")
    return args


@torch.no_grad()
def code_counts(tokenizer, clips: torch.Tensor, batch_size: int, checkpoints: list[int] | None = None):
    """Occurrences of every code in `clips` (uint8, N F H W C), and the usage after each checkpoint clip count."""
    from chronos_video.flow_matching import frames_to_model_input

    counts = torch.zeros(tokenizer.codebook_size, dtype=torch.long)
    usage, wanted = {}, set(checkpoints or [])
    for start in range(0, clips.shape[0], batch_size):
        stop = min(start + batch_size, clips.shape[0])
        codes = tokenizer.encode(frames_to_model_input(clips[start:stop]).to(tokenizer.device)).flatten(1).cpu()
        # split the batch where a checkpoint count falls inside it
        cuts = sorted(n - start for n in wanted if start < n <= stop)
        first = 0
        for cut in cuts:
            counts += torch.bincount(codes[first:cut].flatten(), minlength=tokenizer.codebook_size)
            usage[start + cut] = float((counts > 0).float().mean())
            first = cut
        counts += torch.bincount(codes[first:].flatten(), minlength=tokenizer.codebook_size)
    return counts, usage


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from chronos_video.data import load_shapes_frames
    from chronos_video.models.fsq_tokenizer import FSQVideoTokenizer

    tokenizer = FSQVideoTokenizer.from_pretrained(args.video_tokenizer).eval()
    geometry = {"num_frames": 16, "height": 32, "width": 32}
    cache = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    heldout, _ = load_shapes_frames({**geometry, **cache, "num_clips": max(args.clips), "split": "heldout", "seed": 1})
    counts, usage = code_counts(tokenizer, heldout, args.batch_size, args.clips)
    tokens_per_clip = int(counts.sum()) // heldout.shape[0]
    result = {"video_tokenizer": args.video_tokenizer, "codebook_size": tokenizer.codebook_size, "heldout_usage": usage}
    print(f"{Path(args.video_tokenizer)}: codebook of {tokenizer.codebook_size} codes")
    print("| held-out clips | tokens | codebook usage |\n|---:|---:|---:|")
    for count, share in sorted(usage.items()):
        print(f"| {count} | {count * tokens_per_clip} | {share:.1%} |")
    if args.train_clips:
        train, _ = load_shapes_frames({**geometry, **cache, "num_clips": args.train_clips, "split": "train", "seed": 0, "start_spread": args.train_start_spread})
        counts, _ = code_counts(tokenizer, train, args.batch_size)
        probabilities = counts.double() / counts.sum()
        nonzero = probabilities[probabilities > 0]
        result.update(
            train_clips=args.train_clips, train_usage=float((counts > 0).double().mean()),
            train_perplexity=float(torch.exp(-(nonzero * nonzero.log()).sum())), train_codes_under_10=int(((counts > 0) & (counts < 10)).sum()),
        )
        print(f"\n{args.train_clips} training clips (start_spread {args.train_start_spread:g}): usage {result['train_usage']:.1%}, "
              f"perplexity {result['train_perplexity']:.1f} codes, {result['train_codes_under_10']} codes used fewer than 10 times")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
