"""The IO-binding path of OnnxCausalLM (the one CUDA takes), forced on CPU: it returns the
very same numbers as the plain session.run path, with and without a past (prefix reuse)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto

from lmscore.export.manifest import Manifest
from lmscore.server.app import load_model
from lmscore.server.config import ServerConfig
from lmscore.server.engine import ItemInput, ScoreOptions, ScoringEngine
from lmscore.server.runtime import DeviceArray, OnnxCausalLM, RuntimeOptions, tile_model_bytes

ITEMS = [
    # Several completions of one prompt: prefix reuse, the cache repeated along the batch.
    ItemInput(
        "This License applies to any program",
        [" or other work", " and", "", " which is licensed under the terms of this License"],
    ),
    ItemInput("Free ", ["software"]),
    ItemInput("the", ["re", " end of it", " end"]),
    ItemInput("", ["Everyone is permitted to copy"]),
]
OPTIONS = [
    ScoreOptions(),
    ScoreOptions(token_details=True, top_k=3),
    ScoreOptions(separate_marginal_pass=True),
]


def engines(model_dir: Path) -> tuple[ScoringEngine, ScoringEngine, OnnxCausalLM]:
    """The server's own engine (plain path on CPU) and the same with IO binding forced."""
    # Reuse every shared prompt, however short, so the cache path runs on ITEMS.
    config = ServerConfig(model_dir=model_dir, device="cpu", min_prefix_reuse_saved_tokens=1)
    plain = load_model(config).engine
    bound_model = OnnxCausalLM(model_dir, RuntimeOptions(device="cpu", io_binding=True))
    manifest = Manifest.read(model_dir)
    bound = ScoringEngine(
        bound_model,
        plain.tokenizer,
        manifest.bos_token_id,
        plain.limits,
        eos_token_id=manifest.eos_token_id,
    )
    return plain, bound, bound_model


def test_plain_path_stays_the_default_on_cpu(tiny_export: Path) -> None:
    model = OnnxCausalLM(tiny_export, RuntimeOptions(device="cpu"))
    assert model.device == "cpu" and model.io_binding is False
    ids = np.array([[1, 40, 41, 42]])
    _, present = model.score(ids, np.ones_like(ids), np.zeros_like(ids), return_present=True)
    assert model.io_binding_runs == 0
    assert present and all(isinstance(v, np.ndarray) for v in present.values())


def scores_with_io_binding_equal_plain(model_dir: Path) -> OnnxCausalLM:
    """Every OPTIONS run of ITEMS: IO binding forced gives exactly the plain path's results.
    Returns the IO-bound model, for its counters."""
    plain, bound, bound_model = engines(model_dir)
    try:
        for options in OPTIONS:
            expected = plain.score_sync(plain.plan(ITEMS, options))
            assert bound.score_sync(bound.plan(ITEMS, options)) == expected, options
    finally:
        plain.close()
        bound.close()
    return bound_model


def test_io_binding_equals_the_plain_path_through_the_engine(tiny_export: Path) -> None:
    bound_model = scores_with_io_binding_equal_plain(tiny_export)
    assert bound_model.io_binding_runs > 0
    # The prefix caches stayed where ORT wrote them and were tiled there.
    assert bound_model.device_past_tiles > 0
    assert bound_model.host_past_tensors == 0


