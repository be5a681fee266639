"""lm-eval's own `local-completions` model, unmodified, against `lmscore serve --http-port`.

`lm_eval --model local-completions` (lm-eval 0.4.13's CLI in a subprocess) with
`tokenizer_backend=remote` (its RemoteTokenizer calls the server's /tokenizer_info,
/tokenize and /detokenize) and 4 prompts per /v1/completions request, on the local tasks
in tests/lm_eval_tasks (multiple choice and rolling perplexity). Every request's
log-likelihood is compared with `lmscore eval` (the project's lm-eval model, over gRPC)
and with lm-eval's HFLM on the same weights and tokenizer: within 1e-3 nats (rolling
texts: 1e-5 of their total, HFLM's float32 log-softmax bias), the greedy flags and the
metrics equal (test_lm_eval's comparisons).

BOS, as local-completions sends it: its remote tokenizer encodes without special tokens
(and ignores `add_bos_token`) and token-id prompts are scored as given, so no BOS is
added; an empty context (the first rolling window's) is the prefix token, BOS. The
references then run with `add_bos_token=False`. HFLM's default on a tokenizer that adds
BOS (the tiny one, Gemma's) is matched by giving local-completions that tokenizer with
`tokenizer_backend=huggingface,tokenizer=DIR,add_bos_token=True`. With
`tokenized_requests=False` it decodes its token ids to text and the server adds the BOS,
not echoed: multiple choice then equals HFLM's default, rolling perplexity does not (the
Gemma test says why).

Lengths: local-completions' `max_length` L sends at most L - 1 tokens (the server appends
the one it generates: L in all) and rolls windows of L - 2 tokens; HFLM and `lmscore eval`
roll windows of their `max_length`, so they get L - 2 and every window is the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_lm_eval import (
    REPO,
    ROLLING_TASK,
    TASK_DIR,
    TOLERANCE,
    assert_multiple_choice_equal,
    assert_rolling_equal,
    read_run,
    run_hflm,
    run_lm_eval_cli,
    run_lmscore_eval,
    samples_by_doc,
)

from conftest import ServerProcess, free_port, running_server, scrape_metrics
from tiny_model import MAX_CONTEXT

LM_EVAL = str(Path(sys.executable).parent / "lm_eval")
# Model inputs per rolling window of HFLM and `lmscore eval` on the real models (as in
# test_lm_eval), and local-completions' max_length giving the same windows.
WINDOW = 2048
COMPLETIONS_MAX_LENGTH = WINDOW + 2
GEMMA_BOS = 2


@dataclasses.dataclass(frozen=True)
class HttpServer:
    grpc: ServerProcess
    http_port: int
    metrics_port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=30) as response:
            return json.load(response)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            self.url(path),
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.load(response)

    def model_name(self) -> str:
        """The served model's name, as /v1/models lists it (local-completions needs it)."""
        [model] = self.get("/v1/models")["data"]
        return str(model["id"])


@contextlib.contextmanager
def http_server(model_dir: Path | str, *flags: str) -> Iterator[HttpServer]:
    http_port, metrics_port = free_port(), free_port()
    ports = ("--http-port", str(http_port), "--metrics-port", str(metrics_port))
    with running_server(model_dir, *ports, *flags) as server:
        yield HttpServer(server, http_port, metrics_port)


def run_local_completions(
    server: HttpServer,
    output: Path,
    max_length: int,
    *model_args: str,
    tokenizer: tuple[str, ...] = ("tokenizer_backend=remote",),
) -> tuple[dict, dict]:
    """lm-eval's CLI with its `local-completions` model: 4 prompts per request, 2 requests
    at a time, no retries (a refused request fails the run); the server's tokenizer unless
    `tokenizer` names another."""
    args = [
        f"base_url={server.url('/v1/completions')}",
        *tokenizer,
        f"model={server.model_name()}",
        "num_concurrent=2",
        "max_retries=1",
        f"max_length={max_length}",
        *model_args,
    ]
    run = run_lm_eval_cli([LM_EVAL], "local-completions", args, output, batch_size=4, timeout=1200)
    assert "API request failed" not in run.stderr, run.stderr[-4000:]
    return read_run(output)


