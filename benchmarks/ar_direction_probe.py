#!/usr/bin/env python
"""Does an ARVideoPipeline's LM know which way a held-out object moves? The LM read as a direction classifier.

    python benchmarks/ar_direction_probe.py [--pipeline pipelines/ar-shapes] [--num_prompts 256] [--early_frames 3]

Sampling can lose a direction the LM knows (a stray code at frame 1), or the LM may not know it. This separates
the two without sampling: real clips of held-out prompts (`heldout_prompts`, placed with `--start_spread`) are
encoded by the pipeline's video tokenizer, and the LM scores their codes, teacher-forced, under the prompt's
caption with each of the 8 directions in turn. The direction whose caption makes the clip most likely is the
LM's reading; it is scored on the whole clip and on its first `--early_frames` frames (where sampling commits to
a direction), overall and per held-out pairing (`HELDOUT_COMBINATIONS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default=str(REPO / "pipelines" / "ar-shapes"))
    parser.add_argument("--num_prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="held-out prompt draw")
    parser.add_argument("--clip_seed", type=int, default=5, help="placement of the real clips")
    parser.add_argument("--start_spread", type=float, default=1.0, help="the LM's training value")
    parser.add_argument("--early_frames", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.early_frames < 1 or args.threads < 1:
        parser.error("--num_prompts, --early_frames and --threads must be >= 1")
    return args


@torch.no_grad()
def direction_readings(pipe, clips, attributes, early_frames: int) -> list[dict]:
    """For each clip (uint8 F H W C) and its attributes: the direction the LM finds most likely, whole and early."""
    from chronos_video.data.motion import DIRECTIONS
    from chronos_video.flow_matching import frames_to_model_input

    directions = list(DIRECTIONS)
    lm, config = pipe.language_model, pipe.language_model.config
    early_codes = early_frames * config.tokens_per_frame
    rows = []
    for clip, attrs in zip(clips, attributes):
        codes = pipe.video_tokenizer.encode(frames_to_model_input(clip[None]).to(pipe.video_tokenizer.device)).flatten(1)
        captions = [dataclasses.replace(attrs, direction=direction).caption() for direction in directions]
        ids = torch.cat([pipe.prompt_ids(captions), (codes + config.visual_token_offset).to(lm.device).expand(len(captions), -1)], dim=1)
        log_likelihoods = lm.code_log_likelihoods(ids)  # (directions, codes)
        whole, early = log_likelihoods.sum(-1), log_likelihoods[:, :early_codes].sum(-1)
        rows.append({"caption": attrs.caption(), "direction": attrs.direction,
                     "whole": directions[int(whole.argmax())], "early": directions[int(early.argmax())]})
    return rows


def summarise(rows: list[dict], attributes) -> dict[str, dict[str, float]]:
    """Accuracy of the whole-clip and early readings, overall and per held-out pairing (those with clips)."""
    from chronos_video.data.shapes import HELDOUT_COMBINATIONS

    groups = {"all held-out prompts": list(range(len(rows)))}
    for combination in HELDOUT_COMBINATIONS:
        chosen = [i for i, attrs in enumerate(attributes) if all(getattr(attrs, key) == value for key, value in combination.items())]
        if chosen:
            groups[" ".join(combination.values())] = chosen
    return {name: {"n": len(chosen),
                   "whole": sum(rows[i]["whole"] == rows[i]["direction"] for i in chosen) / len(chosen),
                   "early": sum(rows[i]["early"] == rows[i]["direction"] for i in chosen) / len(chosen)}
            for name, chosen in groups.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from chronos_video import ARVideoPipeline
    from chronos_video.data import heldout_prompts
    from chronos_video.evaluation.fvd_local import render_real_clips

    pipe = ARVideoPipeline.from_pretrained(args.pipeline)
    attributes = [attrs for _, attrs in heldout_prompts(args.num_prompts, seed=args.seed)]
    height, width = pipe.frame_size
    clips = render_real_clips(attributes, num_frames=pipe.config.num_frames, height=height, width=width,
                              seed=args.clip_seed, start_spread=args.start_spread)
    rows = direction_readings(pipe, torch.from_numpy(clips), attributes, args.early_frames)
    scores = summarise(rows, attributes)
    print(f"{Path(args.pipeline)}: direction read by the LM from real held-out clips ({args.num_prompts} prompts, seed {args.seed})")
    print(f"| prompts | clips | whole clip | first {args.early_frames} frames |\n|---|---:|---:|---:|")
    for name, row in scores.items():
        print(f"| {name} | {row['n']} | {row['whole']:.1%} | {row['early']:.1%} |")
    result = {"pipeline": args.pipeline, "early_frames": args.early_frames, "scores": scores, "rows": rows}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
