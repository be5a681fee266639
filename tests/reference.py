"""Independent PyTorch computation of what the server must return.

Written from the rules in the README, sharing no code with lmscore.server:
Hugging Face tokenizer, transformers model, float64 sums.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

NATURAL_TEXTS = [Path("/usr/share/common-licenses") / n for n in ("GPL-3", "Apache-2.0", "MPL-2.0")]


@dataclasses.dataclass(frozen=True)
class Reference:
    joint: float
    marginal: float
    conditional: float
    greedy: bool
    prompt_ids: list[int]
    completion_ids: list[int]
    # Per token of the sequence, None for the first.
    token_logprobs: list[float | None]
    token_ranks: list[int]
    top_ids: list[list[int]]


def encode(hf_tokenizer, text: str) -> list[int]:
    return list(hf_tokenizer(text, add_special_tokens=False)["input_ids"])


def split_pair(hf_tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's _encode_pair, plus the documented fallback at a merged boundary."""
    n_spaces = len(prompt) - len(prompt.rstrip())
    if n_spaces:
        completion = prompt[-n_spaces:] + completion
        prompt = prompt[:-n_spaces]
    context = encode(hf_tokenizer, prompt)
    if not completion:
        return context, []
    whole = encode(hf_tokenizer, prompt + completion)
    if whole[: len(context)] != context:
        return context, encode(hf_tokenizer, completion)
    return context, whole[len(context) :]


def sequence_logprobs(model, ids: list[int], top_k: int = 0):
    """log p(t_j | t_<j) for j >= 1 (float64), ranks, and top-k ids, from one PyTorch pass."""
    import torch

    if len(ids) < 2:
        return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros((0, top_k), dtype=np.int64)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[1:])
    chosen = logprobs[torch.arange(len(targets)), targets]
    ranks = 1 + (logits > logits[torch.arange(len(targets)), targets][:, None]).sum(-1)
    top = torch.topk(logits, top_k, dim=-1).indices if top_k else torch.zeros((len(targets), 0))
    return chosen.numpy(), ranks.numpy(), top.long().numpy()


def reference_score(
    model,
    hf_tokenizer,
    prompt: str | list[int],
    completion: str | list[int],
    bos_id: int | None,
    top_k: int = 0,
    truncate_to: int | None = None,
) -> Reference:
    if isinstance(prompt, str) and isinstance(completion, str):
        prompt_ids, completion_ids = split_pair(hf_tokenizer, prompt, completion)
    else:
        prompt_ids = encode(hf_tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        completion_ids = (
            encode(hf_tokenizer, completion) if isinstance(completion, str) else list(completion)
        )
    bos = [] if bos_id is None else [bos_id]
    if truncate_to is not None:
        excess = len(bos) + len(prompt_ids) + len(completion_ids) - truncate_to
        if excess > 0:
            prompt_ids = prompt_ids[excess:]
    ids = bos + prompt_ids + completion_ids
    logprobs, ranks, top = sequence_logprobs(model, ids, top_k)
    # Entry j-1 scores token j; token 0 (BOS, or the first token without BOS) is unscored.
    boundary = len(bos) + len(prompt_ids)
    marginal = float(sum(logprobs[: max(boundary - 1, 0)]))
    conditional = float(sum(logprobs[max(boundary - 1, 0) :]))
    greedy = bool(all(r == 1 for r in ranks[max(boundary - 1, 0) :]))
    return Reference(
        joint=float(sum(logprobs)),
        marginal=marginal,
        conditional=conditional,
        greedy=greedy,
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        token_logprobs=[None, *(float(x) for x in logprobs)] if ids else [],
        token_ranks=[0, *(int(r) for r in ranks)] if ids else [],
        top_ids=[[], *(list(map(int, t)) for t in top)] if ids else [],
    )


def natural_pairs(count_per_text: int = 4) -> list[tuple[str, str]]:
    """Sentences cut from the license texts, split into prompt and completion at a word."""
    pairs = []
    for path in NATURAL_TEXTS:
        text = re.sub(r"\s+", " ", path.read_text())
        sentences = [s for s in re.split(r"(?<=[.;:])\s", text) if 12 <= len(s.split()) <= 40]
        for number, sentence in enumerate(sentences[5 : 5 + count_per_text]):
            words = sentence.split(" ")
            cut = len(words) * 2 // 3
            prompt = " ".join(words[:cut])
            # Every other pair keeps the space at the end of the prompt (the whitespace rule).
            completion = " ".join(words[cut:])
            if number % 2:
                pairs.append((prompt + " ", completion))
            else:
                pairs.append((prompt, " " + completion))
    return pairs


def assert_equals_reference(result, expected: Reference, tolerance: float) -> None:
    """A ScoreResult's split, joint, marginal, conditional and greedy flag against the
    reference."""
    import pytest

    assert result.prompt_tokens == len(expected.prompt_ids)
    assert result.completion_tokens == len(expected.completion_ids)
    assert result.joint_logprob == pytest.approx(expected.joint, abs=tolerance)
    assert result.marginal_logprob == pytest.approx(expected.marginal, abs=tolerance)
    assert result.conditional_logprob == pytest.approx(expected.conditional, abs=tolerance)
    assert result.greedy == expected.greedy


def assert_token_details_equal(tokens, expected: Reference, tolerance: float) -> None:
    """Token details after the first (log-prob, rank, top-k ids) against the reference."""
    import pytest

    for token, logprob, rank, top in zip(
        tokens[1:],
        expected.token_logprobs[1:],
        expected.token_ranks[1:],
        expected.top_ids[1:],
        strict=True,
    ):
        assert token.logprob == pytest.approx(logprob, abs=tolerance)
        assert token.rank == rank
        assert [t.id for t in token.top] == top


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted (written out here, not taken from the code
    under test)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in table.items()}


