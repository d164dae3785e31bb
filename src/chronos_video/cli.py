"""`chronos-video` command line: generate videos, write the shapes dataset, evaluate a pipeline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _looks_local(path: str) -> bool:
    """Whether a missing `path` was meant as a folder rather than a Hub id (`owner/name`): it starts
    like a path, has more than one separator, or its first component is a folder here (so
    `pipelines/nope` in a checkout that has `pipelines/`)."""
    if path.startswith((".", "~", "/")) or "\\" in path or (os.altsep and os.altsep in path):
        return True
    parts = path.rstrip("/").split("/")
    return len(parts) > 2 or path.endswith("/") or (len(parts) == 2 and Path(parts[0]).is_dir())


def _in_hub_cache(path: str) -> bool:
    """A Hub id already downloaded (so `owner/name` still works where a folder `owner` exists here)."""
    if path.count("/") != 1 or path.startswith((".", "~", "/")):
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(path, "model_index.json"), str)
    except ValueError:  # not a valid repo id
        return False


def check_pipeline_path(path: str) -> Path | None:
    """The local pipeline folder `path` names, or None for a Hub id; fails at once, naming the path,
    for a local-looking path that is not a saved pipeline instead of asking the Hub for it."""
    folder = Path(path).expanduser()
    if (folder / "model_index.json").is_file():
        return folder
    if folder.exists():
        raise FileNotFoundError(f"`--pipeline` {path!r} has no model_index.json; pass a folder written by `save_pretrained`.")
    if _looks_local(path) and not _in_hub_cache(path):
        raise FileNotFoundError(f"`--pipeline` {path!r}: no such folder ({folder.resolve()} does not exist).")
    return None


def load_pipeline(path: str, dtype: str = "float32"):
    """Loads any chronos-video pipeline folder (or Hub id) by the class named in its model_index.json."""
    folder = check_pipeline_path(path)
    import torch

    import chronos_video

    if folder is not None:
        class_name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    else:
        from huggingface_hub import hf_hub_download

        class_name = json.loads(Path(hf_hub_download(path, "model_index.json")).read_text())["_class_name"]
    pipeline_class = getattr(chronos_video, class_name, None)
    if pipeline_class is None:
        raise ValueError(f"{path}: pipeline class {class_name!r} is not part of chronos_video.")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return pipeline_class.from_pretrained(str(folder) if folder is not None else path, dtype=dtypes[dtype])


def sampling_kwargs(pipe, args: argparse.Namespace) -> dict:
    """`--steps` for flow pipelines; `--top-k/--top-p/--typical-p/--temperature/--guidance-plausibility` for the
    autoregressive one."""
    import inspect

    parameters = inspect.signature(pipe.__call__).parameters
    if "num_inference_steps" in parameters:
        return {"num_inference_steps": args.steps}
    options = {"top_k": args.top_k, "top_p": args.top_p, "typical_p": args.typical_p, "temperature": args.temperature,
               "guidance_plausibility": args.guidance_plausibility}
    return {name: value for name, value in options.items() if value is not None and name in parameters}


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top-k", type=int, default=None, help="autoregressive pipelines: top-k sampling")
    parser.add_argument("--top-p", type=float, default=None, help="autoregressive pipelines: nucleus sampling")
    parser.add_argument("--typical-p", type=float, default=None, help="autoregressive pipelines: typical sampling")
    parser.add_argument("--temperature", type=float, default=None, help="autoregressive pipelines: sampling temperature")
    parser.add_argument("--guidance-plausibility", type=float, default=None,
                        help="autoregressive pipelines: guide only codes at least this fraction as likely as the best one")


def _generate(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from diffusers.utils import export_to_gif, export_to_video
    from PIL import Image

    output = Path(args.output)
    if args.upscale < 1:
        raise ValueError(f"`--upscale` must be >= 1, got {args.upscale}.")
    if output.suffix.lower() not in (".mp4", ".gif"):
        raise ValueError(f"`--output` must end in .mp4 or .gif, got {args.output!r}.")
    pipe = load_pipeline(args.pipeline, args.dtype)
    video = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
        **sampling_kwargs(pipe, args),
    ).frames[0]
    saved = video.repeat(args.upscale, axis=1).repeat(args.upscale, axis=2) if args.upscale > 1 else video
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".gif":
        export_to_gif([Image.fromarray((frame * 255).round().astype(np.uint8)) for frame in saved], str(output), fps=args.fps)
    else:
        export_to_video(list(saved), str(output), fps=args.fps)
    print(f"wrote {output} ({video.shape[0]} frames of {video.shape[1]}x{video.shape[2]}, saved at x{args.upscale})")
    if args.score:  # scored at the generated resolution, not the upscaled file
        from .data import parse_caption
        from .evaluation import ShapesOracle, format_oracle_table

        labels = parse_caption(args.prompt)
        scores = ShapesOracle(height=video.shape[1], width=video.shape[2]).score([video], [labels])
        print(format_oracle_table({"this video": scores}))


def _dataset(args: argparse.Namespace) -> None:
    from .data import save_shapes_dataset

    save_shapes_dataset(args.output, num_clips=args.num_clips, num_frames=args.num_frames, height=args.height, width=args.width, split=args.split, seed=args.seed)
    print(f"wrote {args.num_clips} {args.split} clips to {args.output}")


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation.pipeline_eval import evaluate_pipeline

    pipe = load_pipeline(args.pipeline, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    options = sampling_kwargs(pipe, args)
    steps = options.pop("num_inference_steps", None)
    if args.fvd:  # real clips for FVD-local are placed as the pipeline's training clips were
        options.update(fvd=True, start_spread=_start_spread(args))
    scores, table = evaluate_pipeline(
        pipe, num_prompts=args.num_prompts, num_inference_steps=steps, guidance_scale=args.guidance_scale,
        seed=args.seed, batch_size=args.batch_size, by_pairing=args.by_pairing, **options,
    )
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2))


def _start_spread(args: argparse.Namespace) -> float:
    """The path placement to score on: the flag, else the one the pipeline was trained on."""
    if args.start_spread is not None:
        return args.start_spread
    settings = Path(args.pipeline) / "training_config.json"
    if settings.is_file():
        return float(json.loads(settings.read_text()).get("data", {}).get("start_spread", 1.0))
    return 1.0


def _swap_gap(args: argparse.Namespace) -> None:
    from .evaluation import caption_swap_loss_gaps

    pipe = load_pipeline(args.pipeline, args.dtype)
    attributes = [name.strip() for name in args.attributes.split(",") if name.strip()]
    results = caption_swap_loss_gaps(
        pipe, attributes, num_clips=args.num_clips, split=args.split, seed=args.seed, start_spread=_start_spread(args),
    )
    print("| attribute swapped | loss, true caption | loss gap | gap / loss |\n|---|---:|---:|---:|")
    for attribute, result in results.items():
        print(f"| {attribute} | {result['loss_true']:.4f} | {result['gap']:+.5f} | {100 * result['relative_gap']:+.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _calibrate(args: argparse.Namespace) -> None:
    import numpy as np

    from .data import sample_attributes
    from .precision import calibrate_pipeline

    if args.num_prompts < 1:
        raise ValueError(f"`--num-prompts` must be >= 1, got {args.num_prompts}.")
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(args.seed + 7919)  # training-split prompts, disjoint from the held-out evaluation prompts
    prompts = [sample_attributes(rng, split="train").caption(0) for _ in range(args.num_prompts)]
    schedule = calibrate_pipeline(pipe, prompts, num_inference_steps=args.steps, budget=args.budget, guidance_scale=args.guidance_scale, seed=args.seed)
    if args.output:  # a full copy of the pipeline with the schedule in its config
        pipe.save_pretrained(args.output, safe_serialization=True)
    else:  # the schedule is pipeline policy: only model_index.json changes
        pipe.save_policy(args.pipeline)
    folder = Path(args.output or args.pipeline) / "model_index.json"
    print(f"stored the calibrated schedule ({len(schedule.rules)} sigma rules) in {folder}; use it with precision=\"calibrated\"")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chronos-video", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="text -> .mp4 or .gif")
    generate.add_argument("--pipeline", required=True, help="pipeline folder or Hub id")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--output", default="out.mp4", help="*.mp4 or *.gif")
    generate.add_argument("--num-frames", type=int, default=None)
    generate.add_argument("--height", type=int, default=None)
    generate.add_argument("--width", type=int, default=None)
    generate.add_argument("--steps", type=int, default=30)
    generate.add_argument("--guidance-scale", type=float, default=4.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--fps", type=int, default=8)
    generate.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscaling of the saved file (>= 1)")
    generate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    generate.add_argument("--score", action="store_true", help="score the video with the shapes oracle (shapes prompts only)")
    _add_sampling_options(generate)
    generate.set_defaults(func=_generate)

    dataset = commands.add_parser("dataset", help="write the procedural shapes dataset with save_to_disk")
    dataset.add_argument("--output", required=True)
    dataset.add_argument("--num-clips", type=int, default=10000)
    dataset.add_argument("--num-frames", type=int, default=16)
    dataset.add_argument("--height", type=int, default=32)
    dataset.add_argument("--width", type=int, default=32)
    dataset.add_argument("--split", choices=["train", "heldout", "all"], default="train")
    dataset.add_argument("--seed", type=int, default=0)
    dataset.set_defaults(func=_dataset)

    evaluate = commands.add_parser("evaluate", help="oracle accuracy on prompts from held-out attribute combinations")
    evaluate.add_argument("--pipeline", required=True)
    evaluate.add_argument("--num-prompts", type=int, default=32)
    evaluate.add_argument("--steps", type=int, default=20)
    evaluate.add_argument("--guidance-scale", type=float, default=4.0)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    evaluate.add_argument("--json", default=None, help="also write the scores to this JSON file")
    evaluate.add_argument(
        "--fvd", action="store_true",
        help="also report FVD-local (our shapes 3D-CNN features, not comparable to I3D-FVD) beside its real-vs-real "
        "floor (real clips with the same captions), both against real clips of other held-out prompts",
    )
    evaluate.add_argument(
        "--by-pairing", action="store_true",
        help="also score the videos of each held-out pairing (e.g. red triangles) apart: which unseen combination fails",
    )
    evaluate.add_argument(
        "--start-spread", type=float, default=None,
        help="with --fvd: where the real clips' paths lie (0 centred, 1 anywhere); default: as the pipeline's "
        "training_config.json says, else 1",
    )
    _add_sampling_options(evaluate)
    evaluate.set_defaults(func=_evaluate)

    swap = commands.add_parser("swap-gap", help="denoising-loss increase when one caption attribute is swapped (does the model use it?)")
    swap.add_argument("--pipeline", required=True)
    swap.add_argument("--attributes", default="color,shape,size,direction,speed", help="comma-separated attribute names")
    swap.add_argument("--num-clips", type=int, default=64)
    swap.add_argument("--split", choices=["train", "heldout", "all"], default="train")
    swap.add_argument("--seed", type=int, default=0)
    swap.add_argument(
        "--start-spread", type=float, default=None,
        help="where the scored clips' paths lie (0 centred, 1 anywhere); default: as the pipeline's training_config.json says, else 1",
    )
    swap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    swap.add_argument("--json", default=None, help="also write the results to this JSON file")
    swap.set_defaults(func=_swap_gap)

    calibrate = commands.add_parser("calibrate", help="profile per-layer precision sensitivity and store a calibrated schedule")
    calibrate.add_argument("--pipeline", required=True, help="pipeline folder (its model_index.json is updated in place)")
    calibrate.add_argument("--output", default=None, help="save the calibrated pipeline to this folder instead")
    calibrate.add_argument("--num-prompts", type=int, default=8)
    calibrate.add_argument("--steps", type=int, default=20)
    calibrate.add_argument("--budget", type=float, default=0.5, help="fraction of quantizable MACs run at <= 8 bits")
    calibrate.add_argument("--guidance-scale", type=float, default=4.0)
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.set_defaults(func=_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "pipeline", None):
            check_pipeline_path(args.pipeline)  # before any heavy import, so a typo fails at once
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"chronos-video {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
