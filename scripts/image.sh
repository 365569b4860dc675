#!/usr/bin/env bash
# Builds the node image with mkosi 25 in the trixie environment of scripts/image-env.sh.
#
#   image.sh build [OUT]       the image (default target/image/out), pinned to image/packages.lock
#   image.sh build-test [OUT]  the same with TEST_TREE's files added (a test image)
#   image.sh lock              build unpinned and write image/packages.lock from what was installed
#   image.sh reproducible      build twice and compare every output byte for byte
#   image.sh measurements OUT  the reference values of a built image, as JSON
#
# Inputs: KUBELET=<kubelet binary or .deb> (else the Kubernetes package repository, when it is
# reachable), CONFIG=<cvm-init configuration> (default image/node.toml), INIT=<static cvm-init>
# (default the release build), CHECK_ON=<snp|tdx|vtpm|bare>: the kind of machine the
# configuration must boot on (`cvm-init check-config --on`; default: at least one),
# TEST_TREE=<directory>: files added to the root of a test image, with `image.sh build-test`
# only (make image-test); every other command refuses it, so that no production build takes
# a test tree from the environment;
# CNI_PLUGINS="<names>": the standard CNI plugins the root keeps (default: loopback bridge
# host-local portmap; image/trim-root.py), PCR_KEY=<PEM private key, RSA-2048 or ECDSA P-256>: sign the expected PCR 11 at the key
# release into the UKI (.pcrsig, and the public key as .pcrpkey) for `state.tpm_policy =
# "signed"` (docs/upgrades.md).
set -euo pipefail

prog=image
# shellcheck source=scripts/image-lib.sh
. "$(dirname "$0")/image-lib.sh"
lock="$root/image/packages.lock"
config_file="${CONFIG:-$root/image/node.toml}"
init_bin="${INIT:-$root/target/x86_64-unknown-linux-musl/release/cvm-init}"
measure_bin="$root/target/x86_64-unknown-linux-musl/release/cvm-measure"
image_tool="$root/target/debug/cvm-image"
# The Kubernetes package repository (minor version 1.32), used when no KUBELET is given.
k8s_repo="https://pkgs.k8s.io/core:/stable:/v1.32/deb/"


