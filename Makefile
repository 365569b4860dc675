# cvm-init: build, run and test. `make test` is what CI runs; `make run` boots the demo guest.

SHELL := /bin/bash
CARGO ?= cargo
# musl for a fully static init; glibc +crt-static where the musl target cannot be installed.
MUSL := $(shell rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl && echo yes)
ifeq ($(MUSL),yes)
TARGET := x86_64-unknown-linux-musl
# devicemapper-sys probes pkg-config for headers only; allow it when cross-compiling to musl.
STATIC_FLAGS := PKG_CONFIG_ALLOW_CROSS=1
else
TARGET := x86_64-unknown-linux-gnu
STATIC_FLAGS := RUSTFLAGS="-C target-feature=+crt-static"
endif

RELEASE_DIR := target/$(TARGET)/release
TEST_DIR := target/$(TARGET)/test-image
KERNEL_DIR := .cache/kernel
export CVM_INIT_BIN := $(CURDIR)/$(TEST_DIR)/cvm-init
export CVM_PAYLOAD_BIN := $(CURDIR)/$(TEST_DIR)/cvm-test-payload
export CVM_KERNEL_DIR := $(CURDIR)/$(KERNEL_DIR)
# The initramfs's zstd frame comes from the libzstd vendored in Cargo.lock, never the system's
# (zstd-sys takes the system's when this is set): another version writes other bytes.
unexport ZSTD_SYS_USE_PKG_CONFIG

.PHONY: fuzz all deps build install check-config test-artifacts check unit boot-tests test run bench clean image image-lock image-reproducible measurements image-test image-test-signed image-systemd ovmf ovmf-reproducible ovmf-test

all: build

## Install apt packages, the musl target and the Debian kernel (idempotent, quick when done).
deps:
	@bash scripts/deps.sh

## The release init (static) and the measurements CLI.
build: deps
	$(STATIC_FLAGS) $(CARGO) build --release --target $(TARGET) -p cvm-init -p cvm-measure
	@file $(RELEASE_DIR)/cvm-init | grep -q 'static' || { echo "cvm-init is not static"; exit 1; }
	@ls -l $(RELEASE_DIR)/cvm-init

