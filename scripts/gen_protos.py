"""Regenerate the Python code of the protobuf contract: `python scripts/gen_protos.py`.

Writes scoring_pb2.py, scoring_pb2_grpc.py and their typed stubs (.pyi, by
mypy-protobuf) next to protos/lmscore/v1/scoring.proto. With `--out DIR` it
writes under DIR instead (tests/test_protos.py uses that to prove the
committed code is not stale).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
PROTO_FILES = ["lmscore/v1/scoring.proto"]


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the files it wrote."""
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    # mypy-protobuf's plugins live next to this interpreter, which need not be on PATH.
    bin_dir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(p for p in (out_root / "lmscore" / "v1").iterdir() if "_pb2" in p.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
