"""The server process under signals and deadlines: graceful shutdown, dropped work, start-up."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from conftest import LMSCORE, ServerProcess
from lmscore.client import Item, RetryPolicy, ScoringClient, ScoringError

MANY_ITEMS = [Item(f"Item {i} of the batch says", [f" number {i} is here"]) for i in range(600)]
# Near the per-request limit (1024): what runs before a 0.3 s deadline (up to ~410 sequences
# seen on a 2-core CI machine) stays well below half, and had the rest run, it would be all.
DEADLINE_ITEMS = [
    Item(f"Item {i} of the batch says", [f" number {i} is here"]) for i in range(1000)
]


def sequences_scored(log: str) -> int:
    match = re.search(r"stopped: (\d+) sequences scored", log)
    assert match, log
    return int(match.group(1))


def test_sigterm_finishes_in_flight_requests_then_exits_0(tiny_export: Path) -> None:
    server = ServerProcess(tiny_export, "--max-batch-tokens", "64").wait_ready()
    results: list = []
    errors: list = []

    def score() -> None:
        with ScoringClient(server.address, timeout=120) as client:
            try:
                results.extend(client.score(MANY_ITEMS))
            except ScoringError as exc:
                errors.append(exc)

    worker = threading.Thread(target=score)
    worker.start()
    time.sleep(0.5)  # the request is in flight
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with ScoringClient(server.address, retry=RetryPolicy(max_attempts=1), timeout=5) as late:
        assert not late.is_server_ready()  # NOT_SERVING or refusing: no new work
        with pytest.raises(ScoringError) as refused:
            late.score([Item("too", [" late"])])
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    worker.join(timeout=120)
    assert errors == [] and len(results) == len(MANY_ITEMS)
    assert server.process.wait(timeout=60) == 0
    assert sequences_scored(server.log()) == len(MANY_ITEMS)


def test_deadline_exceeded_drops_the_pending_work(tiny_export: Path) -> None:
    server = ServerProcess(tiny_export, "--max-batch-tokens", "32").wait_ready()
    try:
        with ScoringClient(server.address, retry=RetryPolicy(max_attempts=1)) as client:
            began = time.monotonic()
            with pytest.raises(ScoringError) as error:
                client.score(DEADLINE_ITEMS, timeout=0.3)
            assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - began < 5
            time.sleep(1.0)  # had the work gone on, it would run now
            assert client.score([Item("still", [" serving"])])[0].completion_tokens > 0
    finally:
        assert server.stop() == 0
    assert sequences_scored(server.log()) < len(DEADLINE_ITEMS) // 2


def test_client_killed_mid_stream_frees_the_server(tiny_export: Path, tmp_path: Path) -> None:
    server = ServerProcess(tiny_export, "--max-batch-tokens", "32").wait_ready()
    script = tmp_path / "client.py"
    script.write_text(
        "import sys\n"
        "from lmscore.client import Item, ScoringClient\n"
        "items = [Item(f'Item {i} of the batch says', [f' number {i} is here'])\n"
        f"         for i in range({len(MANY_ITEMS)})]\n"
        "with ScoringClient(sys.argv[1]) as client:\n"
        "    for result in client.iter_score(items):\n"
        "        print('got', flush=True)\n"
    )
    try:
        import sys

        child = subprocess.Popen(
            [sys.executable, str(script), server.address], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdout.readline().startswith("got")
        child.kill()  # SIGKILL: no goodbye to the server
        child.wait()
        time.sleep(1.0)
        with ScoringClient(server.address) as client:
            assert client.score([Item("still", [" serving"])])[0].completion_tokens > 0
    finally:
        assert server.stop() == 0
    assert sequences_scored(server.log()) < len(MANY_ITEMS) // 2


def test_port_in_use_exits_with_one_line(tiny_export: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [LMSCORE, "serve", "--model", str(tiny_export), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert str(port) in run.stderr.strip().splitlines()[-1]


def test_batch_cli_resumes_without_repeating_or_skipping(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    import json

    source = tmp_path / "in.jsonl"
    lines = [
        {"prompt": f"Line {i} of the file ", "completions": ["says yes", "says no"], "id": i}
        for i in range(400)
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    target = tmp_path / "out.jsonl"
    command = [
        LMSCORE,
        "score",
        "--server",
        tiny_server.address,
        "--input",
        str(source),
        "--output",
        str(target),
        "--items-per-request",
        "4",
    ]
    first = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while (not target.exists() or target.stat().st_size < 2000) and time.monotonic() < deadline:
        time.sleep(0.02)
    first.kill()
    first.wait()
    with target.open("a") as handle:
        handle.write('{"index": 399, "completion_ind')  # a line torn by the kill
    partial = len(target.read_text().splitlines()) - 1
    assert 0 < partial < 800
    subprocess.run([*command, "--resume"], check=True, capture_output=True, timeout=300)
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    keys = [(r["index"], r["completion_index"]) for r in rows]
    assert sorted(keys) == [(i, c) for i in range(400) for c in (0, 1)]  # each exactly once
    assert keys == sorted(keys)
    with ScoringClient(tiny_server.address) as client:
        expected = client.score([Item(line["prompt"], line["completions"]) for line in lines])
    for row, result in zip(rows, expected, strict=True):
        assert row["id"] == row["index"]
        assert row["conditional_logprob"] == pytest.approx(result.conditional_logprob, abs=1e-4)
