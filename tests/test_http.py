"""The HTTP transport (`lmscore serve --http-port`) on a real server of the tiny model (whose
tokenizer adds BOS): every RPC as JSON equal to its gRPC answer field by field, OpenAI's
completions through the `openai` SDK equal to the gRPC token details, the tokenizer routes,
and bad input answered with a status and the field, the server serving on."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from conftest import ServerProcess, free_port, running_server, scrape_metrics_until
from lmscore.client import Item, ScoreOptions, ScoringClient
from lmscore.client.convert import build_request
from lmscore.v1 import scoring_pb2 as pb
from lmscore.v1 import scoring_pb2_grpc
from tiny_model import MAX_CONTEXT

SCORER = pb.DESCRIPTOR.services_by_name["Scorer"]
TOKEN = "http-test-token"
PROMPT = "This program is free software: you can redistribute it"


@pytest.fixture(scope="module")
def server(tiny_export: Path) -> Iterator[tuple[ServerProcess, int]]:
    http_port, metrics_port = free_port(), free_port()
    flags = ("--http-port", str(http_port), "--metrics-port", str(metrics_port), "--max-top-k", "8")
    flags += ("--max-message-bytes", str(256 * 1024))
    with running_server(tiny_export, *flags) as process:
        process.metrics_port = metrics_port  # type: ignore[attr-defined]
        yield process, http_port


def post(
    port: int,
    path: str,
    body: Any,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    scheme: str = "http",
    context: Any = None,
) -> tuple[int, Any]:
    """(status, parsed body: a JSON value, or a list of them for NDJSON answers)."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{scheme}://127.0.0.1:{port}{path}",
        data=data,
        headers={"content-type": "application/json", **(headers or {})},
        method="POST" if data is not None else "GET",
    )
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    if response_is_ndjson(text):
        return status, [json.loads(line) for line in text.splitlines()]
    return status, json.loads(text) if text else None


def response_is_ndjson(text: str) -> bool:
    return text.count("\n") > 1 or (text.endswith("\n") and text.count("\n") == 1)


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def as_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def grpc_answers(address: str, method: str, request: Any) -> list[dict[str, Any]]:
    with grpc.insecure_channel(address) as channel:
        stub = scoring_pb2_grpc.ScorerStub(channel)
        answer = getattr(stub, method)(request)
        messages = [answer] if isinstance(answer, pb.ModelInfo | pb.ListModelsResponse) else answer
        return [as_json(m) for m in messages]


SCORE_REQUEST = build_request(
    [
        Item(PROMPT, [" and/or modify it", " or sell it"]),
        Item("", ["Free"]),
        Item([5, 6], [[7, 8]]),
    ],
    ScoreOptions(token_details=True, top_k=3, pmi=True, words=False),
)
SCORE_REQUEST.request_id = "json-route"
ROLLING_REQUEST = pb.RollingRequest(
    texts=[pb.RollingText(text=PROMPT * 3), pb.RollingText(text="")],
    options=pb.RollingOptions(max_window_tokens=16, token_logprobs=True),
)
# One request per RPC; a new RPC without an entry here fails test_every_rpc_has_a_json_route.
RPC_REQUESTS: dict[str, Any] = {
    "Score": SCORE_REQUEST,
    "ScoreStream": [
        SCORE_REQUEST,
        pb.ScoreRequest(items=[pb.ScoreItem(prompt="a", completions=[pb.Completion(text=" b")])]),
    ],
    "ScoreRolling": ROLLING_REQUEST,
    "GetModelInfo": pb.GetModelInfoRequest(),
    "ListModels": pb.ListModelsRequest(),
}


@pytest.mark.parametrize("method", [m.name for m in SCORER.methods])
def test_every_rpc_has_a_json_route_equal_to_its_grpc_answer(server, method: str) -> None:
    """The list of RPCs comes from the service descriptor: an RPC without its route fails."""
    process, port = server
    request = RPC_REQUESTS[method]
    path = f"/{SCORER.full_name}/{method}"
    if isinstance(request, list):  # a client stream: NDJSON in, as on the wire
        raw = b"".join(json.dumps(as_json(r)).encode() + b"\n" for r in request)
        status, answer = post(port, path, None, {"content-type": "application/x-ndjson"}, raw)
        expected = grpc_answers(process.address, method, iter(request))
    else:
        status, answer = post(port, path, as_json(request))
        expected = grpc_answers(process.address, method, request)
    assert status == 200, answer
    answers = answer if isinstance(answer, list) else [answer]
    key = ("request_index", "item_index", "completion_index", "text_index")
    order = lambda r: tuple(r.get(k, 0) for k in key)  # noqa: E731
    assert sorted(answers, key=order) == sorted(expected, key=order)


