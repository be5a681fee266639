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
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    scored_prompt: str
    scored_completion: str
    prompt_ids: list[int]
    completion_ids: list[int]


def move_trailing_whitespace(prompt: str, completion: str) -> tuple[str, str]:
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped) :] + completion


class TextTokenizer:
    """The exported tokenizer.json, loaded with the `tokenizers` library (no transformers)."""

    def __init__(self, path: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.decode_token = lru_cache(maxsize=65536)(self._decode_token)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_pair(self, prompt: str, completion: str) -> EncodedPair:
        prompt, completion = move_trailing_whitespace(prompt, completion)
        prompt_ids = self.encode(prompt)
        if not completion:
            return EncodedPair(prompt, completion, prompt_ids, [])
        whole = self.encode(prompt + completion)
        if whole[: len(prompt_ids)] == prompt_ids:
            completion_ids = whole[len(prompt_ids) :]
        else:
            completion_ids = self.encode(completion)
        return EncodedPair(prompt, completion, prompt_ids, completion_ids)

    def _decode_token(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)
