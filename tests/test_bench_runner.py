"""lmscore.bench.runner's side-by-side timing, on fake paths."""

from __future__ import annotations

import time

from lmscore.bench.runner import measure_side_by_side


def test_no_timed_run_of_the_side_by_side_phase_is_one_of_a_paths_first_two() -> None:
    # A path's first two runs of a shape allocate (the server's memory pattern): slow.
    calls = {"fresh": 0, "other": 0}

    def path(name: str) -> None:
        calls[name] += 1
        if calls[name] <= 2:
            time.sleep(0.2)

    result = measure_side_by_side(
        {name: lambda name=name: path(name) for name in calls}, repeats=3, units=1.0
    )
    for name, summary in result.items():
        assert summary["max_s"] < 0.1, name
        assert calls[name] == 1 + 2 * 3  # the untimed round, then two runs a turn
