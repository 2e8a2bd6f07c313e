#!/usr/bin/env bash
# Compile-time cost of `trace!` (acceptance, issue 13: building 100 blocks takes at most 1.2x the
# time of the same code written by hand against `Tracer`; an earlier issue allowed 2x).
#
# Generates two throwaway binary crates under target/macro_cost/ that path-depend on this
# workspace's `nnsight` crate:
#   macro/ — 100 functions, each with one `trace!` block on a tiny tch model (saves, computed
#            saves, swaps of outputs and inputs, in-place edits, two-invoke patching,
#            conditionals, `.next()` + `.stop()`, loops), 10 kinds x 10 variants;
#   hand/  — the same 100 functions with each block written against `nnsight::Tracer`
#            (`tr.invoke`, `tr.output(g, 0, || Ok(&model.layers[1]))`, `tr.apply1`,
#            `tr.swap_output_with`, `tr.edits`, `tr.begin_if`, `tr.save`, `tr.finish`).
# Everything else (model, imports, `main`) is identical. Both build into the workspace's target
# folder (CARGO_TARGET_DIR), so tch and nnsight are built once and shared.
#
# Then, for each crate and for `cargo build` and `cargo check`: touch src/main.rs and rebuild,
# REPS times (default 3), variants interleaved; prints every time, the medians and the ratios
# macro / hand. Only the generated crate recompiles (its dependencies are fresh), so the times
# are that crate's compile: macro expansion, type checking, codegen. The crates are built with
# incremental compilation off (a per-package profile override, which leaves the shared
# dependencies' artifacts alone), so each rebuild compiles the crate whole instead of reusing
# the previous run's query cache. A timing during which cargo waited for the target folder's
# lock (another build running) is discarded and retaken.
#
# Usage: benches/macro_cost/run.sh            (REPS=5 benches/macro_cost/run.sh for more runs)
# Needs the workspace to build (libtorch set up: `cargo xtask setup`). Not part of the tests.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT="$ROOT/target/macro_cost"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
REPS="${REPS:-3}"
N_CASES=100

# ----- generation ------------------------------------------------------------------------

cargo_toml() { # name
    cat <<EOF
[package]
name = "$1"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
nnsight = { path = "$ROOT" }

# Incremental off for this crate only: each timed rebuild compiles it whole.
[profile.dev.package.$1]
incremental = false

# Not part of the nnsight workspace (this folder sits inside it).
[workspace]
EOF
}

tiny_rs() {
    cat <<'EOF'
//! Tiny models (as in the workspace's tests/common/tiny.rs).
use nnsight::tch::{nn, Tensor};
use nnsight::{HookModule, Hooked};

/// Four Linear(4, 4) + tanh layers.
pub struct Stack {
    pub layers: Vec<Hooked<nn::Linear>>,
}

impl HookModule for Stack {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        self.layers.iter().fold(x, |h, l| l.call(h).tanh())
    }
}

/// One Linear(4, 4) called twice, then another.
pub struct Twice {
    pub lin: Hooked<nn::Linear>,
    pub post: Hooked<nn::Linear>,
}

impl HookModule for Twice {
    type Input = Tensor;
    type Output = Tensor;
    fn forward(&self, x: Tensor) -> Tensor {
        let h = self.lin.call(x);
        let h = self.lin.call(h.relu());
        self.post.call(h)
    }
}

pub fn stack(vs: &nn::VarStore) -> Hooked<Stack> {
    let p = vs.root() / "layers";
    let layers = (0..4).map(|i| Hooked::new(&(&p / i), nn::linear(&p / i, 4, 4, Default::default()))).collect();
    Hooked::with_path("", Stack { layers })
}

pub fn twice(vs: &nn::VarStore) -> Hooked<Twice> {
    let p = vs.root();
    Hooked::with_path(
        "",
        Twice {
            lin: Hooked::new(&(&p / "lin"), nn::linear(&p / "lin", 4, 4, Default::default())),
            post: Hooked::new(&(&p / "post"), nn::linear(&p / "post", 4, 4, Default::default())),
        },
    )
}
EOF
}

