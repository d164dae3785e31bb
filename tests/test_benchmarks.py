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
