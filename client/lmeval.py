"""lm-evaluation-harness model `lmscore`: log-likelihoods from an lmscore server.

    lmscore eval --model lmscore --model_args server=HOST:PORT[,model=NAME] --tasks ...

(`--model lmscore` is lm-eval's choice of model class; `model=NAME` in
--model_args picks one of the models the server serves, default its first.)

`lmscore eval` imports this module (which registers the class with lm-eval)
and hands every argument to lm-eval's own CLI. Needs `lmscore[lm-eval]`.

Conventions are lm-eval's (its TemplateLM and HFLM), applied by the server:

* `loglikelihood(context, continuation)`: trailing whitespace of the context
  moves to the continuation; the continuation's tokens are those of
  encode(context + continuation) after encode(context); a non-empty context
  starts with BOS exactly when HFLM's would: `add_bos_token` in --model_args
  as HFLM reads it (unset: the model's tokenizer decides, which the server
  reports as ModelInfo.bos_by_default). An empty context becomes the prefix
  token (BOS, else EOS) and the whole continuation, encoded without special
  tokens, is scored. Sequences longer than the server's context lose context tokens
  from the left, as in HFLM. `is_greedy`: every continuation token is the
  argmax at its position.
* `loglikelihood_rolling(text)`: lm-eval's rolling windows (context_len 1) of
  `max_length` model inputs, default the server's longest (ModelInfo.max_context - 1),
  over the text's tokens with BOS first when BOS is added (HFLM encodes the text
  with its tokenizer's special tokens, so its first window predicts that BOS).
* `generate_until` is not served: lmscore scores text, it does not generate.

Known differences from HFLM, all rare: a tokenizer that adds special tokens
other than BOS (an EOS after every text) is followed only for BOS; a context
or continuation whose text starts with the BOS token's text is not special-cased
as HFLM does; and when a token straddles the context/continuation boundary the
server scores the continuation encoded on its own (lmscore.server.tokenization)
where HFLM scores a slice that does not spell it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

# lm-eval registers its own models (lazily imported) only while its registry is empty:
# registering `lmscore` first would hide them ("hf" unknown) from anything else in this
# process, such as a comparison with HFLM. This fills the registry first.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from lmscore.client.sync import ScoringClient
from lmscore.client.types import Item, RollingOptions, ScoreOptions

Job = TypeVar("Job")
Answer = TypeVar("Answer")

DEFAULT_BATCH_SIZE = 32
DEFAULT_CONCURRENCY = 4
# What lm-eval's own CLI hands every model besides --model_args; not ours to use.
LM_EVAL_SETTINGS = {"device", "max_batch_size"}


def _positive_int(name: str, value: Any, default: int) -> int:
    """lm-eval passes batch_size as int or str ("auto", "auto:4"); auto means our default."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return default
    number = int(value)
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return number


def _optional_bool(name: str, value: bool | str | None) -> bool | None:
    """lm-eval hands model_args over as bools or strings ("True", "false")."""
    if value is None or isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


