#!/usr/bin/env bash
# The path from an empty folder to a running experiment in a researcher's own crate (issue 18),
# as the guide's set-up chapter describes it: `cargo xtask new` writes a crate outside the
# repository that depends on this clone, cargo builds it against the set-up cache's libtorch,
# and its binary runs directly (not through cargo, with no LD_LIBRARY_PATH) and finds the
# bundled model by the library's own lookup. Run by .ci/run after the tests; needs
# `cargo xtask setup` done. Takes a few minutes: the new crate builds its dependencies itself.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=$(mktemp -d)/first_experiment
trap 'rm -rf "$(dirname "$dir")"' EXIT
cargo xtask new "$dir"
(cd "$dir" && cargo build --release --quiet)
out=$(env -u LD_LIBRARY_PATH -u LIBTORCH -u NNSIGHT_MINILM_DIR "$dir/target/release/first_experiment")
echo "$out"
# Six layers; layer 2 zeroed at "paris" gives norm 0.00 there, and layers 0 and 1 are unchanged.
[ "$(echo "$out" | grep -c '^layer ')" = 6 ] || { echo "own crate: expected 6 layer lines"; exit 1; }
echo "$out" | grep -q '^layer 2: .* 0.00 with layer 2 zeroed$' || { echo "own crate: layer 2 not zeroed"; exit 1; }
for l in 0 1; do
    line=$(echo "$out" | grep "^layer $l:")
    clean=$(echo "$line" | sed -E 's/.* ([0-9.]+) clean.*/\1/')
    ablated=$(echo "$line" | sed -E 's/.*, ([0-9.]+) with.*/\1/')
    [ "$clean" = "$ablated" ] || { echo "own crate: layer $l changed by an edit at layer 2: $line"; exit 1; }
done
echo "own crate: built outside the repository and ran directly"