# One case: kind K = i % 10, layer A, second layer B, column C, constant S.
# `emit_case macro|hand i`
emit_case() {
    local style=$1 i=$2
    local k=$((i % 10)) A=$(((i / 10) % 4)) B=$(((i / 10 + 1) % 4)) C=$((i % 4)) S="$((i + 1)).5"
    local model="stack"
    [[ $k == 6 ]] && model="twice"
    printf '\npub fn case_%03d(vs: &nn::VarStore, x: &Tensor, y: &Tensor) -> nnsight::Result<()> {\n' "$i"
    printf '    let model = tiny::%s(vs);\n    let _ = (x, y);\n' "$model"
    if [[ $style == macro ]]; then
        case $k in
        0) cat <<EOF
    let out = trace!(model, x, {
        model.layers[$A].output.save()
    })?;
EOF
        ;;
        1) cat <<EOF
    let out = trace!(model, x, {
        (model.layers[$A].output.sum(Kind::Float) * $S).save()
    })?;
EOF
        ;;
        2) cat <<EOF
    let out = trace!(model, x, {
        model.layers[$A].output = model.layers[$A].output * $S;
        model.layers[$B].output.save()
    })?;
EOF
        ;;
        3) cat <<EOF
    let out = trace!(model, x, {
        model.layers[$A].output[.., $C] = 0.0;
        model.layers[3].output.save()
    })?;
EOF
        ;;
        4) cat <<EOF
    let out = trace!(model, {
        invoke(x) {
            let clean = model.layers[$A].output;
        }
        invoke(y) {
            model.layers[$A].output[.., $C] = clean[.., $C];
            model.layers[3].output.save()
        }
    })?;
EOF
        ;;
        5) cat <<EOF
    let out = trace!(model, x, {
        if model.layers[$A].output.sum(Kind::Float).double_value(&[]) > $S {
            model.layers[$A].output[..] = 0.0;
        }
        model.layers[3].output.save()
    })?;
EOF
        ;;
        6) cat <<EOF
    let out = trace!(model, x, {
        let c0 = model.lin.output.save();
        let c1 = model.lin.next().output.save();
        c1.stop();
        (c0, c1)
    })?;
EOF
        ;;
        7) cat <<EOF
    let out = trace!(model, x, {
        let mut outs = Vec::new();
        for l in 0..$((A + 1)) {
            outs.push(model.layers[l].output.save());
        }
        outs
    })?;
EOF
        ;;
        8) cat <<EOF
    let out = trace!(model, x, {
        let a = model.layers[$A].output;
        let b = model.layers[$B].output;
        ((a + b) * $S).mean(Kind::Float).save()
    })?;
EOF
        ;;
        9) cat <<EOF
    let out = trace!(model, x, {
        model.layers[$A].input = model.layers[$A].input * $S;
        model.output.save()
    })?;
EOF
        ;;
        esac
    else
        case $k in
        0) cat <<EOF
    let out = {
        let mut tr = Tracer::new(&model);
        let g = tr.invoke(x);
        let h = tr.output(g, 0, || Ok(&model.layers[$A]));
        let s = tr.save(h);
        tr.finish(s)?
    };
EOF
        ;;
        1) cat <<EOF
    let out = {
        let mut tr = Tracer::new(&model);
        let g = tr.invoke(x);
        let h = tr.output(g, 0, || Ok(&model.layers[$A]));
        let v = tr.apply1(h, |h: &Tensor| h.sum(Kind::Float) * $S);
        let s = tr.save(v);
        tr.finish(s)?
    };
EOF
        ;;
        2) cat <<EOF
    let out = {
        let mut tr = Tracer::new(&model);
        let g = tr.invoke(x);
        tr.swap_output_with(g, 0, || Ok(&model.layers[$A]), |tr| {
            let h = tr.output(g, 0, || Ok(&model.layers[$A]));
            tr.apply1(h, |h: &Tensor| h * $S)
        });
        let o = tr.output(g, 0, || Ok(&model.layers[$B]));
        let s = tr.save(o);
        tr.finish(s)?
    };
EOF
        ;;
        3) cat <<EOF
    let out = {
        let mut tr = Tracer::new(&model);
        let g = tr.invoke(x);
        let t = tr.output(g, 0, || Ok(&model.layers[$A]));
        let e = tr.apply1(t, |t: &Tensor| {
            let _ = t.i((.., $C)).fill_(0.0);
        });
        tr.edits(t, e);
        let o = tr.output(g, 0, || Ok(&model.layers[3]));
        let s = tr.save(o);
        tr.finish(s)?
    };
