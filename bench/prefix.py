"""When prefix reuse pays: full passes against prefix reuse, side by side in one run.

    python -m lmscore.bench.prefix [--model DIR] [--repeats 3]

For each (prompt tokens, completions) on a grid, 12 items of GPL-3 token ids
(8-token completions) are scored in-process twice, with prefix reuse forced on
and with it off; the ratio full / reuse > 1 means reuse is faster. The
threshold `--min-prefix-reuse-tokens` (lmscore.server.config) comes from
this table: tokens saved = (completions - 1) x prompt.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lmscore.bench.harness import timed
from lmscore.export.paths import default_model_dir
from lmscore.server.app import load_model
from lmscore.server.config import EngineSettings, ServerConfig
from lmscore.server.requests import ItemInput
from lmscore.v1.options import ScoreOptions

GRID = ((14, 2), (32, 4), (64, 2), (64, 4), (128, 2), (128, 4))
ITEMS = 12
COMPLETION_TOKENS = 8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="exported model dir or 'default'")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model_dir = default_model_dir(os.environ) if args.model == "default" else Path(args.model)
    # The same model twice, with prefix reuse and without, scoring the same plans in turn.
    engines = {
        reuse: load_model(
            ServerConfig(
                model_dir=model_dir,
                engine=EngineSettings(prefix_reuse=reuse, min_prefix_reuse_tokens=1),
            )
        ).engine
        for reuse in (True, False)
    }
    engine = engines[True]
    text = Path("/usr/share/common-licenses/GPL-3").read_text()
    ids = engine.tokenizer.encode(text)
    print("| prompt tokens | completions | tokens saved | reuse s | full s | full / reuse |")
    print("|---|---|---|---|---|---|")
    for prompt_len, completions in GRID:
        stride = prompt_len + completions * COMPLETION_TOKENS
        items = []
        for i in range(ITEMS):
            start = i * stride
            prompt = ids[start : start + prompt_len]
            rest = start + prompt_len
            answers = [
                ids[rest + j * COMPLETION_TOKENS : rest + (j + 1) * COMPLETION_TOKENS]
                for j in range(completions)
            ]
            items.append(ItemInput(prompt, answers))
        seconds = {}
        for reuse, scorer in engines.items():
            plan = scorer.plan(items, ScoreOptions())
            seconds[reuse] = timed(lambda s=scorer, p=plan: s.score_sync(p), args.repeats).median
        saved = (completions - 1) * prompt_len
        print(
            f"| {prompt_len} | {completions} | {saved} | {seconds[True]:.2f} | "
            f"{seconds[False]:.2f} | {seconds[False] / seconds[True]:.2f} |"
        )
    for scorer in engines.values():
        scorer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