def test_openai_sdk_echo_and_logprobs_equal_the_grpc_token_details(server) -> None:
    """Text prompts (the tiny model adds BOS, not echoed) and token-id prompts (as given),
    scoring only and with the greedy next token."""
    from openai import OpenAI

    process, port = server
    sdk = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    [model] = [m.id for m in sdk.models.list().data]
    with ScoringClient(process.address) as client:
        for prompt in (PROMPT, [5, 17, 99, 3, 250]):
            reply = sdk.completions.create(
                model=model, prompt=prompt, echo=True, logprobs=5, max_tokens=0
            )
            [choice] = reply.choices
            ids = prompt if isinstance(prompt, list) else None
            options = ScoreOptions(token_details=True, top_k=5, add_bos=False if ids else None)
            completion: Any = [] if ids else ""
            [result] = client.score([Item(prompt, [completion])], options)
            tokens = [t for t in result.tokens if t.segment != "bos"]
            assert result.bos_added == (ids is None)  # the tiny model adds BOS to text
            assert choice.logprobs.tokens == [t.text for t in tokens]
            for got, token in zip(choice.logprobs.token_logprobs, tokens, strict=True):
                assert (got is None) == (token.logprob is None)
                if got is not None:
                    assert got == pytest.approx(token.logprob, abs=1e-6)
            for got, token in zip(choice.logprobs.top_logprobs, tokens, strict=True):
                if token.logprob is None:
                    assert got is None
                else:
                    assert got == {
                        t.text: pytest.approx(t.logprob, abs=1e-6) for t in reversed(token.top)
                    }
            if ids is None:  # text prompts: the first token follows BOS, so it is scored
                assert choice.logprobs.token_logprobs[0] is not None
                assert choice.text == PROMPT
                assert choice.logprobs.text_offset[1] == len(tokens[0].text)
            else:
                assert choice.logprobs.token_logprobs[0] is None
            assert reply.usage.prompt_tokens == len(result.tokens)

            # max_tokens 1: the greedy next token after the prompt, as lm-eval reads it.
            reply = sdk.completions.create(
                model=model, prompt=prompt, echo=True, logprobs=2, max_tokens=1, temperature=0
            )
            [choice] = reply.choices
            [after] = client.score(
                [Item(prompt, [[0]])],
                ScoreOptions(token_details=True, top_k=2, add_bos=False if ids else None),
            )
            best = after.tokens[-1].top[0]
            assert choice.logprobs.tokens[-1] == best.text
            assert choice.logprobs.token_logprobs[-1] == pytest.approx(best.logprob, abs=1e-6)
            assert choice.logprobs.token_logprobs[-1] == max(
                choice.logprobs.top_logprobs[-1].values()
            )
            assert len(choice.logprobs.tokens) == len(tokens) + 1
            assert reply.usage.completion_tokens == 1


def test_several_prompts_in_one_request_keep_their_index(server) -> None:
    _, port = server
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    status, batch = post(
        port, "/v1/completions", {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0}
    )
    assert status == 200, batch
    for index, prompt in enumerate(prompts):
        status, alone = post(
            port,
            "/v1/completions",
            {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0},
        )
        assert status == 200 and batch["choices"][index]["index"] == index
        got = batch["choices"][index]["logprobs"]["token_logprobs"]
        want = alone["choices"][0]["logprobs"]["token_logprobs"]
        assert got[0] is None and want[0] is None
        assert got[1:] == pytest.approx(want[1:], abs=1e-5)


