"""Planning: a request's items (or texts) -> the token sequences to score, checked.

`Planner.plan` validates and tokenizes a Score request: the x/y token split
(lmscore.server.tokenization), BOS, left truncation, the size limits, and which
joint sequences share a prompt prefix worth one pass (prefix reuse). With the
pmi option each completion also gets the sequence [prefix token] + tokens(y),
batched with the joint sequences. Bad input raises InvalidInput
(RequestTooLarge for size limits) naming the first bad field. Identical
sequences are scored once.

`Planner.plan_rolling` cuts whole texts into the windows of lmscore.server.rolling
and plans them as items of one ScoringPlan (token ids verbatim, no BOS), so
windows go through the same validation, batching and sums as any item.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from lmscore.server.config import EngineSettings
from lmscore.server.requests import (
    Cancelled,
    InvalidInput,
    ItemInput,
    ModelFacts,
    RequestTooLarge,
    TokenInput,
)
from lmscore.server.rolling import rolling_windows
from lmscore.server.scoring import SequenceLayout, WordSpan, split_words
from lmscore.server.tokenization import EncodedPair, Offsets, TextTokenizer
from lmscore.v1.limits import DEFAULT_MAX_MESSAGE_BYTES
from lmscore.v1.options import RollingOptions, ScoreOptions


@dataclasses.dataclass
class PlannedCompletion:
    item_index: int
    completion_index: int
    layout: SequenceLayout
    joint: int  # index into ScoringPlan.sequences
    marginal: int | None  # separate-pass prefix sequence, if requested
    truncated: int
    scored_prompt: str
    scored_completion: str
    # The completion was given as text (it has characters and bytes to normalize by).
    completion_is_text: bool = False
    # [prefix token] + tokens(y), with the pmi option.
    unconditional: int | None = None
    # With token details: each joint token's span in its segment's text (None: BOS, ids).
    offsets: tuple[tuple[int, int] | None, ...] | None = None
    # With the words / prompt_words options: where each word of the segment is.
    words: tuple[WordSpan, ...] = ()
    prompt_words: tuple[WordSpan, ...] = ()
    # With distribution_positions: the positions of the joint sequence, resolved (>= 0).
    distribution_positions: tuple[int, ...] = ()


@dataclasses.dataclass
class PrefixGroup:
    """Joint sequences `members` (indices) that all start with `prefix` = [BOS] + prompt."""

    prefix: tuple[int, ...]
    members: list[int]


@dataclasses.dataclass
class ScoringPlan:
    options: ScoreOptions
    sequences: list[tuple[int, ...]]
    completions: list[PlannedCompletion]
    # Sequences scored by full passes, and the groups scored by prefix reuse.
    full_passes: list[int]
    prefix_groups: list[PrefixGroup]
    # Candidate labels and whole distributions: the ids read (the labels, or every id when
    # whole distributions are asked), and the sequences whose runs read them, with the
    # positions read in each (lmscore.server.gather_runs); those are not in full_passes.
    label_ids: tuple[int, ...] = ()
    gather_ids: tuple[int, ...] | None = None
    gather_positions: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @property
    def top_k(self) -> int:
        """Alternatives per position the model runs return (none without token details)."""
        return self.options.top_k if self.options.token_details else 0


@dataclasses.dataclass
class RollingPlan:
    """Windows of every text as the items of one ScoringPlan; `windows_of[t]` lists text t's
    item indices in text order."""

    options: RollingOptions
    prefix_token_id: int
    texts: list[list[int]]
    windows_of: list[list[int]]
    plan: ScoringPlan | None  # None when every text is empty


# The --max-response-bytes estimate of a result message: its numbers and field tags, plus
# per token detail its numbers and tags and a token text (BPE vocabularies average ~6-8
# bytes a token; tests/test_security_limits.py holds the estimate to real responses).
RESULT_BYTES = 124
PMI_BYTES = 18
ENTROPY_BYTES = 9  # a tag and a double, per token detail and per word
LABEL_BYTES = 8  # a packed double
DISTRIBUTION_BYTES = 16  # its tags, position and length, beside 4 bytes a vocabulary entry
TOKEN_BYTES = 38
TOP_TOKEN_BYTES = 24
WORD_BYTES = 40  # and its text
ROLLING_RESULT_BYTES = 64
ROLLING_TOKEN_BYTES = 12


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def result_sizes(plan: ScoringPlan, request_id: str, vocab_size: int = 0) -> list[int]:
    """About how many bytes each result of `plan` takes as a message (request_id echoed in
    each), in plan.completions order: the texts counted exactly, token details by
    TOKEN_BYTES and TOP_TOKEN_BYTES, whole distributions by `vocab_size` float32s."""
    options = plan.options
    entropy = ENTROPY_BYTES * options.entropy
    per_token = TOKEN_BYTES + plan.top_k * TOP_TOKEN_BYTES + entropy if options.token_details else 0
    fixed = (
        RESULT_BYTES
        + PMI_BYTES * options.pmi
        + _utf8_len(request_id)
        + (LABEL_BYTES * len(plan.label_ids) + 4 if plan.label_ids else 0)
    )
    distribution = DISTRIBUTION_BYTES + 4 * vocab_size
    return [
        fixed
        + _utf8_len(c.scored_prompt)
        + _utf8_len(c.scored_completion)
        + per_token * c.layout.length
        + sum(WORD_BYTES + entropy + _utf8_len(w.text) for w in c.words + c.prompt_words)
        + distribution * len(c.distribution_positions)
        for c in plan.completions
    ]


def response_bytes(plan: ScoringPlan, request_id: str, vocab_size: int = 0) -> int:
    """About how many bytes all the results of `plan` take as messages."""
    return sum(result_sizes(plan, request_id, vocab_size))


def rolling_result_sizes(plan: RollingPlan, request_id: str) -> list[int]:
    per_token = ROLLING_TOKEN_BYTES if plan.options.token_logprobs else 0
    fixed = ROLLING_RESULT_BYTES + _utf8_len(request_id)
    return [fixed + per_token * len(ids) for ids in plan.texts]


def rolling_response_bytes(plan: RollingPlan, request_id: str) -> int:
    return sum(rolling_result_sizes(plan, request_id))


def _gather_positions(
    completions: Sequence[PlannedCompletion], labels: bool
) -> dict[int, tuple[int, ...]]:
    """The positions each joint sequence's run reads: the completions' distributions, and the
    last position when there are labels (read there)."""
    positions: dict[int, set[int]] = {}
    for c in completions:
        wanted = set(c.distribution_positions)
        if labels:
            wanted.add(c.layout.length - 1)
        if wanted:
            positions.setdefault(c.joint, set()).update(wanted)
    return {joint: tuple(sorted(p)) for joint, p in positions.items()}


def _spans(spans: Offsets | None, ids: list[int]) -> tuple[tuple[int, int] | None, ...]:
    """One span per token; all None for tokens given as ids."""
    return tuple(spans) if spans is not None else (None,) * len(ids)


# Asked between the items (or texts) of a request being planned: True stops it, e.g. once its
# caller has gone or its deadline has passed (None: never).
StopCheck = Callable[[], bool] | None


def _check_stop(stop: StopCheck) -> None:
    if stop is not None and stop():
        raise Cancelled("the request was cancelled or its deadline passed while it was planned")


class _PlanBuilder:
    """The sequences of a plan being built: each distinct sequence once (identical ones are
    scored once), the [BOS] + prompt prefix of every joint sequence, and the tokens counted
    against the request's budget (None: no budget)."""

    def __init__(self, token_budget: int | None) -> None:
        self.token_budget = token_budget
        self.index: dict[tuple[int, ...], int] = {}
        self.prefixes: dict[int, tuple[int, ...]] = {}
        self.tokens = 0

    def intern(self, ids: Sequence[int]) -> int:
        return self.index.setdefault(tuple(ids), len(self.index))

    def joint(self, prefix: list[int], completion: list[int]) -> int:
        """The joint sequence prefix + completion, its prefix remembered for prefix reuse."""
        joint = self.intern(prefix + completion)
        self.prefixes.setdefault(joint, tuple(prefix))
        return joint

    def count_tokens(self, tokens: int, field: str) -> None:
        """Count a completion's model tokens; RequestTooLarge past the budget."""
        self.tokens += tokens
        if self.token_budget is not None and self.tokens > self.token_budget:
            raise RequestTooLarge(
                "items",
                f"more than {self.token_budget} tokens in one request (reached at {field})",
            )


