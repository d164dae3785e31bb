"""The benchmark scripts that train models run end to end (at a budget of one step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_chronos_ablation_benchmark_runs_end_to_end(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "bench_chronos_ablations.py"), "--max_train_steps", "1",
               "--variants", "1 scan order", "no wavelet gate", "--parallel", "2", "--num_prompts", "1", "--num_clips", "2",
               "--output_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads((tmp_path / "ablations.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["1 scan order", "no wavelet gate"]
    assert rows[0]["gate_skipped_fraction"] is not None and rows[1]["gate_skipped_fraction"] is None
    for row in rows:
        assert row["heldout_loss"]["n"] == 2 and row["heldout_loss"]["loss"] > 0
        assert set(row["oracle"]) >= {"color", "direction", "all"}
    assert "| 1 scan order |" in result.stdout


def test_chronos_ablation_benchmark_rejects_unknown_variant(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_chronos_ablations.py"), "--variants", "bogus",
                             "--output_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "unknown variant 'bogus'" in result.stderr


def test_train_throughput_reads_the_config_through_the_package(tmp_path):
    """The throughput benchmark builds the config's backbone with the package's builders (no `train.py` import)."""
    command = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--config", str(REPO / "training" / "configs" / "smoke.yaml"),
               "--steps", "1", "--warmup-steps", "0", "--peak-size", "64", "--peak-repeats", "1", "--device", "cpu", "--threads", "1"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "| NanoSoraTransformer3DModel (nano-sora) |" in result.stdout and "| diffusers LatteTransformer3DModel |" in result.stdout


def test_cache_benchmark_counts_reused_evaluations(tmp_path, tiny_tokenizer):
    """`bench_cache.py` on a tiny saved pipeline: threshold 0 reuses nothing (same videos), a huge one skips
    every evaluation after the first, and MagCache (calibrated by the script) and TaylorSeer run too."""
    from conftest import make_tiny_pipeline

    make_tiny_pipeline(tiny_tokenizer).save_pretrained(tmp_path / "tiny")
    command = [sys.executable, str(REPO / "benchmarks" / "bench_cache.py"), "--pipeline", str(tmp_path / "tiny"),
               "--cache", "first_block", "--cache", "magcache", "--cache", "taylorseer", "--thresholds", "0", "1e9",
               "--cache-intervals", "2", "--warmup-steps", "1", "--num-prompts", "2", "--batch-size", "2", "--steps", "4",
               "--output", str(tmp_path / "cache.json")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {(row["cache"], row["setting"]): row for row in json.loads((tmp_path / "cache.json").read_text())["rows"]}
    assert set(rows) == {("off", "-"), ("first_block", "threshold 0"), ("first_block", "threshold 1e+09"),
                         ("magcache", "threshold 0"), ("magcache", "threshold 1e+09"), ("taylorseer", "interval 2")}
    assert all(row["model_calls"] == 4 for row in rows.values())  # one batch of 2 prompts, 4 Euler steps, CFG in one call
    assert rows["off", "-"]["full_evaluations"] == 4
    assert rows["first_block", "threshold 0"]["full_evaluations"] == 4 and rows["first_block", "threshold 0"]["mean_abs_pixel_diff"] == 0.0
    assert rows["first_block", "threshold 1e+09"]["full_evaluations"] == 1 and rows["first_block", "threshold 1e+09"]["mean_abs_pixel_diff"] > 0
    assert rows["magcache", "threshold 1e+09"]["full_evaluations"] < 4
    assert rows["taylorseer", "interval 2"]["full_evaluations"] < 4
    assert set(rows["off", "-"]["oracle"]) >= {"color", "shape", "direction", "all"}
    assert "| tiny | first_block | threshold 1e+09 |" in result.stdout and "| pipeline | cache | setting |" in result.stdout


def test_ssd_benchmark_quick_mode_prints_both_tables():
    """`bench_ssd.py --quick`: the scan-op table (SSD, selective, loop in fp32 and bf16) and the whole-model table."""
    command = [sys.executable, str(REPO / "benchmarks" / "bench_ssd.py"), "--quick"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for row in ("| 256 | float32 | ssd |", "| 512 | bfloat16 | selective |", "| 512 | float32 | loop |"):
        assert row in result.stdout, row
    assert "| 256 | " in result.stdout.split("### Whole model")[1] and "error" not in result.stdout
    assert "Crossover:" in result.stdout
    checkpointed = subprocess.run(command + ["--mode", "model", "--models", "chronos-ssd-shared", "--gradient_checkpointing",
                                             "--held_memory", "--scan_orders", "2"], cwd=REPO, capture_output=True, text=True,
                                  env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert checkpointed.returncode == 0, checkpointed.stderr[-2000:]
    assert "gradient checkpointing (blocks; Chronos-V also per scan order), Chronos-V with 2 scan orders" in checkpointed.stdout
    row = next(line for line in checkpointed.stdout.splitlines() if line.startswith("| 256 | "))
    cells = [cell.strip() for cell in row.strip("|").split("|")]  # tokens, time, peak, held peak
    assert len(cells) == 4 and all(float(cell) >= 0 for cell in cells[1:]), row


def make_tiny_hrm_folder(tokenizer, folder: Path, halt: bool) -> Path:
    """A tiny saved HRMVideoPipeline (max 3 segments) whose halting head always (or never) fires."""
    import torch
    from conftest import perturb_zero_init

    from chronos_video import ChronosFlowMatchScheduler, HRMVideoModel, HRMVideoPipeline, build_text_encoder

    torch.manual_seed(0)
    text_encoder = build_text_encoder(len(tokenizer), d_model=32, num_layers=1, num_heads=2)
    transformer = HRMVideoModel(sample_frames=4, sample_height=16, sample_width=16, hidden_size=32, num_attention_heads=2,
                                text_embed_dim=32, h_layers=1, l_layers=1, h_cycles=1, l_cycles=2, max_segments=3)
    perturb_zero_init(transformer, std=0.05)
    with torch.no_grad():
        transformer.halt_head.proj.weight.zero_()
        transformer.halt_head.proj.bias.fill_(5.0 if halt else -5.0)
    HRMVideoPipeline(tokenizer, text_encoder, transformer, ChronosFlowMatchScheduler()).save_pretrained(folder)
    return folder


def test_hrm_halting_benchmark_counts_segments_per_setting(tmp_path, tiny_tokenizer):
    """`bench_hrm_halting.py` on a tiny HRM pipeline whose halting head always fires: the four settings run the
    same prompts; halting cuts every sampling step to one segment of three, warm start alone changes the videos."""
    folder = make_tiny_hrm_folder(tiny_tokenizer, tmp_path / "hrm", halt=True)
    command = [sys.executable, str(REPO / "benchmarks" / "bench_hrm_halting.py"), "--pipeline", str(folder), "--num-prompts", "2",
               "--batch-size", "2", "--steps", "3", "--halt-thresholds", "0.999", "--single-segment-above-sigma", "0.5", "--output", str(tmp_path / "halting.json")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {row["setting"]: row for row in json.loads((tmp_path / "halting.json").read_text())["rows"]}
    assert list(rows) == ["max segments", "halting", "warm start", "halting + warm start", "halting, threshold 0.999",
                          "one segment above sigma 0.5"]
    # 3 steps at sigmas 1, 2/3, 1/3 (no shift): one segment at the first two, three at the last
    assert rows["one segment above sigma 0.5"]["segments_by_step"] == [1.0, 1.0, 3.0]
    # the head fires at sigmoid(5) = 0.993: above the model's 0.5, below 0.999, so the last row never halts
    assert rows["halting, threshold 0.999"]["segments_per_step"] == 3.0 and rows["halting"]["segments_by_step"] == [1.0, 1.0, 1.0]
    assert rows["max segments"]["segments_per_step"] == rows["warm start"]["segments_per_step"] == 3.0
    assert rows["max segments"]["segments_per_step_unconditional"] == 3.0  # guidance 4: the unconditional half too
    assert rows["halting"]["segments_per_step"] == rows["halting + warm start"]["segments_per_step"] == 1.0
    assert abs(rows["halting"]["segments_saved"] - 2 / 3) < 1e-9 and rows["max segments"]["segments_saved"] == 0.0
    assert rows["max segments"]["mean_abs_pixel_diff"] == 0.0 and rows["warm start"]["mean_abs_pixel_diff"] > 0
    assert all(set(row["oracle"]) >= {"color", "direction", "all"} and row["seconds_per_video"] > 0 for row in rows.values())
    assert "| halting + warm start | 1.00 / 3 |" in result.stdout and "| setting | segments / step |" in result.stdout
    short = subprocess.run([*command[:4], "--num-prompts", "1", "--batch-size", "1", "--steps", "1", "--no-warm-start", "--output", str(tmp_path / "short.json")],
                           cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert short.returncode == 0, short.stderr[-2000:]
    assert [row["setting"] for row in json.loads((tmp_path / "short.json").read_text())["rows"]] == ["max segments", "halting"]


def test_hrm_halting_benchmark_rejects_a_non_hrm_pipeline(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_pipeline

    make_tiny_pipeline(tiny_tokenizer).save_pretrained(tmp_path / "nano")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_hrm_halting.py"), "--pipeline", str(tmp_path / "nano"),
                             "--num-prompts", "1", "--steps", "1"], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode != 0 and "not an HRMVideoPipeline" in result.stderr


def test_hrm_ablations_quick_mode_trains_and_scores_every_variant(tmp_path):
    """`hrm_ablations.py --quick`: all five variants train (2 steps of hrm_smoke.yaml) and are scored; the
    Nano-Sora row has the HRM row's parameters (but the halting head), direct-mse samples in one step."""
    command = [sys.executable, str(REPO / "benchmarks" / "hrm_ablations.py"), "--quick", "--output_dir", str(tmp_path / "out"),
               "--", "--data.cache_dir", str(tmp_path / "cache")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads((tmp_path / "out" / "ablations.json").read_text())["rows"]}
    assert list(rows) == ["hrm-one-step", "trm-full-recursion", "shared-weights", "direct-mse", "nano-sora"]
    hrm = rows["hrm-one-step"]
    assert 0 < hrm["parameters"] - rows["nano-sora"]["parameters"] <= 2 * 32 + 1  # the halting head's Linear(2 * hidden, 1)
    assert rows["shared-weights"]["parameters"] < hrm["parameters"] == rows["trm-full-recursion"]["parameters"]
    assert rows["direct-mse"]["sampling_steps"] == 1 and rows["direct-mse"]["guidance_scale"] == 1.0 and hrm["sampling_steps"] == 2
    for row in rows.values():
        assert row["steps"] == 2 and row["seconds_per_step"] > 0 and set(row["oracle"]) >= {"color", "direction", "all"}
        assert Path(row["strip"]).is_file()
    config = json.loads((tmp_path / "out" / "direct-mse" / "training_config.json").read_text())
    assert config["objective"] == "direct" and config["model"]["prediction_type"] == "sample"
    assert "| variant | params (M) |" in result.stdout and "| nano-sora |" in result.stdout