EOF
        ;;
        4) cat <<EOF
    let out = {
        let mut tr = Tracer::new(&model);
        let g0 = tr.invoke(x);
        let clean = tr.output(g0, 0, || Ok(&model.layers[$A]));
        let g1 = tr.invoke(y);
        let t = tr.output(g1, 0, || Ok(&model.layers[$A]));
        let e = tr.apply2(t, clean, |t: &Tensor, c: &Tensor| {
            t.i((.., $C)).copy_(&c.i((.., $C)));
        });
        tr.edits(t, e);
        let o = tr.output(g1, 0, || Ok(&model.layers[3]));
        let s = tr.save(o);
        tr.finish(s)?
    };
EOF
        ;;
        5) cat <<EOF
    let out = {
        let mut tr = Tracer::new(&model);
        let g = tr.invoke(x);
        let h = tr.output(g, 0, || Ok(&model.layers[$A]));
        let c = tr.apply1(h, |h: &Tensor| h.sum(Kind::Float).double_value(&[]) > $S);
        tr.begin_if(c);
        let t = tr.output(g, 0, || Ok(&model.layers[$A]));
        let e = tr.apply1(t, |t: &Tensor| {
            let _ = t.shallow_clone().fill_(0.0);
        });
        tr.edits(t, e);
        tr.end_if();
        let o = tr.output(g, 0, || Ok(&model.layers[3]));
        let s = tr.save(o);
        tr.finish(s)?
    };
EOF
        ;;
        6) cat <<EOF
    let out = {
        let mut tr = Tracer::new(&model);
        let g = tr.invoke(x);
        let c0 = tr.output(g, 0, || Ok(&model.lin));
        let s0 = tr.save(c0);
        let c1 = tr.output(g, 1, || Ok(&model.lin));
        let s1 = tr.save(c1);
        tr.stop(s1);
        tr.finish((s0, s1))?
    };
EOF
        ;;
        7) cat <<EOF
    let out = {
        let mut tr = Tracer::new(&model);
        let g = tr.invoke(x);
        let mut outs = Vec::new();
        for l in 0..$((A + 1)) {
            let h = tr.output(g, 0, || Ok(&model.layers[l]));
            outs.push(tr.save(h));
        }
        tr.finish(outs)?
    };
EOF
        ;;
        8) cat <<EOF
    let out = {
        let mut tr = Tracer::new(&model);
        let g = tr.invoke(x);
        let a = tr.output(g, 0, || Ok(&model.layers[$A]));
        let b = tr.output(g, 0, || Ok(&model.layers[$B]));
        let v = tr.apply2(a, b, |a: &Tensor, b: &Tensor| ((a + b) * $S).mean(Kind::Float));
        let s = tr.save(v);
        tr.finish(s)?
    };
EOF
        ;;
        9) cat <<EOF
    let out = {
        let mut tr = Tracer::new(&model);
        let g = tr.invoke(x);
        tr.swap_input_with(g, 0, || Ok(&model.layers[$A]), |tr| {
            let h = tr.input(g, 0, || Ok(&model.layers[$A]));
            tr.apply1(h, |h: &Tensor| h * $S)
        });
        let o = tr.output(g, 0, || Ok(&model));
        let s = tr.save(o);
        tr.finish(s)?
    };
EOF
        ;;
        esac
    fi
    printf '    drop(out);\n    Ok(())\n}\n'
}