def completions_calls(server: HttpServer) -> dict[str, float]:
    """/v1/completions calls answered OK and (prompt, completion) results scored so far."""
    samples = scrape_metrics(server.metrics_port)
    calls = sum(
        value
        for (name, labels), value in samples.items()
        if name == "lmscore_requests_total"
        and ("method", "/v1/completions") in labels
        and ("code", "OK") in labels
    )
    scored = sum(
        value for (name, _), value in samples.items() if name == "lmscore_completions_scored_total"
    )
    return {"calls": calls, "scored": scored}


def rolling_texts_tokens(server: HttpServer) -> list[list[int]]:
    """The rolling task's texts as the server's /tokenize encodes them (no BOS)."""
    path = REPO / TASK_DIR / "license_text.jsonl"
    texts = [json.loads(line)["text"] for line in path.open()]
    body = {"add_special_tokens": False}
    return [server.post("/tokenize", {**body, "prompt": text})["tokens"] for text in texts]


def rolling_logprobs(run: tuple[dict, dict]) -> dict[int, float]:
    return {
        doc: float(logprob) for doc, [[logprob]] in samples_by_doc(run[1][ROLLING_TASK]).items()
    }


# The tiny model: its tokenizer adds BOS, so leaving BOS out is a choice that shows.


@pytest.fixture(scope="module")
def tiny_http_server(tiny_export: Path) -> Iterator[HttpServer]:
    # As conftest's tiny_server: every shared prompt reused, however short.
    flags = ("--max-batch-tokens", "256", "--min-prefix-reuse-tokens", "1")
    with http_server(tiny_export, *flags) as server:
        yield server


