#!/usr/bin/env bash
# One lent-GPU session: the CUDA tests, then every benchmark, each bounded in time (the
# limits are caps; on an H200 on 2026-11-26 the steps took 130, 15, 28, 40, 51, 23 and 15
# s; on an H100 the same day tests 169 s, check 16, headline 29, sampling about 45 per
# batch, linear-ce 39, train-step 19, profile 17, host 37; the default STEPS below fit one
# 600 s device call, caps and kill grace included; STEPS="sampling train-step tune" is a
# second call's). Results land in $OUT (or ./gpu-out) as
# <what>-<device>-<date>-<HHMM>.json; copy them to bench/results/.
#
#   bash bench/gpu_session.sh            # from the repository root, on a CUDA machine
#
# Liger-Kernel, when wanted, comes as a wheel in .whl/ (installed --no-deps). The package
# is used from the source tree: fused_softmax.kernels is linked to kernels/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
[ -e fused_softmax/kernels ] || ln -s ../kernels fused_softmax/kernels
python3 -c "import fused_softmax.kernels.softmax" || exit 1
DEV=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
TAG=$DEV-$(date +%F-%H%M)  # the time too: a second session on one day must not overwrite
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# The default fits one 600 s device call (caps 500 s + 15 s of kill grace a step; a task's
# device time was 15 minutes on 2026-11-27, machine start included).
STEPS=${STEPS:-"tests check headline linear-ce profile host"}  # which steps, in this order
step() {  # step SECONDS NAME COMMAND...: run, bounded, and log its wall time
  local s=$1 name=$2; shift 2; local t=$SECONDS
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  echo "=== $name (limit ${s}s)"
  timeout -s INT -k 15 "$s" "$@"; echo "=== $name rc=$? in $((SECONDS - t))s"
}
# every failure, with its traceback (a device-side assert ends only its worker: conftest.py)
step ${T_TESTS:-200} tests python3 -m pytest ${TESTS:-tests} -q -n 8 -p no:cacheprovider --tb=short -rfE -o console_output_style=classic > "$OUT/cuda-tests-$TAG.log" 2>&1
[ -f "$OUT/cuda-tests-$TAG.log" ] && grep -E "^(FAILED|ERROR)|CUDA context lost|passed|failed" "$OUT/cuda-tests-$TAG.log" | head -40
step ${T_CHECK:-40} check python3 -m fused_softmax check --json "$OUT/check-$TAG.json" > "$OUT/check-$TAG.txt" 2>&1
[ -f "$OUT/check-$TAG.txt" ] && grep -iA12 "summary" "$OUT/check-$TAG.txt" | head -30
step ${T_HEADLINE:-70} headline python3 bench/headline.py "$OUT/headline-$TAG.json"
step ${T_LINEAR:-90} linear-ce python3 bench/linear_ce.py "$OUT/linear-ce-$TAG.json"
step ${T_SAMPLING:-150} sampling python3 bench/sampling.py "$OUT/sampling-$TAG.json"
step ${T_TRAIN:-60} train-step python3 bench/train_step.py --chunk-sizes 4096 --json "$OUT/train-step-$TAG.json"
step ${T_PROFILE:-40} profile sh -c "python3 bench/profile_softmax.py > '$OUT/profile-softmax-$TAG.txt' 2>&1"
[ -f "$OUT/profile-softmax-$TAG.txt" ] && grep -v -i warn "$OUT/profile-softmax-$TAG.txt"
step ${T_HOST:-60} host python3 bench/host_overhead.py "$OUT/host-overhead-$TAG.json" > "$OUT/host-overhead-$TAG.txt" 2>&1
[ -f "$OUT/host-overhead-$TAG.txt" ] && grep "^\[" "$OUT/host-overhead-$TAG.txt"
step ${T_TUNE:-160} tune env DEADLINE=${DEADLINE:-140} python3 bench/tune.py "$OUT/tune-$TAG.json"
ls -la "$OUT"
