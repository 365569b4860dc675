#!/usr/bin/env bash
# The static cvm-init's size against its budget, and what takes the bytes: the loaded sections
# of an unstripped build of the same code (profile size-report: the release settings with the
# symbols kept) and cargo-bloat's per-crate table of its .text (installed here
# on first use). Usage: scripts/size.sh <target triple> <release cvm-init>
set -euo pipefail

target=$1
bin=$2
# The budget of issue 20: 2 MiB with TLS, the TPM, SNP and TDX, the network and the
# device-driver loader in it.
budget=2097152

size=$(stat -c %s "$bin")
if [ "$size" -le "$budget" ]; then
  verdict="within the budget of $budget bytes"
else
  verdict="OVER the budget of $budget bytes by $((size - budget)) bytes"
fi
awk -v s="$size" -v v="$verdict" 'BEGIN { printf "cvm-init release binary: %d bytes (%.2f MiB), %s\n", s, s / 1048576, v }'

# Installed here rather than by `make deps`: only the benchmark needs it, and CI need not build it.
if ! command -v cargo-bloat >/dev/null; then
  echo "size: cargo install cargo-bloat"
  cargo install --locked --version 0.12.1 cargo-bloat
fi
cargo bloat -q --profile size-report --target "$target" -p cvm-init --bin cvm-init --crates -n 40 2>/dev/null \
  | grep -v '^Note: numbers above'
unstripped="target/$target/size-report/cvm-init"
echo "loaded sections of the unstripped build (bytes):"
size -A "$unstripped" | awk '$1 ~ /^\./ && $1 !~ /^\.(debug|comment|symtab|strtab|shstrtab)/ && $2 > 4096 { printf "  %-20s %9d\n", $1, $2 }'
