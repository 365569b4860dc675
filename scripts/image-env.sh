#!/usr/bin/env bash
# The build environment of `make image`: Debian trixie with mkosi 25, debootstrapped once into
# .cache/image-env (bookworm's own mkosi and systemd-repart are too old to build the image
# reproducibly). Idempotent: a ready environment is left as it is. Runs commands inside it
# with `image-env.sh run CMD...` (a private mount namespace: nothing stays mounted).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
env_dir="${CVM_IMAGE_ENV:-$root/.cache/image-env}"
# The packages mkosi needs in the environment (it brings systemd-repart, ukify, mtools,
# dosfstools, erofs-utils); reprepro serves local .debs (a kubelet package), qemu-utils makes
# the cloud formats.
env_packages=(mkosi reprepro qemu-utils ca-certificates)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# The Debian archive as the host's apt sources name it (the environment must use the same).
host_mirror() {
  local uri
  uri=$(grep -hE '^\s*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$uri" ] || uri=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

host_security_mirror() {
  local uri
  uri=$(grep -hE '^\s*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep security | head -1 || true)
  echo "${uri:-http://deb.debian.org/debian-security}"
}

# Runs a command inside the environment with /dev, /proc, /sys and the project mounted; the
# environment's root is bind-mounted onto itself so that mkosi's sandbox finds a mount point.
run_inside() {
  as_root unshare -m --propagation private sh -c '
    set -e
    env="$1"; project="$2"; shift 2
    mount --rbind "$env" "$env"
    mount --rbind /dev "$env/dev"
    mount -t proc proc "$env/proc"
    mount -t sysfs sysfs "$env/sys"
    mkdir -p "$env/build/src"
    mount --bind "$project" "$env/build/src"
    exec chroot "$env" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
      SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-}" "$@"
  ' sh "$env_dir" "$root" "$@"
}

create() {
  if [ -f "$env_dir/.ready" ]; then
    return 0
  fi
  if ! command -v debootstrap >/dev/null; then
    echo "image-env: installing debootstrap"
    as_root apt-get install -y -qq debootstrap >/dev/null
  fi
  local mirror start
  mirror=$(host_mirror)
  start=$(date +%s)
  echo "image-env: debootstrapping Debian trixie from $mirror into $env_dir (once; about 1 min)"
  as_root rm -rf "$env_dir"
  as_root debootstrap --variant=minbase trixie "$env_dir" "$mirror" >"$root/.cache/image-env.log" 2>&1 \
    || { echo "image-env: debootstrap failed, see .cache/image-env.log" >&2; exit 1; }
  as_root tee "$env_dir/etc/apt/sources.list.d/debian.sources" >/dev/null <<SRC
Types: deb
URIs: $mirror
Suites: trixie trixie-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $(host_security_mirror)
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  as_root rm -f "$env_dir/etc/apt/sources.list"
  as_root cp /etc/resolv.conf "$env_dir/etc/resolv.conf" 2>/dev/null || true
  echo "image-env: installing ${env_packages[*]}"
  run_inside apt-get update -qq >>"$root/.cache/image-env.log" 2>&1
  run_inside env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${env_packages[@]}" \
    >>"$root/.cache/image-env.log" 2>&1 \
    || { echo "image-env: installing mkosi failed, see .cache/image-env.log" >&2; exit 1; }
  as_root touch "$env_dir/.ready"
  echo "image-env: ready in $(( $(date +%s) - start )) s: $(run_inside mkosi --version)"
}

case "${1:-create}" in
  create) create ;;
  run) shift; create; run_inside "$@" ;;
  mirror) host_mirror ;;
  security-mirror) host_security_mirror ;;
  *) echo "usage: $0 [create | run CMD... | mirror | security-mirror]" >&2; exit 2 ;;
esac
