"""training/gpu_run.sh: the one-command GPU run, exercised on the CPU with `--cpu-smoke` (no GPU here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "gpu_run.sh"
SMOKE_NAMES = ("smoke", "chronos_v_smoke", "hrm_smoke")


def load_driver():
    spec = importlib.util.spec_from_file_location("chronos_gpu_run", ROOT / "training" / "gpu_run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_script(out: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("OUT", "CONFIGS", "STEPS_FACTOR", "TIME_LIMIT_PER_RUN", "TRAIN_ARGS", "WHEELS"):
        env.pop(name, None)
    return subprocess.run(["bash", str(SCRIPT), "--out", str(out), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def members(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


def read_member(archive: Path, name: str) -> str:
    with tarfile.open(archive) as tar:
        return tar.extractfile(name).read().decode()


@pytest.fixture(scope="module")
def driver():
    return load_driver()


def test_arguments_are_validated(driver, tmp_path):
    with pytest.raises(SystemExit):  # seven configs would need more than the 8 files a lent machine hands back
        driver.parse_args(["--configs", *["training/configs/smoke.yaml"] * 7])
    with pytest.raises(SystemExit):
        driver.parse_args(["--configs", "training/configs/no_such.yaml"])
    with pytest.raises(SystemExit):
        driver.parse_args(["--steps-factor", "0"])
    args = driver.parse_args(["--cpu-smoke", "--out", str(tmp_path)])
    assert args.configs == driver.SMOKE_CONFIGS and args.num_threads == 1
    assert driver.parse_args(["--out", str(tmp_path)]).configs == driver.DEFAULT_CONFIGS


def test_plan_scales_steps_and_validation(driver, tmp_path):
    args = driver.parse_args(["--out", str(tmp_path), "--steps-factor", "3", "--batch-factor", "2", "--train-arg=--seed=1"])
    taken: set[str] = set()
    run = driver.plan_run("training/configs/nano_sora_shapes.yaml", args, tmp_path, taken, tensorboard=False)
    again = driver.plan_run("training/configs/nano_sora_shapes.yaml", args, tmp_path, taken, tensorboard=False)
    flags = dict(zip(run.overrides[::2], run.overrides[1::2]))
    assert run.name == "nano_sora_shapes" and again.name == "nano_sora_shapes-2"
    assert flags["--max_train_steps"] == "15000" and run.target_steps == 15000  # 5000 x 3
    assert flags["--validation_steps"] == "1500" and flags["--train_batch_size"] == "32"
    assert flags["--mixed_precision"] == "bf16" and flags["--report_to"] == "null"
    assert flags["--output_dir"] == str(tmp_path / "nano_sora_shapes") and run.overrides[-1] == "--seed=1"
    # the data caches a parallel launch builds first: the clips, then the curriculum's (its settings over the clips')
    assert run.data[0] == {"num_clips": 8000, "num_frames": 16, "height": 32, "width": 32, "split": "train", "seed": 0, "start_spread": 0.0}
    assert len(run.data) == 2 and run.data[1]["num_clips"] == 2000 and run.data[1]["attributes"]["color"] == ["white"]
    assert len(driver.plan_run("training/configs/smoke.yaml", args, tmp_path, taken, tensorboard=False).data) == 1
    assert driver.latest_checkpoint_step(tmp_path) is None
    for step in (5, 40, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert driver.latest_checkpoint_step(tmp_path) == 40


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on a machine without CUDA")
def test_without_cuda_it_stops_with_a_clear_message(tmp_path):
    result = run_script(tmp_path / "out", "--skip-tests", "--skip-bench", timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "sees no CUDA GPU" in result.stderr and "--cpu-smoke" in result.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.md"]  # no work folder left behind
    assert "**Stopped:**" in (out / "summary.md").read_text()
    assert "ERROR" in read_member(out / "logs.tar.gz", "logs/env.txt")
    result = run_script(out)  # a used folder is refused, so earlier results are never mixed in
    assert result.returncode != 0 and "not empty" in result.stderr


@pytest.mark.slow
def test_cpu_smoke_trains_tests_and_packs(tmp_path):
    out = tmp_path / "out"
    result = run_script(out, "--cpu-smoke", "--steps-factor", "0.5", "--parallel")  # 3 steps per smoke config, side by side
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([*(f"{n}.tar.gz" for n in SMOKE_NAMES), "logs.tar.gz", "summary.md"]) and len(files) <= 8
    assert all(p.is_file() and p.stat().st_size < 16 * 2**20 for p in out.iterdir())

    summary = json.loads(read_member(out / "logs.tar.gz", "logs/summary.json"))
    assert summary["mode"] == "cpu-smoke" and summary["error"] is None
    logs = members(out / "logs.tar.gz")
    assert {"logs/env.txt", "logs/pytest_0.log", "logs/pytest_1.log"} <= set(logs)
    assert "skipped" in summary["checks"][0]["note"] and "skipped" in summary["checks"][1]["note"]
    assert summary["checks"][2]["name"] == "bench_gpu" and summary["checks"][2]["returncode"] == 0

    table = (out / "summary.md").read_text()
    assert "runs side by side" in table
    for run in summary["runs"]:
        name = run["name"]
        assert run["status"] == "ok" and run["steps_done"] == 3 and f"logs/train_{name}.log" in logs
        names = members(out / f"{name}.tar.gz")
        assert f"{name}/model_index.json" in names and f"{name}/transformer/diffusion_pytorch_model.safetensors" in names
        assert not any(n.startswith(f"{name}/checkpoints") for n in names)  # optimizer state stays behind
        scores = json.loads(read_member(out / f"{name}.tar.gz", f"{name}/oracle_scores.json"))
        assert run["oracle"] == scores
        assert f"| {name} | 3 / 3 |" in table and f"{100 * scores['size']:.1f}%" in table

    from chronos_video import NanoSoraPipeline

    with tarfile.open(out / "smoke.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    pipe = NanoSoraPipeline.from_pretrained(str(tmp_path / "unpacked" / "smoke"))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a small red circle moving left to right slowly", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape[1:] == (8, 16, 16, 3)


@pytest.mark.slow
def test_a_run_stopped_at_its_time_limit_still_writes_its_pipeline(tmp_path):
    out = tmp_path / "out"
    result = run_script(out, "--cpu-smoke", "--configs", "training/configs/smoke.yaml", "--steps-factor", "1000",
                        "--time-limit-per-run", "50", "--finalize-time-limit", "25", "--skip-tests", "--skip-bench",
                        "--train-arg=--checkpointing_steps=20")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = json.loads(read_member(out / "logs.tar.gz", "logs/summary.json"))["runs"][0]
    assert "pipeline written from checkpoint-" in run["status"], run["status"]
    assert 20 <= run["steps_done"] < 6000 and run["steps_done"] % 20 == 0 and run["oracle"]["n"] == 4
    assert "smoke/oracle_scores.json" in members(out / "smoke.tar.gz")
