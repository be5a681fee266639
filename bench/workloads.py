"""The benchmark's workloads, cut from text every machine has (/usr/share/common-licenses)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmscore.server.requests import ItemInput
from lmscore.server.tokenization import TextTokenizer

LICENSES = Path("/usr/share/common-licenses")
BATCH_TEXT = LICENSES / "GPL-3"
HELD_OUT_TEXTS = [LICENSES / "Apache-2.0", LICENSES / "MPL-2.0"]


@dataclasses.dataclass(frozen=True)
class Workloads:
    batch: list[ItemInput]  # 8 x 128 tokens of natural text, empty prompts
    batch_tokens: int
    choice: ItemInput  # one 256-token prompt, 8 completions of 16 tokens
    short_pair: ItemInput  # 16-token prompt, 4-token completion
    short_pair_text: str  # the short pair's prompt and completion as one text
    held_out: list[ItemInput]  # deviation checks of the quantized variant
    # A 5-shot task: a 600-token preamble shared by 64 questions of 40 tokens, each with 4
    # choices of 5 tokens, one question per request (as lm-eval sends them).
    few_shot: list[ItemInput]


def _windows(ids: list[int], count: int, length: int, start: int = 0) -> list[list[int]]:
    return [ids[start + i * length : start + (i + 1) * length] for i in range(count)]


def build_workloads(tokenizer: TextTokenizer) -> Workloads:
    gpl = tokenizer.encode(BATCH_TEXT.read_text(encoding="utf-8"))
    batch = [ItemInput(None, [window]) for window in _windows(gpl, 8, 128)]
    prompt = gpl[2000:2256]
    completions = _windows(gpl, 8, 16, start=3000)
    held_out_ids = [tokenizer.encode(path.read_text(encoding="utf-8")) for path in HELD_OUT_TEXTS]
    held_out = [
        ItemInput(None, [window]) for ids in held_out_ids for window in _windows(ids, 8, 128)
    ]
    return Workloads(
        batch=batch,
        batch_tokens=sum(len(w.completions[0]) for w in batch),
        choice=ItemInput(prompt, completions),
        short_pair=ItemInput(gpl[4000:4016], [gpl[4016:4020]]),
        short_pair_text=tokenizer.decode(gpl[4000:4020]),
        held_out=held_out,
        few_shot=few_shot_items(gpl),
    )


def few_shot_items(ids: list[int]) -> list[ItemInput]:
    """From GPL-3's ~7,600 tokens (any of the shipped tokenizers): tokens 4100-7400."""
    preamble = ids[4100:4700]
    questions = _windows(ids, 64, 40, start=4700)
    choices = _windows(ids, 4, 5, start=7300)
    if len(choices[-1]) < 5:
        raise ValueError(f"the few-shot workload needs 7,320 tokens of text, got {len(ids)}")
    return [ItemInput(preamble + question, choices) for question in questions]
