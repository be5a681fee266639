"""What `lmscore export` prints: its own progress and result, not the libraries' known warnings
(lmscore.export.quiet), while anything unexpected still shows, and `--verbose` shows all."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lmscore.export.quiet import quiet_libraries
from tiny_model import MAX_CONTEXT, save_tiny_model

LMSCORE = str(Path(sys.executable).parent / "lmscore")
# What the tiny tied Llama's export prints without lmscore.export.quiet.
KNOWN = (
    "TracerWarning",
    "Converting a tensor to a Python boolean",
    "torch.tensor results are registered as constants",
    "Exporting aten::index operator",
    "Found different candidate ONNX initializers",
    "lm_head.weight: {",
)
TIED_NOTICE = "Found different candidate ONNX initializers (likely duplicate) for the tied weights:"
# `lmscore export` with one step (run within the quiet scope) also warning and logging
# something no one expects.
UNEXPECTED_STEP = """
import logging, sys, warnings
from lmscore.cli import main
from lmscore.export import convert

share = convert.share_tied_embeddings

def share_noisily(*args):
    warnings.warn("lmscore-test: an unexpected warning", UserWarning)
    logging.getLogger("optimum").warning("lmscore-test: an unexpected notice")
    return share(*args)

convert.share_tied_embeddings = share_noisily
sys.exit(main(["export", "--source", sys.argv[1], "--output", sys.argv[2]]))
"""


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with tied embeddings: its export meets every known warning and notice."""
    return save_tiny_model(
        tmp_path_factory.mktemp("quiet") / "tied-llama",
        "LlamaConfig",
        0,
        max_position_embeddings=MAX_CONTEXT,
        tie_word_embeddings=True,
    )


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "exported tied-llama (float32)" in output
    return output


def test_export_prints_no_known_warning_but_an_unexpected_one(
    tied_llama: Path, tmp_path: Path
) -> None:
    output = run([sys.executable, "-c", UNEXPECTED_STEP, str(tied_llama), str(tmp_path / "out")])
    assert [known for known in KNOWN if known in output] == []
    assert "UserWarning: lmscore-test: an unexpected warning" in output
    assert "lmscore-test: an unexpected notice" in output


def test_verbose_shows_the_known_warnings(tied_llama: Path, tmp_path: Path) -> None:
    source, output_dir = str(tied_llama), str(tmp_path / "out")
    output = run([LMSCORE, "export", "--source", source, "--output", output_dir, "--verbose"])
    assert [known for known in KNOWN if known not in output] == []


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_known_messages_are_silenced_and_only_within_the_scope() -> None:
    from optimum.utils import logging as optimum_logging
    from torch.jit import TracerWarning

    def tracer_warning(message: str) -> None:
        warnings.warn(message, TracerWarning, stacklevel=2)

    loggers = (optimum_logging.get_logger(), logging.getLogger())  # Optimum's, and the root
    records = (_Records(), _Records())
    for logger, handler in zip(loggers, records, strict=True):
        logger.addHandler(handler)
    optimum, root = loggers
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            filters = list(warnings.filters)
            with quiet_libraries():
                tracer_warning("Converting a tensor to a Python boolean might")
                tracer_warning("a trace that does not match")
                optimum.warning(TIED_NOTICE)
                optimum.warning("\tlm_head.weight: {'onnx::MatMul_777'}")
                optimum.warning("Could not find unique initializers")
                root.warning("Please consider to run pre-processing before quantization.")
                root.warning("something else")
            with quiet_libraries(enabled=False):
                tracer_warning("Converting a tensor to a Python boolean")
            optimum.warning(TIED_NOTICE)
            assert warnings.filters == filters
    finally:
        for logger, handler in zip(loggers, records, strict=True):
            logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == [
        "a trace that does not match",
        "Converting a tensor to a Python boolean",
    ]
    assert records[0].messages == ["Could not find unique initializers", TIED_NOTICE]
    assert records[1].messages == ["something else"]
    assert optimum.filters == root.filters == []
