"""PT2E quantization with a per-tensor mix: what the TFLite (litert-torch) and ExecuTorch (XNNPACK) quantizers share.

Both export the model with ``torch.export``, annotate it with a backend's PT2E quantizer, calibrate
on real images and convert. A tensor at the ``float`` rung leaves the layers reading or writing it
out of the annotation (a node filter on the module path ``torch.export`` records), so they stay
float32 operators. Neither backend has a cheaper rung per layer: the XNNPACK quantizer builds int8
activations only; litert-torch 0.10 lowers int16 PT2E activations but stores the biases of their
ops as int32, which TFLite's 16x8 kernels refuse (they want int64: "bias->type != kTfLiteInt64"),
so its int16x8 files do not run. Both already calibrate activations with a histogram observer,
which clips outliers as a percentile range would.

The two-run ranking here runs the converted graph twice — every quantize/dequantize pair rounding,
then none — and matches each rounded tensor across the runs (``quant_sensitivity.pt2e_tensor_errors``).
Layers are module paths (``features.3``); the MACs off int8 are those of the float layers' Conv2d and
Linear modules. TFLite ranks the converted files instead when it has the fp32 one (``tflite_ranking``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.config import QuantizeConfig
from edgeprune.quant_sensitivity import export_for_calibration, pt2e_tensor_errors, pt2e_tensor_noise
from edgeprune.quantization.search import Mix, TensorError

RANKING_SAMPLES = 16  # calibration images of the two ranking runs
SENSITIVITY_SAMPLES = 64  # calibration images on which each tensor's effect alone on the logits is measured


class Pt2eMixQuantizer:
    """The search's ``MixQuantizer`` for a PT2E backend; a subclass writes the file (``write``)."""

    layout: str | None = "NCHW"
    rungs: tuple[str, ...] = ("float",)

    def __init__(self, model: nn.Module, example: torch.Tensor, calibration: np.ndarray, config: QuantizeConfig) -> None:
        self.model, self.example, self.calibration, self.config = model.eval(), example, calibration, config
        self.converted: torch.fx.GraphModule | None = None  # the last candidate, quantize ops unfolded (the ranking rounds them)
        self.batch = 1
        self.path: Path | None = None
        self._layers: dict[str, tuple[str, ...]] = {}  # tensor -> the module paths reading or writing it

    def keep_float(self, mix: Mix) -> tuple[str, ...]:
        """The module paths the ``float`` tensors of ``mix`` leave out of the annotation, in first-seen order."""
        return tuple(dict.fromkeys(layer for tensor, rung in mix.items() if rung == "float" for layer in self._layers.get(tensor, ())))

    def calibrated(self, quantizer: Any, samples: int | None = None) -> torch.fx.GraphModule:
        """The model exported, annotated by ``quantizer`` and run on the first ``samples`` calibration images (all: None)."""
        # torchao loads here, not at the top: its import writes shared-library load failures to stderr,
        # which a build that quantizes nothing with PT2E should not show
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        graph, self.batch = export_for_calibration(self.model, self.example)
        prepared = prepare_pt2e(unfoldable_shared_convs(graph), quantizer)
        with torch.no_grad():
            for start in range(0, len(self.calibration) if samples is None else samples, self.batch):
                prepared(torch.from_numpy(self.calibration[start : start + self.batch]))
        return prepared

    @staticmethod
    def converted_graph(prepared: torch.fx.GraphModule, fold_quantize: bool = False) -> torch.fx.GraphModule:
        from torchao.quantization.pt2e import move_exported_model_to_eval  # loaded with prepare_pt2e (see ``calibrated``)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        converted = move_exported_model_to_eval(convert_pt2e(prepared, fold_quantize=fold_quantize))
        for module in converted.modules():  # move_exported_model_to_eval switches the ops, not the flag litert-torch reads
            module.training = False
        return converted

    def tensor_errors(self) -> list[TensorError]:
        """Two runs of the last converted graph (all tensors rounding, none), each rounded tensor matched."""
        rows = pt2e_tensor_errors(self.converted, self.calibration[:RANKING_SAMPLES], self.batch)
        self._layers.update({row[0]: row[4] for row in rows})
        return [TensorError(*row) for row in rows]

    def refine(self, candidates: list[TensorError]) -> list[TensorError]:
        """``candidates`` re-ranked by the noise each alone adds to the logits (one run per tensor)."""
        noise = pt2e_tensor_noise(self.converted, self.calibration[:SENSITIVITY_SAMPLES], self.batch)
        alone = {item.tensor: item.sqnr_db for item in noise}
        return sorted(candidates, key=lambda item: (alone.get(item.tensor, item.sqnr_db), item.tensor))

    def mix_cost(self, mix: Mix) -> dict[str, Any]:
        keep_float = self.keep_float(mix)
        macs = module_macs(self.model, self.example)
        share = sum(macs.get(layer, 0) for layer in keep_float) / max(sum(macs.values()), 1)
        return {"float_layers": list(keep_float), "macs_off_int8": {"float": round(share, 4)}}

    def output_grid(self) -> tuple[float, int] | None:
        return None  # float32 model output unless a subclass says otherwise

    def close(self) -> None:
        self.converted = None


_BATCH_NORMS = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default)
_CONVS = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default)


def unfoldable_shared_convs(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``graph`` with a copy (``aten.clone``) between each conv read by others too and the BatchNorm after it.

    ``prepare_pt2e`` folds every BatchNorm into the conv before it and hands the folded output to
    all of the conv's readers (torchao's ``_fuse_conv_bn_``): where a DenseNet-BC concatenates the
    stem conv's output and the first dense layer normalizes it, the concat received the normalized
    tensor, a different model (an int8 TFLite DenseNet-BC agreed with its fp32 file on 23 % of the
    images). Such a BatchNorm stays a float op of its own.
    """
    for node in list(graph.graph.nodes):
        source = node.args[0] if node.op == "call_function" and node.target in _BATCH_NORMS else None
        if isinstance(source, torch.fx.Node) and source.target in _CONVS and len(source.users) > 1:
            with graph.graph.inserting_before(node):
                copy = graph.graph.call_function(torch.ops.aten.clone.default, (source,))
            copy.meta = {**source.meta, "val": source.meta.get("val")}
            node.replace_input_with(source, copy)
    graph.recompile()
    return graph


def module_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of each Conv2d and Linear module, by module path (one forward pass)."""
    macs: dict[str, int] = {}

    def hook(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def record(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            per_output = module.weight[0].numel()  # Conv2d: in/groups x kh x kw; Linear: in_features
            macs[name] = macs.get(name, 0) + int(output[0].numel() * per_output)

        return record

    handles = [
        module.register_forward_hook(hook(name)) for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return macs
