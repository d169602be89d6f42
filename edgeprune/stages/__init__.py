"""Pipeline stages, one file each; every stage is file-in, file-out with one ``run()``."""

from edgeprune.stages.baseline import Baseline
from edgeprune.stages.benchmark import Benchmark
from edgeprune.stages.export_onnx import ExportOnnx
from edgeprune.stages.export_pte import ExportPte
from edgeprune.stages.export_tflite import ExportTflite
from edgeprune.stages.finetune import Finetune
from edgeprune.stages.prune_structured import PruneStructured
from edgeprune.stages.prune_unstructured import PruneUnstructured
from edgeprune.stages.quantize import Quantize

__all__ = [
    "Baseline",
    "Benchmark",
    "ExportOnnx",
    "ExportPte",
    "ExportTflite",
    "Finetune",
    "PruneStructured",
    "PruneUnstructured",
    "Quantize",
]
