# Two commands matter to a newcomer: `make run` and `make test` (see README.md).

CARGO ?= cargo
# Tests start real PostgreSQL clusters and processes; nextest runs each test in
# its own process (and in parallel), plain `cargo test` works too.
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: run dev build test test-big fuzz bench soak clean-data image

## Build optimised binaries and start the gateway with default settings.
run:
	$(CARGO) build --release --workspace
	./target/release/omni-gateway

## Debug build, verbose logs; the worker is swapped when rebuilt and UI files
## are read from ui-dist/ at each request (no build needed for UI edits).
dev:
	$(CARGO) build --workspace
	OMNI_DEV=true OMNI_UI_DIR=$${OMNI_UI_DIR:-./ui-dist} LOG_LEVEL=$${LOG_LEVEL:-debug} ./target/debug/omni-gateway

build:
	$(CARGO) build --workspace

## Every test, against real PostgreSQL, real processes and a real headless
## Chromium (installed from Debian's packages by tests/ui/run.sh when missing).
## The browser tests run beside the Rust ones (their output is printed when
## they end, and kept in target/ui-test.log); either failing fails the target.
ifeq ($(NEXTEST),yes)
RUST_TESTS := $(CARGO) nextest run --workspace --no-fail-fast
else
RUST_TESTS := $(CARGO) test --workspace --no-fail-fast
endif
test: build
	@mkdir -p target; bash tests/ui/run.sh >target/ui-test.log 2>&1 & ui=$$!; \
	$(RUST_TESTS); rust=$$?; \
	wait $$ui; ui_status=$$?; \
	echo "── tests/ui/run.sh (exit $$ui_status) ──"; cat target/ui-test.log; \
	if [ $$rust -ne 0 ]; then echo "make test: the Rust tests failed (exit $$rust)" >&2; fi; \
	if [ $$ui_status -ne 0 ]; then echo "make test: the browser tests failed (exit $$ui_status)" >&2; fi; \
	[ $$rust -eq 0 ] && [ $$ui_status -eq 0 ]

## The relay under a 2 GB single transaction with the gateway capped at 512 MB
## (make test runs the same test with a 585 MB one); ~12 min, ~20 GB of disk.
test-big: build
	OMNI_TEST_BIG_TXN_ROWS=2000000 $(CARGO) nextest run -p omni-tests --test e2e -E 'test(/^replication_stream::.*bigger_than_memory/)'

## Property-based fuzzing of the API's OpenAPI document (FUZZ_SECONDS, default 120).
fuzz: build
	bash tests/fuzz/run.sh

## Benchmarks; each writes its table into BENCHMARKS.md (proxy and preferences also their figures and ratios into BENCHMARKS.json).
bench:
	$(CARGO) build --release --workspace
	python3 bench/startup.py
	python3 bench/proxy.py
	python3 bench/tls.py
	python3 bench/logs.py
	bash bench/api_prefs.sh
	python3 bench/backup.py
	python3 bench/import.py
	python3 bench/upgrade.py
	python3 bench/replication.py
	python3 bench/pitr.py
	python3 bench/recovery.py
	python3 bench/login_flood.py
	python3 bench/offsite.py
	python3 bench/offsite_crypt.py
	python3 bench/ha.py

## Chaos soak: kill -9 PostgreSQL and the worker under write load; appends to RELIABILITY.md (SOAK_SECONDS, default 240).
soak:
	$(CARGO) build --release --workspace
	SOAK_SECONDS=$${SOAK_SECONDS:-240} ./target/release/soak

## Docker image omni-gateway:local from the release binaries (no rust image
## needed; debian:bookworm-slim is made with debootstrap when it cannot be pulled).
image:
	$(CARGO) build --release -p omni-gateway -p omni-api
	sh deploy/build-image.sh -t omni-gateway:local -b target/release
