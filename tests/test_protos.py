"""The committed protobuf code is what `python scripts/gen_protos.py` generates now, and the
Python result types (lmscore.v1.results) name the messages' fields."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from lmscore.v1 import results
from lmscore.v1 import scoring_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "protos" / "lmscore" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted((tmp_path / "lmscore" / "v1").glob("*_pb2*"))
    committed = sorted(GENERATED.glob("*_pb2*"))
    assert [p.name for p in fresh] == [p.name for p in committed]
    assert len(fresh) == 4  # messages, stubs, and a .pyi for each
    for new, old in zip(fresh, committed, strict=True):
        assert new.read_text() == old.read_text(), (
            f"{old.name} is stale: run `python scripts/gen_protos.py`"
        )


@pytest.mark.parametrize(
    ("result_type", "message"),
    [
        (results.ScoreResult, pb.ScoreResult),
        (results.Token, pb.TokenDetail),
        (results.TopToken, pb.TopToken),
        (results.Word, pb.Word),
        (results.RollingResult, pb.RollingResult),
    ],
)
def test_python_results_declare_the_messages_fields(result_type: type, message: type) -> None:
    """lmscore.v1.results is the one Python declaration of the results; the server and the
    client convert to and from the messages by field name, so the names must be the same."""
    declared = [f.name for f in dataclasses.fields(result_type)]
    assert sorted(declared) == sorted(f.name for f in message.DESCRIPTOR.fields)


def test_python_enums_name_the_messages_values() -> None:
    marginal = [f"MARGINAL_MODE_{mode.upper()}" for mode in typing.get_args(results.MarginalMode)]
    assert marginal == list(pb.MarginalMode.keys())
    segments = [f"SEGMENT_{segment.name}" for segment in results.Segment]
    assert ["SEGMENT_UNSPECIFIED", *segments] == list(pb.Segment.keys())
