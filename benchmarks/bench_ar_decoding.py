"""Autoregressive video decoding: KV cache vs none, the sliding window as videos grow, sampling options, time per video.

    python benchmarks/bench_ar_decoding.py --pipeline pipelines/ar-shapes --threads 1 \
        --frames 4 8 16 32 64 --no_cache_max_frames 8 --oracle_prompts 32 \
        --flow_pipelines pipelines/nano-sora-shapes pipelines/chronos-v-shapes

Four markdown tables:
1. decoding tokens/s, peak memory (growth of the process' peak RSS, as `bench_ssd.py` measures it) and
   the KV cache's own size, with the cache and without it (every token recomputes the whole sequence);
2. the same with the cache as `num_frames` grows past the window: the cache must stop growing;
3. oracle scores on held-out prompts for greedy, top-k, top-p and typical sampling at fixed seeds;
4. seconds per video beside the flow pipelines (each at its own defaults: 20 steps, guidance 4).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaling import held_peak_mb  # noqa: E402  (the same peak-memory measurement as the scan benchmark)

from chronos_video import ARVideoPipeline  # noqa: E402
from chronos_video.evaluation.pipeline_eval import evaluate_pipeline  # noqa: E402

PROMPT = "a large blue square moving left to right quickly"
SAMPLING = {"greedy": {"do_sample": False}, "top-k 20": {"top_k": 20}, "top-p 0.9": {"top_p": 0.9}, "typical 0.9": {"typical_p": 0.9}, "temperature 1": {}}


def cache_mb(cache) -> float:
    """Bytes held by a transformers cache's keys and values, in MB."""
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if getattr(layer, "keys", None) is not None) / 2**20


def decode_once(pipe: ARVideoPipeline, num_frames: int, batch: int, use_cache: bool) -> dict:
    """One timed generation (greedy, no guidance) with its peak memory and final cache size."""
    from transformers import DynamicCache

    lm = pipe.language_model
    input_ids = pipe.prompt_ids([PROMPT] * batch)
    new_tokens = num_frames * lm.config.tokens_per_frame
    cache = DynamicCache(config=lm.config) if use_cache else None
    timing = {}

    def run():
        started = time.perf_counter()
        lm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False,
                    use_cache=use_cache, pad_token_id=lm.config.begin_of_video_token_id, **({"cache": cache} if use_cache else {}))
        timing["seconds"] = time.perf_counter() - started

    peak = held_peak_mb(run)
    return {"seconds": timing["seconds"], "tokens_per_s": batch * new_tokens / timing["seconds"], "peak_mb": peak,
            "cache_mb": cache_mb(cache) if cache is not None else 0.0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="pipelines/ar-shapes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--no_cache_max_frames", type=int, default=8, help="longest video decoded without the cache (its cost is quadratic)")
    parser.add_argument("--oracle_prompts", type=int, default=32, help="0 skips the sampling table")
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: the pipeline's training config, else 3")
    parser.add_argument("--flow_pipelines", nargs="*", default=[], help="flow pipeline folders timed beside the AR one")
    parser.add_argument("--time_prompts", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = ARVideoPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.language_model.config
    guidance = args.guidance_scale
    settings = Path(args.pipeline) / "training_config.json"
    if guidance is None:
        import json

        guidance = float(json.loads(settings.read_text()).get("eval_guidance_scale", 3.0)) if settings.is_file() else 3.0
    decode_once(pipe, 1, args.batch, True)  # warm-up

    print(f"## Decoding ({args.pipeline}: window {config.window_frames} frames = {config.sliding_window} tokens, "
          f"{config.tokens_per_frame} tokens per frame, batch {args.batch}, {args.threads} thread(s), greedy, no guidance)\n")
    print("| frames | KV cache | tokens/s | seconds | peak MB | cache MB |")
    print("|---:|---|---:|---:|---:|---:|")
    for frames in args.frames:
        for use_cache in (True, False):
            if not use_cache and frames > args.no_cache_max_frames:
                continue
            r = decode_once(pipe, frames, args.batch, use_cache)
            print(f"| {frames} | {'on' if use_cache else 'off'} | {r['tokens_per_s']:.0f} | {r['seconds']:.2f} | {r['peak_mb']:.1f} | {r['cache_mb']:.2f} |", flush=True)

    if args.oracle_prompts:
        print(f"\n## Sampling options ({args.oracle_prompts} held-out prompts, guidance {guidance}, seed 0)\n")
        rows = {}
        for name, options in SAMPLING.items():
            scores, _ = evaluate_pipeline(pipe, num_prompts=args.oracle_prompts, num_inference_steps=None, guidance_scale=guidance, seed=0, **options)
            rows[name] = scores
        from chronos_video.evaluation.oracle import format_oracle_table

        print(format_oracle_table(rows))

    print(f"\n## Seconds per video ({args.time_prompts} prompts in batches of 8, {args.threads} thread(s))\n")
    print("| pipeline | settings | s / video |")
    print("|---|---|---:|")
    runs = [(args.pipeline, pipe, {"num_inference_steps": None, "guidance_scale": guidance}, f"{config.tokens_per_frame * pipe.config.num_frames} tokens, guidance {guidance}")]
    for folder in args.flow_pipelines:
        from chronos_video.cli import load_pipeline

        flow = load_pipeline(folder)
        flow.set_progress_bar_config(disable=True)
        runs.append((folder, flow, {"num_inference_steps": 20, "guidance_scale": 4.0}, "20 steps, guidance 4"))
    for folder, pipeline, options, label in runs:
        started = time.perf_counter()
        evaluate_pipeline(pipeline, num_prompts=args.time_prompts, seed=0, **options)
        print(f"| {folder} | {label} | {(time.perf_counter() - started) / args.time_prompts:.2f} |", flush=True)


if __name__ == "__main__":
    main()