class Planner:
    """`message_limit`: the largest message the transport sends (gRPC's --max-message-bytes):
    a result that would not fit one is refused before any model run."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        facts: ModelFacts,
        settings: EngineSettings,
        message_limit: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.tokenizer = tokenizer
        self.facts = facts
        self.settings = settings
        self.message_limit = message_limit

    # Checks of the request as a whole, before anything is tokenized.

    def _check_request_id(self, request_id: str) -> None:
        limit = self.settings.max_request_id_bytes
        if _utf8_len(request_id) > limit:
            raise InvalidInput(
                "request_id",
                f"{_utf8_len(request_id)} bytes exceed the limit of {limit} bytes "
                "(--max-request-id-bytes); it is echoed in every result",
            )

    def _check_count(self, entries: Sequence[object], field: str, noun: str) -> None:
        """At least one item (or text), at most --max-items-per-request."""
        if not entries:
            raise InvalidInput(field, f"must hold at least one {noun}")
        limit = self.settings.max_items_per_request
        if len(entries) > limit:
            raise RequestTooLarge(field, f"{len(entries)} {noun}s exceed the limit of {limit}")

    def _check_options(self, options: ScoreOptions) -> None:
        """Options the model or the server's limits cannot serve."""
        if options.top_k < 0:
            raise InvalidInput("options.top_k", f"must be >= 0, got {options.top_k}")
        if options.top_k > self.settings.max_top_k:
            raise InvalidInput(
                "options.top_k", f"must be <= {self.settings.max_top_k}, got {options.top_k}"
            )
        if options.add_bos and self.facts.bos_token_id is None:
            raise InvalidInput("options.add_bos", "the model has no BOS token")
        if options.pmi and self.prefix_token_id is None:
            raise InvalidInput(
                "options.pmi", "the model has neither BOS nor EOS to stand for the empty context"
            )
        for name in ("words", "prompt_words"):
            if getattr(options, name) and self.tokenizer.word_starts is None:
                raise InvalidInput(
                    f"options.{name}",
                    "this model's export has no word-start mask; export it again with "
                    "`lmscore export` to score words",
                )
        if options.entropy and not (options.token_details or options.words or options.prompt_words):
            raise InvalidInput(
                "options.entropy",
                "is returned in token details and words: ask token_details, words or "
                "prompt_words with it",
            )
        needs = [("entropy", self.facts.entropy, "entropy")]
        needs += [
            (name, self.facts.gathers, "gathered_logprobs")
            for name in ("label_token_ids", "label_tokens", "distribution_positions")
        ]
        for name, served, output in needs:
            if getattr(options, name) and not served:
                raise InvalidInput(
                    f"options.{name}",
                    f"this model's export has no {output} output (exported before it was "
                    "added); export it again with `lmscore export` to ask for it",
                )

    def _label_ids(self, options: ScoreOptions) -> tuple[int, ...]:
        """The candidate labels as ids: ids checked against the vocabulary, strings that are
        exactly one token each (as the tokenizer encodes text, no special tokens)."""
        if options.label_token_ids and options.label_tokens:
            raise InvalidInput(
                "options.label_tokens", "give label_token_ids or label_tokens, not both"
            )
        field = "options.label_tokens" if options.label_tokens else "options.label_token_ids"
        count = len(options.label_tokens) or len(options.label_token_ids)
        vocab_size = self.facts.vocab_size
        if count > vocab_size:
            raise InvalidInput(
                field, f"{count} labels exceed the vocabulary of {vocab_size} tokens"
            )
        if options.label_token_ids:
            return tuple(self._check_ids(options.label_token_ids, field))
        ids = []
        for index, text in enumerate(options.label_tokens):
            encoded = self.tokenizer.encode(text)
            if len(encoded) != 1:
                raise InvalidInput(
                    f"{field}[{index}]",
                    f"{text!r} is {len(encoded)} tokens {encoded}, not one; give a string "
                    "that is one token (mind the leading space) or its id in label_token_ids",
                )
            ids.extend(encoded)
        return tuple(ids)

    def _distribution_positions(
        self, options: ScoreOptions, layout: SequenceLayout, field: str
    ) -> tuple[int, ...]:
        """options.distribution_positions in the joint sequence of `layout` (negative ones
        counted from its end), each checked to be one of its positions."""
        resolved = []
        for index, position in enumerate(options.distribution_positions):
            at = position + layout.length if position < 0 else position
            if not 0 <= at < layout.length:
                raise InvalidInput(
                    f"options.distribution_positions[{index}]",
                    f"position {position} is outside the {layout.length}-token joint "
                    f"sequence of {field} (positions 0 to {layout.length - 1}, or -1 to "
                    f"-{layout.length} from its end)",
                )
            resolved.append(at)
        return tuple(resolved)

    def _bos(self, add_bos: bool | None) -> list[int]:
        """[BOS] or []: as `add_bos` says, or (None) as the model's tokenizer does."""
        bos = self.facts.bos_token_id
        if add_bos and bos is None:
            raise InvalidInput("options.add_bos", "the model has no BOS token")
        wanted = self.facts.bos_by_default if add_bos is None else add_bos
        return [bos] if bos is not None and wanted else []

    def _check_text(self, text: TokenInput | None, field: str) -> None:
        """A text within --max-text-bytes, checked before anything tokenizes it."""
        limit = self.settings.max_text_bytes
        if not isinstance(text, str) or len(text) * 4 <= limit:  # UTF-8: <= 4 bytes a char
            return
        if len(text) > limit:  # over it whatever the encoding: no need to encode
            size = f"{len(text)} characters"
        else:
            encoded = _utf8_len(text)
            if encoded <= limit:
                return
            size = f"{encoded} bytes"
        raise InvalidInput(
            field, f"text of {size} exceeds the limit of {limit} UTF-8 bytes (--max-text-bytes)"
        )

    def _check_item_texts(self, items: Sequence[ItemInput]) -> None:
        for item_index, item in enumerate(items):
            self._check_text(item.prompt, f"items[{item_index}].prompt")
            for completion_index, completion in enumerate(item.completions):
                self._check_text(
                    completion, f"items[{item_index}].completions[{completion_index}].text"
                )

    @staticmethod
    def _check_response(size: int, limit: int, field: str, advice: str) -> None:
        if size > limit:
            raise RequestTooLarge(
                field,
                f"the results would take about {size} bytes, over the limit of {limit} bytes "
                f"per request (--max-response-bytes); {advice}",
            )

    def _check_messages(self, sizes: list[int], fields: list[str], advice: str) -> None:
        """Each result is one message: none may exceed the transport's message limit."""
        for size, field in zip(sizes, fields, strict=True):
            if size > self.message_limit:
                raise RequestTooLarge(
                    field,
                    f"its result would take about {size} bytes, over the message limit of "
                    f"{self.message_limit} bytes (--max-message-bytes); {advice}",
                )

    # Checks and steps of one item and completion.

    def _check_completion_count(self, item: ItemInput, item_index: int) -> None:
        field = f"items[{item_index}].completions"
        if not item.completions:
            raise InvalidInput(field, "must hold at least one completion")
        limit = self.settings.max_completions_per_item
        if len(item.completions) > limit:
            raise RequestTooLarge(
                field,
                f"{len(item.completions)} completions exceed the limit of {limit} per item",
            )

    @staticmethod
    def _check_words_input(
        options: ScoreOptions,
        prompt: TokenInput | None,
        completion: TokenInput | None,
        item_index: int,
        field: str,
    ) -> None:
        """Words are spans of characters: the segments they are asked of must be text."""
        if options.words and not isinstance(completion, str | None):
            raise InvalidInput(
                f"{field}.token_ids",
                "options.words needs the completion as text: words are spans of "
                "characters, which token ids do not have",
            )
        if options.prompt_words and not isinstance(prompt, str | None):
            raise InvalidInput(
                f"items[{item_index}].prompt_token_ids",
                "options.prompt_words needs the prompt as text: words are spans of "
                "characters, which token ids do not have",
            )

    def _check_ids(self, ids: Sequence[int], field: str) -> list[int]:
        vocab_size = self.facts.vocab_size
        for position, token_id in enumerate(ids):
            if not 0 <= token_id < vocab_size:
                raise InvalidInput(
                    f"{field}[{position}]",
                    f"token id {token_id} is outside the vocabulary [0, {vocab_size})",
                )
        return list(ids)

    @property
    def prefix_token_id(self) -> int | None:
        """The token that stands for the empty context: BOS, else EOS (lm-eval's HFLM
        prefix_token_id), for rolling windows and PMI alike."""
        facts = self.facts
        return facts.bos_token_id if facts.bos_token_id is not None else facts.eos_token_id

    def _encode_text(self, text: str, offsets: bool) -> tuple[list[int], Offsets | None]:
        return (
            self.tokenizer.encode_offsets(text) if offsets else (self.tokenizer.encode(text), None)
        )

    def _encode(
        self,
        prompt: TokenInput | None,
        completion: TokenInput | None,
        field: str,
        offsets: bool = False,
    ) -> EncodedPair:
        """tokens(x) and tokens(y); with `offsets`, each text token's span (None for ids)."""
        if completion is None:
            raise InvalidInput(field, "has neither text nor token_ids")
        prompt_field = field.rsplit(".completions", 1)[0]
        if isinstance(prompt, str | None) and isinstance(completion, str):
            return self.tokenizer.encode_pair(prompt or "", completion, offsets)
        prompt_spans: Offsets | None = None
        if prompt is None:
            prompt_text, prompt_ids = "", []
            prompt_spans = [] if offsets else None
        elif isinstance(prompt, str):
            prompt_text = prompt
            prompt_ids, prompt_spans = self._encode_text(prompt, offsets)
        else:
            prompt_text = ""
            prompt_ids = self._check_ids(prompt, f"{prompt_field}.prompt_token_ids")
        if isinstance(completion, str):
            ids, spans = self._encode_text(completion, offsets)
            return EncodedPair(prompt_text, completion, prompt_ids, ids, prompt_spans, spans)
        ids = self._check_ids(completion, f"{field}.token_ids")
        return EncodedPair(prompt_text, "", prompt_ids, ids, prompt_spans, None)

    def longest_sequence(self) -> int:
        """Tokens of the longest joint sequence (BOS included): the model's context, or the
        server's per-item limit when lower."""
        context = self.facts.max_context
        return min(context, self.settings.max_tokens_per_item or context)

    def _prompt_truncation(
        self, bos: list[int], pair: EncodedPair, truncate_left: bool, field: str
    ) -> int:
        """Prompt tokens to drop from the left so [BOS] + prompt + completion fits the
        longest sequence: 0 when it fits; InvalidInput when it does not and may not be cut,
        or cannot be."""
        longest = self.longest_sequence()
        prompt_len, completion_len = len(pair.prompt_ids), len(pair.completion_ids)
        length = len(bos) + prompt_len + completion_len
        if length <= longest:
            return 0
        limit_name = (
            "the model's context"
            if longest == self.facts.max_context
            else "the server's per-item limit (--max-tokens-per-item)"
        )
        if not truncate_left:
            raise InvalidInput(
                field,
                f"sequence of {length} tokens ({len(bos)} BOS + {prompt_len} "
                f"prompt + {completion_len} completion) exceeds {limit_name} "
                f"of {longest} tokens; set options.truncate_prompt_left "
                "to drop prompt tokens from the left",
            )
        truncated = length - longest
        if truncated > prompt_len:
            raise InvalidInput(
                field,
                f"completion of {completion_len} tokens (+{len(bos)} BOS) does "
                f"not fit {limit_name} of {longest} tokens even with "
                "the whole prompt truncated",
            )
        return truncated

    def _token_spans(
        self, bos: list[int], pair: EncodedPair, prompt_ids: list[int], truncated: int
    ) -> tuple[tuple[int, int] | None, ...]:
        """Each joint token's span in its segment's text (None: BOS, token ids)."""
        prompt_spans = pair.prompt_offsets
        return (
            (None,) * len(bos)
            + _spans(prompt_spans[truncated:] if prompt_spans else None, prompt_ids)
            + _spans(pair.completion_offsets, pair.completion_ids)
        )

    def _plan_completion(
        self,
        builder: _PlanBuilder,
        options: ScoreOptions,
        bos: list[int],
        item_index: int,
        prompt: TokenInput | None,
        completion_index: int,
        completion: TokenInput | None,
    ) -> PlannedCompletion:
        """One completion: tokenized, fitted to the context, its sequences in `builder`."""
        field = f"items[{item_index}].completions[{completion_index}]"
        self._check_words_input(options, prompt, completion, item_index, field)
        with_offsets = options.token_details or options.words or options.prompt_words
        pair = self._encode(prompt, completion, field, with_offsets)
        truncated = self._prompt_truncation(bos, pair, options.truncate_prompt_left, field)
        prompt_ids, completion_ids = pair.prompt_ids[truncated:], pair.completion_ids
        layout = SequenceLayout(bool(bos), len(prompt_ids), len(completion_ids))
        # The unconditional sequence of PMI: [prefix token] + tokens(y).
        builder.count_tokens(layout.length + (1 + len(completion_ids)) * options.pmi, field)
        marginal = unconditional = None
        if options.marginal_mode == "separate_pass":
            marginal = builder.intern(bos + prompt_ids)
        if options.pmi:
            unconditional = builder.intern([self.prefix_token_id or 0, *completion_ids])
        distribution_positions = self._distribution_positions(options, layout, field)
        if (options.label_token_ids or options.label_tokens) and layout.length == 0:
            raise InvalidInput(
                field,
                "candidate labels are read after the joint sequence's last token, and this "
                "one has none (no BOS, an empty prompt and completion)",
            )
        words = prompt_words = ()
        if options.words:
            words = self._words(
                completion_ids,
                pair.completion_offsets,
                pair.scored_completion,
                layout.completion_start,
            )
        if options.prompt_words:
            prompt_offsets = (pair.prompt_offsets or [])[truncated:]
            prompt_words = self._words(prompt_ids, prompt_offsets, pair.scored_prompt, len(bos))
        return PlannedCompletion(
            item_index=item_index,
            completion_index=completion_index,
            layout=layout,
            joint=builder.joint(bos + prompt_ids, completion_ids),
            marginal=marginal,
            truncated=truncated,
            scored_prompt=pair.scored_prompt,
            scored_completion=pair.scored_completion,
            completion_is_text=isinstance(completion, str),
            unconditional=unconditional,
            offsets=(
                self._token_spans(bos, pair, prompt_ids, truncated)
                if options.token_details
                else None
            ),
            words=words,
            prompt_words=prompt_words,
            distribution_positions=distribution_positions,
        )

    def _plan_items(
        self,
        items: Sequence[ItemInput],
        options: ScoreOptions,
        bos: list[int],
        token_budget: int | None,
        stop: StopCheck = None,
    ) -> ScoringPlan:
        """Every completion of every item planned, then the prefix groups and full passes;
        `stop` is asked between items (Cancelled)."""
        label_ids = self._label_ids(options)  # before anything is tokenized
        builder = _PlanBuilder(token_budget)
        completions = []
        for item_index, item in enumerate(items):
            _check_stop(stop)
            self._check_completion_count(item, item_index)
            for completion_index, completion in enumerate(item.completions):
                completions.append(
                    self._plan_completion(
                        builder, options, bos, item_index, item.prompt, completion_index, completion
                    )
                )
        sequences = list(builder.index)
        groups = self._prefix_groups(builder.prefixes, options)
        grouped = {m for g in groups for m in g.members}
        gather_positions = _gather_positions(completions, bool(label_ids))
        gather_ids: tuple[int, ...] | None = None
        if options.distribution_positions:
            gather_ids = tuple(range(self.facts.vocab_size))  # whole distributions
        elif label_ids:
            gather_ids = label_ids
        full_passes = [
            i
            for i, ids in enumerate(sequences)
            if len(ids) > 1 and i not in grouped and i not in gather_positions
        ]
        return ScoringPlan(
            options,
            sequences,
            completions,
            full_passes,
            groups,
            label_ids=label_ids,
            gather_ids=gather_ids,
            gather_positions=gather_positions,
        )

    def plan(
        self,
        items: Sequence[ItemInput],
        options: ScoreOptions,
        *,
        request_id: str = "",
        stop: StopCheck = None,
    ) -> ScoringPlan:
        """Validate and tokenize; raises InvalidInput naming the first bad field, and
        RequestTooLarge when the request or its results (`request_id` echoed in each) would
        exceed a limit; Cancelled when `stop`, asked between items, says so."""
        self._check_request_id(request_id)
        self._check_count(items, "items", "item")
        self._check_options(options)
        bos = self._bos(options.add_bos)
        self._check_item_texts(items)  # every size, before any tokenizing
        plan = self._plan_items(
            items, options, bos, self.settings.max_tokens_per_request, stop=stop
        )
        sizes = result_sizes(plan, request_id, self.facts.vocab_size)
        # Whole distributions (4 bytes a vocabulary entry) outweigh everything else.
        distributions = "options.distribution_positions" if options.distribution_positions else ""
        self._check_messages(
            sizes,
            [
                distributions or f"items[{c.item_index}].completions[{c.completion_index}]"
                for c in plan.completions
            ],
            "ask fewer whole distributions, fewer token details (a smaller top_k) or send a "
            "shorter text",
        )
        self._check_response(
            sum(sizes),
            self.settings.max_response_bytes,
            distributions or "items",
            "send fewer items, or ask fewer whole distributions or token details (a smaller top_k)",
        )
        return plan

    def _words(
        self, ids: list[int], offsets: Offsets | None, text: str, first_index: int
    ) -> tuple[WordSpan, ...]:
        """The words of one segment's tokens (lmscore.server.scoring.split_words)."""
        if offsets is None:
            raise ValueError("words need the token offsets")
        starts, blank = self.tokenizer.word_start_flags(ids)
        return tuple(split_words(starts, blank, offsets, text, first_index))

    def _prefix_groups(
        self, prefixes: dict[int, tuple[int, ...]], options: ScoreOptions
    ) -> list[PrefixGroup]:
        """Two or more joint sequences sharing a non-empty prefix that saves at least
        min_prefix_reuse_tokens, in same-pass mode (separate-pass mode stays the
        definition verbatim: full passes only)."""
        if not self.settings.prefix_reuse or options.marginal_mode == "separate_pass":
            return []
        if options.words or options.prompt_words:
            # A word's correction needs B after the last token, which only a full pass
            # (every token an input) computes.
            return []
        if options.label_token_ids or options.label_tokens or options.distribution_positions:
            return []  # so do labels (read there) and distributions (at any position)
        by_prefix: dict[tuple[int, ...], list[int]] = {}
        for joint, prefix in prefixes.items():
            if prefix:
                by_prefix.setdefault(prefix, []).append(joint)
        # The prefix pass runs len(p) - 1 tokens once instead of once per member.
        least = self.settings.min_prefix_reuse_tokens
        return [
            PrefixGroup(p, m)
            for p, m in by_prefix.items()
            if len(m) > 1 and (len(m) - 1) * (len(p) - 1) >= least
        ]

    # Whole texts (ScoreRolling).

    def _rolling_window(self, options: RollingOptions) -> tuple[int, int]:
        """The window and the least context of the request, checked against the server's
        longest sequence."""
        longest = self.longest_sequence() - 1
        window = options.max_window_tokens or longest
        if window > longest:
            raise InvalidInput(
                "options.max_window_tokens",
                f"must be <= {longest} (the server's longest sequence, {longest + 1} tokens, "
                f"holds {longest} model inputs and the last predicted token), got {window}",
            )
        min_context = max(options.min_context_tokens, 1)
        if min_context > window:
            raise InvalidInput(
                "options.min_context_tokens",
                f"must be <= the window of {window} tokens, got {min_context}",
            )
        return window, min_context

    def _encode_text_ids(self, text: TokenInput | None, index: int, bos: list[int]) -> list[int]:
        """A text's tokens (BOS first when asked), token ids checked and kept verbatim."""
        if text is None:
            raise InvalidInput(f"texts[{index}]", "has neither text nor token_ids")
        if isinstance(text, str):
            return bos + self.tokenizer.encode(text)
        return self._check_ids(text, f"texts[{index}].token_ids")

    def _windows(
        self,
        texts: Sequence[TokenInput | None],
        bos: list[int],
        prefix: int,
        window: int,
        min_context: int,
        stop: StopCheck,
    ) -> tuple[list[list[int]], list[ItemInput], list[list[int]]]:
        """Each text's tokens, its windows as items (context as prompt, the tokens it scores
        as the completion), and each text's item indices. A text is tokenized only once the
        ones before it fit the token budget, so a request far over it is refused after the
        text that crosses it, not after tokenizing all (RequestTooLarge); `stop` is asked
        between texts (Cancelled)."""
        budget = self.settings.max_tokens_per_request
        encoded: list[list[int]] = []
        items: list[ItemInput] = []
        windows_of: list[list[int]] = []
        model_tokens = 0
        for index, text in enumerate(texts):
            _check_stop(stop)
            ids = self._encode_text_ids(text, index, bos)
            own = []
            for w in rolling_windows(ids, prefix, window, min_context):
                own.append(len(items))
                items.append(ItemInput(list(w.context), [list(w.continuation)]))
                model_tokens += len(w.context) + len(w.continuation)
            if model_tokens > budget:
                raise RequestTooLarge(
                    "texts",
                    f"more than {budget} tokens in model windows in one request (reached at "
                    f"texts[{index}], {len(ids)} tokens); send fewer texts",
                )
            encoded.append(ids)
            windows_of.append(own)
        return encoded, items, windows_of

    def plan_rolling(
        self,
        texts: Sequence[TokenInput | None],
        options: RollingOptions,
        *,
        request_id: str = "",
        stop: StopCheck = None,
    ) -> RollingPlan:
        """Validate and tokenize texts, cut them into windows; InvalidInput names the field.
        The windows are planned as items (token ids verbatim, no BOS of their own); the
        request's limits are checked in terms of texts. `stop`: asked between texts; when it
        says so, Cancelled."""
        self._check_request_id(request_id)
        self._check_count(texts, "texts", "text")
        prefix = self.prefix_token_id
        if prefix is None:
            raise InvalidInput("texts", "the model has neither BOS nor EOS to start a text with")
        window, min_context = self._rolling_window(options)
        for index, text in enumerate(texts):
            self._check_text(text, f"texts[{index}].text")
        bos = self._bos(options.add_bos) if options.add_bos else []
        encoded, items, windows_of = self._windows(texts, bos, prefix, window, min_context, stop)
        plan = None
        if items:
            scoring = ScoreOptions(token_details=options.token_logprobs, add_bos=False)
            plan = self._plan_items(items, scoring, [], token_budget=None, stop=stop)
        rolling = RollingPlan(options, prefix, encoded, windows_of, plan)
        sizes = rolling_result_sizes(rolling, request_id)
        self._check_messages(
            sizes,
            [f"texts[{t}]" for t in range(len(sizes))],
            "leave token_logprobs off for a text this long",
        )
        self._check_response(
            sum(sizes),
            self.settings.max_response_bytes,
            "texts",
            "send fewer texts, or leave token_logprobs off",
        )
        return rolling
