#!/bin/sh
# Run dcrt's runtime on the oldest Python and numpy it supports: Python 3.9 with numpy<2 and
# flatbuffers only (no onnx, no numba), on the pre-built .dcm files of the ARM payload; then on the
# newest Python there is (PYNEW) with the newest numpy and numba from PyPI.
#
#   PYTHON=/path/to/venv/bin/python PY39=/root/.pyenv/versions/3.9.18/bin/python \
#     PYNEW=/root/.pyenv/versions/3.13.0/bin/python tests/compat/run.sh
#
# PYTHON (a host Python with dcrt[convert] + onnxruntime) builds the payload with
# tests/arm/make_payload.py unless $DCRT_COMPAT_PAYLOAD (default: the ARM run's /var/tmp/dcrt-arm/payload)
# already exists. Four checks, all with tests/arm/device_check.py:
#   1. the payload's copy of dcrt's core + runtime (what a device gets);
#   2. dcrt installed with `pip install --no-deps` from a copy of the repository (packaging on 3.9);
#   3. the payload on the declared minimum versions (numpy 1.21, flatbuffers 2.0);
#   4. the payload on PYNEW with numba (a current device OS: Debian 13 ships Python 3.13); skipped
#      with a note when PYNEW is not there;
#   5. the payload on the declared minimum numba (pyproject's `fast` extra) on PY311, twice: compiling
#      every kernel, then loading them from the cache (dcrt/_jit.py reaches into numba's cache code).
# Needs network (PyPI) the first time. Work folder: $DCRT_COMPAT_WORK (default /var/tmp/dcrt-compat).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${DCRT_COMPAT_WORK:-/var/tmp/dcrt-compat}
PY39=${PY39:-/root/.pyenv/versions/3.9.18/bin/python}
PYNEW=${PYNEW:-/root/.pyenv/versions/3.13.0/bin/python}
PY311=${PY311:-/root/.pyenv/versions/3.11.7/bin/python}
PYTHON=${PYTHON:-python3}
PAYLOAD=${DCRT_COMPAT_PAYLOAD:-/var/tmp/dcrt-arm/payload}

mkdir -p "$WORK"
if [ ! -f "$PAYLOAD/models/manifest.json" ]; then
  PAYLOAD="$WORK/payload"
  "$PYTHON" "$ROOT/tests/arm/make_payload.py" "$PAYLOAD"
fi
# the device check of this checkout, on the payload's models
cp "$ROOT/tests/arm/device_check.py" "$PAYLOAD/device_check.py"

venv="$WORK/venv39"
if [ ! -x "$venv/bin/python" ]; then
  "$PY39" -m venv "$venv"
  "$venv/bin/pip" install --disable-pip-version-check -q "numpy<2" flatbuffers
fi
echo "== packages in $venv"
"$venv/bin/pip" list --disable-pip-version-check 2>/dev/null

status=0
echo "== 1. the payload's dcrt (core + runtime, no converters)"
DCRT_NO_NUMBA=1 "$venv/bin/python" "$PAYLOAD/device_check.py" --numba no --models "$PAYLOAD/models" \
  2>&1 | tee "$WORK/result-payload.txt" || true
tail -n 1 "$WORK/result-payload.txt" | grep -q "RESULT .*: \([0-9]*\)/\1 checks passed" || status=1

echo "== 2. dcrt pip-installed (--no-deps) from a copy of the repository"
src="$WORK/src"
rm -rf "$src" "$WORK/installed"
mkdir -p "$src"
(cd "$ROOT" && tar cf - --exclude=__pycache__ --exclude='*.egg-info' --exclude=.git --exclude='*.nbi' \
   --exclude='*.nbc' pyproject.toml README.md dcrt runtime converters) | (cd "$src" && tar xf -)
"$venv/bin/pip" install --disable-pip-version-check -q --no-deps --target "$WORK/installed" "$src"
mkdir -p "$WORK/run"
cp "$ROOT/tests/arm/device_check.py" "$WORK/run/device_check.py"
(cd "$WORK/run" && PYTHONPATH="$WORK/installed" DCRT_NO_NUMBA=1 "$venv/bin/python" device_check.py --numba no \
   --models "$PAYLOAD/models" 2>&1 | tee "$WORK/result-installed.txt") || true
