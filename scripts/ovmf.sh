#!/usr/bin/env bash
# Builds the two confidential-guest firmware images from Debian's edk2 source package, pinned:
#
#   ovmf.sh [build]        target/ovmf/OVMF.amdsev.fd (OvmfPkg/AmdSev: SEV-SNP with the kernel
#                          hashes table, for measured direct boot) and target/ovmf/OVMF.inteltdx.fd
#                          (OvmfPkg/IntelTdx: TDVF), SHA256SUMS and VERSION. Built once per
#                          source version and recipe into the cache, copied from there after.
#   ovmf.sh reproducible   build both twice from freshly unpacked trees and compare byte for
#                          byte; a difference is named (image, byte ranges and firmware volume,
#                          intermediate FV files, modules) and fails.
#
# The source comes from trixie's deb-src index (a deb-src-only sources file, so no binary package
# changes), downloaded with apt-get source (apt checks each file against the signed index) and
# checked again against the SHA-256 pinned below; dpkg-source unpacks it and applies Debian's
# patches. Build dependencies are installed here, a short explicit list (not apt-get build-dep,
# which brings the cross compilers of the other architectures).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache="${CVM_CACHE:-$root/.cache}"
ovmf_cache="$cache/ovmf"
out="$root/target/ovmf"

# The pinned source: edk2 upstream tag edk2-stable202502 with Debian's patches (trixie).
version="2025.02-8+deb13u1"
upstream_tag="edk2-stable202502"
suite=trixie
# SHA-256 of the two files the source package is made of, as trixie's Sources index lists them.
declare -A pinned_sha256=(
  [edk2_2025.02.orig.tar.xz]=b63b6053d6d89c74d9291f9e96fde1584be99e6fb9c169ba9511505129d6b049
  [edk2_2025.02-8+deb13u1.debian.tar.xz]=e2a7f6fc58640818416a028d6d5e9dfc255697a7cdc60c14566c236df6bd9b08
)
sources_file=/etc/apt/sources.list.d/cvm-init-trixie-src.sources

# Every build, normal or reproducibility check, unpacks the source afresh into this one
# directory and moves its results out. The path is part of the output: GenFw leaves, in each
# module, a zero-filled tail whose size grows with the length of the build path, so trees at
# paths of different lengths give different images (seen: .cache/ovmf/build vs a longer
# CVM_CACHE). A constant path, not under the checkout or CVM_CACHE, gives the same images
# wherever the project is.
build_root=/var/tmp/cvm-init-ovmf
tree="$build_root/edk2-${version%%-*}"

build_packages=(
  build-essential  # gcc, g++ (BaseTools' VfrCompile), make
  uuid-dev         # BaseTools' GenFv and friends
  nasm             # the reset vector and the assembly sources
  acpica-tools     # iasl, the ACPI tables
  python3          # BaseTools' build, GenFds, AutoGen
  dpkg-dev         # dpkg-source (unpacks and patches), dpkg-parsechangelog
  xz-utils         # the source tarballs
)

# The two platforms, name:description file; each gives target/ovmf/OVMF.<name>.fd.
platforms=(amdsev:OvmfPkg/AmdSev/AmdSevX64.dsc inteltdx:OvmfPkg/IntelTdx/IntelTdxX64.dsc)

