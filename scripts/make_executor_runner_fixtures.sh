#!/usr/bin/env bash
# Build ExecuTorch's executor_runner against the installed executorch wheel and capture its real output as
# the parser's test fixtures (tests/fixtures/executor_runner/).
#
# Usage (from the repository root):
#     scripts/make_executor_runner_fixtures.sh EXECUTORCH_SOURCE [PYTHON]
#
# EXECUTORCH_SOURCE is a checkout of the executorch sources (https://github.com/pytorch/executorch, the tag of
# the installed wheel); the wheel ships the runtime libraries and headers but not the runner's source nor the
# runner_util / evalue_util helpers it compiles in. PYTHON (default .venv/bin/python) has edgeprune and the
# executorch wheel installed. Needs g++ and gflags (Debian: apt-get install libgflags-dev). Everything is built
# under a temporary directory; only the fixtures are written into the repository.
set -euo pipefail

SOURCE=${1:?usage: $0 EXECUTORCH_SOURCE [PYTHON]}
PYTHON=${2:-.venv/bin/python}
FIXTURES=tests/fixtures/executor_runner
WORK=$(mktemp -d /tmp/executor-runner.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

WHEEL=$("$PYTHON" -c 'import executorch, pathlib; print(pathlib.Path(list(executorch.__path__)[0]))')
VERSION=$("$PYTHON" -c 'from executorch.version import __version__; print(__version__)')
echo "executorch $VERSION wheel at $WHEEL, sources at $SOURCE, building in $WORK"

# Headers the wheel lacks come from the sources; pthreadpool.h and cpuinfo.h (third-party submodules) are
# replaced by the declarations the runner needs, their code is inside libexecutorch_threadpool.so.
mkdir -p "$WORK/include/executorch/extension/threadpool" "$WORK/shim"
ln -s "$SOURCE/extension/runner_util" "$SOURCE/extension/evalue_util" "$WORK/include/executorch/extension/"
cp "$SOURCE/extension/threadpool/threadpool.h" "$WORK/include/executorch/extension/threadpool/"
cat >"$WORK/include/executorch/extension/threadpool/cpuinfo_utils.h" <<'EOF'
#pragma once
#include <cstdint>
namespace executorch::extension::cpuinfo {
uint32_t get_num_performant_cores();
}
EOF
cat >"$WORK/shim/pthreadpool.h" <<'EOF'
#pragma once
#include <stddef.h>
extern "C" {
typedef struct pthreadpool* pthreadpool_t;
void pthreadpool_destroy(pthreadpool_t threadpool);
}
EOF

# The wheel's libraries are compiled with the event tracer; its CMake config asks consumers for the same
# definitions (EXECUTORCH_COMPILE_DEFINITIONS) plus ET_USE_THREADPOOL when the thread pool library is present.
CXXFLAGS=(-std=c++17 -O2 -DC10_USING_CUSTOM_GENERATED_MACROS -DET_EVENT_TRACER_ENABLED -DET_USE_THREADPOOL
  -I"$WHEEL/include" -I"$WORK/include" -I"$WHEEL/include/executorch/runtime/core/portable_type/c10" -I"$WORK/shim")
OBJECTS=()
for unit in examples/portable/executor_runner/executor_runner extension/runner_util/inputs \
  extension/runner_util/inputs_portable extension/evalue_util/print_evalue; do
  g++ "${CXXFLAGS[@]}" -c "$SOURCE/$unit.cpp" -o "$WORK/$(basename "$unit").o"
  OBJECTS+=("$WORK/$(basename "$unit").o")
done
# --no-as-needed: kernel and delegate libraries only register themselves from static initialisers.
g++ -o "$WORK/executor_runner" "${OBJECTS[@]}" -L"$WHEEL/lib" -Wl,-rpath,"$WHEEL/lib" -Wl,--no-as-needed \
  -lexecutorch -lexecutorch_kernels_optimized -lexecutorch_kernels_quantized -lexecutorch_backend_xnnpack \
  -lexecutorch_threadpool -lexecutorch_etdump -Wl,--as-needed -lgflags -lpthread

# fp32 and int8 (PT2E, XNNPACK quantizer) .pte of the bundled small_cnn, lowered to XNNPACK by edgeprune.
PYTHONPATH=$PWD "$PYTHON" - "$WORK" <<'EOF'
import sys
from pathlib import Path

import torch

from edgeprune.config import DataConfig, QuantizeConfig
from edgeprune.data import load_dataset
from edgeprune.export.executorch import PteQuantizer, export_pte
from edgeprune.models import create_model

work = Path(sys.argv[1])
torch.manual_seed(0)
model = create_model("small_cnn").eval()
data = load_dataset(DataConfig(), 10)
example = torch.from_numpy(data.x_test[:1].copy())
print("fp32", export_pte(model, example, work / "small_cnn_fp32.pte"))
quantizer = PteQuantizer(model, example, data.calibration_batches(64, seed=0), QuantizeConfig())
quantizer.quantize(work / "small_cnn_int8.pte", keep_float=())
print("int8", quantizer.describe())
EOF
head -c 2000 "$WORK/small_cnn_fp32.pte" >"$WORK/truncated.pte"

# Each fixture is the tool's stdout and stderr together, as `adb shell` returns them.
capture() {
  local name=$1
  shift
  (cd "$WORK" && ./executor_runner "$@" >"$name.log" 2>&1) || echo "$name: exit status $?"
  mkdir -p "$FIXTURES"
  sed "s#$WORK/##g" "$WORK/$name.log" >"$FIXTURES/$name.txt"
}
capture fp32_xnnpack_2threads --model_path=small_cnn_fp32.pte --num_executions=20 --cpu_threads=2
capture int8_xnnpack_1thread --model_path=small_cnn_int8.pte --num_executions=20 --cpu_threads=1
capture int8_xnnpack_default_threads --model_path=small_cnn_int8.pte --num_executions=5
capture truncated_pte --model_path=truncated.pte --num_executions=5
capture missing_pte --model_path=missing.pte
echo "executor_runner (executorch $VERSION): fixtures written to $FIXTURES"