tail -n 1 "$WORK/result-installed.txt" | grep -q "RESULT .*: \([0-9]*\)/\1 checks passed" || status=1

echo "== 3. the declared minimum versions: numpy 1.21, flatbuffers 2.0 (pyproject's dependencies)"
venv_min="$WORK/venv39-min"
if [ ! -x "$venv_min/bin/python" ]; then
  "$PY39" -m venv "$venv_min"
  "$venv_min/bin/pip" install --disable-pip-version-check -q "numpy==1.21.*" "flatbuffers==2.0"
fi
"$venv_min/bin/pip" list --disable-pip-version-check 2>/dev/null | grep -i -E "numpy|flatbuffers"
DCRT_NO_NUMBA=1 "$venv_min/bin/python" "$PAYLOAD/device_check.py" --numba no --models "$PAYLOAD/models" \
  2>&1 | tee "$WORK/result-minimum.txt" || true
tail -n 1 "$WORK/result-minimum.txt" | grep -q "RESULT .*: \([0-9]*\)/\1 checks passed" || status=1

echo "== 4. the newest Python with the newest numpy and numba"
rm -f "$WORK/result-newest.txt"
if [ -x "$PYNEW" ]; then
  venv_new="$WORK/venv-newest"
  if [ ! -x "$venv_new/bin/python" ]; then
    "$PYNEW" -m venv "$venv_new"
    "$venv_new/bin/pip" install --disable-pip-version-check -q numpy flatbuffers numba
  fi
  "$venv_new/bin/python" -c "import sys, numpy, numba; print('Python', sys.version.split()[0], 'numpy', numpy.__version__, 'numba', numba.__version__)"
  "$venv_new/bin/python" "$PAYLOAD/device_check.py" --numba yes --models "$PAYLOAD/models" \
    2>&1 | tee "$WORK/result-newest.txt" || true
  tail -n 1 "$WORK/result-newest.txt" | grep -q "RESULT .*: \([0-9]*\)/\1 checks passed" || status=1
else
  echo "skipped: no Python at PYNEW=$PYNEW"
fi

echo "== 5. the declared minimum numba, compiling the kernels, then loading them from the cache"
minimum=$(sed -n 's/^fast = \["numba>=\([0-9.]*\)"\].*/\1/p' "$ROOT/pyproject.toml")
rm -f "$WORK/result-numba-min.txt" "$WORK/result-numba-min-cached.txt"
if [ -x "$PY311" ] && [ -n "$minimum" ]; then
  venv_nmin="$WORK/venv-numba-$minimum"
  if [ ! -x "$venv_nmin/bin/python" ]; then
    "$PY311" -m venv "$venv_nmin"
    "$venv_nmin/bin/pip" install --disable-pip-version-check -q "numba==$minimum.*" "numpy<2" flatbuffers
  fi
  "$venv_nmin/bin/pip" list --disable-pip-version-check 2>/dev/null | grep -i -E "^(numpy|numba|llvmlite) "
  rm -rf "$WORK/numba-min-cache"
  for run in numba-min numba-min-cached; do
    NUMBA_CACHE_DIR="$WORK/numba-min-cache" timeout 1800 "$venv_nmin/bin/python" "$PAYLOAD/device_check.py" \
      --numba yes --models "$PAYLOAD/models" 2>&1 | tee "$WORK/result-$run.txt" || true
    tail -n 1 "$WORK/result-$run.txt" | grep -q "RESULT .*: \([0-9]*\)/\1 checks passed" || status=1
  done
else
  echo "skipped: no Python at PY311=$PY311, or no numba minimum in pyproject.toml"
fi

echo "== summary"
for f in "$WORK"/result-*.txt; do echo "$(basename "$f"): $(tail -n 1 "$f")"; done
exit $status
