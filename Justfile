# dunnage — task runner (just 1.x; install with `cargo install just --locked`).

set shell := ["bash", "-euo", "pipefail", "-c"]

# Integration tests mostly wait on IO (mkfs, mount, dockerd); a few in parallel is enough.
export RUST_TEST_THREADS := env_var_or_default("RUST_TEST_THREADS", "4")

# List the recipes.
default:
    @just --list --unsorted

# Install the Debian packages the daemon, tests and benchmarks need (idempotent).
deps:
    scripts/install-deps.sh

# Build the release binary (target/release/dunnage).
build:
    cargo build --release

# Run the daemon with its embedded defaults (extra arguments go to `dunnage serve`).
[positional-arguments]
serve *ARGS: deps build
    scripts/kernel-prep.sh
    exec target/release/dunnage serve "$@"

# Everything CI runs: unit, integration and end-to-end tests (needs root, starts dockerd).
test: deps
    scripts/kernel-prep.sh
    scripts/dockerd.sh
    scripts/test-image.sh
    cargo build --release
    cargo test --release --all-targets
    cargo bench --bench engine -- --test
    scripts/vm/run.sh --script tests/vm/ublk.sh

# Formatting and lints, warnings are errors.
lint:
    cargo fmt --all --check
    cargo clippy --all-targets -- -D warnings

# Format the code.
fmt:
    cargo fmt --all

# fio side by side: kernel loop (limit), qemu-storage-daemon (peer), dunnage; plus control-plane
# and memory figures. `just bench quick` takes ~8 min, the full run ~45 min. Results in target/bench/.
bench *ARGS:
    scripts/install-deps.sh
    scripts/kernel-prep.sh
    cargo build --release
    cargo bench --bench fio -- {{ARGS}}

# ublk export in a VM (Debian's backports kernel has ublk_drv; this host's kernel does not):
# boots it under qemu TCG and runs tests/vm/ublk.sh with the release binary inside.
test-ublk: deps
    cargo build --release
    scripts/vm/run.sh --script tests/vm/ublk.sh
