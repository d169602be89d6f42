#!/usr/bin/env bash
# Set up edgeprune in ./.venv on a fresh machine (idempotent).
#
# torch 2.13.0 is installed first, on its own: on these machines that resolves to the
# local CPU wheel, and pyproject's torch range then keeps it (a bare `torch` requirement
# with nothing installed would pull gigabytes of CUDA packages). A user with their own
# CUDA torch can skip this script and `pip install -e .` into their environment.
#
# Usage: bash scripts/setup.sh           # package + test tools
#        EDGEPRUNE_SYSTEM_DEPS=0 bash scripts/setup.sh   # skip apt packages (openssh-server for the ssh
#                                                        # tests, chromium for the report.html browser test)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torch_pruning, onnxruntime, litert_torch, ai_edge_litert" \
  || { echo "setup: the Python packages did not install" >&2; exit 1; }

# The ExecuTorch extra (.pte export and runtime) for its tests. The installed torch is passed as a
# requirement so pip keeps it (executorch's own torch pin would otherwise be free to move it),
# and typing_extensions stays where torch's install left it.
TORCH_PIN=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
TYPING_PIN=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("typing_extensions"))')
.venv/bin/python -m pip install -q -e ".[executorch]" "torch==$TORCH_PIN" "typing_extensions==$TYPING_PIN" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import executorch.runtime" 2>/dev/null \
  || echo "setup: executorch did not install; the .pte tests will be skipped" >&2

# The ssh adapter is tested against a real OpenSSH server on 127.0.0.1.
if [ "${EDGEPRUNE_SYSTEM_DEPS:-1}" = "1" ] && ! command -v sshd >/dev/null && [ ! -x /usr/sbin/sshd ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client >/dev/null) \
      || echo "setup: could not install openssh-server; the ssh adapter tests will be skipped" >&2
  else
    echo "setup: openssh-server missing and not root; the ssh adapter tests will be skipped" >&2
  fi
fi

# report.html is checked in a real headless browser (tests/test_report_html.py): Debian's chromium.
if [ "${EDGEPRUNE_SYSTEM_DEPS:-1}" = "1" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null) \
      || echo "setup: could not install chromium; the report.html browser test will be skipped" >&2
  else
    echo "setup: /usr/bin/chromium missing and not root; the report.html browser test will be skipped" >&2
  fi
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