def piece_starts_word(piece: str, style: str) -> bool:
    """Whether a vocabulary piece's text starts with whitespace, read from the piece itself:
    `style` "byte-level" (GPT-2's characters for bytes) or "sentencepiece" ("▁", <0xNN>)."""
    if style == "byte-level":
        table = _byte_level_decoder()
        if not piece or piece[0] not in table:
            return False
        data = bytes(table[c] for c in piece if c in table)
        return data.decode("utf-8", errors="replace")[:1].isspace()
    if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
        return chr(int(piece[3:5], 16)).isspace()
    return piece.replace("\u2581", " ")[:1].isspace()


def word_start_ids(hf_tokenizer, style: str, eos_id: int | None, width: int) -> np.ndarray:
    """The ids whose piece begins a word, and EOS (special tokens otherwise not)."""
    special = set(hf_tokenizer.all_special_ids)
    pieces = hf_tokenizer.convert_ids_to_tokens(list(range(len(hf_tokenizer))))
    mask = np.zeros(width, dtype=bool)
    for token, piece in enumerate(pieces[:width]):
        mask[token] = token not in special and piece_starts_word(piece, style)
    if eos_id is not None:
        mask[eos_id] = True
    return mask


@dataclasses.dataclass(frozen=True)
class ReferenceWord:
    text: str
    start: int
    end: int
    logprob: float | None
    logprob_uncorrected: float | None
    token_start: int
    token_end: int


def _offsets(hf_tokenizer, text: str) -> list[tuple[int, int]]:
    encoded = hf_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [tuple(span) for span in encoded["offset_mapping"]]


def _group_by_words(text: str, spans: list[tuple[int, int]]) -> list[tuple[str, int, int, list]]:
    """Tokens grouped by the whitespace-separated words of `text` they overlap; tokens that
    overlap none (whitespace) join the next word, trailing ones an empty word at the end."""
    words = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    groups: list[tuple[str, int, int, list]] = [(w, s, e, []) for w, s, e in words]
    pending: list[int] = []
    for k, (start, end) in enumerate(spans):
        hits = [i for i, (_, s, e) in enumerate(words) if s < end and start < e]
        assert len(hits) <= 1, f"token {k} spans several words of {text!r}"
        if not hits:
            pending.append(k)
            continue
        tokens = groups[hits[0]][3]
        tokens.extend(pending)
        pending = []
        tokens.append(k)
    if pending:
        end = max(e for _, e in (spans[k] for k in pending))
        groups.append(("", end, end, pending))
    return [g for g in groups if g[3]]


def reference_words(
    model,
    hf_tokenizer,
    style: str,
    prompt: str,
    completion: str,
    bos_id: int | None,
    eos_id: int | None,
) -> tuple[list[ReferenceWord], list[ReferenceWord]]:
    """(completion words, prompt words) by the beginning-of-word corrected formula
    (Pimentel & Meister 2024), from one float64 PyTorch pass over every position."""
    import torch

    scored_prompt = prompt.rstrip()
    scored_completion = prompt[len(scored_prompt) :] + completion
    prompt_ids, completion_ids = split_pair(hf_tokenizer, prompt, completion)
    whole = encode(hf_tokenizer, scored_prompt + scored_completion)
    if completion_ids and whole[: len(prompt_ids)] == prompt_ids:
        shift = len(scored_prompt)
        completion_spans = [
            (max(s - shift, 0), max(e - shift, 0))
            for s, e in _offsets(hf_tokenizer, scored_prompt + scored_completion)[len(prompt_ids) :]
        ]
    else:
        completion_spans = _offsets(hf_tokenizer, scored_completion)
    bos = [] if bos_id is None else [bos_id]
    ids = bos + prompt_ids + completion_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logsoftmax = torch.log_softmax(logits, dim=-1)
    mask = torch.from_numpy(word_start_ids(hf_tokenizer, style, eos_id, logits.shape[-1]))
    after = torch.logsumexp(logsoftmax[:, mask], dim=-1).numpy()  # log B at each position
    token_lp = [None] + [float(logsoftmax[j - 1, ids[j]]) for j in range(1, len(ids))]

    def words_of(text: str, spans: list[tuple[int, int]], first: int) -> list[ReferenceWord]:
        found = []
        for word, start, end, tokens in _group_by_words(text, spans):
            a, b = first + tokens[0], first + tokens[-1] + 1
            if a == 0:
                found.append(ReferenceWord(word, start, end, None, None, a, b))
                continue
            uncorrected = float(sum(token_lp[a:b]))
            corrected = uncorrected + after[b - 1] - (after[a - 1] if mask[ids[a]] else 0.0)
            found.append(ReferenceWord(word, start, end, float(corrected), uncorrected, a, b))
        return found

    prompt_spans = _offsets(hf_tokenizer, scored_prompt) if prompt_ids else []
    return (
        words_of(scored_completion, completion_spans, len(bos) + len(prompt_ids)),
        words_of(scored_prompt, prompt_spans, len(bos)),
    )


def assert_words_equal(words, expected: list[ReferenceWord], tolerance: float) -> None:
    import pytest

    assert [(w.text, w.start, w.end) for w in words] == [(w.text, w.start, w.end) for w in expected]
    assert [(w.token_start, w.token_end) for w in words] == [
        (w.token_start, w.token_end) for w in expected
    ]
    for word, want in zip(words, expected, strict=True):
        for name in ("logprob", "logprob_uncorrected"):
            got, value = getattr(word, name), getattr(want, name)
            assert (got is None) == (value is None), (word, want)
            if value is not None:
                assert got == pytest.approx(value, abs=tolerance), (name, word, want)
