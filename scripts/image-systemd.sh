#!/usr/bin/env bash
# Builds the systemd comparison image of `make bench` with mkosi 25 in the trixie environment
# of scripts/image-env.sh: the node image's packages and kernel, booted by mkosi's default
# initrd and systemd as PID 1 (image/systemd/mkosi.conf says what and why).
#
#   image-systemd.sh build [OUT]   the image (default target/image/systemd-out), every package
#                                  pinned: image/packages.lock (the node's) and
#                                  image/systemd/packages.lock (what only this image installs:
#                                  mkosi's default initrd)
#   image-systemd.sh lock          build with only the node's pins, into a package cache of its
#                                  own, and write image/systemd/packages.lock from every other
#                                  package it downloaded
#
# Pins are apt preferences (priority 1001 for the locked version of each package), which reach
# mkosi's default initrd too: its build shares the sandbox's apt configuration.
set -euo pipefail

prog=image-systemd
# shellcheck source=scripts/image-lib.sh
. "$(dirname "$0")/image-lib.sh"
node_lock="$root/image/packages.lock"
lock="$root/image/systemd/packages.lock"

# Apt preferences pinning every package of the lock files given to its locked version.
pins() {
  awk '!/^#/ && NF { printf "Package: %s\nPin: version %s\nPin-Priority: 1001\n\n", $1, $2 }' "$@"
}

# The mkosi directory in $work/systemd-config. $1 = the package cache, $2... = lock files.
assemble() {
  local cache=$1 cfg="$work/systemd-config"; shift
  rm -rf "$cfg"; mkdir -p "$cfg" "$cache"
  cp -r "$root/image/systemd/mkosi.conf" "$root/image/systemd/mkosi.repart" "$cfg/"
  # The node's own files (containerd's configuration, hosts, resolv.conf), then this image's
  # (fstab, the marker unit).
  mkdir -p "$cfg/extra/var/lib/containerd"
  cp -r "$root/image/extra/." "$cfg/extra/"
  cp -r "$root/image/systemd/extra/." "$cfg/extra/"
  mkdir -p "$cfg/mkosi.sandbox/etc/apt/sources.list.d" "$cfg/mkosi.sandbox/etc/apt/preferences.d"
  write_sources "$cfg"
  pins "$@" > "$cfg/mkosi.sandbox/etc/apt/preferences.d/locked.pref"
  local packages=()
  mapfile -t packages < <(sed -e 's/#.*//' -e '/^\s*$/d' -e 's/\s//g' "$root/image/packages.list")
  mkdir -p "$cfg/mkosi.conf.d"
  {
    echo "[Build]"
    echo "PackageCacheDirectory=$(in_env "$cache")"
    echo "[Content]"
    echo "Packages=$(IFS=,; echo "${packages[*]}")"
  } > "$cfg/mkosi.conf.d/90-build.conf"
}

mkosi_build() {
  local out=$1
  rm -rf "$out"; mkdir -p "$out"
  inside mkosi -C "$(in_env "$work/systemd-config")" --output-directory="$(in_env "$out")" -f build \
    > "$out.log" 2>&1 || { tail -30 "$out.log" >&2; die "mkosi failed (whole log: $out.log)"; }
}

# name version architecture sha256 of every .deb under $1.
debs() {
  python3 - "$1" <<'PY'
import hashlib, os, subprocess, sys
rows = []
for base, _, files in os.walk(sys.argv[1]):
    for f in files:
        if f.endswith(".deb"):
            path = os.path.join(base, f)
            fields = subprocess.run(["dpkg-deb", "-W", "--showformat=${Package} ${Version} ${Architecture}", path],
                                    check=True, capture_output=True, text=True).stdout.split()
            rows.append(fields + [hashlib.sha256(open(path, "rb").read()).hexdigest()])
for row in sorted(rows):
    print(*row)
PY
}

# The root's packages (mkosi's manifest) at the versions the locks say, or fail naming them.
check_root() {
  local out=$1 wrong
  wrong=$(python3 - "$out/systemd-compare.manifest" "$node_lock" "$lock" <<'PY'
import json, sys
locked = {}
for path in sys.argv[2:]:
    for line in open(path):
        if line.strip() and not line.startswith("#"):
            name, version = line.split()[:2]
            locked[name] = version
for p in json.load(open(sys.argv[1]))["packages"]:
    if locked.get(p["name"]) != p["version"]:
        print(f'{p["name"]} {p["version"]} (locked: {locked.get(p["name"], "not locked")})')
PY
)
  [ -z "$wrong" ] || { echo "$wrong" | sed 's/^/image-systemd:   /' >&2; die "installed packages differ from the locks: run \`bash scripts/image-systemd.sh lock\`"; }
}

build() {
  local out=${1:-$work/systemd-out} start
  start=$(date +%s)
  [ -f "$node_lock" ] || die "no $node_lock: run \`make image-lock\` first"
  [ -f "$lock" ] || die "no $lock: run \`bash scripts/image-systemd.sh lock\` first"
  "$env_sh" create
  assemble "$pkg_cache" "$node_lock" "$lock"
  say "building with mkosi ($(inside mkosi --version)); log in $out.log"
  mkosi_build "$out"
  check_root "$out"
  objcopy -O binary --only-section=.cmdline "$out/systemd-compare.efi" "$out/systemd-compare.cmdline"
  sed -i 's/\x0//g' "$out/systemd-compare.cmdline"
  say "outputs in $out: systemd-compare.raw $(stat -c %s "$out/systemd-compare.raw") bytes, UKI $(stat -c %s "$out/systemd-compare.efi") bytes"
  say "command line: $(cat "$out/systemd-compare.cmdline")"
  say "built in $(( $(date +%s) - start )) s"
}

lock() {
  local cache="$work/systemd-lock-packages"
  [ -f "$node_lock" ] || die "no $node_lock: run \`make image-lock\` first"
  "$env_sh" create
  rm -rf "$cache"
  assemble "$cache" "$node_lock"
  say "building with the node's pins only; log in $work/systemd-lock-out.log"
  mkosi_build "$work/systemd-lock-out"
  {
    echo "# What only the systemd comparison image installs (mkosi's default initrd), beyond"
    echo "# image/packages.lock: name, version, architecture, sha256 of the .deb."
    echo "# Written by \`bash scripts/image-systemd.sh lock\`; \`make image-systemd\` pins these."
    debs "$cache" | awk 'NR == FNR { if (!/^#/ && NF) node[$1] = 1; next } !($1 in node)' "$node_lock" -
  } > "$lock"
  say "$lock: $(grep -vc '^#' "$lock") packages"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  lock) lock ;;
  *) echo "usage: $0 build [OUT] | lock" >&2; exit 2 ;;
esac
