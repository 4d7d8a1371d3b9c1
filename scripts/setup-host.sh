#!/usr/bin/env bash
# Idempotent host set-up for a fresh Debian (bookworm) machine, run as root by `make setup`.
# Installs only what is missing: apt packages, the .venv with hybridft in editable mode,
# and (through later steps) the patched QEMU build and the guest image.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils qemu-block-extra
  busybox-static python3-libnbd libnbd-bin nbdkit iproute2 tcpdump nftables fio valgrind
  python3-venv python3-dev gcc make libc6-dev
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing packages ${missing[*]} and not root: install them first" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
stamp=.venv/.hybridft-setup
# the stamp covers what the install builds: the project metadata and the compiled fast path
want=$(cat pyproject.toml setup.py hybridft_common/_speedups.c | sha256sum | cut -d' ' -f1)
if [[ ! -x .venv/bin/python ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  echo "$want" >"$stamp"
fi
# the editable install builds hybridft_common/_speedups*.so in place; without it the data plane runs
# the (slower) pure-Python reference, so say so loudly
.venv/bin/python -c 'import hybridft_common._speedups' 2>/dev/null \
  || echo "setup: warning: the compiled fast path did not build (gcc, python3-dev?)" >&2

# libnbd's Python binding comes from Debian (python3-libnbd), built for the system CPython 3.11;
# link it into the venv so tests use the real libnbd client.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for f in /usr/lib/python3/dist-packages/nbd.py /usr/lib/python3/dist-packages/libnbdmod.cpython-*.so; do
  [[ -e "$f" ]] && ln -sf "$f" "$site/$(basename "$f")"
done
.venv/bin/python -c 'import nbd' 2>/dev/null || echo "setup: warning: libnbd Python binding not importable in .venv" >&2

# The patched QEMU 7.2 (issue "Exact COLO checkpoints without usable KVM") and the guest image:
# both cached outside the repo and rebuilt only when their inputs change.
if [[ -f mc_driver/qemu_build.py ]]; then .venv/bin/hybridft qemu build; fi
if [[ -f mc_driver/guest/image.py ]]; then .venv/bin/hybridft guest build; fi

echo "setup: host ready ($(qemu-system-x86_64 --version | head -1))"
