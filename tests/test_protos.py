"""The committed protobuf code is what `python scripts/gen_protos.py` generates now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