@register_model("lmscore")
class LmscoreLM(LM):
    """An lm-eval model scored by an lmscore server (model_args: server=HOST:PORT[,HOST:PORT]
    or dns:///NAME:PORT, model (a served model's name; default: the server's first), token,
    timeout, max_length, concurrency, add_bos_token; batch_size = completions per request)."""

    def __init__(
        self,
        server: str = "127.0.0.1:50051",
        model: str = "",
        token: str | None = None,
        timeout: float = 600.0,
        max_length: int | None = None,
        batch_size: int | str | None = None,
        concurrency: int | str | None = None,
        add_bos_token: bool | str | None = None,
        **others: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(others) - LM_EVAL_SETTINGS)
        if unknown:
            raise ValueError(
                f"lmscore model_args: unknown {', '.join(unknown)}; known: server, model, "
                "token, timeout, max_length, concurrency, add_bos_token (and lm-eval's "
                "batch_size)"
            )
        self.client = ScoringClient(
            server, timeout=float(timeout), token=token or os.environ.get("LMSCORE_TOKEN")
        )
        self.client.wait_until_ready(timeout=float(timeout))
        info = self.client.model_info(model)
        prefix = info.bos_token_id if info.bos_token_id is not None else info.eos_token_id
        if prefix is None:
            raise ValueError(f"{info.name} has neither BOS nor EOS to stand for an empty context")
        self.prefix_token_id = prefix
        # The served model every request names (empty: the server's first; info.name is its).
        self.model_name = info.name
        longest = info.max_context - 1
        self.max_length = _positive_int("max_length", max_length, longest)
        if self.max_length > longest:
            raise ValueError(f"max_length must be <= {longest} on this server, got {max_length}")
        self.batch_size = _positive_int("batch_size", batch_size, DEFAULT_BATCH_SIZE)
        # HFLM's add_bos_token: None leaves it to the tokenizer (the server's default).
        self.add_bos_token = _optional_bool("add_bos_token", add_bos_token)
        self.bos_in_texts = (
            info.bos_by_default if self.add_bos_token is None else self.add_bos_token
        ) and info.bos_token_id is not None
        self.concurrency = _positive_int("concurrency", concurrency, DEFAULT_CONCURRENCY)

    @property
    def tokenizer_name(self) -> str:
        return self.model_name

    def _in_parallel(
        self,
        jobs: Sequence[Job],
        run: Callable[[Job], list[Answer]],
        total: int,
        description: str,
        disable_tqdm: bool,
    ) -> list[list[Answer]]:
        """`run` over `jobs`, `concurrency` requests in flight (the server batches them)."""
        answers: list[list[Answer]] = []
        with (
            ThreadPoolExecutor(self.concurrency) as pool,
            tqdm(total=total, desc=description, disable=disable_tqdm) as bar,
        ):
            for answer in pool.map(run, jobs):
                answers.append(answer)
                bar.update(len(answer))
        return answers

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        pairs: list[tuple[str, str]] = [tuple(r.args) for r in requests]  # type: ignore[misc]
        # One item per distinct context, so multiple-choice answers share the prompt's pass.
        items: dict[str, list[str]] = {}
        for context, continuation in pairs:
            items.setdefault(context, []).append(continuation)
        # Texts get HFLM's BOS rule; an empty context is the prefix token, its ids verbatim
        # with no BOS added, and the continuation encoded alone (HFLM's special case).
        with_context = ScoreOptions(
            add_bos=self.add_bos_token, truncate_prompt_left=True, model=self.model_name
        )
        without_context = ScoreOptions(
            add_bos=False, truncate_prompt_left=True, model=self.model_name
        )
        batches: list[tuple[ScoreOptions, list[Item]]] = []
        for options, wanted in ((with_context, True), (without_context, False)):
            size = 0
            batches.append((options, []))
            for context, all_continuations in items.items():
                if bool(context) != wanted:
                    continue
                prompt = context if context else [self.prefix_token_id]
                for start in range(0, len(all_continuations), self.batch_size):
                    continuations = all_continuations[start : start + self.batch_size]
                    if size and size + len(continuations) > self.batch_size:
                        batches.append((options, []))
                        size = 0
                    batches[-1][1].append(Item(prompt, continuations))
                    size += len(continuations)
        batches = [(options, batch) for options, batch in batches if batch]

        def run(job: tuple[ScoreOptions, list[Item]]) -> list[tuple[str, str, float, bool]]:
            options, batch = job
            return [
                (
                    batch[r.item_index].prompt,  # type: ignore[misc]
                    batch[r.item_index].completions[r.completion_index],
                    r.conditional_logprob,
                    r.greedy,
                )
                for r in self.client.score(batch, options)
            ]

        scored: dict[tuple[Any, str], tuple[float, bool]] = {}
        for answer in self._in_parallel(batches, run, len(pairs), "lmscore", disable_tqdm):
            for prompt, continuation, logprob, greedy in answer:
                context = prompt if isinstance(prompt, str) else ""
                scored[(context, continuation)] = (logprob, greedy)
        results = [scored[pair] for pair in pairs]
        for pair, result in zip(pairs, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts: list[str] = [r.args[0] for r in requests]
        options = RollingOptions(
            max_window_tokens=self.max_length, add_bos=self.bos_in_texts, model=self.model_name
        )
        batches = [texts[i : i + self.batch_size] for i in range(0, len(texts), self.batch_size)]

        def run(batch: list[str]) -> list[float]:
            return [r.logprob for r in self.client.score_rolling(batch, options)]

        answers = self._in_parallel(batches, run, len(texts), "lmscore rolling", disable_tqdm)
        results = [logprob for answer in answers for logprob in answer]
        for text, result in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "lmscore scores text and does not generate: use tasks with output_type "
            "loglikelihood, multiple_choice or loglikelihood_rolling"
        )


def run_lm_eval(argv: Sequence[str]) -> int:
    """`lmscore eval ARGS`: lm-eval's CLI with this model registered; ARGS go to it unchanged."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exit:
        return int(exit.code or 0) if not isinstance(exit.code, str) else 1
    return 0
