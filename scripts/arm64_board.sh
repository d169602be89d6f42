#!/usr/bin/env bash
# An emulated arm64 Linux board on this machine, reached over ssh: scripts/arm64_board.sh start|stop|status
#
# A Debian bookworm arm64 root filesystem (debootstrap, Debian's packages only) run through qemu-user-static
# and binfmt_misc, with Python 3, numpy, ai-edge-litert and onnxruntime (aarch64 wheels from the package
# registry) and, in /opt/tflite-runtime, tflite-runtime with numpy<2 (its wheels need numpy 1.x). OpenSSH's
# sshd runs inside it on a loopback port with a throwaway key. `start` and `status` print the device URL as
# their last line:
#
#     ssh://root@127.0.0.1:PORT?key=BOARD/id_ed25519&known_hosts=BOARD/known_hosts
#
# which `edgeprune bench MODEL --device URL` and `--set benchmark.device=URL` take as it is.
#
# The root filesystem is cached in $EDGEPRUNE_BOARD_DIR (default ~/.cache/edgeprune/arm64-board): the first
# start builds it (about 7-9 minutes, ~500 MB), later starts take seconds. Needs root (chroot, mounts,
# binfmt_misc); installs qemu-user-static, debootstrap and binfmt-support with apt-get when they are missing.
# Exit status: 0 started / running, 1 failed, 3 (status) not running, 4 this machine cannot run a board (no root,
# no binfmt_misc): the message says which.
#
# The emulated CPU is a Cortex-A76 (a Raspberry Pi 5; EDGEPRUNE_BOARD_CPU=cortex-a72 for a Pi 4). qemu's default
# CPU ("max") advertises SVE and i8mm, on which XNNPACK's int8 kernels give wrong outputs under qemu 7.2, so
# QEMU_CPU is set for sshd and, through /etc/environment and sshd's SetEnv, for every ssh session. An aarch64
# /proc/cpuinfo describing that CPU is bound over the host's: onnxruntime's CPU detection crashes on an x86 one.
#
# Timings on this board are emulated (25-300x slower than the host) and say nothing about a real board's speed;
# edgeprune's runner detects the emulation and marks them so.
set -euo pipefail

BOARD_DIR=${EDGEPRUNE_BOARD_DIR:-$HOME/.cache/edgeprune/arm64-board}
PORT=${EDGEPRUNE_BOARD_PORT:-22064}
CPU=${EDGEPRUNE_BOARD_CPU:-cortex-a76}
SUITE=bookworm
ROOT=$BOARD_DIR/rootfs
PARTIAL=$BOARD_DIR/rootfs.partial
READY=.edgeprune-board-ready
PIDFILE=$BOARD_DIR/sshd.pid
KEY=$BOARD_DIR/id_ed25519
KNOWN_HOSTS=$BOARD_DIR/known_hosts
BOARD_PACKAGES=(numpy ai-edge-litert onnxruntime)
TFLITE_RUNTIME_PACKAGES=("numpy<2" tflite-runtime)

say() { echo "arm64-board: $*" >&2; }
die() {
  say "$*"
  exit 1
}
# This machine cannot run a board at all (exit 4: .ci/run then skips the board's tests with this reason).
unsupported() {
  say "this machine cannot run the board: $*"
  exit 4
}

device_url() { echo "ssh://root@127.0.0.1:$PORT?key=$KEY&known_hosts=$KNOWN_HOSTS"; }

# ------------------------------------------------------------------------------------------------ host setup

need_root() { [ "$(id -u)" -eq 0 ] || unsupported "needs root (chroot, mounts and binfmt_misc): run it with sudo"; }

host_tools() {
  if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    say "installing qemu-user-static, debootstrap and binfmt-support (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap binfmt-support >&2 ||
      die "apt-get install qemu-user-static debootstrap binfmt-support failed"
  fi
}

# qemu-aarch64 registered with binfmt_misc, with the F flag (the interpreter opened at registration, so it
# runs inside the chroot, which has no qemu binary of its own).
binfmt_ready() {
  local entry=/proc/sys/fs/binfmt_misc/qemu-aarch64
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null ||
      unsupported "cannot mount binfmt_misc at /proc/sys/fs/binfmt_misc (a container without it cannot run arm64 programs)"
  fi
  if [ ! -e "$entry" ]; then
    update-binfmts --enable qemu-aarch64 >&2 || true
  fi
  grep -q '^enabled' "$entry" 2>/dev/null || unsupported "qemu-aarch64 is not registered with binfmt_misc (update-binfmts --enable qemu-aarch64)"
  grep -q '^flags:.*F' "$entry" || die "qemu-aarch64's binfmt_misc entry lacks the F flag; reinstall qemu-user-static"
}

