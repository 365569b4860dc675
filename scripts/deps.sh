#!/usr/bin/env bash
# Installs everything the build and the tests need on a Debian bookworm (or newer) machine.
# Idempotent: each step checks first and does nothing when its result is present.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache="${CVM_CACHE:-$root/.cache}"
mkdir -p "$cache"

apt_packages=(
  qemu-system-x86   # boots the test guests (TCG); from backports on bookworm (QEMU 10: SNP/TDX launch)
  swtpm swtpm-tools # software TPM 2.0 for the guests
  cpio              # initramfs archives
  erofs-utils       # read-only root file systems
  cryptsetup-bin    # veritysetup / cryptsetup as independent implementations in tests
  kmod              # depmod for the cached kernel's modules.dep
  fdisk             # sfdisk for GPT test disks
  e2fsprogs         # mke2fs, copied into test roots for the state disk
  musl-tools        # musl-gcc for the static musl build
  file              # proves the binary is static
  pkg-config libdevmapper-dev clang libclang-dev  # build-time only: devicemapper-sys probes and bindgen
  xz-utils
  ovmf
  libseccomp2       # runc's one library, copied into test roots
  qemu-utils        # qemu-img: the image's qcow2 and VHD formats
  binutils          # objcopy: the UKI's command line after an image build
  curl              # the image build asks whether the Kubernetes repository is reachable
  openssl           # test certificate chains (key-broker TLS, the emulated SNP chain)
  systemd           # systemd-measure: the tests compare PCR 11 and the signed PCR policy with it
  python3           # image/trim-root.py (3.11: tomllib), which the image-tools tests run
)
# The libtss2 libraries systemd-measure loads to compute a PolicyPCR digest (`sign`).
if [ "$(. /etc/os-release && echo "${VERSION_CODENAME:-}")" = bookworm ]; then
  apt_packages+=(libtss2-esys-3.0.2-0 libtss2-mu0 libtss2-rc0)
else
  apt_packages+=(libtss2-esys-3.0.2-0t64 libtss2-mu-4.0.1-0t64 libtss2-rc0t64)
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

# The 6.12 kernel (configfs-tsm, SNP/TDX guest drivers, CONFIG_MODULE_DECOMPRESS) comes from
# bookworm-backports on bookworm; trixie and newer have it in the main suite.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
need_update=0
if [ "$codename" = bookworm ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deps: adding bookworm-backports"
  as_root tee /etc/apt/sources.list.d/cvm-init-backports.sources >/dev/null <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  need_update=1
fi

kernel_dir="$cache/kernel"
runtime_dir="$cache/container-runtime"
if [ ${#missing[@]} -gt 0 ] || [ ! -f "$kernel_dir/ready" ] || [ ! -f "$runtime_dir/ready" ]; then
  need_update=1
fi
if [ "$need_update" = 1 ]; then
  echo "deps: apt-get update"
  as_root apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  target=()
  [ "$codename" = bookworm ] && target=(-t bookworm-backports)
  # Backports only where a package has a newer version there (qemu, the kernel); everything else is
  # the same either way. qemu-utils on these machines already comes from backports.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${target[@]}" "${missing[@]}" >"$cache/apt.log" 2>&1 \
    || { cat "$cache/apt.log" >&2; echo "deps: apt-get install failed" >&2; exit 1; }
fi

# Rust target for the static init; the Makefile falls back to glibc +crt-static without it.
if command -v rustup >/dev/null; then
  if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
    echo "deps: adding the musl target"
    rustup target add x86_64-unknown-linux-musl || echo "deps: musl target unavailable, using glibc +crt-static"
  fi
  for c in rustfmt clippy; do
    rustup component list --installed | grep -q "^$c" || rustup component add "$c" || true
  done
fi

# The Debian kernel, downloaded (not installed) and unpacked into the cache, with modules.dep.
if [ ! -f "$kernel_dir/ready" ]; then
  rm -rf "$kernel_dir"; mkdir -p "$kernel_dir/deb" "$kernel_dir/root"
  if [ "$codename" = bookworm ]; then
    pkg=$(apt-cache depends -t bookworm-backports linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  else
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || { echo "deps: cannot find the Debian kernel package" >&2; exit 1; }
  echo "deps: downloading $pkg"
  # apt's sandbox user may not reach the cache directory: download into a temporary one.
  tmp=$(mktemp -d); chmod 755 "$tmp"
  (cd "$tmp" && apt-get download -qq "$pkg" 2>/dev/null || apt-get download -qq "$pkg")
  mv "$tmp"/*.deb "$kernel_dir/deb/"; rmdir "$tmp"
  deb=$(ls "$kernel_dir"/deb/*.deb)
  # bookworm-backports ships /lib/modules, trixie /usr/lib/modules: accept both.
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$kernel_dir/root" --wildcards './boot/vmlinuz-*' '*/modules/*'
  moddir=$(find "$kernel_dir/root" -maxdepth 3 -type d -name modules -path '*lib/modules' | head -n 1)
  kver=$(ls "$moddir")
  depmod -b "$(dirname "$(dirname "$moddir")")" "$kver"
  ln -sfn "root/boot/vmlinuz-$kver" "$kernel_dir/vmlinuz"
  ln -sfn "${moddir#"$kernel_dir/"}/$kver" "$kernel_dir/modules"
  echo "$kver" > "$kernel_dir/ready"
  echo "deps: kernel $kver ready in $kernel_dir"
fi

# containerd, runc and a static busybox from Debian, downloaded (not installed: their
# maintainer scripts expect systemd) and unpacked into the cache; the test images copy their
# binaries from here. Versions are whatever the suite has, recorded in `ready`.
if [ ! -f "$runtime_dir/ready" ]; then
  rm -rf "$runtime_dir"; mkdir -p "$runtime_dir/deb" "$runtime_dir/root"
  tmp=$(mktemp -d); chmod 755 "$tmp"
  (cd "$tmp" && { apt-get download -qq containerd runc busybox-static 2>/dev/null || apt-get download -qq containerd runc busybox-static; })
  mv "$tmp"/*.deb "$runtime_dir/deb/"; rmdir "$tmp"
  for deb in "$runtime_dir"/deb/*.deb; do dpkg-deb -x "$deb" "$runtime_dir/root"; done
  (cd "$runtime_dir/deb" && ls *.deb) > "$runtime_dir/ready"
  echo "deps: container runtime ready in $runtime_dir: $(tr '\n' ' ' < "$runtime_dir/ready")"
fi
