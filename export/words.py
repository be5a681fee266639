"""Which tokens begin a word: the vocabulary mask behind word scores (docs/research.md).

A token begins a word when its text, read after a letter, starts with whitespace:
GPT-2's byte-level "Ġ" and "Ċ", SentencePiece's "▁", a byte-fallback <0x0A>.
EOS counts too (every EOS id of the config), since the end of the text ends a word
(Pimentel & Meister 2024, "How to compute the probability of a word"). Other special
tokens do not.

The export computes the mask once from the exported tokenizer.json: the scoring
head sums the probability of these tokens at every position (lmscore.export.head),
and WORD_STARTS_NAME keeps the mask for the server to split words by. Needs only
`tokenizers` and numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

WORD_STARTS_NAME = "word_starts.npy"


def word_start_mask(
    tokenizer_path: Path, width: int, eos_token_ids: int | Sequence[int] | None
) -> np.ndarray:
    """bool [width]: which ids begin a word (ids the tokenizer does not know: none); every
    EOS id of the model's config counts (Gemma's <eos> and <end_of_turn>, say)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    # Decoded after a letter, so that decoders which drop a text's leading space (Metaspace's
    # prepend scheme) keep it: decode([a, t]) = "a" + text of t.
    anchor = tokenizer.encode("a", add_special_tokens=False).ids[-1:]
    lead = len(tokenizer.decode(anchor, skip_special_tokens=False))
    known = min(width, tokenizer.get_vocab_size(with_added_tokens=True))
    texts = tokenizer.decode_batch(
        [[*anchor, token] for token in range(known)], skip_special_tokens=False
    )
    mask = np.zeros(width, dtype=bool)
    mask[:known] = [text[lead : lead + 1].isspace() for text in texts]
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    for eos in eos_token_ids or ():
        if 0 <= eos < width:
            mask[eos] = True
    return mask


def write_word_starts(model_dir: Path, mask: np.ndarray) -> Path:
    path = model_dir / WORD_STARTS_NAME
    np.save(path, mask.astype(bool), allow_pickle=False)
    return path


def read_word_starts(model_dir: Path) -> np.ndarray | None:
    """The export's mask; None where the directory holds none."""
    path = model_dir / WORD_STARTS_NAME
    return np.load(path, allow_pickle=False) if path.is_file() else None
