"""lm-eval's multiple-choice task through the HTTP port (`--model local-completions`, as any
OpenAI-compatible server is evaluated) beside `lmscore eval` (the lmscore model, over gRPC),
against one server: each command's wall time, the best of `rounds`, the two alternating.

The task is lmscore_license_mc of tests/lm_eval_tasks (16 questions, 4 choices each), whose
files name their data relative to the repository root: the commands run there, offline.
Both send batches of 8 requests, two at a time, and must agree on the task's accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TASK = "lmscore_license_mc"
TASK_DIR = "tests/lm_eval_tasks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# lm-eval, and the packages of its [api] extra that local-completions needs.
MODULES = ("lm_eval", "aiohttp", "tenacity")


def default_repo_root() -> Path:
    """The checkout the bench runs from (an editable install): the one with the task files."""
    return Path(__file__).resolve().parents[1]


def unavailable(repo_root: Path) -> str | None:
    """Why the comparison cannot run here, or None."""
    missing = [name for name in MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return f"needs lm-eval with its [api] extra (missing: {', '.join(missing)})"
    if not (repo_root / TASK_DIR).is_dir():
        return f"no {TASK_DIR} under {repo_root} (--repo-root)"
    return None


def commands(address: str, http_port: int, model: str) -> dict[str, list[str]]:
    scripts = Path(sys.executable).parent
    common = ["--tasks", TASK, "--include_path", TASK_DIR, "--batch_size", "8"]
    base_url = f"http://127.0.0.1:{http_port}/v1/completions"
    return {
        "local_completions": [
            str(scripts / "lm_eval"),
            "--model",
            "local-completions",
            "--model_args",
            f"base_url={base_url},tokenizer_backend=remote,model={model},"
            "num_concurrent=2,max_retries=1",
            *common,
        ],
        "lmscore_eval": [
            str(scripts / "lmscore"),
            "eval",
            "--model",
            "lmscore",
            "--model_args",
            f"server={address},concurrency=2",
            *common,
        ],
    }


def _accuracy(output: Path) -> float:
    [results] = output.rglob("results_*.json")
    return float(json.loads(results.read_text())["results"][TASK]["acc,none"])


def measure_lm_eval(
    repo_root: Path, address: str, http_port: int, model: str, rounds: int = 2
) -> dict[str, Any]:
    reason = unavailable(repo_root)
    if reason is not None:
        print(f"lm-eval comparison skipped: {reason}", file=sys.stderr)
        return {"skipped": reason}
    seconds: dict[str, list[float]] = {}
    accuracy: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lmscore-bench-lm-eval-") as scratch:
        for round_ in range(rounds):
            for name, command in commands(address, http_port, model).items():
                output = Path(scratch, f"{name}-{round_}")
                began = time.perf_counter()
                run = subprocess.run(
                    [*command, "--output_path", str(output)],
                    cwd=repo_root,
                    env={**os.environ, **OFFLINE},
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                seconds.setdefault(name, []).append(time.perf_counter() - began)
                if run.returncode != 0:
                    raise RuntimeError(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
                accuracy[name] = _accuracy(output)
    best = {name: min(values) for name, values in seconds.items()}
    return {
        "task": TASK,
        "rounds": rounds,
        "seconds": seconds,
        "local_completions_s": best["local_completions"],
        "lmscore_eval_s": best["lmscore_eval"],
        "ratio": best["local_completions"] / best["lmscore_eval"],
        "acc": accuracy,
    }
