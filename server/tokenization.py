"""How tokens(x) and tokens(y) are formed (lm-evaluation-harness's `_encode_pair` convention).

For text input:

1. Trailing whitespace of the prompt moves to the front of the completion:
   ("The cat ", "sat") is scored as ("The cat", " sat"). The moved text is
   reported as scored_prompt / scored_completion.
2. tokens(x) = encode(x). tokens(y) = encode(x + y)[len(tokens(x)):], so the
   completion is tokenized the way it reads after its prompt.
3. When a token of encode(x + y) straddles the boundary (encode(x) is not a
   prefix of encode(x + y)), that slice would not spell y; then tokens(y) =
   encode(y) on its own. Nothing of y is ever dropped.

encode() adds no special tokens; BOS is added by the scoring plan. Token ids
given by the client are used verbatim, with no whitespace rule; a text prompt
with an id completion (or the reverse) encodes the text side on its own.

Offsets (token details): each token's [start, end) in the text it belongs to,
scored_prompt for tokens(x) and scored_completion for tokens(y), in Unicode
code points (Python str indices, as `tokenizers` reports them). Rule 3 means
no token straddles the two texts. A token holding only some bytes of a
character (byte-level BPE splits an emoji into several) spans the whole
character, so neighbours may share a span.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from functools import lru_cache
from pathlib import Path
from typing import Final

import numpy as np
from tokenizers import Tokenizer

# Texts longer than this go through encode_batch, which releases the GIL while it works
# (encode holds it, stopping every other thread, the event loop too, for seconds on a
# text of megabytes); shorter ones through encode, which has less overhead.
_RELEASE_GIL_CHARS: Final = 4096
# Long texts whose ids are kept: a prompt and its joint text with a completion, for each of
# two requests being planned at once.
_RECENT_TEXTS: Final = 4


# [start, end) of a token in its text, in code points.
Offsets = list[tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    scored_prompt: str
    scored_completion: str
    prompt_ids: list[int]
    completion_ids: list[int]
    # With encode_pair(..., offsets=True): each token's span in scored_prompt / scored_completion.
    prompt_offsets: Offsets | None = None
    completion_offsets: Offsets | None = None


def move_trailing_whitespace(prompt: str, completion: str) -> tuple[str, str]:
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped) :] + completion


class TextTokenizer:
    """The exported tokenizer.json, loaded with the `tokenizers` library (no transformers).

    `word_starts`: the export's mask of the ids that begin a word (lmscore.export.words);
    None where the model cannot score words."""

    def __init__(self, path: Path, word_starts: np.ndarray | None = None) -> None:
        self.word_starts = word_starts
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.decode_token = lru_cache(maxsize=65536)(self._decode_token)
        # The last long texts encoded: an item's prompt, encoded again for each completion.
        self._recent: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self._recent_lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        if len(text) <= _RELEASE_GIL_CHARS:
            return list(self._tokenizer.encode(text, add_special_tokens=False).ids)
        with self._recent_lock:
            known = self._recent.get(text)
            if known is not None:
                self._recent.move_to_end(text)
                return list(known)
        [encoding] = self._tokenizer.encode_batch([text], add_special_tokens=False)
        ids = list(encoding.ids)
        with self._recent_lock:
            self._recent[text] = ids
            while len(self._recent) > _RECENT_TEXTS:
                self._recent.popitem(last=False)
        return list(ids)

    def forget_recent(self) -> None:
        """Drop the kept ids of the last long texts (after a request that was refused: its
        texts will not be asked for again)."""
        with self._recent_lock:
            self._recent.clear()

    def encode_offsets(self, text: str) -> tuple[list[int], Offsets]:
        """encode(text) and each token's [start, end) in `text` (code points). Not cached:
        only token details ask for offsets."""
        if len(text) <= _RELEASE_GIL_CHARS:
            encoding = self._tokenizer.encode(text, add_special_tokens=False)
        else:
            [encoding] = self._tokenizer.encode_batch([text], add_special_tokens=False)
        return list(encoding.ids), [(int(s), int(e)) for s, e in encoding.offsets]

    def encode_pair(self, prompt: str, completion: str, offsets: bool = False) -> EncodedPair:
        """tokens(x) and tokens(y) by the rules above; `offsets`: with each token's span."""
        prompt, completion = move_trailing_whitespace(prompt, completion)
        if offsets:
            return self._encode_pair_offsets(prompt, completion)
        prompt_ids = self.encode(prompt)
        if not completion:
            return EncodedPair(prompt, completion, prompt_ids, [])
        whole = self.encode(prompt + completion)
        if whole[: len(prompt_ids)] == prompt_ids:
            completion_ids = whole[len(prompt_ids) :]
        else:
            completion_ids = self.encode(completion)
        return EncodedPair(prompt, completion, prompt_ids, completion_ids)

    def _encode_pair_offsets(self, prompt: str, completion: str) -> EncodedPair:
        prompt_ids, prompt_spans = self.encode_offsets(prompt)
        if not completion:
            return EncodedPair(prompt, completion, prompt_ids, [], prompt_spans, [])
        whole, whole_spans = self.encode_offsets(prompt + completion)
        if whole[: len(prompt_ids)] == prompt_ids:
            completion_ids = whole[len(prompt_ids) :]
            # Spans in prompt + completion, moved to the completion's own text.
            shift = len(prompt)
            completion_spans = [
                (max(s - shift, 0), max(e - shift, 0)) for s, e in whole_spans[len(prompt_ids) :]
            ]
        else:
            completion_ids, completion_spans = self.encode_offsets(completion)
        return EncodedPair(
            prompt, completion, prompt_ids, completion_ids, prompt_spans, completion_spans
        )

    def adds_bos(self, bos_token_id: int | None) -> bool:
        """Whether the tokenizer itself puts BOS before a text (its post-processor, what
        transformers' `add_bos_token` configures): the BOS rule HFLM follows by default."""
        if bos_token_id is None:
            return False
        plain = self._tokenizer.encode("a", add_special_tokens=False).ids
        special = self._tokenizer.encode("a", add_special_tokens=True).ids
        before = special[: special.index(plain[0])] if plain and plain[0] in special else []
        return bos_token_id in before

    def word_start_flags(self, ids: list[int]) -> tuple[list[bool], list[bool]]:
        """Per token: whether it begins a word, and whether it is whitespace only."""
        mask = self.word_starts
        if mask is None:
            raise ValueError("the tokenizer has no word-start mask")
        starts = [bool(mask[i]) if i < len(mask) else False for i in ids]
        blank = [not self.decode_token(i).strip() for i in ids]
        return starts, blank

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens written out (what /detokenize returns)."""
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def _decode_token(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)