main_rs() { # macro|hand
    cat <<'EOF'
//! Generated by benches/macro_cost/run.sh; not meant to be run, only compiled.
#![allow(unused_imports, clippy::all)]

mod tiny;

use nnsight::prelude::*;
use nnsight::tch::nn;
EOF
    for ((i = 0; i < N_CASES; i++)); do emit_case "$1" "$i"; done
    cat <<EOF

fn main() -> nnsight::Result<()> {
    let vs = nn::VarStore::new(Device::Cpu);
    let x = Tensor::ones([1, 4], (Kind::Float, Device::Cpu));
    let y = Tensor::ones([1, 4], (Kind::Float, Device::Cpu));
EOF
    for ((i = 0; i < N_CASES; i++)); do printf '    case_%03d(&vs, &x, &y)?;\n' "$i"; done
    printf '    Ok(())\n}\n'
}

generate() { # macro|hand
    local dir="$OUT/$1"
    mkdir -p "$dir/src"
    cargo_toml "macro_cost_$1" >"$dir/Cargo.toml"
    tiny_rs >"$dir/src/tiny.rs"
    main_rs "$1" >"$dir/src/main.rs"
    # Same dependency versions as the workspace (cargo drops what this crate does not use).
    [[ -f "$dir/Cargo.lock" ]] || cp "$ROOT/Cargo.lock" "$dir/Cargo.lock"
}

# ----- timing ----------------------------------------------------------------------------

now() { date +%s.%N; }

# `timed macro|hand build|check`: touch, rebuild, print seconds. Retakes a run that waited for
# the target folder's lock.
timed() {
    local dir="$OUT/$1" sub=$2 t0 t1
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        touch "$dir/src/main.rs"
        t0=$(now)
        if ! (cd "$dir" && cargo "$sub" 2>"$dir/$sub.stderr"); then
            cat "$dir/$sub.stderr" >&2
            exit 1
        fi
        t1=$(now)
        if grep -q "Blocking waiting for file lock" "$dir/$sub.stderr"; then
            echo "  ($1 $sub waited for the target folder lock; retaking)" >&2
            sleep 5
            continue
        fi
        if ! grep -q "Compiling macro_cost_$1\|Checking macro_cost_$1" "$dir/$sub.stderr"; then
            echo "error: $1 $sub did not recompile the crate:" >&2
            cat "$dir/$sub.stderr" >&2
            exit 1
        fi
        if grep -q "Compiling \|Checking " <(grep -v "macro_cost_$1" "$dir/$sub.stderr"); then
            echo "  ($1 $sub rebuilt a dependency too; retaking)" >&2
            continue
        fi
        awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'
        return
    done
    echo "error: could not get an undisturbed $1 $sub timing" >&2
    exit 1
}

# `noop macro|hand build|check`: cargo with nothing to do (its own overhead), in seconds.
noop() {
    local dir="$OUT/$1" sub=$2 t0 t1
    t0=$(now)
    (cd "$dir" && cargo "$sub" 2>"$dir/noop.stderr") || { cat "$dir/noop.stderr" >&2; exit 1; }
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

generate macro
generate hand
n_macro=$(grep -c 'trace!(' "$OUT/macro/src/main.rs")
n_hand=$(grep -c 'Tracer::new(' "$OUT/hand/src/main.rs")
echo "generated $OUT/macro ($n_macro trace! blocks) and $OUT/hand ($n_hand Tracer blocks)"
[[ $n_macro == "$N_CASES" && $n_hand == "$N_CASES" ]] || { echo "error: expected $N_CASES blocks each" >&2; exit 1; }
echo "target folder: $CARGO_TARGET_DIR; $(rustc --version); $(nproc) cores"

echo "warm-up (builds dependencies if needed, not timed)..."
for v in macro hand; do
    for sub in build check; do
        (cd "$OUT/$v" && cargo "$sub" 2>"$OUT/$v/warmup.stderr") || { cat "$OUT/$v/warmup.stderr" >&2; exit 1; }
    done
done

declare -A times
for sub in build check; do
    for ((r = 1; r <= REPS; r++)); do
        for v in macro hand; do
            t=$(timed "$v" "$sub")
            times[$v.$sub]+="$t "
            echo "  cargo $sub  $v  run $r: ${t} s"
        done
    done
    for ((r = 1; r <= REPS; r++)); do
        times[noop.$sub]+="$(noop macro "$sub") $(noop hand "$sub") "
    done
done

echo
printf '%-14s %-22s %-22s %-7s %-16s %s\n' "" "trace! (100 blocks)" "by hand (100 blocks)" "ratio" "cargo no-op" "ratio net of no-op"
for sub in build check; do
    # shellcheck disable=SC2086
    m=$(median ${times[macro.$sub]})
    # shellcheck disable=SC2086
    h=$(median ${times[hand.$sub]})
    # shellcheck disable=SC2086
    z=$(median ${times[noop.$sub]})
    ratio=$(awk -v m="$m" -v h="$h" 'BEGIN { printf "%.2f", m / h }')
    net=$(awk -v m="$m" -v h="$h" -v z="$z" 'BEGIN { printf "%.2f", (m - z) / (h - z) }')
    printf '%-14s %-22s %-22s %-7s %-16s %s\n' "cargo $sub" "median $m s" "median $h s" "$ratio" "median $z s" "$net"
    [[ $sub == build ]] && build_ratio=$ratio
done
echo
if awk -v r="$build_ratio" 'BEGIN { exit !(r <= 1.2) }'; then
    echo "macro cost: cargo build ratio $build_ratio <= 1.2 (acceptance met)"
else
    echo "macro cost: cargo build ratio $build_ratio > 1.2 (acceptance NOT met)"
fi
