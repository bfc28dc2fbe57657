#!/usr/bin/env bash
# Every check that needs a GPU, in one run, for a session that is lent a GPU machine: the
# CUDA tests (tests/trainer/test_device.py and the Hugging Face model tests), the benchmark
# suite's GPU section (staging path against a pinned copy) and the tiny Gemma-2 activation
# benchmark in bfloat16. A few minutes on one GPU; run it from the repository root:
#
#   bash benchmarks/gpu_check.sh             # results and one log under $OUT (default /tmp/lensfeed-gpu)
#
# A machine without network access gets what its Python lacks from wheels in .whl/, made
# beforehand where PyPI is reachable with `bash benchmarks/gpu_check.sh --fetch-wheels`
# (for the Python version named by PYVER, default 3.12). DEVICE=cpu runs the same steps on the
# CPU, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/lensfeed-gpu}
DEVICE=${DEVICE:-cuda}
# What the GPU image's Python may lack (lensfeed's own dependencies, and theirs), fetched at the
# versions this machine runs the test suite with.
WHEELS="pyzmq omegaconf datasets dill multiprocess msgpack"

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    for w in $WHEELS; do
        v=$("$PY" -c "import importlib.metadata as m; print(m.version('$w'))") || exit 1
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w==$v" || exit 1
    done
    ls .whl
    exit 0
fi

mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
missing=$("$PY" - <<'PY'
import importlib.util
mods = {"zmq": "pyzmq", "omegaconf": "omegaconf", "datasets": "datasets", "msgpack": "msgpack"}
print(" ".join(p for m, p in mods.items() if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    [ -d .whl ] || { echo "missing $missing and no .whl/ to install from (see --fetch-wheels)"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import lensfeed" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation -e . || exit 2
"$PY" - <<'PY'
import torch, zmq, pyarrow, lensfeed
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("pyzmq", zmq.__version__, "libzmq", zmq.zmq_version(), "pyarrow", pyarrow.__version__)
PY
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA device here (DEVICE=cpu checks the script on the CPU)"; exit 2
fi

status=0
step() { echo "== $* ($(date +%T))"; "$@" || { echo "== FAILED: $*"; status=1; }; }
step "$PY" -m pytest -q -rs -p no:cacheprovider tests/trainer/test_device.py \
    tests/producer/test_activations.py tests/producer/test_hf_models.py
step "$PY" -m benchmarks.run --sections gpu --out "$OUT/bench"
step "$PY" -m benchmarks.activations --device "$DEVICE" \
    --dtype "$([ "$DEVICE" = cuda ] && echo bfloat16 || echo float32)" --repeats 3 --out "$OUT/act"
echo "== done: status $status; results in $OUT"
exit $status
