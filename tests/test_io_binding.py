"""The IO-binding path of OnnxCausalLM (the one CUDA takes), forced on CPU: it returns the
very same numbers as the plain session.run path, with and without a past (prefix reuse),
and repeats a prompt's cache along the batch where the cache lives."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from lmscore.export.manifest import PAST_TILE_NAME, Manifest
from lmscore.export.past_tile import build_past_tile
from lmscore.server.app import load_model
from lmscore.server.config import EngineSettings, RuntimeOptions, ServerConfig
from lmscore.server.engine import ScoringEngine
from lmscore.server.requests import ItemInput, ModelFacts
from lmscore.server.runtime import OnnxCausalLM
from lmscore.v1.options import ScoreOptions

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
    ScoreOptions(marginal_mode="separate_pass"),
]


def engines(model_dir: Path) -> tuple[ScoringEngine, ScoringEngine, OnnxCausalLM]:
    """The plain path (IO binding off) and the server's own engine (IO binding on)."""
    # Reuse every shared prompt, however short, so the cache path runs on ITEMS.
    config = ServerConfig(
        model_dir=model_dir,
        runtime=RuntimeOptions(device="cpu", io_binding=False),
        engine=EngineSettings(min_prefix_reuse_tokens=1),
    )
    plain = load_model(config).engine
    bound_model = OnnxCausalLM(model_dir, RuntimeOptions(device="cpu", io_binding=True))
    manifest = Manifest.read(model_dir)
    facts = ModelFacts(
        manifest.max_context, manifest.vocab_size, manifest.bos_token_id, manifest.eos_token_id
    )
    bound = ScoringEngine(bound_model, plain.tokenizer, facts, plain.settings)
    return plain, bound, bound_model


def test_io_binding_is_the_default_on_cpu_and_can_be_turned_off(tiny_export: Path) -> None:
    ids = np.array([[1, 40, 41, 42]])
    bound = OnnxCausalLM(tiny_export, RuntimeOptions(device="cpu"))
    _, present = bound.score(ids, np.ones_like(ids), np.zeros_like(ids), return_present=True)
    assert bound.io_binding_runs == 1
    assert present and all(isinstance(v, ort.OrtValue) for v in present.values())
    plain = OnnxCausalLM(tiny_export, RuntimeOptions(device="cpu", io_binding=False))
    _, present = plain.score(ids, np.ones_like(ids), np.zeros_like(ids), return_present=True)
    assert plain.io_binding_runs == 0
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


def test_export_without_the_tiling_graph_repeats_on_the_host(
    tiny_export: Path, tmp_path: Path
) -> None:
    """Exports made before the past-tiling graph: the same numbers, the cache repeated on
    the host (and counted)."""
    old = tmp_path / "old-export"
    shutil.copytree(tiny_export, old)
    (old / PAST_TILE_NAME).unlink()
    bound_model = scores_with_io_binding_equal_plain(old)
    assert bound_model.device_past_tiles == 0
    assert bound_model.host_past_tensors > 0