debian_mirror() {
  local uris
  uris=$(grep -h -m1 -E '^URIs:' /etc/apt/sources.list.d/debian.sources 2>/dev/null | awk '{print $2}' || true)
  echo "${EDGEPRUNE_BOARD_MIRROR:-${uris:-http://deb.debian.org/debian}}"
}

# ------------------------------------------------------------------------------------------------ mounts

mounted() { mountpoint -q "$1"; }

mount_board() {
  local root=$1
  mounted "$root/proc" || mount -t proc proc "$root/proc"
  mounted "$root/sys" || mount --bind /sys "$root/sys"
  mounted "$root/dev" || mount --bind /dev "$root/dev"
  mounted "$root/dev/pts" || mount --bind /dev/pts "$root/dev/pts"
  cpuinfo "$CPU" "$(nproc)" >"$BOARD_DIR/cpuinfo"
  mounted "$root/proc/cpuinfo" || mount --bind "$BOARD_DIR/cpuinfo" "$root/proc/cpuinfo"
}

unmount_board() {
  local root=$1 point
  for point in proc/cpuinfo proc sys dev/pts dev; do
    if mounted "$root/$point"; then
      umount "$root/$point" 2>/dev/null || umount -l "$root/$point"
    fi
  done
}

# An aarch64 /proc/cpuinfo for COUNT cores of the emulated CPU (what the kernel of such a board prints).
cpuinfo() {
  local cpu=$1 count=$2 part features index
  features="fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
  case $cpu in
  cortex-a76) part=0xd0b features="$features atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp" ;;
  cortex-a72) part=0xd08 ;;
  cortex-a57) part=0xd07 ;;
  cortex-a53) part=0xd03 ;;
  *) die "EDGEPRUNE_BOARD_CPU=$cpu: use cortex-a76, cortex-a72, cortex-a57 or cortex-a53" ;;
  esac
  for ((index = 0; index < count; index++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$index" "$features"
    printf 'CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: %s\nCPU revision\t: 1\n\n' "$part"
  done
}

in_board() { chroot "$1" /usr/bin/env -i QEMU_CPU="$CPU" HOME=/root PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin LANG=C.UTF-8 \
  ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} ${no_proxy:+no_proxy=$no_proxy} "${@:2}"; }

# ------------------------------------------------------------------------------------------------ root filesystem

build_rootfs() {
  local started=$SECONDS
  if [ ! -e "$PARTIAL/.debootstrap-done" ]; then
    rm -rf "$PARTIAL"
    say "debootstrap $SUITE arm64 from $(debian_mirror) into $PARTIAL (several minutes)"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,openssh-server,ca-certificates \
      "$SUITE" "$PARTIAL" "$(debian_mirror)" >"$BOARD_DIR/debootstrap.log" 2>&1 ||
      die "debootstrap failed; see $BOARD_DIR/debootstrap.log"
    touch "$PARTIAL/.debootstrap-done"
  fi
  carry_host_settings "$PARTIAL"
  mount_board "$PARTIAL"
  trap 'unmount_board "$PARTIAL"' EXIT
  say "installing ${BOARD_PACKAGES[*]} (and ${TFLITE_RUNTIME_PACKAGES[*]} in /opt/tflite-runtime) with pip"
  in_board "$PARTIAL" update-ca-certificates >/dev/null
  in_board "$PARTIAL" python3 -m pip install -q --break-system-packages "${BOARD_PACKAGES[@]}" >"$BOARD_DIR/pip.log" 2>&1 ||
    die "pip install ${BOARD_PACKAGES[*]} inside the board failed: $(tail -1 "$BOARD_DIR/pip.log") (see $BOARD_DIR/pip.log)"
  in_board "$PARTIAL" python3 -m venv /opt/tflite-runtime
  in_board "$PARTIAL" /opt/tflite-runtime/bin/python -m pip install -q "${TFLITE_RUNTIME_PACKAGES[@]}" >>"$BOARD_DIR/pip.log" 2>&1 ||
    die "pip install ${TFLITE_RUNTIME_PACKAGES[*]} inside the board failed: $(tail -1 "$BOARD_DIR/pip.log") (see $BOARD_DIR/pip.log)"
  unmount_board "$PARTIAL"
  trap - EXIT
  touch "$PARTIAL/$READY"
  mv "$PARTIAL" "$ROOT"
  say "root filesystem ready in $((SECONDS - started)) s ($(du -sh "$ROOT" | cut -f1))"
}