def test_present_and_repeated_past_are_identical_on_both_paths(tiny_export: Path) -> None:
    plain = OnnxCausalLM(tiny_export, RuntimeOptions(device="cpu"))
    bound = OnnxCausalLM(tiny_export, RuntimeOptions(device="cpu", io_binding=True))
    prefix = np.array([[1, 60, 61, 62, 63, 64]])
    targets = np.zeros_like(prefix)
    targets[0, :-1] = prefix[0, 1:]
    runs = [
        m.score(prefix, np.ones_like(prefix), targets, top_k=2, return_present=True)
        for m in (plain, bound)
    ]
    (plain_scores, plain_present), (bound_scores, bound_present) = runs
    assert plain_present is not None and bound_present is not None
    np.testing.assert_array_equal(bound_scores.logprobs, plain_scores.logprobs)
    np.testing.assert_array_equal(bound_scores.top_ids, plain_scores.top_ids)
    assert sorted(bound_present) == sorted(plain_present)
    for name, value in bound_present.items():
        assert isinstance(value, DeviceArray) and value.device == "cpu"
        assert value.shape == plain_present[name].shape
        assert value.dtype == plain_present[name].dtype
        np.testing.assert_array_equal(np.asarray(value), plain_present[name])

    # Three continuations (right-padded) against the prefix cache, as the engine runs them.
    rows = np.array([[70, 71, 72], [73, 0, 0], [74, 75, 0]])
    lengths = [3, 1, 2]
    mask = np.zeros((3, prefix.shape[1] + 3), dtype=np.int64)
    mask[:, : prefix.shape[1]] = 1
    for row, length in enumerate(lengths):
        mask[row, prefix.shape[1] : prefix.shape[1] + length] = 1
    cont_targets = np.roll(rows, -1, axis=1)
    expected, _ = plain.score(
        rows, mask, cont_targets, 2, {n: np.repeat(v, 3, axis=0) for n, v in plain_present.items()}
    )
    repeated = {n: np.repeat(v, 3, axis=0) for n, v in bound_present.items()}
    assert all(isinstance(v, DeviceArray) and v.shape[0] == 3 for v in repeated.values())
    tiles = bound.device_past_tiles
    got, _ = bound.score(rows, mask, cont_targets, 2, repeated)
    assert bound.device_past_tiles == tiles + 1 and bound.host_past_tensors == 0
    for field in ("logprobs", "ranks", "top_logprobs", "top_ids"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))
    # Host arrays as past take the IO-binding path too, with the same result.
    host_past = {n: np.asarray(v) for n, v in repeated.items()}
    got_host, _ = bound.score(rows, mask, cont_targets, 2, host_past)
    np.testing.assert_array_equal(got_host.logprobs, expected.logprobs)


def test_device_array_behaves_like_its_host_copy(tiny_export: Path) -> None:
    bound = OnnxCausalLM(tiny_export, RuntimeOptions(device="cpu", io_binding=True))
    ids = np.array([[1, 50, 51], [1, 52, 53]])
    _, present = bound.score(ids, np.ones_like(ids), np.zeros_like(ids), return_present=True)
    assert present is not None
    name, value = next(iter(present.items()))
    host = np.asarray(value)
    assert value.shape == host.shape and value.ndim == 4
    np.testing.assert_array_equal(value[1], host[1])
    np.testing.assert_array_equal(np.concatenate([value, value]), np.concatenate([host, host]))
    # Two rows: np.repeat's row-by-row order is not a Tile, so it is done on the host.
    repeated = np.repeat(value, 2, axis=0)
    assert isinstance(repeated, np.ndarray)
    np.testing.assert_array_equal(repeated, np.repeat(host, 2, axis=0))
    _, single = bound.score(ids[:1], np.ones_like(ids[:1]), ids[:1], return_present=True)
    assert single is not None
    one_row = single[name]
    tiled = np.repeat(np.repeat(one_row, 2, axis=0), 3, axis=0)
    assert isinstance(tiled, DeviceArray) and tiled.shape[0] == 6
    np.testing.assert_array_equal(np.asarray(tiled), np.repeat(np.asarray(one_row), 6, axis=0))


def test_tile_graph_is_valid_onnx_and_tiles() -> None:
    import onnx
    import onnxruntime as ort

    data = tile_model_bytes([TensorProto.FLOAT16, TensorProto.FLOAT])
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x0 = np.arange(24, dtype=np.float16).reshape(1, 2, 3, 4)
    x1 = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)
    repeats = np.array([3, 1, 1, 1], dtype=np.int64)
    y0, y1 = session.run(None, {"x0": x0, "x1": x1, "repeats": repeats})
    np.testing.assert_array_equal(y0, np.repeat(x0, 3, axis=0))
    np.testing.assert_array_equal(y1, np.repeat(x1, 3, axis=0))


def test_io_binding_needs_no_onnx_package(tiny_export: Path) -> None:
    """The server installs without the onnx package: the IO-binding path must not import it."""
    script = f"""
import sys
import numpy as np
from pathlib import Path
from lmscore.server.runtime import OnnxCausalLM, RuntimeOptions
model = OnnxCausalLM(Path({str(tiny_export)!r}), RuntimeOptions(device="cpu", io_binding=True))
ids = np.array([[1, 40, 41]])
_, present = model.score(ids, np.ones_like(ids), ids, return_present=True)
past = {{name: np.repeat(value, 2, axis=0) for name, value in present.items()}}
more = np.array([[42], [43]])
model.score(more, np.ones((2, 4), dtype=np.int64), more, past=past)
assert model.device_past_tiles == 1, model.device_past_tiles
assert "onnx" not in sys.modules, "imported onnx"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