# Assembles the mkosi directory in $work/config: image/ as committed, plus what the build
# depends on. $1 = pinned|unpinned.
assemble() {
  local mode=$1 cfg="$work/config"
  rm -rf "$cfg"; mkdir -p "$cfg" "$pkg_cache"
  cp -r "$root/image/mkosi.conf" "$root/image/mkosi.postinst" "$root/image/mkosi.finalize" "$root/image/trim-root.py" "$root/image/mkosi.repart" "$root/image/extra" "$cfg/"
  # Package sources exactly as the build host reaches them, without the debug archive mkosi
  # would add (unreachable here).
  write_sources "$cfg"
  # The root's own files: cvm-init's configuration, the mount points of the state disk.
  [ -f "$config_file" ] || die "CONFIG=$config_file: no such file"
  install -D -m 0644 "$config_file" "$cfg/extra/etc/cvm-init/config.toml"
  for d in var/lib/cvm-state var/lib/containerd var/lib/kubelet var/lib/cni etc/kubernetes var/log etc/cni/net.d opt/cni/bin; do
    mkdir -p "$cfg/extra/$d"
  done
  local packages=()
  mapfile -t packages < <(sed -e 's/#.*//' -e '/^\s*$/d' -e 's/\s//g' "$root/image/packages.list")
  kubelet "$cfg"
  if [ -n "$kubelet_package" ]; then packages+=("$kubelet_package"); fi
  if [ "$mode" = pinned ]; then
    [ -f "$lock" ] || die "no $lock: run \`make image-lock\` first"
    # Every installed package at its locked version (dependencies included): apt then has
    # nothing to choose.
    mapfile -t packages < <(awk '!/^#/ && NF { print $1 "=" $2 }' "$lock")
    if [ -n "$kubelet_package" ] && ! awk '{ print $1 }' "$lock" | grep -qx "$kubelet_package"; then
      die "KUBELET=$KUBELET is a package, but $lock has no $kubelet_package: run \`make image-lock KUBELET=$KUBELET\`"
    fi
  fi
  initramfs "$cfg"
  if [ -n "$test_tree" ]; then
    [ -d "$test_tree" ] || die "TEST_TREE=$test_tree: no such directory"
    cp -r "$test_tree" "$cfg/test-tree"
    say "TEST_TREE: a test image, with the files of $test_tree added to the root: $(cd "$test_tree" && find . -type f | sed 's#^\.##' | sort | tr '\n' ' ')"
  fi
  mkdir -p "$cfg/mkosi.conf.d"
  {
    echo "[Build]"
    echo "PackageCacheDirectory=$(in_env "$pkg_cache")"
    echo "[Content]"
    echo "Initrds=$(in_env "$cfg/initrd.cpio.zst")"
    echo "Packages=$(IFS=,; echo "${packages[*]}")"
    if [ -n "$kubelet_repo_dir" ]; then
      echo "PackageDirectories=$(in_env "$kubelet_repo_dir")"
    fi
    if [ -n "$test_tree" ]; then
      echo "ExtraTrees=$(in_env "$cfg/test-tree")"
    fi
    if [ -n "${CNI_PLUGINS:-}" ]; then
      # mkosi splits Environment= at spaces: trim-root.py takes the names comma-separated.
      echo "[Build]"
      echo "Environment=CNI_PLUGINS=$(echo "$CNI_PLUGINS" | tr -s ' ' ',')"
    fi
  } > "$cfg/mkosi.conf.d/90-build.conf"
  pcr_signing "$cfg"
}

# PCR_KEY: mkosi has ukify sign the expected PCR 11 with it. ukify runs through
# image/tools/ukify, which limits the signature to the key-release point (the node refuses
# signatures for later phases). The key is copied into the build tree (the environment sees
# only the project) with mode 0600 and removed when mkosi is done.
pcr_signing() {
  local cfg=$1 dir="$work/pcr-key"
  [ -n "${PCR_KEY:-}" ] || return 0
  check_pcr_key
  rm -rf "$dir"
  # The copy goes whatever way the script ends (an error, a signal, or after mkosi).
  trap 'rm -rf "$work/pcr-key"' EXIT
  (umask 077; mkdir -p "$dir" && cp "$PCR_KEY" "$dir/key.pem")
  openssl pkey -in "$PCR_KEY" -pubout -out "$dir/public.pem"
  # mkosi validates the key against a certificate; only its public key reaches the UKI
  # (image/tools/ukify), so its dates and serial number change nothing the node measures.
  openssl req -new -x509 -key "$dir/key.pem" -subj "/CN=cvm-init PCR policy" -days 36500 \
    -out "$dir/cert.pem" 2>/dev/null || die "PCR_KEY=$PCR_KEY: cannot make a certificate for mkosi"
  cat >> "$cfg/mkosi.conf.d/90-build.conf" <<CONF
[Build]
ExtraSearchPaths=$(in_env "$root/image/tools")
[Validation]
SignExpectedPcr=yes
SignExpectedPcrKey=$(in_env "$dir/key.pem")
SignExpectedPcrCertificate=$(in_env "$dir/cert.pem")
CONF
  pcr_key_expected=$(pcr_key_id "$dir/public.pem")
  say "PCR policy: signing PCR 11 at the key release with $PCR_KEY ($pcr_key_expected)"
}

