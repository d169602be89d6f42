"""The fallback TFLite converter: ONNX → onnx2tf (TensorFlow), for ops litert-torch cannot lower.

Optional: ``pip install "edgeprune[tensorflow]"``. Nothing here imports
TensorFlow: ``missing_requirements`` only looks the modules up, and onnx2tf
runs in a child process, so TensorFlow never loads into a build that does not
need it. The child runs in a scratch folder and never downloads anything:

- onnx2tf fetches a sample image file for its op-by-op checks unless one is in
  its working folder (``onnx2tf.utils.common_functions.download_test_image_data``);
  we put our own test images there under that name (``SAMPLE_FILE``) and pass
  them with ``-cind`` as well;
- the child's proxies point at a closed local port, so an unforeseen download
  fails instead of fetching silently.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from edgeprune import parity
from edgeprune.errors import ExportError

# The modules onnx2tf imports (it declares no dependencies of its own).
REQUIREMENTS = ("tensorflow", "tf_keras", "onnx2tf", "onnx_graphsurgeon", "sng4onnx", "sne4onnx", "psutil")
INSTALL_HINT = 'install the optional fallback with pip install "edgeprune[tensorflow]"'
SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"  # the name onnx2tf looks for
SAMPLE_COUNT = 20
PSEUDO_OPERATORS = ("Erf", "GeLU")  # onnx2tf would lower these to TensorFlow select ops
TIMEOUT_S = 1800
NOWHERE = "http://127.0.0.1:9"  # the discard port: connections are refused at once


def missing_requirements() -> list[str]:
    """The fallback's modules that are not installed (looked up, not imported)."""
    return [module for module in REQUIREMENTS if importlib.util.find_spec(module) is None]


def versions() -> dict[str, str]:
    """Installed versions of the fallback's tools, for cache keys and the manifest."""
    found = {}
    for dist in ("tensorflow", "tensorflow-cpu", "onnx2tf"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def convert_onnx(onnx_path: Path, tflite_path: Path, samples: np.ndarray, channels_last: bool = False) -> str:
    """Convert an fp32 ONNX file to an fp32 .tflite at ``tflite_path``; returns its input layout.

    ``samples`` are real NCHW float32 inputs onnx2tf checks its conversion with.
    The input stays NCHW unless ``channels_last``. Raises ExportError naming
    the ONNX node onnx2tf failed on, or the missing packages.
    """
    missing = missing_requirements()
    if missing:
        raise ExportError(f"the onnx2tf fallback needs {', '.join(missing)}; {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="onnx2tf-", dir=tflite_path.parent) as scratch:
        folder = Path(scratch)
        inputs = samples[:SAMPLE_COUNT].astype(np.float32)
        nhwc = inputs.transpose(0, 2, 3, 1)
        np.save(folder / SAMPLE_FILE, nhwc)
        np.save(folder / "samples.npy", nhwc if channels_last else inputs)  # -cind data is in the TF model's layout
        command = [sys.executable, "-m", "onnx2tf", "-i", str(Path(onnx_path).resolve()), "-o", "out", "-n", "-nuo"]
        name = input_name(onnx_path)
        command += ["-cind", name, "samples.npy"]
        command += ["-rtpo", *PSEUDO_OPERATORS]  # builtin-op forms, else GELU's Erf becomes a Flex op LiteRT cannot run
        if not channels_last:
            command += ["-k", name]
        _run(command, folder, onnx_path)
        produced = folder / "out" / f"{Path(onnx_path).stem}_float32.tflite"
        if not produced.is_file():
            raise ExportError(f"onnx2tf wrote no {produced.name} for {Path(onnx_path).name}; rerun with --debug and report the model")
        input_shape = builtin_interpreter(produced, Path(onnx_path).name).get_input_details()[0]["shape"]
        os.replace(produced, tflite_path)
    return parity.input_layout(tflite_path, input_shape, samples.shape)  # the layout onnx2tf really gave it (it may transpose despite -k)


def builtin_interpreter(tflite_path: Path, filename: str):
    """The converted file loaded in LiteRT's builtin interpreter, tensors allocated.

    ExportError when it needs TensorFlow select (Flex) ops that interpreter lacks, or does not load at all.
    """
    try:
        interpreter = parity.tflite_interpreter(tflite_path, 1)
        interpreter.allocate_tensors()
        return interpreter
    except (RuntimeError, ValueError) as error:
        flex = sorted(set(re.findall(r"\b(Flex\w+)", str(error))))
        if not flex:
            raise ExportError(
                f"onnx2tf converted {filename}, but LiteRT cannot load the result: {str(error).splitlines()[0][:300]}"
            ) from None
        raise ExportError(
            f"onnx2tf converted {filename} with TensorFlow select ops ({', '.join(flex)}) that LiteRT's builtin interpreter "
            "cannot run (a device app would need the Flex delegate); replace the operator in the model"
        ) from None


def input_name(onnx_path: Path) -> str:
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name


def _run(command: list[str], folder: Path, onnx_path: Path) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "NO_PROXY": "", "no_proxy": ""}
    env.update({name: NOWHERE for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")})
    try:
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ExportError(f"onnx2tf did not finish converting {Path(onnx_path).name} within {TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise ExportError(failure_message(done.stdout + done.stderr, Path(onnx_path).name))


def failure_message(log: str, filename: str) -> str:
    """One line from onnx2tf's log: the ONNX node it failed on and its last error."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log)
    node = re.search(r"onnx_op_name:\s*(\S+)", plain)
    errors = [line.strip() for line in plain.splitlines() if re.match(r"\s*\w*(Error|Exception)\b", line)]
    where = f" at node {node.group(1)}" if node else ""
    reason = errors[-1][:300] if errors else "see its log with --debug"
    return f"onnx2tf cannot convert {filename}{where}: {reason}"
