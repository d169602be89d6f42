"""The host CPU's vector width, for ``prune.round_to = "auto"``.

CPU inference kernels (onnxruntime's MLAS, oneDNN, XNNPACK) tile output channels by
the float32 lanes of one vector register: a channel count off that multiple leaves a
partly filled tile or adds a layout reorder. AVX-512 holds 16 float32 lanes, AVX/AVX2
8, SSE and Arm NEON 4 (XNNPACK's arm64 kernels still tile by 8).

``ATEN_CPU_CAPABILITY`` (PyTorch's switch to emulate a smaller CPU: ``default``,
``avx2``, ``avx512``) lowers what this module reports, never raises it, so a run
under it derives what that smaller CPU would.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

AVX512_FLAGS = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"})  # what PyTorch's avx512 kernels need
LANES = {"avx512": 16, "avx2": 8, "avx": 8, "sse": 4}
ISA_ORDER = ("sse", "avx", "avx2", "avx512")
ATEN_CAPABILITIES = {"default": "sse", "avx2": "avx2", "avx512": "avx512"}
ARM64_MULTIPLE = 8  # NEON holds 4 float32 lanes, but XNNPACK's arm64 GEMM kernels tile output channels by 8
OTHER_MULTIPLE = 8


@dataclass(frozen=True)
class ChannelMultiple:
    """A derived ``round_to``: the value and why (recorded in the manifest's config)."""

    value: int
    reason: str


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's feature flags (Linux x86 ``flags`` line); empty where unreadable."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def x86_isa(flags: frozenset[str]) -> str:
    """The widest float vector ISA the ``flags`` announce: ``avx512``, ``avx2``, ``avx`` or ``sse``."""
    if AVX512_FLAGS <= flags:
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return "avx" if "avx" in flags else "sse"


def capped_by_aten(isa: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """``isa`` lowered to ``ATEN_CPU_CAPABILITY`` when that is set to a known, smaller value; and the note saying so."""
    requested = environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    cap = ATEN_CAPABILITIES.get(requested)
    if cap is None or ISA_ORDER.index(cap) >= ISA_ORDER.index(isa):
        return isa, ""
    return cap, f" (the CPU has {isa.upper()}; ATEN_CPU_CAPABILITY={requested} caps it)"


def host_channel_multiple(
    machine: str | None = None, flags: frozenset[str] | None = None, environ: Mapping[str, str] | None = None
) -> ChannelMultiple:
    """The channel multiple this host's kernels tile by; arguments default to this machine and process."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        isa = x86_isa(flags if flags is not None else cpu_flags())
        isa, capped = capped_by_aten(isa, os.environ if environ is None else environ)
        return ChannelMultiple(LANES[isa], f"host {isa.upper()}{capped}: {LANES[isa]} float32 lanes per vector")
    if machine in ("arm64", "aarch64"):
        return ChannelMultiple(ARM64_MULTIPLE, f"host {machine}: XNNPACK's arm64 kernels tile output channels by {ARM64_MULTIPLE}")
    return ChannelMultiple(OTHER_MULTIPLE, f"host {machine or 'unknown'}: no known vector width, {OTHER_MULTIPLE} assumed")
