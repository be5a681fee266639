"""Scoring throughput, in-process engine vs. the full gRPC path, side by side in one run.

    .venv/bin/python bench/throughput.py [--model default|DIR] [--repeats 5]

Workload: 8 texts of 128 tokens cut from /usr/share/common-licenses/GPL-3,
each scored as (empty prompt, text) in one request. Prints tokens scored per
second (median of the repeats, after one warm-up) and the gRPC/in-process ratio.
The server is started by this script on a free loopback port and stopped after.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lmscore.client import Item, ScoringClient
from lmscore.export.paths import default_model_dir
from lmscore.server.app import load_model, warm_up
from lmscore.server.config import ServerConfig
from lmscore.server.engine import ItemInput, ScoreOptions

TEXT = Path("/usr/share/common-licenses/GPL-3")


def workload(tokenizer, count: int = 8, length: int = 128) -> list[list[int]]:
    ids = tokenizer.encode(TEXT.read_text())
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def timed(run, repeats: int) -> list[float]:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model_dir = default_model_dir(os.environ) if args.model == "default" else Path(args.model)

    loaded = load_model(ServerConfig(model_dir=model_dir))
    warm_up(loaded.engine)
    texts = workload(loaded.engine.tokenizer)
    tokens = sum(len(t) for t in texts)  # BOS + 128 tokens: 128 scored per text
    engine = loaded.engine
    in_process = timed(
        lambda: engine.score_sync(
            engine.plan([ItemInput(None, [t]) for t in texts], ScoreOptions())
        ),
        args.repeats,
    )
    loaded.engine.close()
    del loaded

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    lmscore = str(Path(sys.executable).parent / "lmscore")
    started = time.perf_counter()
    server = subprocess.Popen(
        [lmscore, "serve", "--model", str(model_dir), "--port", str(port), "--log-level", "WARNING"]
    )
    try:
        with ScoringClient(f"127.0.0.1:{port}", timeout=600) as client:
            client.wait_until_ready(timeout=120)
            startup = time.perf_counter() - started
            grpc_times = timed(lambda: client.score([Item(None, [t]) for t in texts]), args.repeats)
    finally:
        server.terminate()
        server.wait()

    def rate(times: list[float]) -> float:
        return tokens / statistics.median(times)

    print(f"workload: {len(texts)} x {tokens // len(texts)} tokens, {args.repeats} repeats, median")
    print(f"server start to SERVING: {startup:.2f} s")
    print(
        f"in-process engine : {rate(in_process):7.1f} tokens/s  (min {min(in_process):.3f} s, "
        f"max {max(in_process):.3f} s)"
    )
    print(
        f"gRPC end to end   : {rate(grpc_times):7.1f} tokens/s  (min {min(grpc_times):.3f} s, "
        f"max {max(grpc_times):.3f} s)"
    )
    print(f"ratio gRPC / in-process: {rate(grpc_times) / rate(in_process):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
