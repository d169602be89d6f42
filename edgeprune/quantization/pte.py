"""int8 ExecuTorch ``.pte`` through PT2E with the XNNPACK quantizer, with a per-tensor mix (``edgeprune.quantization.pt2e``).

Symmetric int8, per-channel weights, calibrated on real images, then lowered to XNNPACK
(``edgeprune.export.executorch``). Layers at the ``float`` rung are left out of the quantizer's
annotation: they stay float32 operators, still delegated to XNNPACK. The XNNPACK quantizer has
no 16-bit activations and already calibrates with a histogram observer, so ``float`` is its one rung.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.config import QuantizeConfig
from edgeprune.export.executorch import export_pte, quiet
from edgeprune.pte_runtime import require_executorch
from edgeprune.quant_sensitivity import module_path
from edgeprune.quantization.pt2e import Pt2eMixQuantizer
from edgeprune.quantization.search import Mix


def xnnpack_quantizer(per_channel: bool, keep_float: tuple[str, ...] = ()) -> Any:
    """The XNNPACK quantizer: static symmetric int8 everywhere except the operators of ``keep_float`` modules."""
    # executorch is an optional extra: imported once require_executorch has said it is there
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    kept = frozenset(keep_float)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    # Not set_module_name(name, None): XNNPACKQuantizer (executorch 1.5) asserts on None. The filter
    # reads the module path torch.export records on every node, as the TFLite quantizer's does.
    return quantizer.set_filter_function(lambda node: module_path(node) not in kept)


class PteQuantizer(Pt2eMixQuantizer):
    """int8 .pte through PT2E with the XNNPACK quantizer; layers are module paths."""

    def __init__(self, model: nn.Module, example: torch.Tensor, calibration: np.ndarray, config: QuantizeConfig) -> None:
        require_executorch()
        super().__init__(model, example, calibration, config)
        self.delegation: dict[str, Any] = {}

    def quantize(self, path: Path, mix: Mix) -> None:
        with quiet():
            prepared = self.calibrated(xnnpack_quantizer(self.config.per_channel, self.keep_float(mix)))
            # The ranking needs each weight's quantize op in the graph (fold_quantize=False); the lowered file
            # needs them folded: ExecuTorch has no portable out-variant of a weight's quantize op.
            self.converted = self.converted_graph(copy.deepcopy(prepared))
            lowered = self.converted_graph(prepared, fold_quantize=True)
        self.delegation = export_pte(lowered, self.example, path)
        self.path = path

    def describe(self) -> dict[str, Any]:
        return {"calibration": "histogram", "calibration_samples": len(self.calibration), **self.delegation}