def test_tiny_local_completions_equals_lmscore_eval_and_hflm(
    tiny_http_server: HttpServer, tiny_hf_dir: Path, tmp_path: Path
) -> None:
    """BOS rule of all three: none added (token-id prompts; `add_bos_token=False` for
    `lmscore eval` and HFLM, whose tokenizer would add it). local-completions' max_length
    is the model's context: at most 95 prompt tokens and the generated one."""
    window = MAX_CONTEXT - 2
    before = completions_calls(tiny_http_server)
    theirs = run_local_completions(tiny_http_server, tmp_path / "http", MAX_CONTEXT)
    after = completions_calls(tiny_http_server)
    ours = run_lmscore_eval(
        tiny_http_server.grpc.address,
        tmp_path / "grpc",
        "add_bos_token=False",
        f"max_length={window}",
    )
    hflm = run_hflm(
        f"pretrained={tiny_hf_dir},dtype=float32,max_length={window},add_bos_token=False"
    )
    for reference in (ours, hflm):
        assert_multiple_choice_equal(theirs, reference)
        assert_rolling_equal(theirs, reference)
    # Every rolling text spans 2 to 4 windows: later windows are compared too.
    windows = [-(-len(tokens) // window) for tokens in rolling_texts_tokens(tiny_http_server)]
    assert min(windows) >= 2
    # Several prompts per request: 64 answers in 16 requests, each text's windows in one.
    calls, scored = after["calls"] - before["calls"], after["scored"] - before["scored"]
    assert scored == 16 * 4 + sum(windows)
    assert calls == 16 + sum(-(-n // 4) for n in windows)


def test_tiny_with_its_tokenizer_adding_bos_equals_hflm_default(
    tiny_http_server: HttpServer, tiny_hf_dir: Path, tmp_path: Path
) -> None:
    """What equals HFLM's default (`add_bos_token` unset: this tokenizer adds BOS) through
    local-completions: the model's own tokenizer with `add_bos_token=True`
    (`tokenizer_backend=huggingface`; the remote tokenizer ignores add_bos_token). Its
    token ids then start every context and every rolling text with BOS, as HFLM's, and the
    server scores them as given; windows after the first have no BOS in either."""
    window = MAX_CONTEXT - 2
    theirs = run_local_completions(
        tiny_http_server,
        tmp_path,
        MAX_CONTEXT,
        tokenizer=(
            "tokenizer_backend=huggingface",
            f"tokenizer={tiny_hf_dir}",
            "add_bos_token=True",
        ),
    )
    hflm = run_hflm(f"pretrained={tiny_hf_dir},dtype=float32,max_length={window}")
    assert_multiple_choice_equal(theirs, hflm)
    assert_rolling_equal(theirs, hflm)


def test_tiny_greedy_flags_through_local_completions(tiny_http_server: HttpServer) -> None:
    """is_greedy as local-completions reads it (a token's log-prob equals the top entry of
    top_logprobs) against `lmscore eval`'s, on the model's own next three tokens (asked of
    /v1/completions with max_tokens 1) and on a continuation that is not greedy. BOS: none
    (token ids; `add_bos_token=False`)."""
    from types import SimpleNamespace

    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from lmscore.client.lmeval import LmscoreLM

    context, greedy = "This License applies to any program", ""
    for _ in range(3):
        body = {"prompt": context + greedy, "add_special_tokens": False}
        ids = tiny_http_server.post("/tokenize", body)["tokens"]
        [choice] = tiny_http_server.post(
            "/v1/completions", {"prompt": ids, "max_tokens": 1, "logprobs": 1}
        )["choices"]
        greedy += choice["text"]
    requests = [SimpleNamespace(args=(context, c)) for c in (greedy, " or other work")]
    theirs = LocalCompletionsAPI(
        base_url=tiny_http_server.url("/v1/completions"),
        tokenizer_backend="remote",
        model=tiny_http_server.model_name(),
        max_retries=1,
        max_length=MAX_CONTEXT,
        batch_size=2,
    ).loglikelihood(requests, disable_tqdm=True)
    model = LmscoreLM(server=tiny_http_server.grpc.address, add_bos_token=False)
    ours = model.loglikelihood(requests, disable_tqdm=True)
    assert [g for _, g in theirs] == [g for _, g in ours] == [True, False]
    assert [lp for lp, _ in theirs] == pytest.approx([lp for lp, _ in ours], abs=TOLERANCE)


# The shipped models, their PyTorch weights read by transformers from the same GGUF files.


@pytest.mark.e2e
def test_default_model_local_completions_equals_lmscore_eval_and_hflm(
    exported_default: Path, tmp_path: Path
) -> None:
    """BOS rule of all three: none added. SmolLM2's GGUF adds none either, so HFLM's
    default is the same (test_lm_eval); `add_bos_token=False` is said all the same."""
    from lmscore.export.source import default_gguf_path

    gguf = default_gguf_path()
    with http_server("default") as server:
        theirs = run_local_completions(server, tmp_path / "http", COMPLETIONS_MAX_LENGTH)
        ours = run_lmscore_eval(
            server.grpc.address, tmp_path / "grpc", "add_bos_token=False", f"max_length={WINDOW}"
        )
    hflm = run_hflm(
        f"pretrained={gguf.parent},gguf_file={gguf.name},tokenizer={exported_default},"
        f"dtype=float32,max_length={WINDOW},add_bos_token=False"
    )
    for reference in (ours, hflm):
        assert_multiple_choice_equal(theirs, reference)
        assert_rolling_equal(theirs, reference)


@pytest.fixture(scope="module")
def gemma_http_server(exported_gemma: Path) -> Iterator[HttpServer]:
    with http_server(exported_gemma) as server:
        yield server


@pytest.fixture(scope="module")
def gemma_hflm_args(exported_gemma: Path) -> str:
    """HFLM on Gemma's GGUF weights with the exported (faithful) tokenizer, which adds BOS."""
    from lmscore.export.paths import lmscore_home
    from lmscore.export.source import gemma_gguf_path

    gguf = gemma_gguf_path(lmscore_home(os.environ) / "sources")
    return (
        f"pretrained={gguf.parent},gguf_file={gguf.name},tokenizer={exported_gemma},"
        f"dtype=float32,max_length={WINDOW}"
    )


@pytest.mark.e2e
def test_gemma_token_requests_equal_lmscore_eval_and_hflm_without_bos(
    gemma_http_server: HttpServer, gemma_hflm_args: str, tmp_path: Path
) -> None:
    """local-completions' default (token ids): BOS rule of all three, none added, although
    Gemma's tokenizer adds it (`add_bos_token=False` for `lmscore eval` and HFLM)."""
    theirs = run_local_completions(gemma_http_server, tmp_path / "http", COMPLETIONS_MAX_LENGTH)
    ours = run_lmscore_eval(
        gemma_http_server.grpc.address,
        tmp_path / "grpc",
        "add_bos_token=False",
        f"max_length={WINDOW}",
    )
    hflm = run_hflm(f"{gemma_hflm_args},add_bos_token=False")
    for reference in (ours, hflm):
        assert_multiple_choice_equal(theirs, reference)
        assert_rolling_equal(theirs, reference)


@pytest.fixture(scope="module")
def gemma_hflm_default(gemma_hflm_args: str) -> tuple[dict, dict]:
    """HFLM's default: `add_bos_token` unset, so Gemma's tokenizer adds BOS to every
    context and to every rolling text (whose first window then predicts that BOS)."""
    return run_hflm(gemma_hflm_args)


@pytest.mark.e2e
def test_gemma_with_its_tokenizer_adding_bos_equals_hflm_default(
    gemma_http_server: HttpServer,
    exported_gemma: Path,
    gemma_hflm_default: tuple[dict, dict],
    tmp_path: Path,
) -> None:
    """What equals HFLM's default through local-completions on a model whose tokenizer adds
    BOS: the model's own tokenizer (the exported directory's) with `add_bos_token=True`;
    its token ids carry BOS where HFLM's do and the server scores them as given."""
    theirs = run_local_completions(
        gemma_http_server,
        tmp_path,
        COMPLETIONS_MAX_LENGTH,
        tokenizer=(
            "tokenizer_backend=huggingface",
            f"tokenizer={exported_gemma}",
            "add_bos_token=True",
        ),
    )
    assert_multiple_choice_equal(theirs, gemma_hflm_default)
    assert_rolling_equal(theirs, gemma_hflm_default)


@pytest.mark.e2e
def test_gemma_text_requests_equal_hflm_default_but_for_its_predicted_bos(
    gemma_http_server: HttpServer, gemma_hflm_default: tuple[dict, dict], tmp_path: Path
) -> None:
    """`tokenized_requests=False` with the remote tokenizer: local-completions decodes its
    token ids (no BOS) to text and the server adds Gemma's BOS (not echoed). Against HFLM's
    default:

    * multiple choice: equal; both score the continuation after BOS + context.
    * rolling: not equal. The first window is the prefix token and the text, sent as
      "<bos>" + text, which the server reads as its BOS + [BOS, text] and of which it
      scores the text's tokens. HFLM's window is the prefix BOS + [BOS, text] too, but
      it also scores that second BOS: log P(BOS | BOS), about -17.8 nats on Gemma. So
      each text's log-likelihood is HFLM's minus that term (these texts fit one window;
      in later windows the server's BOS would precede a window HFLM reads without one)."""
    theirs = run_local_completions(
        gemma_http_server, tmp_path, COMPLETIONS_MAX_LENGTH, "tokenized_requests=False"
    )
    assert_multiple_choice_equal(theirs, gemma_hflm_default)

    [choice] = gemma_http_server.post(
        "/v1/completions",
        {"prompt": [GEMMA_BOS, GEMMA_BOS], "echo": True, "logprobs": 0, "max_tokens": 0},
    )["choices"]
    bos_after_bos = choice["logprobs"]["token_logprobs"][1]
    assert bos_after_bos < -10
    assert max(len(t) for t in rolling_texts_tokens(gemma_http_server)) <= WINDOW  # 1 window
    ours, reference = rolling_logprobs(theirs), rolling_logprobs(gemma_hflm_default)
    assert ours.keys() == reference.keys() and len(ours) == 6
    for doc, logprob in reference.items():
        tolerance = max(TOLERANCE, 1e-5 * abs(logprob))  # as assert_rolling_equal
        assert ours[doc] == pytest.approx(logprob - bos_after_bos, abs=tolerance)