def test_tokenizer_routes_as_lm_evals_remote_tokenizer_calls_them(server) -> None:
    process, port = server
    status, info = get(port, "/tokenizer_info")
    assert status == 200 and info["eos_token"] and info["bos_token"]
    status, tokens = post(port, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    with ScoringClient(process.address) as client:
        [result] = client.score([Item(PROMPT, [""])], ScoreOptions(token_details=True))
    assert tokens["tokens"] == [t.id for t in result.tokens if t.segment != "bos"]
    status, with_bos = post(port, "/tokenize", {"prompt": PROMPT})  # vLLM's default: true
    assert with_bos["tokens"] == [result.tokens[0].id, *tokens["tokens"]]
    status, text = post(port, "/detokenize", {"tokens": tokens["tokens"]})
    assert status == 200 and text == {"prompt": PROMPT}
    # The special tokens' texts encode to their ids (what RemoteTokenizer.eos_token_id does).
    status, eos = post(
        port, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}
    )
    with ScoringClient(process.address) as client:
        assert eos["tokens"] == [client.model_info().eos_token_id]


# (path, body, HTTP status, param): each answered with an OpenAI-style error body.
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "a", "max_tokens": 2}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "a", "stream": True}, 400, "stream"),
    ("/v1/completions", {"prompt": "a", "suffix": "z"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "temperature": 0.7}, 400, "temperature"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "top_p": 0.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 1}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "a", "logprobs": 9}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": "5"}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "a", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"echo": True}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", [1]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, "x"]]}, 400, "prompt[0][1]"),
    ("/v1/completions", {"prompt": [[1, 2], [3, 10**9]]}, 400, "prompt[1][1]"),
    ("/v1/completions", {"prompt": [[]], "max_tokens": 0}, 200, None),
    ("/v1/completions", {"prompt": "a", "model": "nope"}, 404, "model"),
    ("/v1/completions", {"prompt": "a", "model": 5}, 400, "model"),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", {"prompt": "x" * 300_000}, 413, "body"),
    ("/lmscore.v1.Scorer/Score", {"items": []}, 400, "items"),
    ("/lmscore.v1.Scorer/Score", {"itemz": []}, 400, "itemz"),
    ("/lmscore.v1.Scorer/Score", {"items": "x"}, 400, "items"),
    (
        "/lmscore.v1.Scorer/Score",
        {"items": [{"prompt": "a", "completions": [{"text": "b"}]}], "options": {"top_k": 99}},
        400,
        "options.top_k",
    ),
    (
        "/lmscore.v1.Scorer/Score",
        {
            "items": [{"prompt": "a", "completions": [{"text": "b"}]}],
            "options": {"marginal_mode": 9},
        },
        400,
        "options.marginal_mode",
    ),
    (
        "/lmscore.v1.Scorer/Score",
        {"model": "nope", "items": [{"prompt": "a", "completions": [{"text": "b"}]}]},
        404,
        "model",
    ),
    ("/lmscore.v1.Scorer/GetModelInfo", {"model": "nope"}, 404, "model"),
    (
        "/lmscore.v1.Scorer/ScoreRolling",
        {"texts": [{"text": "a"}], "options": {"max_window_tokens": 10**6}},
        400,
        "options.max_window_tokens",
    ),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "no"}, 400, "add_special_tokens"),
    ("/detokenize", {"tokens": [1, -4]}, 400, "tokens[1]"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_a_status_and_the_field(server, path, body, status, param) -> None:
    _, port = server
    got, answer = post(port, path, body)
    assert got == status, answer
    if status != 200:
        error = answer["error"]
        assert error["param"] == param, error
        assert error["message"] and error["type"] and error["code"]
    assert get(port, "/health") == (200, {"status": "SERVING"})  # still serving


def test_malformed_bodies_and_wrong_methods(server) -> None:
    _, port = server
    status, answer = post(port, "/v1/completions", None, raw=b"{not json")
    assert status == 400 and "not JSON" in answer["error"]["message"]
    status, answer = post(port, "/lmscore.v1.Scorer/Score", None, raw=b"\xff\xfe")
    assert status == 400
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=b"{}",
        method="POST",
        headers={"content-length": str(10**9)},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:  # refused before reading a byte
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 413
    assert get(port, "/nowhere")[0] == 404


def test_http_and_grpc_calls_are_counted_by_protocol(server) -> None:
    process, port = server
    with ScoringClient(process.address) as client:
        client.score([Item("a", [" b"])])
    post(port, "/v1/completions", {"prompt": "a b", "echo": True, "logprobs": 0})
    post(port, "/v1/completions", {"prompt": "a", "n": 3})

    def key(path: str, code: str, protocol: str) -> tuple:
        labels = {"method": path, "code": code, "model": "tiny-llama", "protocol": protocol}
        return ("lmscore_requests_total", tuple(sorted(labels.items())))

    ok, refused = (
        key("/v1/completions", "OK", "http"),
        key("/v1/completions", "INVALID_ARGUMENT", "http"),
    )
    grpc_ok = key(f"/{SCORER.full_name}/Score", "OK", "grpc")
    samples = scrape_metrics_until(
        process.metrics_port,
        lambda s: s.get(ok, 0) >= 1 and s.get(refused, 0) >= 1 and s.get(grpc_ok, 0) >= 1,
    )
    assert samples[ok] >= 1 and samples[refused] >= 1 and samples[grpc_ok] >= 1


def test_a_deadline_ends_the_call_with_504(server) -> None:
    _, port = server
    long_prompts = [list(range(5, MAX_CONTEXT))] * 40
    status, answer = post(
        port,
        "/v1/completions",
        {"prompt": long_prompts, "echo": True, "logprobs": 3},
        headers={"lmscore-timeout": "0.001"},
    )
    assert status == 504 and answer["error"]["code"] == "deadline_exceeded"
    status, answer = post(
        port, "/v1/completions", {"prompt": "a"}, headers={"lmscore-timeout": "x"}
    )
    assert status == 400 and answer["error"]["param"] == "lmscore-timeout"


def test_tokens_tls_and_health_as_for_grpc(tiny_export: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKEN + "\n")
    http_port = free_port()
    with running_server(
        tiny_export,
        "--http-port",
        str(http_port),
        "--auth-token-file",
        str(token_file),
        token=TOKEN,
    ):
        assert get(http_port, "/health")[0] == 401
        status, answer = post(http_port, "/v1/completions", {"prompt": "a"})
        assert status == 401 and answer["error"]["type"] == "authentication_error"
        bearer = {"authorization": f"Bearer {TOKEN}"}
        assert post(http_port, "/v1/completions", {"prompt": "a"}, bearer)[0] == 200
        assert get(http_port, "/health", bearer) == (200, {"status": "SERVING"})


def test_tls_serves_http_with_the_grpc_certificate(tiny_export: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from test_security_limits import _certificate, _pem

    from lmscore.client import TlsOptions

    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate("127.0.0.1", key)
    (tmp_path / "cert.pem").write_bytes(_pem(cert))
    (tmp_path / "key.pem").write_bytes(_pem(key=key))
    http_port = free_port()
    flags = (
        "--http-port",
        str(http_port),
        "--tls-cert",
        str(tmp_path / "cert.pem"),
        "--tls-key",
        str(tmp_path / "key.pem"),
    )
    tls = TlsOptions(root_certificates=_pem(cert), server_name="127.0.0.1")
    with running_server(tiny_export, *flags, tls=tls):
        context = ssl.create_default_context(cadata=_pem(cert).decode())
        context.check_hostname = False
        status, answer = post(
            http_port, "/v1/completions", {"prompt": "a"}, scheme="https", context=context
        )
        assert status == 200, answer
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            # plaintext is not served
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5)


def test_graceful_shutdown_drains_http_calls(tiny_export: Path) -> None:
    """SIGTERM while an HTTP call runs: it completes, new calls are refused, the server exits."""
    http_port = free_port()
    process = ServerProcess(tiny_export, "--http-port", str(http_port)).wait_ready()
    try:
        answers: list[int] = []
        body = {"prompt": [list(range(5, MAX_CONTEXT))] * 24, "echo": True, "logprobs": 3}
        call = threading.Thread(
            target=lambda: answers.append(post(http_port, "/v1/completions", body)[0])
        )
        call.start()
        time.sleep(0.3)  # in flight
        process.process.send_signal(signal.SIGTERM)
        call.join(timeout=60)
        assert answers == [200]
        assert process.process.wait(timeout=60) == 0
    finally:
        process.stop()


def test_a_client_that_leaves_cancels_its_call(server) -> None:
    """A client gone before the answer: the server drops its call (CANCELLED) and serves on."""
    import socket

    process, port = server
    body = json.dumps({"prompt": [list(range(5, MAX_CONTEXT))] * 300, "echo": True, "logprobs": 3})
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n{body}".encode()
        )
        time.sleep(0.05)
    cancelled = (
        "lmscore_requests_total",
        tuple(
            sorted(
                {
                    "method": "/v1/completions",
                    "code": "CANCELLED",
                    "model": "tiny-llama",
                    "protocol": "http",
                }.items()
            )
        ),
    )
    scrape_metrics_until(process.metrics_port, lambda s: s.get(cancelled, 0) >= 1)
    assert get(port, "/health") == (200, {"status": "SERVING"})


