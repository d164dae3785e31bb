#!/usr/bin/env python
"""Everything a lent CUDA machine should do for this repository, in one command and one time budget.

    bash training/gpu_run.sh                   # on a CUDA machine: check, test, train, pack into $OUT
    bash training/gpu_run.sh --cpu-smoke       # the same steps on a CPU with the tiny smoke configs
    bash training/gpu_run.sh --prepare-wheels  # here, with network: wheels the GPU image lacks, into .whl/

Steps, each logged:
1. Environment: Python, torch with CUDA, `chronos_video` importable (from `src/` when not installed), the
   training dependencies, `nvidia-smi`. Anything missing stops the run with one clear message (and a
   summary.md saying so) unless `--cpu-smoke` is given. Wheels in `--wheels` (default `.whl/` when present)
   are installed first into a temporary folder: the GPU image has no network and lacks diffusers and datasets.
2. GPU checks: pytest on the scan tests and the native-precision tests (their GPU cases skip on a CPU, and
   `-ra` records why any skipped), and `benchmarks/bench_gpu.py` (mamba-ssm's SSD kernel against our scan, and
   model time and memory at 8 frames; `--quick` on a CPU, where it runs the model table only).
3. Training: each config through `training/train.py` into `<out>/work/<name>`, with `max_train_steps` (and the
   validation interval) scaled by `--steps-factor`, bf16, and a wall-clock limit per run. The budget left is
   shared evenly among the runs still to go, so one slow run cannot eat it (with `--parallel`, all runs start
   together, each with the whole budget, after their data caches are built once); a run that hits its limit is
   stopped and its pipeline folder is written from its latest checkpoint (`--resume_from_checkpoint latest`
   with `max_train_steps` set to that step), so every run that checkpointed ends with a pipeline and oracle
   scores.
4. Packing, into at most 8 files (what a lent machine hands back): one `<name>.tar.gz` per pipeline folder
   (checkpoints left out), `logs.tar.gz` (environment, every log, learning curves, test output,
   summary.json) and `summary.md` (what ran, wall times, oracle scores). The work folder is then removed.

Flags default to environment variables: OUT, CONFIGS (space- or comma-separated), STEPS_FACTOR, BATCH_FACTOR,
TIME_LIMIT_PER_RUN, TOTAL_TIME_LIMIT, TEST_TIME_LIMIT, BENCH_TIME_LIMIT, FINALIZE_TIME_LIMIT, NUM_THREADS, PARALLEL,
WHEELS and TRAIN_ARGS (extra `--key value` overrides for every run).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path("training") / "configs"
DEFAULT_CONFIGS = [str(CONFIG_DIR / n) for n in ("nano_sora_shapes.yaml", "chronos_v_motion.yaml", "hrm_shapes.yaml")]
SMOKE_CONFIGS = [str(CONFIG_DIR / n) for n in ("smoke.yaml", "chronos_v_smoke.yaml", "hrm_smoke.yaml")]
# Imported by training/train.py; the GPU image has all but diffusers and datasets (and their small needs).
REQUIRED_MODULES = ("torch", "accelerate", "diffusers", "transformers", "datasets", "safetensors", "huggingface_hub",
                    "yaml", "tqdm", "numpy", "PIL")
# The H200 image (2026-11) has transformers 5.17 (ARVideo needs >= 5.24) and lacks diffusers and datasets.
WHEEL_PACKAGES = ("diffusers", "transformers", "regex", "datasets", "dill", "multiprocess", "importlib_metadata", "zipp")
MAX_FILES = 8  # a lent machine hands back at most 8 files from $OUT
MAX_FILE_BYTES = 16 * 2**20
PACK_RESERVE_S = 30.0
MIN_RUN_S = 20.0
GPU_TESTS = (
    ["tests/test_precision.py", "-k", "native"],
    ["tests/test_selective_scan.py", "tests/test_ssd_scan.py"],
)


def log(message: str) -> None:
    print(f"[gpu_run] {message}", flush=True)


class SetupError(RuntimeError):
    """The machine cannot run the requested steps; the message says what is missing."""


@dataclass
class Step:
    """One subprocess the driver ran: what, how long, how it ended."""

    name: str
    command: list[str]
    log_path: Path
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    note: str = ""


@dataclass
class Run:
    """One config's training run and what it produced."""

    name: str
    config: str
    output_dir: Path
    overrides: list[str]
    target_steps: int
    data: list[dict[str, Any]] = field(default_factory=list)  # the config's data settings (and curriculum data), for pre-rendering
    status: str = "not run"
    seconds: float = 0.0
    steps_done: int | None = None
    oracle: dict[str, Any] = field(default_factory=dict)
    curve_last: dict[str, Any] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def _env(name: str, default: Any) -> Any:
    value = os.environ.get(name)
    return default if value in (None, "") else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="run every step on the CPU with the tiny smoke configs")
    parser.add_argument("--out", default=_env("OUT", "gpu_out"), help="result folder (env OUT; default ./gpu_out)")
    parser.add_argument("--configs", nargs="+", default=None, help="training configs (env CONFIGS; default: the shipped three)")
    parser.add_argument("--steps-factor", type=float, default=float(_env("STEPS_FACTOR", 2.0)), help="max_train_steps multiplier")
    parser.add_argument("--batch-factor", type=float, default=float(_env("BATCH_FACTOR", 1.0)), help="train_batch_size multiplier")
    parser.add_argument("--time-limit-per-run", type=float, default=float(_env("TIME_LIMIT_PER_RUN", 0)),
                        help="seconds per training run, final evaluation included (0: an even share of the budget left)")
    parser.add_argument("--total-time-limit", type=float, default=float(_env("TOTAL_TIME_LIMIT", 540)), help="seconds for everything")
    parser.add_argument("--test-time-limit", type=float, default=float(_env("TEST_TIME_LIMIT", 150)), help="seconds for the pytest step")
    parser.add_argument("--bench-time-limit", type=float, default=float(_env("BENCH_TIME_LIMIT", 240)), help="seconds for the benchmark")
    parser.add_argument("--finalize-time-limit", type=float, default=float(_env("FINALIZE_TIME_LIMIT", 90)),
                        help="seconds to write a stopped run's pipeline from its checkpoint")
    parser.add_argument("--num-threads", type=int, default=int(_env("NUM_THREADS", 0)), help="CPU threads per run (0: 8 on GPU, 1 on CPU)")
    parser.add_argument("--mixed-precision", default=_env("MIXED_PRECISION", "bf16"), choices=("no", "fp16", "bf16"))
    parser.add_argument("--wheels", default=_env("WHEELS", None), help="folder of wheels to install first (default .whl/ if present)")
    parser.add_argument("--train-arg", action="append", default=None, help="extra train.py override, e.g. --train-arg=--model.hidden_size=64")
    parser.add_argument("--parallel", action="store_true", default=bool(_env("PARALLEL", "")),
                        help="train the configs side by side, each with the whole budget (env PARALLEL)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--keep-work", action="store_true", help="keep <out>/work (checkpoints included) after packing")
    parser.add_argument("--prepare-wheels", action="store_true", help="download the wheels the GPU image lacks into --wheels, then stop")
    parser.add_argument("--wheel-packages", nargs="+", default=list(WHEEL_PACKAGES), help="packages for --prepare-wheels")
    args = parser.parse_args(argv)

    if args.configs is None:
        from_env = os.environ.get("CONFIGS", "").replace(",", " ").split()
        args.configs = from_env or (SMOKE_CONFIGS if args.cpu_smoke else DEFAULT_CONFIGS)
    args.train_arg = (args.train_arg or []) + shlex.split(os.environ.get("TRAIN_ARGS", ""))
    if len(args.configs) > MAX_FILES - 2:
        parser.error(f"--configs: at most {MAX_FILES - 2} configs (one archive each, plus logs and summary), got {len(args.configs)}")
    for config in args.configs:
        if not (ROOT / config).is_file() and not Path(config).is_file():
            parser.error(f"--configs: no such config {config!r}")
    for name in ("steps_factor", "batch_factor", "total_time_limit"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    args.out = Path(args.out).resolve()
    if args.wheels is None and (ROOT / ".whl").is_dir():
        args.wheels = str(ROOT / ".whl")
    if args.num_threads <= 0:
        args.num_threads = 1 if args.cpu_smoke else 8
    return args


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------


def prepare_wheels(folder: Path, packages: list[str]) -> int:
    """Downloads the local versions of `packages` as wheels for the GPU image (Python 3.12, x86-64)."""
    from importlib import metadata

    folder.mkdir(parents=True, exist_ok=True)
    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *platforms, "-d", str(folder), *pins]
    log("downloading " + " ".join(pins))
    return subprocess.call(command)


