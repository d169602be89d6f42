"""ExecuTorch ``.pte`` files: ``torch.export`` → ``to_edge_transform_and_lower`` (XNNPACK) → ``to_executorch``.

fp32: the model is exported at batch 1 and every operator XNNPACK supports is lowered
into its delegate; the rest runs on ExecuTorch's portable kernels. int8: PT2E with the
XNNPACK quantizer (symmetric int8, per-channel weights), calibrated on real images,
then lowered the same way. Layers the accuracy budget keeps float are left out of the
quantizer's annotation (a node filter on the module path ``torch.export`` records), so
they stay float32 operators, still delegated to XNNPACK.

``delegation_summary`` says how much XNNPACK took: operators delegated, operators left to
portable kernels (by name: silent fallback to slow kernels is what hurts on a phone) and
the delegated share. Output bookkeeping (``getitem``) is not counted.

executorch is an optional extra (``pip install "edgeprune[executorch]"``); without it
``require_executorch`` (``edgeprune.pte_runtime``) raises one ConfigError line naming the extra.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.config import QuantizeConfig
from edgeprune.errors import ConfigError, ExportError
from edgeprune.pte_runtime import require_executorch
from edgeprune.quant_sensitivity import TensorNoise, export_for_calibration, module_path, pt2e_tensor_noise

DELEGATE = "XnnpackBackend"
BOOKKEEPING = frozenset({"getitem"})  # picks a delegate's outputs apart; not an operator that computes
SENSITIVITY_SAMPLES = 64  # calibration images on which each tensor's effect on the logits is measured


def check_scheme(config: QuantizeConfig) -> None:
    """ConfigError for a quantize setting the .pte path has no form of."""
    if config.scheme in ("fp16", "dynamic") or (config.scheme == "int8" and config.activation_type != "int8"):
        setting = f"scheme = {config.scheme!r}" if config.scheme != "int8" else f"activation_type = {config.activation_type!r}"
        raise ConfigError(
            f"quantize.{setting} has no ExecuTorch form: .pte is fp32 or int8 (scheme = 'int8', activation_type = 'int8'); "
            "drop 'pte' from export.formats or change quantize"
        )


# --------------------------------------------------------------------------- lowering


def export_pte(model: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """Write ``model`` (float or PT2E-converted) as an XNNPACK-delegated .pte at ``path``.

    ``example`` is one NCHW input; the file takes exactly that shape. Returns
    ``delegation_summary``. Raises ExportError with the exporter's first line.
    """
    require_executorch()
    if not isinstance(model, torch.fx.GraphModule):  # a PT2E-converted graph refuses eval(); it is in eval mode already
        model = model.eval()
    try:
        with _quiet():
            exported = torch.export.export(model, (example,))
    except Exception as error:  # torch.export raises many types; all mean "cannot export"
        raise ExportError(f"torch.export cannot export the model for ExecuTorch: {_first_line(error)}") from None
    return lower_to_pte(exported, path)


def lower_to_pte(exported: torch.export.ExportedProgram, path: Path) -> dict[str, Any]:
    """XNNPACK partitioning, ExecuTorch program, file written; returns ``delegation_summary``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    try:
        with _quiet():
            edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
            summary = delegation_summary(get_delegation_info(edge.exported_program().graph_module))
            program = edge.to_executorch()
    except Exception as error:  # the edge passes raise many types; all mean "cannot lower"
        raise ExportError(f"ExecuTorch cannot lower the model to XNNPACK: {_first_line(error)}") from None
    path.write_bytes(program.buffer)
    return summary


def delegation_summary(info: Any) -> dict[str, Any]:
    """Operators XNNPACK took and those left to portable kernels, from executorch's ``DelegationBreakdown``."""
    delegated = portable = 0
    portable_kernels: dict[str, int] = {}
    for operator, breakdown in sorted(info.delegation_by_operator.items()):
        if operator in BOOKKEEPING:
            continue
        delegated += breakdown.delegated
        portable += breakdown.non_delegated
        if breakdown.non_delegated:
            portable_kernels[operator] = breakdown.non_delegated
    total = delegated + portable
    return {
        "delegate": DELEGATE,
        "delegated_subgraphs": int(info.num_delegated_subgraphs),
        "delegated_operators": delegated,
        "portable_operators": portable,
        "delegated_share": round(delegated / total, 4) if total else 0.0,
        "portable_kernels": portable_kernels,
    }


# --------------------------------------------------------------------------- int8 (PT2E, XNNPACK quantizer)


def xnnpack_quantizer(per_channel: bool, keep_float: tuple[str, ...] = ()) -> Any:
    """The XNNPACK quantizer: static symmetric int8 everywhere except the operators of ``keep_float`` modules."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    kept = frozenset(keep_float)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    # Not set_module_name(name, None): XNNPACKQuantizer (executorch 1.5) asserts on None. The filter
    # reads the module path torch.export records on every node, as the TFLite quantizer's does.
    return quantizer.set_filter_function(lambda node: module_path(node) not in kept)


class PteQuantizer:
    """int8 .pte through PT2E with the XNNPACK quantizer; layers are module paths (the quantize stage's ``LayerQuantizer``)."""

    layout = "NCHW"

    def __init__(self, model: nn.Module, example: torch.Tensor, calibration: np.ndarray, config: QuantizeConfig) -> None:
        require_executorch()
        self.model, self.example, self.calibration, self.config = model.eval(), example, calibration, config
        self.prepared: torch.fx.GraphModule | None = None  # calibrated, kept for the noise ranking
        self.batch = 1
        self.delegation: dict[str, Any] = {}

    def quantize(self, path: Path, keep_float: tuple[str, ...]) -> None:
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        with _quiet():
            graph, self.batch = export_for_calibration(self.model, self.example)
            prepared = prepare_pt2e(graph, xnnpack_quantizer(self.config.per_channel, keep_float))
            with torch.no_grad():
                for start in range(0, len(self.calibration), self.batch):
                    prepared(torch.from_numpy(self.calibration[start : start + self.batch]))
            self.prepared = copy.deepcopy(prepared)  # convert_pt2e consumes its input
            converted = move_exported_model_to_eval(convert_pt2e(prepared))
        self.delegation = export_pte(converted, self.example, path)

    def tensor_noise(self) -> list[TensorNoise]:
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        # fold_quantize=False keeps each weight's quantize op in the graph: the ranking rounds them one at a time.
        # (The lowered file needs them folded: ExecuTorch has no portable out-variant of a weight's quantize op.)
        with _quiet():
            converted = move_exported_model_to_eval(convert_pt2e(copy.deepcopy(self.prepared), fold_quantize=False))
        return pt2e_tensor_noise(converted, self.calibration[:SENSITIVITY_SAMPLES], self.batch)

    def output_grid(self) -> tuple[float, int] | None:
        return None  # the XNNPACK flow keeps float32 model I/O

    def describe(self) -> dict[str, Any]:
        return {"calibration": "histogram", "calibration_samples": len(self.calibration), **self.delegation}

    def close(self) -> None:
        self.prepared = None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytree and export deprecations inside torch.export / executorch
        yield


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