def test_the_http_socket_says_it_is_tcp() -> None:
    """asyncio turns Nagle's algorithm off only on sockets created as IPPROTO_TCP; without
    that every response waited for the client's delayed ACK (~40 ms a call)."""
    import socket

    from lmscore.server.asgi_server import bind_tcp

    sock = bind_tcp("127.0.0.1", free_port())
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_an_http_port_in_use_exits_with_one_line_before_loading(tiny_export: Path) -> None:
    import socket
    import subprocess

    from conftest import LMSCORE

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [
                LMSCORE,
                "serve",
                "--model",
                str(tiny_export),
                "--port",
                str(free_port()),
                "--http-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode != 0 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert "HTTP" in last and str(port) in last


def test_http_and_grpc_requests_share_a_batch(tiny_export: Path) -> None:
    """One engine behind both transports: an HTTP call and a gRPC call that arrive together
    are scored in one model run (the batcher waits up to --max-queue-delay-ms for both)."""
    http_port, metrics_port = free_port(), free_port()
    flags = ("--http-port", str(http_port), "--metrics-port", str(metrics_port))
    flags += ("--max-queue-delay-ms", "500")
    with running_server(tiny_export, *flags) as server:
        label = (("model", "tiny-llama"),)
        count, total = (
            ("lmscore_batch_sequences_count", label),
            ("lmscore_batch_sequences_sum", label),
        )
        before = scrape_metrics_until(metrics_port, lambda s: True)
        answers: list[Any] = []

        def over_http() -> None:
            answers.append(post(http_port, "/v1/completions", {"prompt": [[5, 6, 7, 8]]}))

        call = threading.Thread(target=over_http)
        call.start()
        with ScoringClient(server.address) as client:
            client.score([Item([9, 10, 11], [[12]])])
        call.join(timeout=60)
        assert answers and answers[0][0] == 200
        after = scrape_metrics_until(
            metrics_port, lambda s: s.get(total, 0) - before.get(total, 0) >= 2
        )
        assert after[count] - before.get(count, 0) == 1  # one model run
        assert after[total] - before.get(total, 0) == 2  # of both sequences


# Past lmscore.server.http_transport.INLINE_JSON_BYTES (16 KiB): parsed and written on a
# worker thread. ~40 KB of the GPL: ~8,000 tiny-model tokens, rolled in 16-token windows.
LONG_TEXT = Path("/usr/share/common-licenses/GPL-3").read_text()[:40_000]


def test_large_bodies_and_answers_equal_their_grpc_answers(server) -> None:
    """A 40 KB rolling text with its per-token log-probs (body and answer past the inline
    JSON bound), and a 40 KB NDJSON ScoreStream body (400 requests), answer what gRPC answers."""
    process, port = server
    rolling = pb.RollingRequest(
        texts=[pb.RollingText(text=LONG_TEXT)],
        options=pb.RollingOptions(max_window_tokens=16, token_logprobs=True),
    )
    path = f"/{SCORER.full_name}/ScoreRolling"
    status, answer = post(port, path, as_json(rolling))
    assert status == 200, answer
    assert answer == grpc_answers(process.address, "ScoreRolling", rolling)
    assert rolling.ByteSize() > 16 * 1024 and len(answer[0]["token_logprobs"]) > 4_000

    stream = [
        pb.ScoreRequest(
            items=[
                pb.ScoreItem(prompt=LONG_TEXT[i : i + 100], completions=[pb.Completion(text=" b")])
            ]
        )
        for i in range(0, len(LONG_TEXT), 100)
    ]
    raw = b"".join(json.dumps(as_json(r)).encode() + b"\n" for r in stream)
    assert len(raw) > 16 * 1024
    path = f"/{SCORER.full_name}/ScoreStream"
    status, answer = post(port, path, None, {"content-type": "application/x-ndjson"}, raw)
    assert status == 200, answer
    expected = grpc_answers(process.address, "ScoreStream", iter(stream))
    order = lambda r: (r["request_index"], r["item_index"])  # noqa: E731
    assert sorted(answer, key=order) == sorted(expected, key=order)


def test_a_large_answer_is_written_while_the_event_loop_serves_on(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event loop is every gRPC and HTTP call's and /metrics': a large answer's JSON is
    written on a worker thread, so /health answers while it is being written (here held
    until /health answered; written on the loop, it would hold /health for 20 s). A small
    answer's JSON is written on the loop."""
    from lmscore.server import http_transport
    from lmscore.server.app import load_model
    from lmscore.server.asgi_server import AsgiServer, bind_tcp
    from lmscore.server.config import ServerConfig
    from lmscore.server.servicer import ScorerServicer, ServedModel

    config = ServerConfig(model_dir=tiny_export)
    loaded = load_model(config)
    transport = http_transport.HttpTransport(
        ScorerServicer([ServedModel(loaded.engine, loaded.info)]), config
    )
    writing_large, health_answered = threading.Event(), threading.Event()
    events: list[str] = []
    written_on_loop: dict[bool, list[bool]] = {True: [], False: []}  # by large
    write = http_transport.message_json

    def held_write(message: Any) -> dict[str, Any]:
        large = message.ByteSize() > http_transport.INLINE_JSON_BYTES
        written_on_loop[large].append(threading.current_thread() is loop_thread)
        if large:
            writing_large.set()
            health_answered.wait(timeout=20)
        value = write(message)
        if large:
            events.append("large answer written")
        return value

    monkeypatch.setattr(http_transport, "message_json", held_write)
    rolling = {"texts": [{"text": LONG_TEXT}], "options": {"token_logprobs": True}}
    small = {"items": [{"prompt": "a", "completions": [{"text": " b"}]}]}
    loop_thread = threading.current_thread()

    async def calls() -> list[int]:
        server = AsgiServer(transport.app, bind_tcp("127.0.0.1", 0), shutdown_grace=1)
        await server.start()
        try:
            score, _ = await asyncio.to_thread(
                post, server.port, f"/{SCORER.full_name}/Score", small
            )
            large = asyncio.create_task(
                asyncio.to_thread(post, server.port, f"/{SCORER.full_name}/ScoreRolling", rolling)
            )
            await asyncio.to_thread(writing_large.wait, 60)
            health, _ = await asyncio.to_thread(get, server.port, "/health")
            events.append("health answered")
            health_answered.set()
            return [score, health, (await large)[0]]
        finally:
            await server.stop()

    try:
        assert asyncio.run(calls()) == [200, 200, 200]
    finally:
        loaded.engine.close()
    assert events == ["health answered", "large answer written"]
    assert written_on_loop == {True: [False], False: [True]}


def test_json_text_writes_what_json_dumps_and_starlette_write() -> None:
    """The pieces a large answer is written in join to the very text of one json.dumps call
    (NDJSON lines) and of Starlette's JSONResponse (whole answers)."""
    from starlette.responses import JSONResponse

    from lmscore.server.http_transport import LINE_JSON, RESPONSE_JSON, json_text, message_json

    result = pb.ScoreResult(joint_logprob=-31.75, scored_completion=" Paris.")
    for i in range(100):
        token = result.tokens.add(id=i, text=" tök\u00e9\n", rank=3, start=i, end=i + 1)
        token.logprob = -1.5 / (i + 1)
        for j in range(5):
            token.top.add(id=j, text=f" alt{j}", logprob=-2.0 / (j + 3))
    completion = {"choices": [{"logprobs": {"tokens": ["a"] * 70, "top_logprobs": [None] * 70}}]}
    values = [message_json(result), completion, [], {}, [1, [2, {"a": None}]], "é", 3, None]
    for value in values:
        assert json_text(value, LINE_JSON) == json.dumps(value, **LINE_JSON)
        assert json_text(value, RESPONSE_JSON).encode() == JSONResponse(value).body
    nans = {"x": [float("nan")] * 70}  # a long list, written in pieces: NaN as json.dumps writes it
    assert json_text(nans, LINE_JSON) == '{"x":[' + ",".join(["NaN"] * 70) + "]}"
