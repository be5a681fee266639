"""lmscore.bench.after_idle's accounting of other processes' CPU, which decides which
after-idle calls give the server's own figure (issue 23)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmscore.bench.after_idle import DISTURBED_SHARE, Calls, machine_cpu_s
from lmscore.bench.report import after_idle_checks, after_idle_table

pytestmark = pytest.mark.skipif(
    machine_cpu_s(()) is None, reason="the kernel keeps no per-task schedstat"
)

# The child burns this much CPU once told to, then waits: what the accounting must see.
BURN_S = 0.3
BURNER = f"""
import sys, time
print("ready", flush=True)
sys.stdin.readline()
began = time.process_time()
while time.process_time() - began < {BURN_S}:
    pass
print("burnt", flush=True)
sys.stdin.readline()
"""


def test_another_process_cpu_is_counted_and_an_excluded_one_is_not() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        own, with_child = {os.getpid()}, {os.getpid(), child.pid}
        before = machine_cpu_s(own), machine_cpu_s(with_child)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "burnt"
        after = machine_cpu_s(own), machine_cpu_s(with_child)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert all(v is not None for v in (*before, *after))
    others = after[0] - before[0]  # type: ignore[operator]
    others_but_child = after[1] - before[1]  # type: ignore[operator]
    # Other processes only add to what the child ran; the two snapshots of each moment
    # are microseconds apart, so the difference is the child's CPU.
    assert others >= BURN_S
    assert others - others_but_child == pytest.approx(BURN_S, abs=0.05)


def test_undisturbed_calls_are_those_others_left_alone() -> None:
    calls = Calls(
        seconds=[0.050, 0.080, 0.045, 0.046, 0.090, 1.5],
        others_cpu_s=[0.0002, 0.030, 0.0, DISTURBED_SHARE * 0.046, None, 0.004],
    )
    summary = calls.summary()
    assert summary["median_s"] == pytest.approx(0.065)
    # At the threshold counts; unknown does not; the share is of each call's own time.
    assert summary["undisturbed_calls"] == 4
    assert summary["undisturbed_median_s"] == pytest.approx(0.048)
    assert Calls([0.05], [0.01]).summary()["undisturbed_median_s"] is None


def _timed(median: float, undisturbed: float | None, ratio: float | None = None) -> dict:
    timed = {
        "median_s": median,
        "undisturbed_median_s": undisturbed,
        "calls": 7,
        "undisturbed_calls": 0 if undisturbed is None else 5,
    }
    if ratio is not None:
        timed["ratio"] = 0.045 / median
        timed["undisturbed_ratio"] = None if undisturbed is None else ratio
    return timed


def test_the_checks_hold_the_undisturbed_ratio_and_show_all_calls_beside_it() -> None:
    row = {
        "back_to_back": _timed(0.045, 0.045),
        "after_3s": _timed(0.060, 0.046, 0.045 / 0.046),
        "after_15s": _timed(0.050, None, 0.0),
    }
    checks = after_idle_checks({"short_pair": row})
    assert [c.met for c in checks] == [True, None]  # none undisturbed: not measured
    assert "all calls 0.75x" in checks[0].name
    table = after_idle_table(
        {"cpu": "test CPU", "disturbed_share": 0.02, "default": {"short_pair": row}}
    )
    assert "| default | short pair | 45.0; undisturbed 45.0, 5/7 |" in table
    assert "60.0 (0.75x); undisturbed 46.0 (0.98x), 5/7" in table
    assert "undisturbed: none of 7" in table
