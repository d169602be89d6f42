"""ExecuTorch ``.pte`` files: ``torch.export`` → ``to_edge_transform_and_lower`` (XNNPACK) → ``to_executorch``.

fp32: the model is exported at batch 1 and every operator XNNPACK supports is lowered
into its delegate; the rest runs on ExecuTorch's portable kernels. int8: a PT2E-converted
graph (``edgeprune.quantization.pte``) is lowered the same way.

``delegation_summary`` says how much XNNPACK took: operators delegated, operators left to
portable kernels (by name: silent fallback to slow kernels is what hurts on a phone) and
the delegated share. Output bookkeeping (``getitem``) is not counted.

executorch is an optional extra (``pip install "edgeprune[executorch]"``); without it
``require_executorch`` (``edgeprune.pte_runtime``) raises one ConfigError line naming the extra.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune.config import QuantizeConfig
from edgeprune.errors import ConfigError, ExportError
from edgeprune.pte_runtime import require_executorch

DELEGATE = "XnnpackBackend"
BOOKKEEPING = frozenset({"getitem"})  # picks a delegate's outputs apart; not an operator that computes


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
        with quiet():
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
        with quiet():
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


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytree and export deprecations inside torch.export / executorch
        yield


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