def continuation_batch(past_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three right-padded continuations against a past of `past_len` tokens, as the engine
    runs them: ids, attention mask (past + new), targets."""
    rows = np.array([[70, 71, 72], [73, 0, 0], [74, 75, 0]])
    mask = np.zeros((3, past_len + 3), dtype=np.int64)
    mask[:, :past_len] = 1
    for row, length in enumerate([3, 1, 2]):
        mask[row, past_len : past_len + length] = 1
    return rows, mask, np.roll(rows, -1, axis=1)


def test_present_and_repeated_past_are_identical_on_both_paths(tiny_export: Path) -> None:
    plain = OnnxCausalLM(tiny_export, RuntimeOptions(device="cpu", io_binding=False))
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
        # Left where ORT wrote it: an OrtValue on the session's device.
        assert isinstance(value, ort.OrtValue) and value.device_name().lower() == "cpu"
        assert tuple(value.shape()) == plain_present[name].shape
        assert value.numpy().dtype == plain_present[name].dtype
        np.testing.assert_array_equal(value.numpy(), plain_present[name])

    rows, mask, cont_targets = continuation_batch(prefix.shape[1])
    repeated = {n: np.repeat(v, 3, axis=0) for n, v in plain_present.items()}
    expected, _ = plain.score(rows, mask, cont_targets, 2, repeated)
    # The plain path repeats a batch-1 cache itself.
    by_count, _ = plain.score(rows, mask, cont_targets, 2, plain_present, past_repeats=3)
    np.testing.assert_array_equal(by_count.logprobs, expected.logprobs)
    tiles = bound.device_past_tiles
    got, _ = bound.score(rows, mask, cont_targets, 2, bound_present, past_repeats=3)
    assert bound.device_past_tiles == tiles + 1 and bound.host_past_tensors == 0
    for field in ("logprobs", "ranks", "top_logprobs", "top_ids"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))
    # Host arrays as past take the IO-binding path too, with the same result.
    host_past = {n: v.numpy() for n, v in bound_present.items()}
    got_host, _ = bound.score(rows, mask, cont_targets, 2, host_past, past_repeats=3)
    np.testing.assert_array_equal(got_host.logprobs, expected.logprobs)
    assert bound.host_past_tensors == 0  # nothing had to leave the device


def test_a_cache_of_several_rows_is_repeated_row_by_row(tiny_export: Path) -> None:
    """np.repeat's order (each row n times in turn) is not a Tile: a two-row device cache
    with past_repeats is repeated on the host, with the plain path's result."""
    plain = OnnxCausalLM(tiny_export, RuntimeOptions(device="cpu", io_binding=False))
    bound = OnnxCausalLM(tiny_export, RuntimeOptions(device="cpu", io_binding=True))
    ids = np.array([[1, 50, 51], [1, 52, 53]])
    present = [m.score(ids, np.ones_like(ids), ids, return_present=True)[1] for m in (plain, bound)]
    assert present[0] is not None and present[1] is not None
    rows = np.array([[54], [55], [56], [57]])
    mask = np.ones((4, ids.shape[1] + 1), dtype=np.int64)
    expected, _ = plain.score(rows, mask, rows, 2, present[0], past_repeats=2)
    got, _ = bound.score(rows, mask, rows, 2, present[1], past_repeats=2)
    assert bound.device_past_tiles == 0 and bound.host_past_tensors == len(present[1])
    np.testing.assert_array_equal(got.logprobs, expected.logprobs)
    np.testing.assert_array_equal(got.top_ids, expected.top_ids)


def test_tile_graph_is_valid_onnx_and_tiles(tiny_export: Path) -> None:
    import onnx

    model = build_past_tile([("x0", TensorProto.FLOAT16), ("x1", TensorProto.FLOAT)])
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x0 = np.arange(24, dtype=np.float16).reshape(1, 2, 3, 4)
    x1 = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)
    repeats = np.array([3, 1, 1, 1], dtype=np.int64)
    y0, y1 = session.run(None, {"x0": x0, "x1": x1, "repeats": repeats})
    np.testing.assert_array_equal(y0, np.repeat(x0, 3, axis=0))
    np.testing.assert_array_equal(y1, np.repeat(x1, 3, axis=0))
    # The export wrote one for exactly the model's past inputs.
    model_inputs = ort.InferenceSession(str(tiny_export / "model.onnx")).get_inputs()
    tile_inputs = ort.InferenceSession(str(tiny_export / PAST_TILE_NAME)).get_inputs()
    past = [(i.name, i.type) for i in model_inputs if i.name.startswith("past_key_values.")]
    assert [(i.name, i.type) for i in tile_inputs if i.name != "repeats"] == past


def test_io_binding_needs_no_onnx_package(tiny_export: Path) -> None:
    """The server installs without the onnx package: the IO-binding path must not import it."""
    script = f"""
import sys
import numpy as np
from pathlib import Path
from lmscore.server.runtime import OnnxCausalLM
from lmscore.server.config import RuntimeOptions
model = OnnxCausalLM(Path({str(tiny_export)!r}), RuntimeOptions(device="cpu", io_binding=True))
ids = np.array([[1, 40, 41]])
_, present = model.score(ids, np.ones_like(ids), ids, return_present=True)
more = np.array([[42], [43]])
model.score(more, np.ones((2, 4), dtype=np.int64), more, past=present, past_repeats=2)
assert model.device_past_tiles == 1, model.device_past_tiles
assert "onnx" not in sys.modules, "imported onnx"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
