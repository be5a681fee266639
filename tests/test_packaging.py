"""Import boundaries and start-up failures that a user meets before any scoring."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import LMSCORE, free_port

BLOCK_HEAVY = textwrap.dedent(
    """
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED}:
                raise ImportError(f"{{name}} is blocked in this test")
    sys.meta_path.insert(0, Block())
    """
)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_client_imports_without_onnxruntime_torch_or_transformers() -> None:
    code = BLOCK_HEAVY.format(BLOCKED={"onnxruntime", "torch", "transformers", "numpy"}) + (
        "import lmscore.client, lmscore.cli\n"
        "from lmscore.client import ScoringClient, AsyncScoringClient\n"
        "lmscore.cli.build_parser()\n"
        "print('ok')\n"
    )
    result = run_python(code)
    assert result.stdout.strip() == "ok", result.stderr


def test_server_loads_and_scores_without_torch_or_transformers(tiny_export: Path) -> None:
    code = BLOCK_HEAVY.format(BLOCKED={"torch", "transformers", "optimum"}) + textwrap.dedent(
        f"""
        from pathlib import Path
        from lmscore.server.app import load_model, warm_up
        from lmscore.server.config import ServerConfig
        loaded = load_model(ServerConfig(model_dir=Path({str(tiny_export)!r})))
        warm_up(loaded.engine)
        print('ok', loaded.runtime.providers)
        """
    )
    result = run_python(code)
    assert result.stdout.startswith("ok"), result.stderr


def serve_once(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LMSCORE, "serve", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cuda_requested_but_not_loadable_exits_with_a_clear_error(tiny_export: Path) -> None:
    import onnxruntime as ort

    if (
        "CUDAExecutionProvider"
        in ort.InferenceSession(
            str(tiny_export / "model.onnx"),
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        ).get_providers()
    ):
        import pytest

        pytest.skip("CUDA loads on this machine")
    result = serve_once("--model", str(tiny_export), "--device", "cuda")
    assert result.returncode == 2
    assert "CUDAExecutionProvider did not load" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_directory_exits_with_one_line(tmp_path: Path) -> None:
    result = serve_once("--model", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "not an exported lmscore model" in result.stderr
    assert "Traceback" not in result.stderr


def test_cached_optimized_graph_scores_the_same(tiny_export: Path, tmp_path: Path) -> None:
    from lmscore.server.app import load_model
    from lmscore.server.config import RuntimeOptions, ServerConfig
    from lmscore.server.requests import ItemInput
    from lmscore.server.runtime import optimized_graph_path
    from lmscore.v1.options import ScoreOptions

    config = ServerConfig(model_dir=tiny_export, runtime=RuntimeOptions(ort_cache_dir=tmp_path))
    items = [ItemInput("The Program", [" is free", " is not"]), ItemInput("", ["Copyright"])]
    results = []
    for _ in range(2):  # the first load writes the cache, the second reads it
        loaded = load_model(config)
        results.append(loaded.engine.score_sync(loaded.engine.plan(items, ScoreOptions())))
        loaded.engine.close()
        assert optimized_graph_path(tmp_path, tiny_export / "model.onnx").is_file()
    for first, second in zip(*results, strict=True):
        assert first.joint_logprob == second.joint_logprob
        assert first.conditional_logprob == second.conditional_logprob


def test_corrupt_model_file_exits_with_one_line(tiny_export: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_export, broken)
    (broken / "model.onnx").write_bytes(b"this is not an ONNX graph")
    result = serve_once("--model", str(broken))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("lmscore serve: cannot load")


def test_manifest_of_another_format_exits_with_one_line(tiny_export: Path, tmp_path: Path) -> None:
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_export, old)
    manifest = json.loads((old / "lmscore-manifest.json").read_text())
    manifest["format_version"] = 1
    (old / "lmscore-manifest.json").write_text(json.dumps(manifest))
    result = serve_once("--model", str(old))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "format_version is 1" in result.stderr.strip().splitlines()[-1]
