"""The HTTP paths `lmscore bench` measures beside gRPC, on the server's --http-port
(lmscore.server.http_transport): the Score RPC as JSON (`POST /lmscore.v1.Scorer/Score`,
answered with newline-delimited results) and OpenAI's `POST /v1/completions`.

Each is called as its clients call it: the body encoded and the answer decoded on every
call (as the gRPC client builds and reads its messages), on one keep-alive connection.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from lmscore.client import Item
from lmscore.client.convert import build_request

SCORE_PATH = "/lmscore.v1.Scorer/Score"
COMPLETIONS_PATH = "/v1/completions"
# Scoring through /v1/completions: the prompt's tokens echoed with their log-probs.
SCORING = {"echo": True, "logprobs": 1, "max_tokens": 0}
# What lm-eval's `local-completions` sends for log-likelihoods (its LocalCompletionsAPI
# payload): the same, and the greedy token after the prompt (max_tokens 1).
LM_EVAL = {"echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234}


class HttpScorer:
    """Calls on one keep-alive connection to the HTTP port on 127.0.0.1."""

    def __init__(self, port: int, timeout: float = 600) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def __enter__(self) -> HttpScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._connection.close()

    def post(self, path: str, body: dict[str, Any]) -> bytes:
        data = json.dumps(body).encode()
        try:
            return self._send(path, data)
        except ConnectionError:
            # The server closed the connection idle past its keep-alive timeout: a new one.
            self._connection.close()
            return self._send(path, data)

    def _send(self, path: str, data: bytes) -> bytes:
        self._connection.request("POST", path, data, {"Content-Type": "application/json"})
        response = self._connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {response.status}: {answer[:500]!r}")
        return answer

    def score(self, items: Sequence[Item]) -> list[dict[str, Any]]:
        """The Score RPC as JSON: the request message the gRPC client sends, its results."""
        request = json_format.MessageToDict(
            build_request(items, None), preserving_proto_field_name=True
        )
        results = [json.loads(line) for line in self.post(SCORE_PATH, request).splitlines()]
        if any("error" in result for result in results):
            raise RuntimeError(f"POST {SCORE_PATH}: {results[-1]}")
        return results

    def complete(
        self, model: str, prompt: str | list[list[int]], fields: dict[str, Any]
    ) -> dict[str, Any]:
        """/v1/completions with `fields` (SCORING or LM_EVAL)."""
        answer: dict[str, Any] = json.loads(
            self.post(COMPLETIONS_PATH, {"model": model, "prompt": prompt, **fields})
        )
        return answer
