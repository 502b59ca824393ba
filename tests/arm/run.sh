#!/bin/sh
# Run dcrt's runtime on emulated ARM: Debian bookworm root file systems (arm64, armhf) built with
# debootstrap, run under qemu-user through binfmt_misc, with only numpy (Debian's python3-numpy 1.24,
# so numpy 1.x is covered too) and flatbuffers (pip) installed; then on arm64 with numba, twice
# (compiling the kernels, then loading them from the cache).
#
#   sudo PYTHON=/path/to/venv/bin/python tests/arm/run.sh [arm64] [armhf]   # default: both
#
# Needs root (debootstrap, chroot, mounts), network (Debian mirror, PyPI) and, on the host:
#   apt-get install debootstrap qemu-user-static binfmt-support
# PYTHON is a host Python with dcrt[convert] + onnxruntime: it builds the payload (tests/arm/make_payload.py:
# dcrt's core + runtime without converters, a few .dcm files, the host's and onnxruntime's outputs) that
# tests/arm/device_check.py checks inside the emulated system.
# Environment: DCRT_ARM_WORK (default /var/tmp/dcrt-arm: root file systems are kept there and reused),
# MIRROR (default http://deb.debian.org/debian), NUMBA=0 to skip the numba run.
# Results: $DCRT_ARM_WORK/result-<arch>[-numba[-cached]].txt; the last line of each is
# "RESULT <machine>: n/n checks passed".
# Takes 10-30 minutes the first time (debootstrap + pip under emulation), a few minutes afterwards.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${DCRT_ARM_WORK:-/var/tmp/dcrt-arm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PYTHON=${PYTHON:-python3}
NUMBA=${NUMBA:-1}
ARCHES=${*:-arm64 armhf}

[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot)"; exit 2; }
for tool in debootstrap chroot; do
  command -v $tool >/dev/null || { echo "missing $tool: apt-get install debootstrap qemu-user-static binfmt-support"; exit 2; }
done
mkdir -p "$WORK"

# binfmt_misc lets the kernel hand ARM binaries to qemu (the F flag: works inside a chroot too).
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable qemu-aarch64 2>/dev/null || true
update-binfmts --enable qemu-arm 2>/dev/null || true

echo "== payload (host: $($PYTHON -c 'import platform; print(platform.machine())'))"
"$PYTHON" "$HERE/make_payload.py" "$WORK/payload"

MOUNTED=""
cleanup() {
  for m in $MOUNTED; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

status=0
for arch in $ARCHES; do
  rootfs="$WORK/rootfs-$arch"
  if [ ! -f "$rootfs/.dcrt-ready" ]; then
    echo "== debootstrap $SUITE $arch into $rootfs"
    rm -rf "$rootfs"
    debootstrap --foreign --arch="$arch" --variant=minbase \
      --include=python3,python3-numpy,python3-venv,python3-pip,ca-certificates "$SUITE" "$rootfs" "$MIRROR"
    chroot "$rootfs" /debootstrap/debootstrap --second-stage
    touch "$rootfs/.dcrt-ready"
  fi
  mount -t proc proc "$rootfs/proc" && MOUNTED="$rootfs/proc $MOUNTED"
  mount --bind /dev "$rootfs/dev" && MOUNTED="$rootfs/dev $MOUNTED"
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  # The host's CA bundle, for hosts behind a TLS-intercepting proxy; pip in the chroot uses it.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/host-ca-certificates.crt" 2>/dev/null || true
  # (requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE, inherited from the host, override PIP_CERT: set all)
  ca=/etc/ssl/certs/host-ca-certificates.crt
  PIPENV="env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CERT=$ca REQUESTS_CA_BUNDLE=$ca CURL_CA_BUNDLE=$ca SSL_CERT_FILE=$ca"

  if ! chroot "$rootfs" /opt/venv/bin/python -c "import flatbuffers" 2>/dev/null; then
    echo "== $arch: venv with Debian's numpy + pip's flatbuffers"
    chroot "$rootfs" python3 -m venv --system-site-packages /opt/venv
    chroot "$rootfs" $PIPENV /opt/venv/bin/pip install --disable-pip-version-check -q flatbuffers
  fi
  rm -rf "$rootfs/opt/dcrt-test"
  cp -r "$WORK/payload" "$rootfs/opt/dcrt-test"
  echo "== $arch: installed Python packages"
  chroot "$rootfs" /opt/venv/bin/pip list --disable-pip-version-check 2>/dev/null | grep -i -E "numpy|flatbuffers|numba|onnx" || true
  echo "== $arch: runtime check (numpy only)"
  if chroot "$rootfs" env DCRT_NO_NUMBA=1 /opt/venv/bin/python /opt/dcrt-test/device_check.py --numba no \
      2>&1 | tee "$WORK/result-$arch.txt"; then :; fi
  tail -n 1 "$WORK/result-$arch.txt" | grep -q "RESULT .*: \([0-9]*\)/\1 checks passed" || status=1

  if [ "$NUMBA" = 1 ] && [ "$arch" = arm64 ]; then
    if ! chroot "$rootfs" /opt/venv-numba/bin/python -c "import numba, flatbuffers" 2>/dev/null; then
      echo "== $arch: venv with numba"
      chroot "$rootfs" python3 -m venv --system-site-packages /opt/venv-numba
      chroot "$rootfs" $PIPENV /opt/venv-numba/bin/pip install --disable-pip-version-check -q flatbuffers numba \
        || echo "numba did not install on $arch"
    fi
    if chroot "$rootfs" /opt/venv-numba/bin/python -c "import numba" 2>/dev/null; then
      chroot "$rootfs" /opt/venv-numba/bin/pip list --disable-pip-version-check 2>/dev/null | grep -i -E "numpy|flatbuffers|numba|llvmlite" || true
      echo "== $arch: runtime check (numba)"
      if chroot "$rootfs" /opt/venv-numba/bin/python /opt/dcrt-test/device_check.py --numba yes \
          2>&1 | tee "$WORK/result-$arch-numba.txt"; then :; fi
      tail -n 1 "$WORK/result-$arch-numba.txt" | grep -q "RESULT .*: \([0-9]*\)/\1 checks passed" || status=1
      # again in a new process: the kernels load from the cache the first run wrote (dcrt/_jit.py)
      echo "== $arch: runtime check (numba, kernels from the cache)"
      if chroot "$rootfs" /opt/venv-numba/bin/python /opt/dcrt-test/device_check.py --numba yes \
          2>&1 | tee "$WORK/result-$arch-numba-cached.txt"; then :; fi
      tail -n 1 "$WORK/result-$arch-numba-cached.txt" | grep -q "RESULT .*: \([0-9]*\)/\1 checks passed" || status=1
    else
      echo "RESULT $arch numba: not installable" | tee "$WORK/result-$arch-numba.txt"
    fi
  fi
  umount -l "$rootfs/dev" "$rootfs/proc"
  MOUNTED=""
done

echo "== summary"
for f in "$WORK"/result-*.txt; do echo "$(basename "$f"): $(tail -n 1 "$f")"; done
exit $status