# With PCR_KEY the UKI carries the key's public half and a signature: a build where signing
# silently did not happen would ship an image that can never open its disk.
pcr_key_expected=""
check_signed() {
  local pcrpkey="$work/built.pcrpkey"
  [ -n "$pcr_key_expected" ] || return 0
  rm -f "$pcrpkey"
  objcopy -O binary --only-section=.pcrpkey "$1/cvm.efi" "$pcrpkey" 2>/dev/null || true
  objcopy -O binary --only-section=.pcrsig "$1/cvm.efi" "$work/built.pcrsig" 2>/dev/null || true
  [ -s "$pcrpkey" ] && [ -s "$work/built.pcrsig" ] \
    || die "PCR_KEY was given but the UKI has no .pcrpkey or .pcrsig: mkosi did not sign it"
  sed -i 's/\x0//g' "$pcrpkey"
  [ "$(pcr_key_id "$pcrpkey")" = "$pcr_key_expected" ] \
    || die "the UKI's .pcrpkey is not PCR_KEY's public key ($(pcr_key_id "$pcrpkey"), expected $pcr_key_expected)"
}

# PCR_KEY is a key a TPM verifies signatures of, or the build stops before it starts.
check_pcr_key() {
  local text
  [ -f "$PCR_KEY" ] || die "PCR_KEY=$PCR_KEY: no such file"
  text=$(openssl pkey -in "$PCR_KEY" -noout -text 2>/dev/null) \
    || die "PCR_KEY=$PCR_KEY: not a private key in PEM (expected RSA-2048 or ECDSA P-256)"
  case "$text" in
    *"Private-Key: (2048 bit, 2 primes)"*) ;;
    *"ASN1 OID: prime256v1"*) ;;
    *) die "PCR_KEY=$PCR_KEY: $(head -1 <<<"$text"): expected RSA-2048 or ECDSA P-256 (what a TPM verifies)" ;;
  esac
}

# The key's fingerprint as systemd's .pcrsig names it (pkfp): sha256 of the public key as
# i2d_PublicKey writes it (PKCS#1 for RSA, the uncompressed point for P-256).
pcr_key_id() {
  local fp
  if openssl rsa -pubin -in "$1" -noout 2>/dev/null; then
    fp=$(openssl rsa -pubin -in "$1" -RSAPublicKey_out -outform DER 2>/dev/null | openssl dgst -sha256 -r)
  else
    fp=$(openssl pkey -pubin -in "$1" -outform DER | tail -c 65 | openssl dgst -sha256 -r)
  fi
  echo "key fingerprint ${fp:0:64}"
}

kubelet_package=""
kubelet_repo_dir=""
# Where the kubelet comes from, said once: a binary or .deb the builder passed, or the
# Kubernetes package repository.
kubelet() {
  local cfg=$1
  if [ -n "${KUBELET:-}" ]; then
    [ -f "$KUBELET" ] || die "KUBELET=$KUBELET: no such file"
    case "$KUBELET" in
      *.deb)
        kubelet_repo_dir="$work/kubelet-deb"
        rm -rf "$kubelet_repo_dir"; mkdir -p "$kubelet_repo_dir"
        cp "$KUBELET" "$kubelet_repo_dir/"
        kubelet_package=kubelet
        say "kubelet: the package $KUBELET (KUBELET=)"
        ;;
      *)
        install -D -m 0755 "$KUBELET" "$cfg/extra/usr/bin/kubelet"
        say "kubelet: the binary $KUBELET (KUBELET=), sha256 $(sha256sum "$KUBELET" | cut -c1-64)"
        ;;
    esac
    return
  fi
  if curl -fsS --max-time 10 -o "$work/k8s-release.key" "${k8s_repo}Release.key" 2>/dev/null; then
    mkdir -p "$cfg/mkosi.sandbox/etc/apt/keyrings"
    inside gpg --dearmor < "$work/k8s-release.key" > "$cfg/mkosi.sandbox/etc/apt/keyrings/kubernetes.gpg"
    cat > "$cfg/mkosi.sandbox/etc/apt/sources.list.d/kubernetes.sources" <<SRC