## Install cvm-init (sbin), cvm-measure (bin), their man pages and cvm-measure's bash, zsh and
## fish completions under PREFIX (DESTDIR honoured). Pages and completions are generated from
## cvm-measure's own command-line definition (its hidden generate-assets command).
PREFIX ?= /usr/local
install: build
	rm -rf target/assets
	$(RELEASE_DIR)/cvm-measure generate-assets --out target/assets
	install -Dm755 $(RELEASE_DIR)/cvm-init $(DESTDIR)$(PREFIX)/sbin/cvm-init
	install -Dm755 $(RELEASE_DIR)/cvm-measure $(DESTDIR)$(PREFIX)/bin/cvm-measure
	install -d $(DESTDIR)$(PREFIX)/share/man/man1 $(DESTDIR)$(PREFIX)/share/man/man8
	install -m644 target/assets/man/*.1 $(DESTDIR)$(PREFIX)/share/man/man1/
	install -m644 target/assets/man/*.8 $(DESTDIR)$(PREFIX)/share/man/man8/
	install -Dm644 target/assets/completions/cvm-measure.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/cvm-measure
	install -Dm644 target/assets/completions/_cvm-measure $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_cvm-measure
	install -Dm644 target/assets/completions/cvm-measure.fish $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/cvm-measure.fish

## The init with test hooks and the static test payload, for boot tests.
test-artifacts: deps
	$(STATIC_FLAGS) $(CARGO) build --profile test-image --target $(TARGET) -p cvm-init -p cvm-test-payload \
	  --bin cvm-init --bin cvm-test-payload --bin kubelet-standin --features cvm-init/test-hooks

## Format, lints, and every relative link of the Markdown documents (scripts/check-links.sh).
check:
	bash scripts/check-links.sh
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p cvm-init --all-targets --features test-hooks -- -D warnings
	$(CARGO) clippy --workspace --test scenarios --test image_boot --test ovmf_boot -- -D warnings

## Unit and integration tests without QEMU (the boot scenarios are a test target of their own).
unit:
	$(CARGO) test --workspace
	$(CARGO) test -p cvm-init --features test-hooks --lib
	$(CARGO) test -p cvm-init --features argon2 --test luks2_cryptsetup

boot-tests: test-artifacts
	$(CARGO) test --workspace --test scenarios -- --test-threads=2

## Everything CI checks: format, lints, unit tests, the boot scenarios.
test: deps build check unit boot-tests

## Boot the demo guest with the console attached (quit: ctrl-a x; power button: ctrl-a c, then system_powerdown).
## TEE=snp or TEE=tdx: a measured direct boot on that hardware (firmware from `make ovmf`), the
## key broker loaded with the predicted measurement; DRY_RUN=1 prints the QEMU command line and
## the prediction instead (on any host); without the hardware it refuses, naming what is missing.
TEE ?=
run: build test-artifacts $(if $(TEE),ovmf)
	CVM_INIT_BIN=$(CURDIR)/$(RELEASE_DIR)/cvm-init DRY_RUN=$(DRY_RUN) $(CARGO) run -q -p qemu-tests --bin cvm-harness -- \
	  demo qemu-tests/demo/config.toml $(if $(TEE),--tee $(TEE))

## Size of the static init (with a per-crate table: scripts/size.sh), time from kernel start to ready, PID 1's RSS at ready.
bench: build test-artifacts
	$(STATIC_FLAGS) bash scripts/size.sh $(TARGET) $(RELEASE_DIR)/cvm-init
	$(CARGO) run -q --release -p qemu-tests --bin cvm-harness -- bench $(CURDIR)/$(RELEASE_DIR)/cvm-init $(CURDIR)/$(RELEASE_DIR)/cvm-measure

## Fuzz the parsers of untrusted input (firmware, SNP reports, TDX quotes, event logs, PE
## images, DHCP, uevents, LUKS2 headers, GPTs, dm-integrity and verity superblocks):
## FUZZ_SECONDS each, with libFuzzer (nightly and cargo-fuzz, installed if missing).
FUZZ_SECONDS ?= 60
fuzz: deps
	bash scripts/fuzz.sh $(FUZZ_SECONDS) firmware snp_report tdx_quote event_log pe_image dhcp_reply device_events \
	  luks2_header gpt integrity_superblock verity_superblock pcr_signature

## The node image: mkosi 25 in a Debian trixie environment that scripts/image-env.sh makes once
## (.cache/image-env); outputs in target/image/out. KUBELET=<kubelet binary or .deb> (else the
## Kubernetes package repository), CONFIG=<cvm-init configuration> (default image/node.toml),
## CNI_PLUGINS="<names>" (default loopback bridge host-local portmap): the CNI plugins the root keeps,
## PCR_KEY=<RSA-2048 or P-256 private key PEM>: sign PCR 11 at the key release (.pcrsig/.pcrpkey)
## for state.tpm_policy = "signed" (docs/upgrades.md).
IMAGE_TOOLS = $(CARGO) build -q -p cvm-image --bin cvm-image
image: build
	$(IMAGE_TOOLS)
	bash scripts/image.sh build

## Run cvm-init's boot-time checks on CONFIG (default image/node.toml) with the image's kernel
## command line, as `make image` does first; CHECK_ON=snp|tdx|vtpm|bare: the machine it must boot on.
check-config: build
	bash scripts/image.sh check

## The systemd comparison image `make bench` boots beside the node image: the same locked packages
## and kernel, mkosi's default initrd, systemd as PID 1 (scripts/image-systemd.sh; outputs in
## target/image/systemd-out, `bash scripts/image-systemd.sh lock` re-pins what only it installs).
image-systemd:
	bash scripts/image-systemd.sh build

## Re-resolve the image's packages and write image/packages.lock (names, versions, sha256).
image-lock: build
	$(IMAGE_TOOLS)
	bash scripts/image.sh lock

## Build the image twice; any output that differs is named and fails the target.
image-reproducible: build
	$(IMAGE_TOOLS)
	bash scripts/image.sh reproducible

## The built image's reference values (PCR 11/15 at ready and at key release, RTMR 2) as JSON,
## and which key signed its PCR policy (checked against the predicted PCR 11 at key release).
measurements: build
	bash scripts/image.sh measurements

## Boot the image under OVMF + swtpm to ready and compare its PCRs with `make measurements`.
## Uses the kubelet stand-in unless KUBELET is given; the test image adds IMAGE_TEST_TREE (the
## registry configuration with which the stand-in runs a test pod through CRI). TEST_TREE in
## the environment of any other image target is refused.
IMAGE_TEST_TREE = $(CURDIR)/qemu-tests/image-tree
image-test: build test-artifacts
	$(IMAGE_TOOLS)
	TEST_TREE=$(IMAGE_TEST_TREE) KUBELET=$${KUBELET:-$(CURDIR)/target/$(TARGET)/test-image/kubelet-standin} bash scripts/image.sh build-test
	bash scripts/image.sh measurements
	$(CARGO) test -p qemu-tests --test image_boot -- --nocapture

## `make image-test` for an image whose PCR 11 is signed (`make image PCR_KEY=...`): a throwaway
## P-256 key and image/node.toml with state.tpm_policy = "signed" (both in target/image/signed);
## the boot seals the state disk to the key, a reboot opens it with the UKI's signature.
SIGNED = $(CURDIR)/target/image/signed
image-test-signed: build test-artifacts
	$(IMAGE_TOOLS)
	mkdir -p $(SIGNED)
	test -f $(SIGNED)/pcr-key.pem || openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out $(SIGNED)/pcr-key.pem
	sed 's/^key = "tpm"$$/key = "tpm"\ntpm_policy = "signed"/' image/node.toml > $(SIGNED)/node.toml
	grep -q '^tpm_policy = "signed"$$' $(SIGNED)/node.toml
	PCR_KEY=$(SIGNED)/pcr-key.pem CONFIG=$(SIGNED)/node.toml TEST_TREE=$(IMAGE_TEST_TREE) \
	  KUBELET=$${KUBELET:-$(CURDIR)/target/$(TARGET)/test-image/kubelet-standin} bash scripts/image.sh build-test
	bash scripts/image.sh measurements
	$(CARGO) test -p qemu-tests --test image_boot -- --nocapture

## The confidential-guest firmware from Debian's edk2 source package (trixie, pinned in
## scripts/ovmf.sh): target/ovmf/OVMF.amdsev.fd (SEV-SNP, kernel hashes for measured direct boot)
## and target/ovmf/OVMF.inteltdx.fd (TDVF), with SHA256SUMS and VERSION. Cached per version.
ovmf:
	bash scripts/ovmf.sh build

## Build the firmware twice from clean trees; any byte that differs is named and fails the target.
ovmf-reproducible:
	bash scripts/ovmf.sh reproducible

## The AmdSev build boots the test image to ready under TCG (with the kernel-hashes table
## cvm-measure computes), and refuses a table with one wrong hash.
ovmf-test: ovmf test-artifacts
	$(CARGO) test -p qemu-tests --test ovmf_boot -- --nocapture --test-threads=2

clean:
	$(CARGO) clean
