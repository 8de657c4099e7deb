#!/usr/bin/env bash
# The GPU check of lightning_swim, in under 8 minutes, on a machine with one CUDA GPU and no internet.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; the table goes to $OUT/gpu_check.md (else ./)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # every path on the CPU (automatic without CUDA)
#
# 1. finds Python and checks that torch, lightning, pykeops, geomloss, pytest and this checkout import;
#    only if one does not, tries `pip install -e .[test]` (2 minutes at most; PyPI may be unreachable, a
#    local wheel cache named by PIP_FIND_LINKS is used if there is one; GPU_CHECK_NO_PIP=1: never) and
#    says what is still missing. pip installs this checkout in editable mode: run the check in the GPU
#    machine's own copy, not in a shared development checkout;
# 2. shows the GPU (nvidia-smi) and the CUDA compiler KeOps would use (nvcc), if present;
# 3. runs benchmarks/gpu_check.py with the time that is left (each section under its own limit).
# Extra arguments are passed to gpu_check.py (--tiny, --only search fit, --budget SECONDS, --out DIR).
set -u
START=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL_SECONDS:-470}  # the whole check, this script included
cd "$(dirname "$0")/.." || exit 1

say() { echo "gpu_check.sh: $*"; }

PY=""
for candidate in "${PYTHON:-}" python3 python; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then say "no Python found (set PYTHON=/path/to/python)"; exit 2; fi
say "Python: $(command -v "$PY") ($("$PY" --version 2>&1))"

missing() {  # the modules that do not import, on one line ("" if none); imports may print, so a marker
    KEOPS_VERBOSE=0 PYKEOPS_VERBOSE=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - 2>/dev/null <<'EOF' | sed -n 's/^GONE://p'
import importlib
gone = []
for name in ("torch", "lightning", "pykeops", "geomloss", "pytest", "hypothesis", "tensorboard", "lightning_swim"):
    try:
        importlib.import_module(name)
    except Exception as err:  # ImportError, or a broken install failing with anything else
        gone.append(f"{name} ({type(err).__name__}: {str(err)[:80]})")
print("GONE:" + "; ".join(gone))
EOF
}

GONE=$(missing)
if [ -n "$GONE" ] && [ "${GPU_CHECK_NO_PIP:-0}" != "0" ]; then
    say "cannot import: $GONE (GPU_CHECK_NO_PIP is set: no pip install)"
elif [ -n "$GONE" ]; then
    say "cannot import: $GONE"
    say "trying: $PY -m pip install -e .[test] (at most 120 s; needs PyPI or a wheel cache in PIP_FIND_LINKS)"
    if command -v timeout >/dev/null 2>&1; then LIMIT="timeout 120"; else LIMIT=""; fi
    if $LIMIT "$PY" -m pip install --retries 1 --timeout 15 -e ".[test]" >/tmp/gpu_check_pip.log 2>&1; then
        say "pip install done"
    else
        say "pip install failed (last lines below; full log /tmp/gpu_check_pip.log)"
        tail -n 3 /tmp/gpu_check_pip.log
    fi
    GONE=$(missing)
fi
if [ -n "$GONE" ]; then
    say "missing: $GONE"
    case "$GONE" in
        torch\ \(*|*\;\ torch\ \(*|*lightning_swim*) say "cannot run without torch and lightning_swim"; exit 3 ;;
    esac
    say "going on: the sections that need what is missing will say so in the table"
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu_check.sh: GPU: /'
else
    say "no nvidia-smi on PATH"
fi
if command -v nvcc >/dev/null 2>&1; then say "nvcc: $(nvcc --version | tail -n 1)"; else say "no nvcc on PATH (KeOps uses NVRTC and the CUDA headers)"; fi

LEFT=$(( TOTAL - ($(date +%s) - START) - 15 ))
if [ "$LEFT" -lt 60 ]; then say "only ${LEFT} s left after the set-up: the sections will be cut short"; fi
if [ "$LEFT" -lt 10 ]; then LEFT=10; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if command -v timeout >/dev/null 2>&1; then
    timeout $(( LEFT + 10 )) "$PY" benchmarks/gpu_check.py --budget "$LEFT" "$@"
else
    "$PY" benchmarks/gpu_check.py --budget "$LEFT" "$@"
fi
