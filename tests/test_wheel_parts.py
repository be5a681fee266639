"""scripts/wheel_parts.py: wheels carried to an offline GPU host in parts (issue 12)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "wheel_parts.py"
spec = importlib.util.spec_from_file_location("wheel_parts", SCRIPT)
assert spec and spec.loader
wheel_parts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheel_parts)


def make_wheels(directory: Path) -> dict[str, bytes]:
    directory.mkdir()
    contents = {"big-1.0-py3-none-any.whl": os.urandom(10_000), "small.whl": b"x" * 100}
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    return contents


def test_split_then_join_gives_back_the_same_bytes(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    contents = make_wheels(wheels)
    assert [p.name for p in wheel_parts.split(wheels, part_bytes=4096)] == [
        "big-1.0-py3-none-any.whl"
    ]
    parts = sorted(wheels.glob("big-1.0-py3-none-any.whl.part-*"))
    assert len(parts) == 3 and all(p.stat().st_size <= 4096 for p in parts)
    assert not (wheels / "big-1.0-py3-none-any.whl").exists()
    assert wheel_parts.main(["join", str(wheels)]) == 0
    for name, data in contents.items():
        assert (wheels / name).read_bytes() == data
    assert not list(wheels.glob("*.part-*"))
    assert wheel_parts.join(wheels) == []  # joined already: nothing to do, still checked


def test_join_refuses_a_corrupt_or_missing_part_naming_it(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    make_wheels(wheels)
    wheel_parts.split(wheels, part_bytes=4096)
    part = wheels / "big-1.0-py3-none-any.whl.part-001"
    data = bytearray(part.read_bytes())
    data[7] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(
        wheel_parts.PartsError, match=r"big-1\.0-py3-none-any\.whl: sha256 \w+ of the joined parts"
    ):
        wheel_parts.join(wheels)
    assert not (wheels / "big-1.0-py3-none-any.whl").exists()  # nothing half-made is left
    part.unlink()
    with pytest.raises(wheel_parts.PartsError, match=r"parts \[1\] are missing"):
        wheel_parts.join(wheels)
    assert wheel_parts.main(["join", str(wheels)]) == 1


def test_requirements_leave_out_pytorch_and_take_the_gpu_runtime() -> None:
    wanted = wheel_parts.requirements(SCRIPT.parent.parent)
    assert any(r.startswith("onnxruntime-gpu") for r in wanted)
    assert not any(
        r.startswith(("torch", "onnxruntime>", "onnxruntime=", "lmscore")) for r in wanted
    )
