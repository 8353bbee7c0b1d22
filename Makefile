# capnet — the commands a newcomer and CI use.
#   make test    the whole test suite (unit, property, hostile-peer, loom models)
#   make ci      fmt check + clippy -D warnings + make test
#   make bench   benchmarks; tables printed and written to docs/results.md
#   make demo    the stack brought up with real traffic (arrives with the stack)
SHELL := /bin/bash
CARGO ?= cargo
# Tests run optimised: loops of thousands of hostile-peer cases and the loom models
# are too slow in debug builds on two cores.
TEST_PROFILE := --cargo-profile test-opt
LOOM_TARGET := target/loom

.PHONY: all deps test test-unit test-loom ci fmt-check clippy bench smoltcp-examples demo clean-leftovers

all: test

# What a fresh machine may lack: the Linux-side peers the tests drive (iproute2,
# tcpdump, socat, ping, nftables, curl) and cargo-nextest.
DEB_TOOLS := ip:iproute2 tcpdump:tcpdump socat:socat ping:iputils-ping nft:nftables curl:curl
deps:
	@missing=""; for pair in $(DEB_TOOLS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null || PATH="$$PATH:/usr/sbin:/sbin" command -v $$cmd >/dev/null || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi
	@command -v cargo-nextest >/dev/null || $(CARGO) install --locked cargo-nextest

clean-leftovers:
	@# Remove namespaces and TAPs a killed earlier run of the network tests left.
	@for ns in $$(ip netns list 2>/dev/null | awk '/^capt-/{print $$1}'); do ip netns del $$ns || true; done

test: deps clean-leftovers test-unit test-loom

test-unit:
	$(CARGO) nextest run --workspace $(TEST_PROFILE)

# loom models: only the ipc crate, in its own target dir so the rest of the build is
# not redone with --cfg loom.
test-loom:
	RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=$(LOOM_TARGET) $(CARGO) test -p capnet-ipc --release --test loom

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	# and as released: without dev-dependencies, so without the hostile feature
	$(CARGO) clippy --workspace -- -D warnings

ci: fmt-check clippy test

# The programs: capnet (the CLI and supervisor) and the group processes next to
# it (built by the same package: see tools/capnet/Cargo.toml).
BINARIES := -p capnet-cli

bench: deps smoltcp-examples
	$(CARGO) build --release $(BINARIES)
	target/release/capnet bench --write-docs .
	$(CARGO) bench -p capnet-ipc --bench ipc
	$(CARGO) bench -p capnet-cli --bench tcp

# smoltcp's own benchmarks (examples/benchmark.rs over a TAP, loopback_benchmark.rs
# in memory), built unmodified from the crate's source as cargo fetched it, for
# the TCP benchmark to run beside capnet; and capnet bench's smoltcp peer
# (bench/smoltcp/capnet_bench_peer.rs), built there as one more example.
SMOLTCP_BUILD := target/smoltcp
smoltcp-examples: $(SMOLTCP_BUILD)/release/examples/capnet_bench_peer
$(SMOLTCP_BUILD)/release/examples/capnet_bench_peer: bench/smoltcp/capnet_bench_peer.rs
	@src=$$($(CARGO) metadata --format-version 1 | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="smoltcp").rsplit("/",1)[0])'); \
	rm -rf target/smoltcp-src && cp -r "$$src" target/smoltcp-src && printf '\n[workspace]\n' >> target/smoltcp-src/Cargo.toml
	cp bench/smoltcp/capnet_bench_peer.rs target/smoltcp-src/examples/
	printf '\n[[example]]\nname = "capnet_bench_peer"\npath = "examples/capnet_bench_peer.rs"\n' >> target/smoltcp-src/Cargo.toml
	cd target/smoltcp-src && CARGO_TARGET_DIR=../smoltcp $(CARGO) build --release --example benchmark --example loopback_benchmark --example capnet_bench_peer

# The main job: capnet up in a private namespace, Linux traffic through it, status,
# down — narrated (scripts/demo.sh).
demo: deps
	$(CARGO) build --release $(BINARIES)
	bash scripts/demo.sh

# Coverage-guided fuzzing of the ring consumer on stable Rust (no cargo-fuzz or
# nightly needed): libFuzzer from libfuzzer-sys, sancov instrumentation by rustc.
# Not run by CI. FUZZ_SECONDS=600 make fuzz-ipc for a longer run.
FUZZ_SECONDS ?= 60
FUZZ_TARGET_TRIPLE := $(shell rustc -vV | awk '/^host/{print $$2}')
FUZZ_RUSTFLAGS := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
	-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
	-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks
# One rule per fuzz crate: fuzz-ipc (ring_consumer), fuzz-domains (ip_frame,
# udp_segment, tcp_segment). Each target runs FUZZ_SECONDS on a copy of its in-tree corpus.
.PHONY: fuzz fuzz-ipc fuzz-domains
fuzz: fuzz-ipc fuzz-domains
fuzz-ipc:
	$(call fuzz_run,ipc/fuzz,ring_consumer)
fuzz-domains:
	$(call fuzz_run,domains/fuzz,ip_frame)
	$(call fuzz_run,domains/fuzz,udp_segment)
	$(call fuzz_run,domains/fuzz,tcp_segment)
define fuzz_run
	cd $(1) && RUSTFLAGS="$(FUZZ_RUSTFLAGS)" $(CARGO) build --release --bin $(2) --target $(FUZZ_TARGET_TRIPLE)
	mkdir -p target/fuzz-corpus/$(2) && cp -n $(1)/corpus/$(2)/* target/fuzz-corpus/$(2)/
	$(1)/target/$(FUZZ_TARGET_TRIPLE)/release/$(2) target/fuzz-corpus/$(2) -max_total_time=$(FUZZ_SECONDS)
endef