def test_hrm_ablations_budget_and_errors(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import hrm_ablations
    finally:
        sys.path.pop(0)
    assert hrm_ablations.steps_for_budget(60, 1.7) == 2117 and hrm_ablations.steps_for_budget(0.001, 10.0) == 1
    overrides = hrm_ablations.nano_sora_overrides({"hidden_size": 96, "h_layers": 2, "l_layers": 2, "gradient_mode": "one_step"})
    assert overrides[:2] == ["--architecture", "nano-sora"] and json.loads(overrides[3]) == {"hidden_size": 96, "num_layers": 4}
    script = [sys.executable, str(REPO / "benchmarks" / "hrm_ablations.py")]
    for args, message in ((["--variants", "bogus", "--steps", "1"], "unknown variant 'bogus'"), ([], "give a budget"),
                          (["--steps", "1", "--config", str(REPO / "training" / "configs" / "smoke.yaml")], "must train architecture 'hrm'")):
        result = subprocess.run([*script, *args, "--output_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-1000:]


def test_hrm_gradient_probe_reports_every_module_of_both_models():
    command = [sys.executable, str(REPO / "benchmarks" / "hrm_gradient_probe.py"), "--steps", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if "gradient norms" in line]
    assert [line.split(":")[0] for line in lines] == ["nano-sora step 0", "nano-sora step 1", "hrm step 0", "hrm step 1"]
    assert "halt_head" in lines[-1] and "text_embed" in lines[-1] and "blocks" in lines[0]


def test_sampling_time_benchmark_times_every_pipeline_interleaved():
    """`bench_sampling_time.py` on the shipped latent pipeline (its VAE decode included); a missing folder is named."""
    script = str(REPO / "benchmarks" / "bench_sampling_time.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, script, "pipelines/nano-sora-latent-shapes", "--steps", "2", "--repeats", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| pipelines/nano-sora-latent-shapes |"))
    median, fastest = (float(cell) for cell in row.strip("|").split("|")[1:3])
    assert 0 < fastest <= median
    missing = subprocess.run([sys.executable, script, "no/such/folder"], cwd=REPO, capture_output=True, text=True, env=env)
    assert missing.returncode != 0 and "no/such/folder" in missing.stderr


def test_codebook_usage_benchmark_counts_codes_by_clip_count(tmp_path):
    import importlib.util

    from chronos_video.models.fsq_tokenizer import FSQVideoTokenizer

    FSQVideoTokenizer(block_out_channels=(8, 16), norm_num_groups=4, levels=(3, 3)).save_pretrained(tmp_path / "tok")
    spec = importlib.util.spec_from_file_location("bench_codebook_usage", REPO / "benchmarks" / "bench_codebook_usage.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--video_tokenizer", str(tmp_path / "tok"), "--clips", "1", "3", "--train_clips", "2",
                         "--batch_size", "2", "--cache_dir", str(tmp_path / "cache"), "--output", str(tmp_path / "usage.json")])
    usage = result["heldout_usage"]
    assert sorted(usage) == [1, 3] and 0 < usage[1] <= usage[3] <= 1  # more clips can only add codes
    assert result["codebook_size"] == 9 and 1 <= result["train_perplexity"] <= 9 and 0 < result["train_usage"] <= 1
    assert json.loads((tmp_path / "usage.json").read_text())["heldout_usage"] == {"1": usage[1], "3": usage[3]}
    with pytest.raises(SystemExit):
        bench.main(["--video_tokenizer", str(tmp_path / "tok"), "--clips", "0"])
