"""What the CPU offers that decides ONNX Runtime's int8 kernels (and is printed beside figures)."""

from __future__ import annotations

from pathlib import Path

# Any of these gives ONNX Runtime's u8 x s8 GEMM an int32 dot product (VPDPBUSD or AMX tiles);
# without them (AVX2 alone) the kernel adds pairs of products in int16 with saturation.
INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# The key of a quantized variant's manifest that lists the CPU flags it needs (any of them).
REQUIRES_KEY = "requires_cpu_flags"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_int8_dot_product(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in INT8_DOT_PRODUCT_FLAGS)


def vector_flags(flags: frozenset[str] | None = None) -> list[str]:
    """The flags that decide which GEMM kernels run (AVX*, AMX*), sorted: printed beside
    every benchmark figure."""
    flags = cpu_flags() if flags is None else flags
    return sorted(f for f in flags if f.startswith(("avx", "amx")))
