# Sourced by scripts/image.sh and scripts/image-systemd.sh: the project's paths as both builds
# see them and their small helpers. $prog names the script in its messages.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_sh="$root/scripts/image-env.sh"
work="$root/target/image"
pkg_cache="$root/.cache/image-packages"

die() { echo "$prog: $*" >&2; exit 1; }
say() { echo "$prog: $*"; }
inside() { "$env_sh" run "$@"; }
# A project path as the environment sees it (the project is mounted at /build/src).
in_env() { echo "/build/src/${1#"$root"/}"; }

# Debian's package sources exactly as the build host reaches them (trixie, its updates and its
# security archive, no debug archive) into the mkosi sandbox of the mkosi directory $1.
write_sources() {
  mkdir -p "$1/mkosi.sandbox/etc/apt/sources.list.d"
  cat > "$1/mkosi.sandbox/etc/apt/sources.list.d/mkosi.sources" <<SRC
Types: deb
URIs: $("$env_sh" mirror)
Suites: trixie trixie-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $("$env_sh" security-mirror)
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}