def install_wheels(folder: Path, env: dict[str, str]) -> str:
    """Installs every wheel of `folder` into a temporary site folder, put first on the path."""
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if not wheels:
        return f"no wheels in {folder}"
    site = Path(tempfile.mkdtemp(prefix="chronos_gpu_site_"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--upgrade", "--target", str(site), *wheels]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SetupError(f"installing the wheels of {folder} failed:\n{result.stderr[-2000:]}")
    sys.path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH", "")]))
    return f"installed {len(wheels)} wheels from {folder}: " + ", ".join(Path(w).name for w in wheels)


def check_environment(args: argparse.Namespace, env: dict[str, str]) -> list[str]:
    """Lines describing the machine; raises `SetupError` naming whatever a GPU run lacks."""
    lines = [f"python {sys.version.split()[0]} ({sys.executable})", f"platform {sys.platform}, {os.cpu_count()} CPUs"]
    if args.wheels:
        lines.append(install_wheels(Path(args.wheels), env))
    try:
        importlib.import_module("chronos_video")
    except ImportError:  # not installed: use the checkout's source tree, here and in every child
        sys.path.insert(0, str(ROOT / "src"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    missing = []
    for name in (*REQUIRED_MODULES, "chronos_video"):
        try:
            module = importlib.import_module(name)
            lines.append(f"{name} {getattr(module, '__version__', '?')} ({Path(getattr(module, '__file__', '') or '?').parent})")
        except Exception as error:  # noqa: BLE001 - any import failure means the run cannot go on
            missing.append(f"{name} ({type(error).__name__}: {error})")
    for name in ("tensorboard", "pytest", "peft"):
        lines.append(f"{name}: {'yes' if importlib.util.find_spec(name) else 'no'}")
    smi = shutil.which("nvidia-smi")
    if smi:
        result = subprocess.run([smi], capture_output=True, text=True)
        lines += ["nvidia-smi:", result.stdout.rstrip() or result.stderr.rstrip()]
    else:
        lines.append("nvidia-smi: not found")
    if missing:
        raise SetupError(
            "missing Python modules: " + "; ".join(missing) + ". On a lent GPU machine (no network), carry them as wheels: "
            "run `bash training/gpu_run.sh --prepare-wheels` here, then name `.whl` in the run's carry."
        )
    import torch

    cuda = torch.cuda.is_available()
    lines.append(f"torch CUDA build {torch.version.cuda}, CUDA available: {cuda}")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU {props.name}, {props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}, "
                     f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    elif not args.cpu_smoke:
        raise SetupError(
            f"torch {torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda}). This script trains on a GPU; "
            "pass --cpu-smoke to run the same steps on the CPU at tiny size."
        )
    return lines


# ----------------------------------------------------------------------------------------------------
# Subprocesses with a wall-clock limit
# ----------------------------------------------------------------------------------------------------


def run_step(step: Step, env: dict[str, str], limit_s: float) -> Step:
    """Runs `step.command` from the repo root, output to `step.log_path`; stops its process group at the limit."""
    step.log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with step.log_path.open("a") as handle:
        handle.write(f"$ {shlex.join(step.command)}\n# time limit {limit_s:.0f} s\n")
        handle.flush()
        process = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            step.returncode = process.wait(timeout=max(limit_s, 1.0))
        except subprocess.TimeoutExpired:
            step.timed_out = True
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            step.returncode = process.returncode
            handle.write(f"\n# stopped at the time limit ({limit_s:.0f} s)\n")
    step.seconds = time.time() - started
    state = "timed out" if step.timed_out else f"rc {step.returncode}"
    log(f"{step.name}: {state} in {step.seconds:.0f} s (log {step.log_path.name})")
    if step.returncode and not step.timed_out:
        print("".join(step.log_path.read_text(errors="replace").splitlines(keepends=True)[-25:]), flush=True)
    return step


class Budget:
    """Seconds left of `--total-time-limit`."""

    def __init__(self, total_s: float):
        self.deadline = time.time() + total_s

    def left(self) -> float:
        return self.deadline - time.time()


# ----------------------------------------------------------------------------------------------------
# Tests and benchmark
# ----------------------------------------------------------------------------------------------------


def pytest_outcome(log_path: Path) -> str:
    """The pytest summary line ("3 passed, 2 skipped") plus its SKIPPED/FAILED reasons."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    reasons = [line.strip() for line in text.splitlines() if line.startswith(("SKIPPED", "FAILED", "ERROR"))]
    totals = re.findall(r"^=* ?(\d+ (?:passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b.*?) in [\d.]+s", text, flags=re.MULTILINE)
    return "; ".join([totals[-1] if totals else "no pytest summary"] + reasons[:12])


def run_gpu_checks(args: argparse.Namespace, env: dict[str, str], logs: Path, budget: Budget) -> list[Step]:
    steps = []
    if not args.skip_tests:
        test_deadline = time.time() + min(args.test_time_limit, max(budget.left() - PACK_RESERVE_S, 0))
        for i, selection in enumerate(GPU_TESTS):
            # On the CPU only the GPU-marked cases run (they skip): the CPU cases are the regular suite's job.
            marker = ["-m", "gpu"] if args.cpu_smoke else []
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-ra", *marker, *selection]
            step = run_step(Step(f"pytest {' '.join(selection)}", command, logs / f"pytest_{i}.log"), env, test_deadline - time.time())
            step.note = pytest_outcome(step.log_path) + (" (no test selected)" if step.returncode == 5 else "")
            steps.append(step)
    if not args.skip_bench:
        command = [sys.executable, "benchmarks/bench_gpu.py", "--json", str(logs / "bench_gpu.json"), *(["--quick"] if args.cpu_smoke else [])]
        step = run_step(Step("bench_gpu", command, logs / "bench_gpu.log"), env, min(args.bench_time_limit, budget.left() - PACK_RESERVE_S))
        step.note = "see bench_gpu.log (kernel vs PyTorch scan, model time and GPU memory at 8 frames)"
        steps.append(step)
    return steps


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def plan_run(config: str, args: argparse.Namespace, work: Path, taken: set[str], tensorboard: bool) -> Run:
    """The run's name, folder and train.py overrides: steps and validation interval scaled, GPU settings."""
    import yaml

    from chronos_video.training_config import TrainConfig

    path = ROOT / config if (ROOT / config).is_file() else Path(config)
    values = {**TrainConfig().__dict__, **(yaml.safe_load(path.read_text()) or {})}
    name = base = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
    suffix = 2
    while name in taken:
        name, suffix = f"{base}-{suffix}", suffix + 1
    taken.add(name)
    output_dir = work / name
    steps = max(1, round(int(values["max_train_steps"]) * args.steps_factor))
    overrides = [
        "--output_dir", str(output_dir), "--checkpoint_dir", str(output_dir / "checkpoints"),
        "--max_train_steps", str(steps),
        "--train_batch_size", str(max(1, round(int(values["train_batch_size"]) * args.batch_factor))),
        "--mixed_precision", args.mixed_precision, "--num_threads", str(args.num_threads),
        "--report_to", "tensorboard" if tensorboard else "null",
    ]
    if values.get("validation_steps"):
        overrides += ["--validation_steps", str(max(1, round(int(values["validation_steps"]) * args.steps_factor)))]
    data = [dict(values["data"])] + ([{**values["data"], **values["curriculum_data"]}] if values.get("curriculum_data") else [])
    return Run(name, str(path), output_dir, overrides + list(args.train_arg), steps, data)


def latest_checkpoint_step(checkpoint_dir: Path) -> int | None:
    steps = [int(m.group(1)) for p in checkpoint_dir.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return max(steps) if steps else None


def train_one(run: Run, env: dict[str, str], logs: Path, limit_s: float, finalize_s: float) -> None:
    """Trains one config; at the time limit, writes the pipeline from the latest checkpoint instead."""
    command = [sys.executable, "training/train.py", "--config", run.config, *run.overrides]
    train_limit = max(limit_s - finalize_s, MIN_RUN_S)
    step = run_step(Step(f"train {run.name}", command, logs / f"train_{run.name}.log"), env, train_limit)
    run.steps.append(step)
    if step.returncode == 0 and not step.timed_out:
        run.status = "ok"
    else:
        reached = latest_checkpoint_step(run.output_dir / "checkpoints")
        why = f"stopped at its {train_limit:.0f} s limit" if step.timed_out else f"failed (rc {step.returncode})"
        if reached is None:
            run.status = f"{why}, no checkpoint: no pipeline"
        else:
            resume = [*command, "--max_train_steps", str(reached), "--resume_from_checkpoint", "latest", "--validation_steps", "0"]
            final = run_step(Step(f"finalize {run.name}", resume, logs / f"train_{run.name}.log"), env, finalize_s)
            run.steps.append(final)
            ok = final.returncode == 0 and not final.timed_out
            run.status = f"{why}; pipeline written from checkpoint-{reached}" if ok else f"{why}; writing checkpoint-{reached} failed"
    run.seconds = sum(s.seconds for s in run.steps)
    read_results(run)


def read_results(run: Run) -> None:
    scores = run.output_dir / "oracle_scores.json"
    if scores.is_file():
        run.oracle = json.loads(scores.read_text())
    summary = run.output_dir / "training_summary.json"
    if summary.is_file():
        run.steps_done = int(json.loads(summary.read_text()).get("steps", 0))
    curve = run.output_dir / "logs" / "learning_curve.jsonl"
    if curve.is_file():
        points = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()]
        run.curve_last = points[-1] if points else {}


def render_data_once(runs: list[Run]) -> None:
    """Builds each distinct data cache here, once, before parallel runs start, instead of in every run that reads it
    (concurrent builds are safe, the cache is renamed into place whole, but each would render every clip again)."""
    from chronos_video.data import load_training_clips

    done: list[dict[str, Any]] = []
    for data in (d for run in runs for d in run.data):
        if data not in done:
            done.append(data)
            load_training_clips(dict(data))


def run_training(args: argparse.Namespace, env: dict[str, str], work: Path, logs: Path, budget: Budget) -> list[Run]:
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    taken: set[str] = set()
    runs = [plan_run(c, args, work, taken, tensorboard) for c in args.configs]
    if args.parallel:  # tiny models leave a GPU mostly idle: side by side, every run gets the whole budget
        render_data_once(runs)
        limit = budget.left() - PACK_RESERVE_S
        limit = min(limit, args.time_limit_per_run) if args.time_limit_per_run > 0 else limit
        log(f"{len(runs)} runs side by side, {limit:.0f} s limit each")
        with ThreadPoolExecutor(max_workers=len(runs)) as pool:
            list(pool.map(lambda run: train_one(run, env, logs, limit, min(args.finalize_time_limit, limit / 2)), runs))
        return runs
    for i, run in enumerate(runs):
        share = (budget.left() - PACK_RESERVE_S) / (len(runs) - i)
        limit = min(share, args.time_limit_per_run) if args.time_limit_per_run > 0 else share
        if limit < MIN_RUN_S + 1:
            run.status = f"skipped: {max(budget.left(), 0):.0f} s of the budget left"
            log(f"{run.name}: {run.status}")
            continue
        log(f"{run.name}: {run.target_steps} steps, {limit:.0f} s limit")
        train_one(run, env, logs, limit, min(args.finalize_time_limit, limit / 2))
    return runs


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------


def _scores_row(run: Run) -> str:
    o = run.oracle
    keys = ("color", "shape", "size", "direction", "speed", "all")
    cells = [f"{100 * o[k]:.1f}%" if isinstance(o.get(k), (int, float)) else "–" for k in keys]
    err = f"{o['trajectory_error']:.2f} px" if isinstance(o.get("trajectory_error"), (int, float)) else "–"
    return f"| {run.name} | {run.steps_done if run.steps_done is not None else '–'} / {run.target_steps} | {run.seconds:.0f} | " \
           + " | ".join(cells) + f" | {err} | {o.get('n', '–')} | {run.status} |"


def write_summary(out: Path, args: argparse.Namespace, env_lines: list[str], checks: list[Step], runs: list[Run],
                  error: str | None, started: float, files: list[tuple[str, int]]) -> None:
    mode = "CPU smoke (--cpu-smoke)" if args.cpu_smoke else "GPU"
    lines = [f"# chronos-video GPU run: {mode}", "", f"Command: `{shlex.join(['bash', 'training/gpu_run.sh', *sys.argv[1:]])}`",
             f"Total wall time: {time.time() - started:.0f} s (budget {args.total_time_limit:.0f} s). "
             f"Steps factor {args.steps_factor}, batch factor {args.batch_factor}, mixed precision {args.mixed_precision}, "
             f"{'runs side by side' if args.parallel else 'runs one after another'}, "
             f"{args.num_threads} CPU thread(s) per run.", ""]
    if error:
        lines += ["**Stopped:** " + error, ""]
    lines += ["## Environment", "", "```", *env_lines, "```", ""]
    if checks:
        lines += ["## GPU checks", "", "| check | wall s | result |", "|---|---:|---|"]
        for s in checks:
            state = "timed out; " if s.timed_out else ("" if s.returncode is None else f"rc {s.returncode}; ")
            lines.append(f"| {s.name} | {s.seconds:.0f} | {state}{s.note.replace('|', '/')} |")
        lines.append("")
    if runs:
        lines += ["## Training", "", "Oracle scores from each pipeline's `oracle_scores.json` (held-out combinations).", "",
                  "| run | steps done / planned | wall s | colour | shape | size | direction | speed | all | traj. err | prompts | status |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        lines += [_scores_row(r) for r in runs]
        lines += ["", "Per run: config, overrides, last learning-curve point.", ""]
        for r in runs:
            lines.append(f"- **{r.name}**: `{Path(r.config).name}` with `{shlex.join(r.overrides)}`")
            if r.curve_last:
                point = (f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.curve_last.items())
                lines.append("  last curve point: " + ", ".join(point))
        lines.append("")
    if files:
        lines += ["## Files", "", "- `summary.md` (this file)"]
        for name, size in files:
            over = " **over the 16 MiB hand-back limit**" if size > MAX_FILE_BYTES else ""
            lines.append(f"- `{name}` ({size / 2**20:.2f} MiB){over}")
        lines.append("")
    (out / "summary.md").write_text("\n".join(lines))


def _without_checkpoints(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Tar filter: drops `<run>/checkpoints` (optimizer state; the pipeline folder holds the weights)."""
    return None if info.name.split("/")[1:2] == ["checkpoints"] else info


def pack(out: Path, work: Path, logs: Path, runs: list[Run], summary: dict[str, Any]) -> list[tuple[str, int]]:
    """One archive per pipeline folder (no checkpoints) and one of logs + curves + test output."""
    files = []
    for run in runs:
        if not run.output_dir.is_dir() or not any(run.output_dir.iterdir()):
            continue
        archive = out / f"{run.name}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(run.output_dir, arcname=run.name, filter=_without_checkpoints)
        files.append((archive.name, archive.stat().st_size))
    curves = logs / "curves"
    for run in runs:
        curve = run.output_dir / "logs" / "learning_curve.jsonl"
        if curve.is_file():
            curves.mkdir(parents=True, exist_ok=True)
            shutil.copy(curve, curves / f"{run.name}.jsonl")
    (logs / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    archive = out / "logs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(logs, arcname="logs")
    files.append((archive.name, archive.stat().st_size))
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare_wheels:
        return prepare_wheels(Path(args.wheels or ROOT / ".whl"), args.wheel_packages)
    started = time.time()
    budget = Budget(args.total_time_limit)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in out.iterdir()]
    if stale:
        raise SystemExit(f"gpu_run: error: --out {out} is not empty ({', '.join(stale[:5])}); give an empty or new folder.")
    work, logs = out / "work", out / "work" / "logs"
    logs.mkdir(parents=True)
    # No network on a lent machine; progress bars refresh every 10 s so long runs keep short logs.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_MININTERVAL": "10"}
    if args.cpu_smoke:  # hide any GPU, here and in the children, so the smoke run is the CPU path
        os.environ["CUDA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = str(args.num_threads)
    error, env_lines, checks, runs = None, [], [], []
    try:
        env_lines = check_environment(args, env)
        print("\n".join(env_lines), flush=True)
        checks = run_gpu_checks(args, env, logs, budget)
        if not args.skip_train:
            runs = run_training(args, env, work, logs, budget)
    except SetupError as failure:
        error = str(failure)
        print(f"gpu_run: error: {error}", file=sys.stderr, flush=True)
    (logs / "env.txt").write_text("\n".join(env_lines + ([f"ERROR: {error}"] if error else [])) + "\n")
    summary = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "error": error, "wall_seconds": time.time() - started,
        "checks": [{"name": s.name, "seconds": s.seconds, "returncode": s.returncode, "timed_out": s.timed_out, "note": s.note} for s in checks],
        "runs": [{"name": r.name, "config": r.config, "status": r.status, "seconds": r.seconds, "steps_done": r.steps_done,
                  "target_steps": r.target_steps, "oracle": r.oracle, "curve_last": r.curve_last, "overrides": r.overrides} for r in runs],
    }
    files = pack(out, work, logs, runs, summary)
    write_summary(out, args, env_lines, checks, runs, error, started, files)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    log(f"results in {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    failed = error is not None or any(not r.oracle for r in runs) or any(s.timed_out or s.returncode not in (None, 0, 5) for s in checks)
    return 2 if error else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
