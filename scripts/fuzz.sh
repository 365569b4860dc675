#!/usr/bin/env bash
# Fuzzes cvm-measure's parsers of untrusted input with libFuzzer (cargo-fuzz, nightly):
#   scripts/fuzz.sh SECONDS TARGET...
# Corpora live in .cache/fuzz/<target>, seeded from the repository's testdata/ (real reports, quotes,
# logs, firmware fixtures), the Debian kernel and, for the disk formats, fuzz/seeds;
# a crash stops the run with libFuzzer's report and the input under fuzz/artifacts/<target>/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
testdata=$root/testdata
seconds=${1:?usage: fuzz.sh SECONDS TARGET...}
shift
say() { echo "fuzz: $*"; }

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

seed() { # target, files...
  local dir="$root/.cache/fuzz/$1"; shift
  mkdir -p "$dir"
  for f in "$@"; do [ -f "$f" ] && cp -n "$f" "$dir/seed-$(basename "$f")"; done
  return 0
}
kernel_head="$root/.cache/fuzz/kernel-head"
mkdir -p "$root/.cache/fuzz"
[ -f "$kernel_head" ] || head -c 65536 "$root/.cache/kernel/vmlinuz" > "$kernel_head"
seed firmware "$testdata"/ovmf/*.bin
seed snp_report "$testdata"/snp/*.bin
seed tdx_quote "$testdata"/tdx/*quote*.dat "$testdata"/tdx/gtg_report.dat
seed event_log "$testdata"/tdx/gtg_ccel_data.dat "$testdata"/tpm/*.bin
seed pe_image "$kernel_head"
# A DHCP ACK as QEMU's user network sends it (what the unit tests build).
dhcp_seed="$root/.cache/fuzz/dhcp-ack.bin"
[ -f "$dhcp_seed" ] || python3 - "$dhcp_seed" <<'PY'
import sys
m = bytearray(236); m[0:3] = b"\x02\x01\x06"; m[4:8] = (7).to_bytes(4, "big")
m[16:20] = bytes([10, 0, 2, 15]); m[28:34] = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56])
m += bytes([99, 130, 83, 99, 53, 1, 5, 54, 4, 10, 0, 2, 2, 51, 4, 0, 1, 81, 128, 1, 4, 255, 255, 255, 0,
            3, 4, 10, 0, 2, 2, 6, 4, 10, 0, 2, 3, 12, 4]) + b"node" + bytes([26, 2, 5, 220, 255])
open(sys.argv[1], "wb").write(m)
PY
seed dhcp_reply "$dhcp_seed"
# A kernel uevent for an NVMe controller, and a domain search list with a compressed name.
events_seed="$root/.cache/fuzz/uevent-nvme.bin"
[ -f "$events_seed" ] || printf 'add@/devices/pci0000:00/0000:00:05.0\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:05.0\0SUBSYSTEM=pci\0MODALIAS=pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02\0SEQNUM=1234\0' > "$events_seed"
search_seed="$root/.cache/fuzz/search-list.bin"
[ -f "$search_seed" ] || printf '\003lan\004test\000\003svc\300\000' > "$search_seed"
seed device_events "$events_seed" "$search_seed"
# The disk formats the init reads, seeded only from files in the repository (made with
# cryptsetup luksFormat, sfdisk, veritysetup format; fuzz/seeds/README.md).
for target in luks2_header gpt integrity_superblock verity_superblock pcr_signature; do
  seed "$target" "$root"/fuzz/seeds/"$target"/*
done

for target in "$@"; do
  say "$target for $seconds s"
  log="$root/.cache/fuzz/$target.log"
  (cd "$root" && cargo +nightly fuzz run "$target" "$root/.cache/fuzz/$target" -- \
      -max_total_time="$seconds" -max_len=300000 -timeout=10 -print_final_stats=1) > "$log" 2>&1 \
    || { tail -40 "$log"; say "$target FAILED (input under fuzz/artifacts/$target)"; exit 1; }
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
  say "$target: $runs inputs, no crash ($cov edges, corpus $(ls "$root/.cache/fuzz/$target" | wc -l) files)"
done