# What a machine behind this host's proxy needs to reach the package registry: the host's pip configuration
# and trusted CA certificates; and the emulated CPU for every ssh session.
carry_host_settings() {
  local root=$1 file
  for file in /etc/pip.conf /etc/xdg/pip/pip.conf /etc/xdg/pip/constraints.txt "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
    if [ -f "$file" ]; then
      local inside=$root/${file/#$HOME//root}
      mkdir -p "$(dirname "$inside")"
      cp "$file" "$inside"
    fi
  done
  if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
    cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
  fi
  grep -q '^QEMU_CPU=' "$root/etc/environment" 2>/dev/null || echo "QEMU_CPU=$CPU" >>"$root/etc/environment"
  sed -i "s/^QEMU_CPU=.*/QEMU_CPU=$CPU/" "$root/etc/environment"
}

# ------------------------------------------------------------------------------------------------ sshd

sshd_running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

start_sshd() {
  [ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N '' -C edgeprune-arm64-board -f "$KEY"
  install -d -m 700 "$ROOT/root/.ssh"
  install -m 600 "$KEY.pub" "$ROOT/root/.ssh/authorized_keys"
  install -d -m 755 "$ROOT/run/sshd"
  [ -f "$ROOT/etc/ssh/ssh_host_ed25519_key" ] || in_board "$ROOT" ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
  echo "[127.0.0.1]:$PORT $(cut -d' ' -f1-2 "$ROOT/etc/ssh/ssh_host_ed25519_key.pub")" >"$KNOWN_HOSTS"
  if ss -ltn "sport = :$PORT" | grep -q LISTEN; then
    die "port $PORT is taken by another program: set EDGEPRUNE_BOARD_PORT"
  fi
  in_board "$ROOT" /usr/sbin/sshd -p "$PORT" -o ListenAddress=127.0.0.1 -o PidFile=/run/sshd.board.pid \
    -o HostKey=/etc/ssh/ssh_host_ed25519_key -o PermitRootLogin=prohibit-password -o PasswordAuthentication=no \
    -o UsePAM=no -o "SetEnv=QEMU_CPU=$CPU" -o MaxStartups=100 -o MaxSessions=100 ||
    die "sshd did not start inside the board"
  wait_for_ssh "$ROOT/run/sshd.board.pid"
}

board_ssh() {
  ssh -o BatchMode=yes -o IdentitiesOnly=yes -i "$KEY" -o UserKnownHostsFile="$KNOWN_HOSTS" -o StrictHostKeyChecking=yes \
    -o ConnectTimeout=5 -o LogLevel=ERROR -p "$PORT" root@127.0.0.1 "$@"
}

wait_for_ssh() {
  local pidfile=$1 tries
  for tries in $(seq 1 100); do
    if [ -f "$pidfile" ] && board_ssh true 2>/dev/null; then
      cp "$pidfile" "$PIDFILE"
      return 0
    fi
    sleep 0.2
  done
  die "sshd inside the board does not answer on 127.0.0.1:$PORT"
}

# ------------------------------------------------------------------------------------------------ commands

start() {
  need_root
  mkdir -p "$BOARD_DIR"
  if sshd_running && board_ssh true 2>/dev/null; then
    say "already running"
    device_url
    return 0
  fi
  local started=$SECONDS
  host_tools
  binfmt_ready
  [ -e "$ROOT/$READY" ] || build_rootfs
  mount_board "$ROOT"
  start_sshd
  say "started in $((SECONDS - started)) s: $(board_ssh 'uname -m; python3 --version' | tr '\n' ' ')"
  device_url
}

stop() {
  need_root
  if sshd_running; then
    kill "$(cat "$PIDFILE")"
    for _ in $(seq 1 50); do sshd_running || break; sleep 0.1; done
  fi
  rm -f "$PIDFILE"
  [ -d "$ROOT" ] && unmount_board "$ROOT"
  say "stopped"
}

status() {
  if sshd_running && board_ssh true 2>/dev/null; then
    say "running: $(board_ssh 'uname -m; python3 --version' | tr '\n' ' ')"
    device_url
    return 0
  fi
  say "not running"
  return 3
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*) die "usage: $0 start|stop|status" ;;
esac
