"""``gpu``: benchmark .onnx artefacts on an NVIDIA GPU through onnxruntime-gpu.

``gpu`` uses CUDA; ``gpu?provider=tensorrt`` puts TensorRT first (CUDA, then CPU, take
the nodes TensorRT cannot) with its sparse tactics enabled (``trt_sparsity_enable``: on
Ampere and later, layers whose weights hold the 2:4 pattern may run on sparse tensor
cores; ``&sparsity=0`` builds dense engines only, so the same artefact can be timed both
ways); ``gpu?device_id=1`` picks a GPU via CUDA_VISIBLE_DEVICES in the runner's
environment only. ``BenchSettings.providers``, when given, wins.
The runner refuses to report numbers if onnxruntime silently fell back to the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgeprune.errors import DeviceError
from edgeprune.runtimes.base import BenchResult, BenchSettings, DeviceUrl
from edgeprune.runtimes.local import LocalAdapter, check_artifact
from edgeprune.runtimes.registry import register_adapter

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROVIDER_CHAINS = {
    "cuda": (CUDA, "CPUExecutionProvider"),
    "tensorrt": (TENSORRT, CUDA, "CPUExecutionProvider"),
}
SPARSITY_SETTINGS = {"0": False, "1": True}


def available_providers() -> list[str]:
    """onnxruntime's execution providers in this interpreter; [] without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


class GpuAdapter:
    """A LocalAdapter whose runner sessions use GPU execution providers."""

    def __init__(self, device: str = "gpu", provider: str = "cuda", device_id: str | None = None, sparsity: str | None = None) -> None:
        if provider not in PROVIDER_CHAINS:
            raise DeviceError(f"device {device!r}: provider must be one of {sorted(PROVIDER_CHAINS)}")
        if sparsity is not None and (provider != "tensorrt" or sparsity not in SPARSITY_SETTINGS):
            raise DeviceError(f"device {device!r}: sparsity=0|1 applies to provider=tensorrt only (TensorRT's sparse tactics)")
        self.name = device
        self.sparse_tactics = provider == "tensorrt" and SPARSITY_SETTINGS[sparsity or "1"]
        env = {"CUDA_VISIBLE_DEVICES": device_id} if device_id is not None else None
        options = (f"{TENSORRT}:trt_sparsity_enable=1",) if self.sparse_tactics else ()
        chain = PROVIDER_CHAINS[provider]
        self._local = LocalAdapter(device, python=sys.executable, providers=chain, extra_env=env, provider_options=options)

    def prepare(self, artifact: Path) -> None:
        """Check the artefact is .onnx and onnxruntime here has a CUDA provider.

        Raises:
            DeviceError: a .tflite artefact, or no CUDAExecutionProvider.
        """
        check_artifact(artifact)
        if artifact.suffix.lower() != ".onnx":
            raise DeviceError(f"{self.name}: runs .onnx artefacts only, got {artifact.name}")
        providers = available_providers()
        if CUDA not in providers:
            raise DeviceError(
                "no CUDA execution provider: install onnxruntime-gpu (with CUDA and cuDNN) "
                f"in place of onnxruntime; available here: {providers or 'no onnxruntime'}"
            )

    def run(self, artifact: Path, settings: BenchSettings) -> BenchResult:
        """Benchmark on the GPU; see LocalAdapter.run."""
        self.prepare(artifact)
        return self._local.run(artifact, settings)

    def cleanup(self) -> None:
        """Nothing to remove."""


@register_adapter("gpu")
def open_gpu(url: DeviceUrl, settings: BenchSettings) -> GpuAdapter:
    """``gpu[?provider=cuda|tensorrt][&device_id=N][&sparsity=0|1]``."""
    url.check_options(("provider", "device_id", "sparsity"))
    options = url.options
    return GpuAdapter(url.text, options.get("provider", "cuda"), options.get("device_id"), options.get("sparsity"))