Types: deb
URIs: $k8s_repo
Suites: /
Signed-By: /etc/apt/keyrings/kubernetes.gpg
SRC
    kubelet_package=kubelet
    say "kubelet: the Kubernetes package repository $k8s_repo"
    return
  fi
  die "kubelet: the Kubernetes package repository ($k8s_repo) is not reachable from here; pass KUBELET=/path/to/kubelet or KUBELET=/path/to/kubelet.deb"
}

# The initramfs: cvm-init and the modules it loads, from the kernel the image installs (the
# locked linux-image package, downloaded into the package cache and unpacked).
initramfs() {
  local cfg=$1 kpkg kver kdir deb
  [ -x "$init_bin" ] || die "INIT=$init_bin: no static cvm-init (run \`make build\`)"
  [ -x "$image_tool" ] || die "$image_tool missing (\`make image\` builds it)"
  if [ -f "$lock" ]; then
    kpkg=$(awk '$1 ~ /^linux-image-[0-9].*-amd64$/ { print $1 "=" $2; exit }' "$lock")
  fi
  if [ -z "${kpkg:-}" ]; then
    kpkg=$(inside apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
  fi
  [ -n "$kpkg" ] || die "cannot tell which kernel package the image installs"
  kdir="$work/kernel"
  rm -rf "$kdir"; mkdir -p "$kdir/deb" "$kdir/root"
  inside sh -c "cd $(in_env "$kdir/deb") && apt-get download -qq '$kpkg'" \
    || die "cannot download the kernel package $kpkg"
  deb=$(ls "$kdir"/deb/*.deb)
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$kdir/root" --wildcards './boot/vmlinuz-*' '*/modules/*'
  kver=$(ls "$kdir/root/usr/lib/modules")
  depmod -b "$kdir/root/usr" "$kver" 2>/dev/null || depmod -b "$kdir/root" "$kver"
  ln -sfn "root/boot/vmlinuz-$kver" "$kdir/vmlinuz"
  ln -sfn "root/usr/lib/modules/$kver" "$kdir/modules"
  echo "$kver" > "$kdir/ready"
  "$image_tool" initramfs "$kdir" "$init_bin" "$cfg/initrd.cpio.zst" >/dev/null
  # The kernel is in the UKI; the root keeps only the modules the configuration names.
  echo "ExcludeFiles=/usr/lib/modules/$kver/vmlinuz" >> "$cfg/mkosi.repart/10-root.conf"
  say "initramfs: cvm-init $(stat -c %s "$init_bin") bytes + modules of $kver = $(stat -c %s "$cfg/initrd.cpio.zst") bytes as one zstd frame"
}

mkosi_build() {
  local out=$1
  rm -rf "$out"; mkdir -p "$out"
  inside mkosi -C "$(in_env "$work/config")" --output-directory="$(in_env "$out")" -f build \
    > "$out.log" 2>&1 || { rm -rf "$work/pcr-key"; tail -30 "$out.log" >&2; die "mkosi failed (whole log: $out.log)"; }
}

# The installed packages (from mkosi's manifest) with the sha256 of their .deb in the cache.
installed_packages() {
  local out=$1
  python3 - "$out/cvm.manifest" "$pkg_cache" <<'PY'
import hashlib, json, os, sys, urllib.parse
manifest, cache = sys.argv[1], sys.argv[2]
debs = {}
for base, _, files in os.walk(cache):
    for f in files:
        if f.endswith(".deb"):
            debs[urllib.parse.unquote(f)] = os.path.join(base, f)
for p in sorted(json.load(open(manifest))["packages"], key=lambda p: p["name"]):
    # apt keeps the epoch in cache names (as %3a); the archive's names drop it.
    names = [f'{p["name"]}_{v}_{p["architecture"]}.deb' for v in (p["version"], p["version"].split(":", 1)[-1])]
    path = next((debs[n] for n in names if n in debs), None)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if path else "-"
    print(p["name"], p["version"], p["architecture"], digest)
PY
}

# Fails, naming each package, where what was installed is not what the lock says.
check_lock() {
  local out=$1 diff
  diff=$(diff <(awk '!/^#/ && NF' "$lock") <(installed_packages "$out") || true)
  if [ -n "$diff" ]; then
    echo "$diff" | sed 's/^/image:   /' >&2
    die "the installed packages differ from $lock (< locked, > installed); the archive moved on: run \`make image-lock\` to take the new versions"
  fi
}

formats() {
  local out=$1 raw="$1/cvm.raw" size
  # Azure wants a fixed VHD whose size is a multiple of 1 MiB: pad a copy and move the backup
  # GPT header to its new end (the root and its hash are untouched).
  cp --sparse=always "$raw" "$out/cvm-azure.raw"
  size=$(stat -c %s "$raw")
  truncate -s $(( (size + 1048575) / 1048576 * 1048576 )) "$out/cvm-azure.raw"
  sfdisk --relocate gpt-bak-std "$out/cvm-azure.raw" >/dev/null 2>&1
  qemu-img convert -f raw -O vpc -o subformat=fixed,force_size "$out/cvm-azure.raw" "$out/cvm-azure.vhd"
  rm "$out/cvm-azure.raw"
  # qemu-img stamps the VHD footer with the time and a random unique ID: fix both (the time
  # from the build's epoch, the ID from the disk's root hash) and recompute its checksum.
  python3 - "$out/cvm-azure.vhd" "$(roothash "$out" 2>/dev/null || true)" <<'PY'
import hashlib, struct, sys
path, seed = sys.argv[1], sys.argv[2]
with open(path, "r+b") as f:
    f.seek(-512, 2)
    footer = bytearray(f.read(512))
    assert footer[:8] == b"conectix", "not a VHD footer"
    footer[24:28] = struct.pack(">I", 1735689600 - 946684800)  # seconds since 2000-01-01
    footer[68:84] = hashlib.sha256(("cvm-azure-vhd " + seed).encode()).digest()[:16]
    footer[64:68] = b"\0\0\0\0"
    footer[64:68] = struct.pack(">I", ~sum(footer) & 0xFFFFFFFF)
    f.seek(-512, 2)
    f.write(footer)
PY
  qemu-img convert -f raw -O qcow2 "$raw" "$out/cvm.qcow2"
  # GCE: a gzipped tar holding disk.raw, with fixed owner and time.
  ln -f "$raw" "$out/disk.raw"
  tar --format=oldgnu --owner=0 --group=0 --numeric-owner --mtime=@1735689600 -S -C "$out" -cf - disk.raw \
    | gzip -n > "$out/cvm-gce.tar.gz"
  rm "$out/disk.raw"
}

report() {
  local out=$1 f
  say "outputs in $out:"
  for f in cvm.efi cvm.root-x86-64.raw cvm.root-x86-64-verity.raw cvm.esp.raw cvm.raw cvm.qcow2 cvm-azure.vhd cvm-gce.tar.gz; do
    [ -f "$out/$f" ] && printf 'image:   %-28s %12d bytes\n' "$f" "$(stat -c %s "$out/$f")"
  done
  say "root hash $(roothash "$out")"
}

# The root hash mkosi put on the UKI's command line.
roothash() {
  tr ' ' '\n' < "$1/cvm.cmdline" 2>/dev/null | sed -n 's/^roothash=//p' | head -1
}

# The configuration the image bakes in, checked by cvm-init's own boot-time checks (with the
# image's kernel command line) before anything is built: a typo stops here, not at a node's boot.
check_config() {
  local cmdline
  [ -f "$config_file" ] || die "CONFIG=$config_file: no such file"
  cmdline=$(sed -n 's/^KernelCommandLine=//p' "$root/image/mkosi.conf" | head -1)
  say "checking $config_file (cvm-init check-config, command line: $cmdline)"
  "$init_bin" check-config "$config_file" --cmdline "$cmdline" ${CHECK_ON:+--on "$CHECK_ON"} \
    || die "CONFIG=$config_file is refused by cvm-init check-config (above); nothing was built"
  # The signed policy and the signing key go together: without the key no boot of the image
  # could open its state disk.
  local policy
  policy=$("$init_bin" check-config "$config_file" --cmdline "$cmdline" --json 2>/dev/null \
    | python3 -c 'import json, sys; print((json.load(sys.stdin).get("state") or {}).get("tpm_policy", ""))') \
    || die "cannot read state.tpm_policy from \`cvm-init check-config --json\` of $config_file"
  if [ "$policy" = signed ] && [ -z "${PCR_KEY:-}" ]; then
    die "CONFIG=$config_file sets state.tpm_policy = \"signed\" but no PCR_KEY was given: the image could never open its state disk; pass PCR_KEY=<private key PEM>; nothing was built"
  fi
  if [ -n "${PCR_KEY:-}" ]; then check_pcr_key; fi
  if [ -n "${PCR_KEY:-}" ] && [ "$policy" != signed ]; then
    say "PCR_KEY is given but CONFIG=$config_file does not set state.tpm_policy = \"signed\": the image carries the signature, the node does not use it"
  fi
}

build() {
  local out=${1:-$work/out} start
  start=$(date +%s)
  check_config
  "$env_sh" create
  assemble pinned
  say "building with mkosi ($(inside mkosi --version)); log in $out.log"
  mkosi_build "$out"
  rm -rf "$work/pcr-key"
  check_signed "$out"
  check_lock "$out"
  # The UKI's command line, for the reference values and for operators.
  objcopy -O binary --only-section=.cmdline "$out/cvm.efi" "$out/cvm.cmdline"
  sed -i 's/\x0//g' "$out/cvm.cmdline"
  formats "$out"
  report "$out"
  check_root "$out"
  say "built in $(( $(date +%s) - start )) s"
}

# What the verified root holds, read back from the built erofs: file count, bytes uncompressed
# and as erofs, the ten largest files, and any shell, interpreter, package manager or setuid
# file (cvm-image check-root), which stop the build (ROOT_CHECK=report only reports them).
check_root() {
  local out=$1 tree="$work/root-tree"
  rm -rf "$tree"; mkdir -p "$tree"
  inside fsck.erofs --extract="$(in_env "$tree")" "$(in_env "$out/cvm.root-x86-64.raw")" >/dev/null \
    || die "cannot extract the root from $out/cvm.root-x86-64.raw"
  say "root as erofs: $(stat -c %s "$out/cvm.root-x86-64.raw") bytes"
  if [ "${ROOT_CHECK:-enforce}" = enforce ]; then
    "$image_tool" check-root "$tree" | sed 's/^/image: /' || die "the root holds what it must not (above)"
  else
    "$image_tool" check-root "$tree" --report-only | sed 's/^/image: /'
  fi
}

lock() {
  "$env_sh" create
  assemble unpinned
  mkosi_build "$work/lock-out"
  {
    echo "# Every package the node image installs: name, version, architecture, sha256 of the .deb."
    echo "# Written by \`make image-lock\`; \`make image\` installs exactly these and checks them."
    installed_packages "$work/lock-out"
  } > "$lock"
  say "$lock: $(grep -vc '^#' "$lock") packages"
}

reproducible() {
  build "$work/build-a"
  build "$work/build-b"
  local differing=() f
  for f in $(cd "$work/build-a" && ls); do
    case "$f" in *.log) continue ;; esac
    cmp -s "$work/build-a/$f" "$work/build-b/$f" || differing+=("$f")
  done
  if [ ${#differing[@]} -gt 0 ]; then
    die "two builds differ in: ${differing[*]}"
  fi
  say "two builds are bit-identical: $(cd "$work/build-a" && ls | grep -vc '\.log$') outputs ($(sha256sum "$work/build-a/cvm.raw" | cut -c1-16)… for cvm.raw)"
}

measurements() {
  local out=${1:-$work/out} tree="$work/root-tree" hash
  hash=$(roothash "$out")
  [ -n "$hash" ] || die "$out: no root hash (build the image first)"
  rm -rf "$tree"; mkdir -p "$tree"
  inside fsck.erofs --extract="$(in_env "$tree")" "$(in_env "$out/cvm.root-x86-64.raw")" >/dev/null
  local ready key_release
  ready=$("$measure_bin" predict --uki "$out/cvm.efi" --root-hash "$hash" \
    --config "$tree/etc/cvm-init/config.toml" --root-tree "$tree" --json)
  key_release=$("$measure_bin" predict --uki "$out/cvm.efi" --root-hash "$hash" \
    --config "$tree/etc/cvm-init/config.toml" --root-tree "$tree" --at key-release --json)
  # The SEV-SNP launch digest for the firmware and vCPUs this image is launched with (the disk,
  # and the UKI on it, are not part of an SNP launch: PCR 11 covers them).
  local snp
  snp=$("$measure_bin" snp --ovmf "${SNP_OVMF:-/usr/share/ovmf/OVMF.fd}" --vcpus "${SNP_VCPUS:-2}" \
    --vcpu-type "${SNP_VCPU_TYPE:-EPYC-Milan}" --guest-features "${SNP_GUEST_FEATURES:-0x1}" --json) \
    || die "the SNP launch digest (SNP_OVMF, SNP_VCPUS, SNP_VCPU_TYPE, SNP_GUEST_FEATURES)"
  # TDX: MRTD of the TDVF the node is launched with, in both page-add orders QEMU versions use.
  local tdx_fw="${TDX_OVMF:-/usr/share/ovmf/OVMF.fd}" mrtd_one mrtd_two
  mrtd_one=$("$measure_bin" tdx --ovmf "$tdx_fw") || die "the TDX MRTD (TDX_OVMF=$tdx_fw)"
  mrtd_two=$("$measure_bin" tdx --ovmf "$tdx_fw" --two-pass) || die "the TDX MRTD (TDX_OVMF=$tdx_fw)"
  # RTMR 1 of this disk booted by TDVF: ReadyToBoot, the GPT, the UKI and its kernel; with a
  # fresh variable store and a state disk attached OVMF first tries one other boot option and
  # comes back (seen by `make image-test`): TDX_RETURNED_BOOT_OPTIONS.
  local tdx_boot
  tdx_boot=$("$measure_bin" tdx --ovmf "$tdx_fw" --uki "$out/cvm.efi" --disk "$out/cvm.raw" \
    --returned-boot-options "${TDX_RETURNED_BOOT_OPTIONS:-1}" --json) \
    || die "the TDX RTMR 1 of the UKI boot (TDX_RETURNED_BOOT_OPTIONS)"
  # What a key broker loads (`kbs-serve --reference`): the registers when the node asks for
  # its disk key, PCR 15 included (at ready PCR 15 also holds the state disk's random LUKS2
  # UUID); beside them the image's identity and PCR 11 at ready, which nothing random enters.
  # The signed PCR policy (PCR_KEY at build): which key, and whether what it signs is PCR 11
  # at the key release as predicted above.
  local pcrsig="$work/uki.pcrsig" pcrpkey="$work/uki.pcrpkey"
  rm -f "$pcrsig" "$pcrpkey"
  objcopy -O binary --only-section=.pcrsig "$out/cvm.efi" "$pcrsig" 2>/dev/null || true
  objcopy -O binary --only-section=.pcrpkey "$out/cvm.efi" "$pcrpkey" 2>/dev/null || true
  if [ -s "$pcrpkey" ]; then
    sed -i 's/\x0//g' "$pcrpkey"
    say "PCR policy signed with the $(pcr_key_id "$pcrpkey") (the UKI's .pcrpkey)"
  else
    say "PCR policy: not signed (built without PCR_KEY; state.tpm_policy = \"signed\" will refuse this image)"
  fi
  python3 - "$hash" "$(sha256sum "$out/cvm.efi" | cut -c1-64)" "$(cat "$out/cvm.cmdline")" "$pcrsig" "$pcrpkey" <<PY > "$out/measurements.json"
import hashlib, json, os, struct, sys
values = json.loads(r"""$key_release""")
at_ready = json.loads(r"""$ready""")
values["image"] = {"root_hash": sys.argv[1], "uki_sha256": sys.argv[2], "cmdline": sys.argv[3]}
values["pcr11_at_ready"] = at_ready["pcr"]["11"]
snp = json.loads(r"""$snp""")
values["snp_measurements"] = snp["snp_measurements"]
values["snp_launch"] = snp["launch"]
values["tdx_mrtds"] = ["$mrtd_one", "$mrtd_two"]
tdx = json.loads(r"""$tdx_boot""")
values["tdx_rtmrs"] = tdx["tdx_rtmrs"]
values["tdx_rtmr1_events"] = tdx["rtmr1_events"]
values["tdx_rtmr2_before_init"] = tdx["tdx_rtmr2_before_init"]
values["tdx_rtmr2_before_init_events"] = tdx["rtmr2_events"]
values["not_predicted"] = "TDX RTMR 0 (the ACPI tables of the exact QEMU and the firmware's variables)"
pcrsig_path, pcrpkey_path = sys.argv[4], sys.argv[5]
if os.path.getsize(pcrpkey_path) if os.path.exists(pcrpkey_path) else 0:
    text = open(pcrsig_path, "rb").read().rstrip(b"\0") if os.path.exists(pcrsig_path) else b""
    signed = json.loads(text) if text else {}
    # TPM2_PolicyPCR's digest of PCR 11 (sha256 bank) at the key release.
    pcr11 = bytes.fromhex(values["pcr"]["11"]["sha256"])
    selection = struct.pack(">IHB3s", 1, 0x000B, 3, bytes([0, 0x08, 0]))
    policy = hashlib.sha256(bytes(32) + struct.pack(">I", 0x17F) + selection + hashlib.sha256(pcr11).digest()).hexdigest()
    entries = signed.get("sha256", [])
    if not any(e.get("pol") == policy and e.get("pcrs") == [11] for e in entries):
        sys.exit(f"image: the UKI's .pcrsig does not sign PCR 11 at the key release ({values['pcr']['11']['sha256']}, policy {policy}): signed policies {[e.get('pol') for e in entries]}")
    values["pcr_signature"] = {
        "key_fingerprints": sorted({e.get("pkfp") for e in entries}),
        "public_key_pem": open(pcrpkey_path).read(),
        "signed_policies": [e.get("pol") for e in entries],
        "key_release_policy": policy,
    }
print(json.dumps(values, indent=2))
PY
  say "reference values: $out/measurements.json"
}

# A test tree only where asked for by name: TEST_TREE left in an environment must not turn a
# production build into a test image (its registry configuration points at the loopback).
test_tree=""
if [ -n "${TEST_TREE:-}" ] && [ "${1:-}" != build-test ]; then
  die "TEST_TREE=$TEST_TREE is set, but only \`image.sh build-test\` (make image-test) builds a test image; unset it for \`${1:-}\`; nothing was built"
fi
case "${1:-}" in
  build) shift; build "$@" ;;
  build-test)
    shift
    [ -n "${TEST_TREE:-}" ] || die "build-test needs TEST_TREE=<directory of files to add to the root>"
    test_tree=$TEST_TREE
    build "$@" ;;
  check) check_config ;;
  lock) lock ;;
  reproducible) reproducible ;;
  measurements) shift; measurements "$@" ;;
  *) echo "usage: $0 build [OUT] | build-test [OUT] | check | lock | reproducible | measurements [OUT]" >&2; exit 2 ;;
esac
