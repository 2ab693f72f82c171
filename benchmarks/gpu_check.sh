#!/usr/bin/env bash
# GPU check, run in ONE call on a lent GPU machine (repo working tree, a preinstalled torch, no network).
#
#   bash benchmarks/gpu_check.sh                          # needs CUDA: a step fails without it
#   GPU_CHECK_ALLOW_CPU=1 bash benchmarks/gpu_check.sh    # check the script itself on a CPU-only machine
#
# Environment: PYTHON (default python3), OUT (if set, logs and JSON results go to $OUT/gpu_check), GPU_CHECK_BUDGET_S
# (default 470: the whole script must end within 8 minutes), STEP_TIMEOUT_S (per step, default 240; set it
# for one step with `STEP_TIMEOUT_S=60 run_step ...`), GPU_CHECK_TIMEOUT_SCALE (default 1: multiplies the budget
# and every step's timeout, for a CPU dry run on a slow or busy machine). Every step runs even when an earlier one failed; the
# summary at the end lists each step's status and time, and the exit status is 1 if any step failed.
#
# To add a step, append `run_step NAME COMMAND ARGS...` in the steps section below (NAME: letters, digits, _-).

set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
TIMEOUT_SCALE=${GPU_CHECK_TIMEOUT_SCALE:-1}  # a CPU dry run on a small, busy host may need 3
BUDGET_S=${GPU_CHECK_BUDGET_S:-$((470 * TIMEOUT_SCALE))}
LOG_DIR=${OUT:+$OUT/gpu_check}
LOG_DIR=${LOG_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$LOG_DIR"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the working tree's pipeline package, installed or not
export PYTHONUNBUFFERED=1

SCRIPT_START=$(date +%s)
STEPS=()
FAILED=()

# run_step NAME CMD [ARGS...]: run CMD with a timeout, tee its output to $LOG_DIR/NAME.log, record status and time.
run_step() {
    local name=$1
    shift
    local left=$((BUDGET_S - ($(date +%s) - SCRIPT_START)))
    local limit=$((${STEP_TIMEOUT_S:-240} * TIMEOUT_SCALE))
    ((left < limit)) && limit=$left
    echo
    echo "================ [$name] $* (timeout ${limit}s) ================"
    if ((limit < 5)); then
        echo "[$name] not run: the script's ${BUDGET_S}s budget is spent"
        STEPS+=("$name: NOT RUN (budget spent)")
        FAILED+=("$name")
        return
    fi
    local start rc seconds
    start=$(date +%s%N)
    # Through bash -c, so that a step may also be one of the (exported) functions of this script.
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    rc=${PIPESTATUS[0]}
    seconds=$(awk -v ns="$(($(date +%s%N) - start))" 'BEGIN { printf "%.1f", ns / 1e9 }')
    if ((rc == 0)); then
        STEPS+=("$name: ok (${seconds}s)")
    else
        ((rc == 124 || rc == 137)) && rc="$rc, timed out after ${limit}s"
        STEPS+=("$name: FAILED (exit $rc, ${seconds}s)")
        FAILED+=("$name")
    fi
}

nvidia_smi() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
    elif [[ $ALLOW_CPU == 1 ]]; then
        echo "nvidia-smi not found; GPU_CHECK_ALLOW_CPU=1, so this is not a failure"
    else
        echo "nvidia-smi not found" >&2
        return 1
    fi
}

python_env() {
    "$PYTHON" - "$ALLOW_CPU" <<'EOF'
import importlib.util, platform, sys
print("python", sys.version.replace("\n", " "), "on", platform.platform())
import torch
print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| threads", torch.get_num_threads())
print("torch.cuda.is_available():", torch.cuda.is_available())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
for name in ("numpy", "PIL", "pytest", "pydensecrf", "ray", "imgviz", "timm", "safetensors", "pyarrow"):
    print(f"  {name:12} {'importable' if importlib.util.find_spec(name) else 'MISSING'}")
if not torch.cuda.is_available() and sys.argv[1] != "1":
    sys.exit("CUDA is not available (set GPU_CHECK_ALLOW_CPU=1 to check this script on a CPU machine)")
EOF
}

export PYTHON ALLOW_CPU
export -f nvidia_smi python_env
echo "gpu_check: repo $REPO, python $PYTHON, logs in $LOG_DIR, budget ${BUDGET_S}s, allow CPU: $ALLOW_CPU"

# ---------------------------------------------------------------- steps ----------------------------------------------
STEP_TIMEOUT_S=30 run_step nvidia-smi nvidia_smi
STEP_TIMEOUT_S=60 run_step python-env python_env
STEP_TIMEOUT_S=180 run_step crf-torch-tests "$PYTHON" -m pytest -q -rs tests/test_crf_torch.py -p no:cacheprovider
# Results (JSON, benchmarks/harness.py's save) go beside the logs. Without CUDA (the CPU dry run) each step runs a
# few images on the CPU plan: a check of the scripts, not a measurement.
has_cuda() { "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; }
if has_cuda; then
    SPEED_ARGS=(--devices cuda --repeats 5) JOB_IMAGES=400 CEILING_ARGS=(--images-off 3000 --rounds 2)
else
    SPEED_ARGS=(--devices cuda --repeats 1) JOB_IMAGES=8 CEILING_ARGS=(--images-off 48 --rounds 1 --loop dataloader)
fi
# The torch CRF on the GPU: ms/image single and in merged batches of 8, against pydensecrf on one core.
STEP_TIMEOUT_S=180 run_step crf-gpu-speed "$PYTHON" benchmarks/crf.py --parts speed "${SPEED_ARGS[@]}" \
    --results "$LOG_DIR"
# The whole job, GPU inference + the torch CRF fused on the GPU vs + the CPU pydensecrf pool (images/s, masks).
STEP_TIMEOUT_S=300 run_step crf-backends-job "$PYTHON" benchmarks/crf.py --parts job --job-images "$JOB_IMAGES" \
    --results "$LOG_DIR"
# The job (CRF off) against a bare GPU loop (DataLoader decode workers, infer_batch on the GPU, PNGs written):
# steady state (goal >= 0.95x), end to end, GPU utilisation from nvidia-smi.
STEP_TIMEOUT_S=200 run_step gpu-ceiling "$PYTHON" benchmarks/ceiling.py --images-on 0 --skip-floor \
    "${CEILING_ARGS[@]}" --results "$LOG_DIR"
# ---------------------------------------------------------------- summary --------------------------------------------

{
    echo
    echo "================ gpu_check summary ($(($(date +%s) - SCRIPT_START))s, logs in $LOG_DIR) ================"
    printf '%s\n' "${STEPS[@]}"
    if ((${#FAILED[@]})); then
        echo "FAILED: ${FAILED[*]}"
    else
        echo "all steps passed"
    fi
} | tee "$LOG_DIR/summary.txt"
((${#FAILED[@]} == 0))
