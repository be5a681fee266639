"""The worked example of docs/research.md: per-word surprisal on garden-path sentences.

    python -m lmscore.bench.garden_path [--model DIR] [--output-dir docs/bench]

Scores each sentence with the default model (or --model, an export directory) through
the server's engine, in process, with per-word scores, and writes garden_path.json, a
Markdown table (garden_path.md, also printed) and garden_path.png: per-word surprisal
in bits, beginning-of-word corrected and uncorrected, one panel per pair of sentences.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path

# (garden path, its unambiguous control): the control's extra words resolve the
# ambiguity early, so the disambiguating word is no surprise there.
PAIRS = [
    ("The horse raced past the barn fell.", "The horse that was raced past the barn fell."),
    ("The old man the boat.", "The old people man the boat."),
    (
        "While the man hunted the deer ran into the woods.",
        "While the man hunted, the deer ran into the woods.",
    ),
]


def surprisals(model_dir: Path) -> list[dict]:
    from lmscore.server.app import load_model
    from lmscore.server.config import ServerConfig
    from lmscore.server.requests import ItemInput
    from lmscore.v1.options import ScoreOptions

    loaded = load_model(ServerConfig(model_dir=model_dir))
    sentences = [s for pair in PAIRS for s in pair]
    # The model's own BOS rule (SmolLM2: none; its BOS is the chat template's
    # <|im_start|>, after which plain prose is unlikely), so a first word may go unscored.
    options = ScoreOptions(words=True)
    plan = loaded.engine.plan([ItemInput(None, [s]) for s in sentences], options)
    results = loaded.engine.score_sync(plan)
    loaded.engine.close()
    return [
        {
            "sentence": sentence,
            "words": [
                {
                    "text": w.text,
                    "surprisal_bits": _bits(w.logprob),
                    "uncorrected_bits": _bits(w.logprob_uncorrected),
                    "tokens": w.token_end - w.token_start,
                }
                for w in result.words
            ],
        }
        for sentence, result in zip(sentences, results, strict=True)
    ]


def _bits(logprob: float | None) -> float | None:
    return None if logprob is None else -logprob / math.log(2)


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(scored: list[dict]) -> str:
    lines = []
    for entry in scored:
        words = entry["words"]
        lines += [
            f"**{entry['sentence']}**",
            "",
            "| " + " | ".join(["", *(w["text"] for w in words)]) + " |",
            "|" + "---|" * (len(words) + 1),
            "| surprisal (bits) | " + " | ".join(_cell(w["surprisal_bits"]) for w in words) + " |",
            "| uncorrected | " + " | ".join(_cell(w["uncorrected_bits"]) for w in words) + " |",
            "",
        ]
    return "\n".join(lines)


def plot(scored: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(PAIRS), 1, figsize=(10, 3.2 * len(PAIRS)))
    for axis, pair in zip(axes, PAIRS, strict=True):
        for sentence, style in zip(pair, ("-o", "--s"), strict=True):
            entry = next(e for e in scored if e["sentence"] == sentence)
            words = [w for w in entry["words"] if w["surprisal_bits"] is not None]
            # Aligned on the sentence's last word, where the two sentences meet again.
            offset = max(len(e["words"]) for e in scored if e["sentence"] in pair) - len(words)
            xs = [offset + i for i in range(len(words))]
            axis.plot(xs, [w["surprisal_bits"] for w in words], style, label=sentence)
            for x, w in zip(xs, words, strict=True):
                axis.annotate(
                    w["text"],
                    (x, w["surprisal_bits"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(0, 5),
                    ha="center",
                )
        axis.set_ylabel("surprisal (bits)")
        axis.set_xticks([])
        axis.legend(fontsize=7, loc="best")
    figure.suptitle("Per-word surprisal, beginning-of-word corrected (lmscore words)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from lmscore.export.paths import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="export directory (default: the default model)")
    parser.add_argument("--output-dir", type=Path, default=Path("docs/bench"))
    args = parser.parse_args(argv)
    model_dir = args.model or default_model_dir(os.environ)
    scored = surprisals(model_dir)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    document = {"model": model_dir.name, "machine": platform.machine(), "sentences": scored}
    (args.output_dir / "garden_path.json").write_text(json.dumps(document, indent=2) + "\n")
    table = markdown(scored)
    (args.output_dir / "garden_path.md").write_text(table + "\n")
    plot(scored, args.output_dir / "garden_path.png")
    print(table)
    print(f"wrote {args.output_dir}/garden_path.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