die() { echo "ovmf: $*" >&2; exit 1; }
say() { echo "ovmf: $*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# -- build dependencies and the pinned source -----------------------------------------------------

deps() {
  local missing=() p
  for p in "${build_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing build dependencies: ${missing[*]}"
    mkdir -p "$ovmf_cache"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
      >"$ovmf_cache/apt.log" 2>&1 \
      || { cat "$ovmf_cache/apt.log" >&2; die "apt-get install ${missing[*]} failed (log: $ovmf_cache/apt.log)"; }
  fi
}

# The Debian source versions of edk2 the configured deb-src indexes offer.
source_versions() { apt-cache showsrc --only-source edk2 2>/dev/null | awk '/^Version:/ { print $2 }'; }

ensure_source_index() {
  if [ ! -f "$sources_file" ]; then
    say "adding $suite's source index ($sources_file, deb-src only)"
    as_root tee "$sources_file" >/dev/null <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  if ! source_versions | grep -qxF "$version"; then
    say "apt-get update"
    as_root apt-get update -qq || die "apt-get update failed"
  fi
  if ! source_versions | grep -qxF "$version"; then
    local have
    have=$(source_versions | sort -u | paste -sd " ")
    die "edk2 $version (pinned) is not in the source indexes; available: ${have:-none} (update \`version\` and the SHA-256 in $0)"
  fi
}

# The Sources index stanza of the pinned version.
source_stanza() {
  apt-cache showsrc --only-source edk2 \
    | awk -v v="$version" 'BEGIN { RS = "" } index($0 "\n", "\nVersion: " v "\n") { print; exit }'
}

src_dir="$ovmf_cache/src/$version"
dsc="$src_dir/edk2_$version.dsc"

verify_pinned() {
  local f
  for f in "${!pinned_sha256[@]}"; do
    [ -f "$src_dir/$f" ] || return 1
    echo "${pinned_sha256[$f]}  $src_dir/$f" | sha256sum -c --status || return 1
  done
}

fetch_source() {
  if [ -f "$dsc" ] && verify_pinned; then
    return
  fi
  ensure_source_index
  say "downloading the edk2 $version source package"
  local tmp f
  tmp=$(mktemp -d)
  chmod 755 "$tmp"
  # apt's download sandbox user writes there.
  if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi
  local log="$ovmf_cache/apt-source.log" other
  mkdir -p "$ovmf_cache"
  # apt verifies each file it fetches against the signed index (a mismatch is not kept).
  if ! (cd "$tmp" && apt-get source -q --download-only "edk2=$version") >"$log" 2>&1; then
    # The mirror here serves the tarballs but answers 404 for this package's .dsc; the tarballs
    # are enough: their hashes are in the signed index (and pinned above), and the .dsc's fields
    # are the index stanza's. Any other failure stops the build.
    other=$(grep '^E: ' "$log" | grep -v -e "edk2_${version//+/%2b}\.dsc" -e 'Failed to fetch some archives' || true)
    if [ -z "$other" ] && grep -q "^E: .*edk2_${version//+/%2b}\.dsc" "$log" && [ ! -f "$tmp/edk2_$version.dsc" ]; then
      say "the mirror does not serve edk2_$version.dsc; unpacking from the verified tarballs with a .dsc made from the signed Sources index"
      source_stanza | sed -e 's/^Package:/Source:/' \
        | awk '/^(Files|Checksums-[A-Za-z0-9]+):/ { print; infiles = 1; next }
               infiles && /^ / { if ($3 !~ /\.dsc$/) print; next }
               { infiles = 0; print }' > "$tmp/edk2_$version.dsc"
    else
      cat "$log" >&2
      die "apt-get source edk2=$version failed"
    fi
  fi
  for f in "${!pinned_sha256[@]}"; do
    [ -f "$tmp/$f" ] || die "apt-get source did not produce $f"
    echo "${pinned_sha256[$f]}  $tmp/$f" | sha256sum -c --status \
      || die "$f does not have the pinned SHA-256 ${pinned_sha256[$f]}"
  done
  rm -rf "$src_dir"; mkdir -p "$src_dir"
  cp "$tmp"/*.dsc "$tmp"/*.tar.* "$src_dir/"
  rm -rf "$tmp"
  say "source: $(cd "$src_dir" && ls | tr '\n' ' ')"
}

# -- the build --------------------------------------------------------------------------------------

# A fresh tree at the fixed path: unpacked and patched by dpkg-source (it checks the tarballs
# against the .dsc), with the AmdSev grub.efi made empty.
unpack() {
  rm -rf "$tree" || die "cannot remove $tree (another user's build?)"
  mkdir -p "$build_root"
  dpkg-source -q -x "$dsc" "$tree" >"$1/unpack.log" 2>&1 \
    || { cat "$1/unpack.log" >&2; die "dpkg-source -x $dsc failed"; }
  # AmdSevX64.dsc runs OvmfPkg/AmdSev/Grub/grub.sh as a PREBUILD, which builds a grub.efi (with
  # the grub source) for the SEV secret-injection boot path. Measured direct boot does not use it:
  # an empty grub.efi newer than grub.sh/grub.cfg makes the PREBUILD keep it, so none is built
  # (common practice for SNP direct-boot builds). The FFS file it becomes is empty.
  touch "$tree/OvmfPkg/AmdSev/Grub/grub.efi"
}

# The build flags: Debian's debian/rules PCD_FLAGS (vendor, version and release date strings),
# spelled as its shell passes them (`L"...\\0"` in make reaches build as `L...\0`). The rules'
# -D defines (CC_MEASUREMENT_ENABLE, NETWORK_*, TPM2_ENABLE, FD_SIZE_4MB) are for
# OvmfPkgX64.dsc: AmdSevX64.dsc and IntelTdxX64.dsc read none of them (measurement is always on
# there), so they are not passed.
build_flags() {
  local epoch=$1
  printf '%s\n' -a X64 -t GCC5 -b RELEASE \
    --pcd 'PcdFirmwareVendor=LDebian distribution of EDK II\0' \
    --pcd "PcdFirmwareVersionString=L$version\\0" \
    --pcd "PcdFirmwareReleaseDateString=L$(date -u -d "@$epoch" +%m/%d/%Y)\\0"
}

# Builds both images in a fresh tree; results (images, the intermediate FV files and modules,
# logs) go to $1.
build_once() {
  local dest=$1 epoch start t p name dsc_file flags
  rm -rf "$dest"; mkdir -p "$dest"
  unpack "$dest"
  epoch=$(dpkg-parsechangelog -l "$tree/debian/changelog" -STimestamp)
  mapfile -t flags < <(build_flags "$epoch")
  # The environment of debian/rules, plus a fixed Python hash seed and locale for the build tools.
  export SOURCE_DATE_EPOCH=$epoch PYTHON3_ENABLE=TRUE PYTHONHASHSEED=0 LC_ALL=C.UTF-8 TZ=UTC
  unset ELF_PACKAGE_METADATA WORKSPACE EDK_TOOLS_PATH CONF_PATH PACKAGES_PATH
  start=$(date +%s)
  say "BaseTools (make -C BaseTools ARCH=X64; log $dest/basetools.log)"
  (cd "$tree" && set -- && set +eu && . ./edksetup.sh >/dev/null && set -e && make -C BaseTools ARCH=X64) \
    >"$dest/basetools.log" 2>&1 || { tail -n 30 "$dest/basetools.log" >&2; die "BaseTools build failed (log: $dest/basetools.log)"; }
  say "BaseTools built in $(($(date +%s) - start))s"
  for p in "${platforms[@]}"; do
    name=${p%%:*} dsc_file=${p#*:}
    t=$(date +%s)
    say "$name: build -p $dsc_file ${flags[*]} -n $(nproc) (log $dest/$name.log)"
    (cd "$tree" && set -- && set +eu && . ./edksetup.sh >/dev/null && set -e && command build -p "$dsc_file" "${flags[@]}" -n "$(nproc)") \
      >"$dest/$name.log" 2>&1 || { tail -n 30 "$dest/$name.log" >&2; die "$name: build -p $dsc_file failed (log: $dest/$name.log)"; }
    local bdir
    bdir=$(awk -F= '/OUTPUT_DIRECTORY/ { gsub(/[ \t\r]/, "", $2); print $2; exit }' "$tree/$dsc_file")/RELEASE_GCC5
    [ -f "$tree/$bdir/FV/OVMF.fd" ] || die "$name: no $bdir/FV/OVMF.fd after the build"
    cp "$tree/$bdir/FV/OVMF.fd" "$dest/OVMF.$name.fd"
    # What the comparison names when two builds differ: the FV files and every module.
    mkdir -p "$dest/parts/$name/FV" "$dest/parts/$name/modules"
    cp "$tree/$bdir"/FV/*.Fv "$dest/parts/$name/FV/"
    (cd "$tree/$bdir/X64" && find . -maxdepth 1 -name '*.efi' -exec cp {} "$dest/parts/$name/modules/" \;)
    # FV name GUID -> FV name, from the platform's flash description.
    awk '{ sub(/\r$/, "") } /^\[FV\./ { n = $0; gsub(/^\[FV\.|\].*$/, "", n) } /^FvNameGuid/ { print toupper($3), n }' \
      "$tree/${dsc_file%.dsc}.fdf" > "$dest/parts/$name/fv-names"
    say "$name: built in $(($(date +%s) - t))s, $(stat -c %s "$dest/OVMF.$name.fd") bytes"
  done
  toolchain > "$dest/toolchain"
  say "both images built in $(($(date +%s) - start))s with $(tr '\n' ',' < "$dest/toolchain" | sed 's/,$//; s/,/, /g')"
  # dpkg-source leaves a copy of the upstream tarball beside the tree.
  rm -rf "$tree" "$build_root"/edk2_*.orig.tar.*
}

# One build at a time in the shared build directory (other checkouts use it too).
lock() {
  exec 9>"$build_root.lock" || die "cannot open $build_root.lock"
  flock 9
}

# The compilers and tools the images depend on (versions of the installed packages).
toolchain() {
  local c
  for c in gcc g++; do command -v "$c" >/dev/null && "$c" --version | head -n 1; done
  dpkg-query -W -f='${Package} ${Version}\n' binutils nasm acpica-tools python3 uuid-dev 2>/dev/null || true
}

# The recipe a cached result was built with: a cache entry is used only when it matches.
recipe() {
  { echo "$version"; build_flags 0; printf '%s\n' "${platforms[@]}" "$tree"; toolchain; } | sha256sum | cut -c1-64
}

build_images() {
  local vcache="$ovmf_cache/$version"
  if [ -f "$vcache/OVMF.amdsev.fd" ] && [ -f "$vcache/OVMF.inteltdx.fd" ] \
      && [ "$(cat "$vcache/recipe" 2>/dev/null)" = "$(recipe)" ]; then
    say "edk2 $version: cached in $vcache, not rebuilding"
  else
    deps
    fetch_source
    lock
    say "building edk2 $version ($upstream_tag + Debian's patches) in $tree"
    build_once "$ovmf_cache/$version.tmp"
    rm -rf "$vcache"; mv "$ovmf_cache/$version.tmp" "$vcache"
    recipe > "$vcache/recipe"
  fi
  install_outputs "$vcache"
}

install_outputs() {
  local from=$1
  mkdir -p "$out"
  cp "$from/OVMF.amdsev.fd" "$from/OVMF.inteltdx.fd" "$out/"
  echo "$version" > "$out/VERSION"
  (cd "$out" && sha256sum OVMF.amdsev.fd OVMF.inteltdx.fd > SHA256SUMS)
  sed 's/^/ovmf:   /' "$out/SHA256SUMS"
  say "images in $out (edk2 $version)"
}

# -- reproducibility -----------------------------------------------------------------------------

# Names where two images differ: byte ranges (at most 8) and the top-level firmware volume each
# falls in.
describe_diff() {
  python3 - "$@" <<'PY'
import struct, sys, uuid
a, b, names_file = sys.argv[1], sys.argv[2], sys.argv[3]
x, y = open(a, 'rb').read(), open(b, 'rb').read()
names = {}
for line in open(names_file):
    if len(line.split()) == 2:
        g, n = line.split()
        names[g.upper()] = n
if len(x) != len(y):
    print(f"    sizes differ: {len(x)} vs {len(y)} bytes")
n = min(len(x), len(y))
ranges, i = [], 0
while i < n:
    if x[i] != y[i]:
        j = i
        while j < n and (x[j] != y[j] or (j + 16 < n and x[j:j + 16] != y[j:j + 16])):
            j += 1
        ranges.append((i, j))
        i = j
    else:
        i += 1
fvs, off = [], 0
while off + 0x40 <= len(x):
    if x[off + 40:off + 44] == b'_FVH':
        length = struct.unpack_from('<Q', x, off + 32)[0]
        ext = struct.unpack_from('<H', x, off + 52)[0]
        name = '?'
        if ext:
            g = str(uuid.UUID(bytes_le=x[off + ext:off + ext + 16])).upper()
            name = names.get(g, g)
        fvs.append((off, off + length, name))
        off += max(length, 0x1000)
    else:
        off += 0x1000
def where(o):
    for s, e, nm in fvs:
        if s <= o < e:
            return f"FV {nm} at 0x{s:x}-0x{e:x}"
    return "outside any firmware volume"
print(f"    {len(ranges)} differing byte range(s), {sum(e - s for s, e in ranges)} bytes")
for s, e in ranges[:8]:
    print(f"    0x{s:x}-0x{e:x} ({e - s} bytes), in {where(s)}")
PY
}

reproducible() {
  deps
  fetch_source
  lock
  local a="$ovmf_cache/repro-a" b="$ovmf_cache/repro-b" p name bad=0 f t
  t=$(date +%s)
  say "reproducibility: build 1 of 2"
  build_once "$a"
  say "reproducibility: build 2 of 2"
  build_once "$b"
  for p in "${platforms[@]}"; do
    name=${p%%:*}
    if cmp -s "$a/OVMF.$name.fd" "$b/OVMF.$name.fd"; then
      say "$name: identical ($(sha256sum "$a/OVMF.$name.fd" | cut -c1-64))"
      continue
    fi
    bad=1
    echo "ovmf: $name: OVMF.$name.fd differs between the two builds:" >&2
    describe_diff "$a/OVMF.$name.fd" "$b/OVMF.$name.fd" "$a/parts/$name/fv-names" >&2
    for f in $(cd "$a/parts/$name" && ls FV/* modules/*); do
      cmp -s "$a/parts/$name/$f" "$b/parts/$name/$f" || echo "ovmf:   $name: $f differs" >&2
    done
  done
  [ "$bad" = 0 ] || die "the two builds differ (kept in $a and $b)"
  say "the two builds are bit-identical ($(($(date +%s) - t))s for both)"
  # A cached result of the same recipe must be the same too; if there is none, this is it.
  local vcache="$ovmf_cache/$version"
  if [ -f "$vcache/OVMF.amdsev.fd" ] && [ "$(cat "$vcache/recipe" 2>/dev/null)" = "$(recipe)" ]; then
    for p in "${platforms[@]}"; do
      name=${p%%:*}
      cmp -s "$a/OVMF.$name.fd" "$vcache/OVMF.$name.fd" \
        || die "$name: the cached $vcache/OVMF.$name.fd differs from this build (remove $vcache and rebuild)"
    done
    say "the cached images in $vcache are the same"
    rm -rf "$a"
  else
    rm -rf "$vcache"; mv "$a" "$vcache"; recipe > "$vcache/recipe"
  fi
  rm -rf "$b"
  install_outputs "$vcache"
}

case "${1:-build}" in
  build) build_images ;;
  reproducible) reproducible ;;
  *) echo "usage: $0 [build] | reproducible" >&2; exit 2 ;;
esac
