#!/usr/bin/env python3
"""Writes BENCHMARKS.md from `cargo bench --bench interleave` (criterion's estimates.json files).

Usage: python3 benches/report.py [--stdout] [CRITERION_DIR]
CRITERION_DIR defaults to $CARGO_TARGET_DIR/criterion, else target/criterion next to this
folder. Reads <dir>/<group>/<case>/new/estimates.json (the median, in ns, of the last run of
each case), the paired runs beside it, and benches/python_nnsight_reference.json (the Python
library's figures, copied into the repository). Makes, per group, medians and ratios to the
plain forward of the same run, the Python library's ratios beside ours, then the performance
targets with the figures.

BENCHMARKS.md (at the repository root) is: a title, benches/benchmarks_notes.md (how to run and
read the figures, written by hand), the tables, and the memory tables that
`cargo run --release --example memory_report > <target>/memory_report.md` printed (when that
file is missing, the memory section already in BENCHMARKS.md is kept). With --stdout the
tables are printed instead and no file is written. Refuses to write when no criterion result
is found, so the recorded figures are never replaced by empty tables.
Python 3 standard library only.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PY_LABEL = "Python nnsight 0.8.1, measured on the same kind of machine (2-core CPU), from the reference cases"

# (case id, description, tokenizes inside the timed call, Python reference key or None)
MINILM_CASES = [
    ("plain_forward", "plain forward `model.forward(&texts)` (no_grad)", True, None),
    ("plain_call_pretokenized", "plain forward, pre-tokenized: root `Hooked::call` (no_grad)", False, "i"),
    ("plain_keep_all_by_hand", "plain tch by hand, pre-tokenized, keeping the 6 layer outputs (no trace)", False, None),
    ("plain_swap_all_by_hand", "plain tch by hand, pre-tokenized, 6 layer outputs * 1.0 (no trace)", False, None),
    ("tokenize", "tokenization alone", True, None),
    ("trace_empty", "trace on text, empty block (no node)", True, None),
    ("trace_read_unsaved", "trace on text, one read of layer[5].output, not saved", True, None),
    ("trace_save_1", "trace on text saving layer[2].output", True, None),
    ("trace_save_all", "trace on text saving all 6 layer outputs", True, None),
    ("trace_swap_all", "trace on text with 6 swaps (output * 1.0) + save", True, None),
    ("trace_empty_pretokenized", "trace on the tokenized batch (`&batch`), empty block", False, None),
    ("trace_save_1_pretokenized", "trace on the tokenized batch saving layer[2].output", False, "ii"),
    ("trace_save_all_pretokenized", "trace on the tokenized batch saving all 6 layer outputs", False, "iii"),
    ("trace_swap_all_pretokenized", "trace on the tokenized batch with 6 swaps (output * 1.0) + save", False, "iv"),
]
KERNEL_CASES = [
    ("plain_call_pretokenized", "plain forward, pre-tokenized, linear layers by the default kernel (`Auto`, measured per shape class)", False, None),
    ("plain_call_pretokenized_libtorch_linear", "the same with libtorch's `linear` (MKL, as PyTorch's `nn.Linear`)", False, None),
    ("plain_call_pretokenized_onednn_linear", "the same with oneDNN for every eligible call (`LinearKernel::OneDnn`)", False, None),
]
LINEAR_SHAPE_CASES = [
    ("auto", "the 4 linear layers, default kernel (`Auto`, measured per shape class)", False, None),
    ("libtorch", "the same with libtorch's `linear` (MKL, as PyTorch's `nn.Linear`)", False, None),
    ("onednn", "the same with oneDNN (`LinearKernel::OneDnn`)", False, None),
]
GPT2_CASES = [
    ("plain_forward", "plain forward `model.forward(&[prompt])` (no_grad)", True, None),
    ("plain_call_pretokenized", "plain forward, pre-tokenized: root `Hooked::call` (no_grad)", False, None),
    ("tokenize", "tokenization alone", True, None),
    ("trace_empty", "trace, empty block (no node)", True, None),
    ("trace_read_unsaved", "trace, one read of h[1].output, not saved", True, None),
    ("trace_save_1", "trace saving h[0].output", True, None),
    ("trace_save_all", "trace saving both block outputs", True, None),
    ("trace_swap_all", "trace with 2 swaps (output * 1.0) + save output", True, None),
]
GENERATE_CASES = [
    ("generate_plain", "`LanguageModel::generate`, 20 new tokens (token ids in)", False, None),
    ("generate_traced", "`generate!`, 20 new tokens, `lm_head.at(step).output.save()` each step", False, None),
]
INVOKE_CASES = [
    ("plain_forward", "plain forward `model.forward(&ten)` (no_grad)", True, None),
    ("one_invoke_10_sentences", "trace, 1 invoke of 10 sentences, save layer[5].output", True, None),
    ("ten_invokes_1_sentence", "trace, 10 invokes of 1 sentence, each saves layer[5].output", True, None),
]
TINY_CASES = [
    ("plain_forward", "plain forward: root `Hooked::call` (no_grad)", False, "vii"),
    ("trace_empty", "trace, empty block (no node)", False, None),
    ("trace_save", "trace saving lin.output (1st call)", False, "viii"),
    ("trace_swap_save", "trace, 1 swap (lin.output * 1.0) + save output", False, "ix"),
]
MICRO_CASES = [
    ("direct_forward", "identity module's own forward (no `Hooked::call`)"),
    ("call_no_trace", "`Hooked::call`, no trace active"),
    ("call_traced_module_not_in_graph", "`Hooked::call`, trace active, module not in the graph"),
    ("call_traced_module_other_call", "`Hooked::call`, module in the graph, nothing at this call"),
    ("call_traced_one_read", "`Hooked::call` with one (unsaved) read at this call"),
    ("node_run", "per apply node, running a chain of 1,000 nodes that each return `x.shallow_clone()` of a [1, 4] tensor"),
    ("node_build_and_run", "per apply node, building + running that chain (whole trace / 1,000)"),
    ("tch_narrow", "libtorch `narrow` of a [1, 4] tensor (what a read does)"),
    ("tch_shallow_clone", "libtorch `shallow_clone` of a [1, 4] tensor"),
    ("tch_size", "tch `size()` (a `Vec` from the C API)"),
    ("root_call_no_grad", "identity model: root `Hooked::call` under `no_grad`"),
    ("trace_empty", "identity model: empty `trace!` (fixed cost of one trace)"),
]


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR") or os.path.join(os.path.dirname(HERE), "target")


def criterion_dir():
    return criterion_dir_arg() or os.path.join(target_dir(), "criterion")


def load(root, group, case):
    """Criterion's median in ns of group/case, or None when that case has not been run."""
    path = os.path.join(root, group, case, "new", "estimates.json")
    try:
        with open(path) as f:
            return json.load(f)["median"]["point_estimate"]
    except (OSError, KeyError, ValueError):
        return None


def paired_folder():
    """Where the bench writes its paired runs: `<target>/interleave-paired`."""
    return os.path.join(os.path.dirname(criterion_dir()), "interleave-paired")


def load_paired(group):
    """Per-round times (ns) of the paired runs of a group: {case: [t_round0, ...]}."""
    path = os.path.join(paired_folder(), f"{group}.json")
    try:
        with open(path) as f:
            return {k: v["times_ns"] for k, v in json.load(f).items()}
    except (OSError, KeyError, ValueError):
        return {}


def load_json_runs(matches, times):
    """`times(parsed_json)` of every file in the paired folder whose name `matches`, in name order."""
    folder = paired_folder()
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    runs = []
    for name in filter(matches, names):
        try:
            with open(os.path.join(folder, name)) as f:
                runs.append(times(json.load(f)))
        except (OSError, KeyError, ValueError):
            pass
    return runs


def load_paired_runs(group):
    """Per-round times of every process that ran a group's paired rounds: the main file and
    any `<group>.<tag>.json` written with PAIRED_TAG. A list of {case: [t_round0, ...]}."""
    return load_json_runs(
        lambda n: n == f"{group}.json" or (n.startswith(f"{group}.") and n.endswith(".json")),
        lambda d: {k: v["times_ns"] for k, v in d.items()})


def load_python_runs():
    """Per-round times (ns) of `benches/python_nnsight.py` runs on this machine
    (`python_minilm_b2_t1.<tag>.json`): a list of {case: [t_round0, ...]}."""
    return load_json_runs(lambda n: n.startswith("python_minilm_b2_t1.") and n.endswith(".json"),
                          lambda d: d["times_ns"])


def median(v):
    v = sorted(v)
    n = len(v)
    return None if n == 0 else (v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2)


def paired_ratio(p, case, base):
    """Median over rounds of case / base in the same round, with the quartiles."""
    a, b = p.get(case), p.get(base)
    if not a or not b or len(a) != len(b):
        return None
    r = sorted(x / y for x, y in zip(a, b))
    return median(r), r[len(r) // 4], r[(3 * len(r)) // 4], len(r)


def fmt_time(ns):
    if ns is None:
        return "—"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.1f} ns"


def fmt_ratio(x):
    return "—" if x is None else f"{x:.3f}"


def fmt_paired(pr):
    return "—" if pr is None else f"{pr[0]:.3f} ({pr[1]:.3f}–{pr[2]:.3f})"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def model_table(root, group, title, cases, py, with_python, baseline="plain_forward", pre="plain_call_pretokenized"):
    med = {c[0]: load(root, group, c[0]) for c in cases}
    paired = load_paired(group)
    if all(v is None for v in med.values()):
        return med, paired, ""
    base = med.get(baseline)
    has_pre = pre in paired and pre != baseline
    has_py = with_python and any(c[3] for c in cases)
    rounds = len(paired.get(baseline, []))
    head = ["case", "tokenizes", f"median ({rounds} paired rounds)", "criterion median",
            "ratio to plain forward, paired (quartiles)"]
    if has_pre:
        head.append("ratio to pre-tokenized call, paired")
    if has_py:
        head += [f"{PY_LABEL}: median", "its ratio to its plain forward"]
    lines = [f"**{title}** (`{group}`)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    py_base_key = "vii" if any(c[3] == "vii" for c in cases) else "i"
    for case, what, tok, key in cases:
        m = med[case]
        if m is None:
            continue
        row = [what, "yes" if tok else "no", fmt_time(median(paired.get(case, []))), fmt_time(m),
               fmt_paired(paired_ratio(paired, case, baseline))]
        if has_pre:
            pr = paired_ratio(paired, case, pre)
            row.append("—" if pr is None else f"{pr[0]:.3f}")
        if has_py:
            if key and key in py:
                pm = py[key]["median_ms"]
                row += [f"{pm:.3f} ms", fmt_ratio(pm / py[py_base_key]["median_ms"])]
            else:
                row += ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    return med, paired, "\n".join(lines) + "\n"


def criterion_dir_arg():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    return args[0] if args else None


def main():
    root = criterion_dir()
    with open(os.path.join(HERE, "python_nnsight_reference.json")) as f:
        ref = json.load(f)
    py = ref["results"]
    out = []
    out.append("Medians: over the paired rounds (the cases of a group run interleaved, each round timing every "
               "case once), and criterion's (`cargo bench --bench interleave`, one case after the other, so load "
               "that comes and goes shows up between cases). Ratios \"paired\": median over rounds of the case's "
               "time / the baseline's time in the same round (quartiles in parentheses). \"tokenizes\": the timed "
               "call tokenizes text (every `trace!` on text does; the pre-tokenized call, the traces on the "
               "tokenized batch and the Python library's cases do not).\n")
    groups = {}
    # The Python figures are for MiniLM batch 2 and the tiny model, 1 thread: shown beside those only.
    for group, title, cases, with_python in [
        ("minilm_b2_t1", "MiniLM, batch 2 (the two reference sentences, 14 tokens), 1 thread", MINILM_CASES, True),
        ("minilm_b2_t1_kernel", "MiniLM, batch 2, 1 thread: the linear layers' kernel", KERNEL_CASES, False),
        ("minilm_b32_t1_kernel", "MiniLM, batch 32, 1 thread: the linear layers' kernel", KERNEL_CASES, False),
        ("linear_768_r128_t1", "A 124M model's block linear layers (768/3072 wide), 128 rows, 1 thread", LINEAR_SHAPE_CASES, False),
        ("linear_768_r1024_t1", "A 124M model's block linear layers (768/3072 wide), 1024 rows, 1 thread", LINEAR_SHAPE_CASES, False),
        ("minilm_b2_tall", "MiniLM, batch 2, all threads", MINILM_CASES, False),
        ("minilm_b32_t1", "MiniLM, batch 32, 1 thread", MINILM_CASES, False),
        ("minilm_b32_tall", "MiniLM, batch 32, all threads", MINILM_CASES, False),
        ("minilm_invokes_t1", "MiniLM, 10 sentences, 1 thread", INVOKE_CASES, False),
        ("gpt2_t1", "tiny GPT-2 (2 layers, 64 wide), 7-token prompt, 1 thread", GPT2_CASES, False),
        ("tiny_linear_t1", "tiny model: one Linear(4, 4) applied twice, input [1, 4], 1 thread", TINY_CASES, True),
    ]:
        # The baseline of a group is its first case (the plain forward).
        med, paired, table = model_table(root, group, title, cases, py, with_python, baseline=cases[0][0])
        groups[group] = (med, paired)
        if table:
            out.append(table)

    gen = {c[0]: load(root, "gpt2_generate_t1", c[0]) for c in GENERATE_CASES}
    gen_p = load_paired("gpt2_generate_t1")
    if any(v is not None for v in gen.values()):
        out.append("**Generation, tiny GPT-2, 1 thread** (`gpt2_generate_t1`)\n")
        out.append("| case | median | ratio to plain generation, paired (quartiles) | ratio of criterion medians |\n|---|---|---|---|")
        for case, what, _, _ in GENERATE_CASES:
            out.append(f"| {what} | {fmt_time(gen[case])} | {fmt_paired(paired_ratio(gen_p, case, 'generate_plain'))} "
                       f"| {fmt_ratio(ratio(gen[case], gen['generate_plain']))} |")
        out.append("")

    micro = {c[0]: load(root, "micro", c[0]) for c in MICRO_CASES}
    if any(v is not None for v in micro.values()):
        out.append("**Interleaver micro-benchmarks** (`micro`, nanoseconds per call or per node)\n")
        out.append("| case | ns |\n|---|---|")
        for case, what in MICRO_CASES:
            v = micro[case]
            out.append(f"| {what} | {'—' if v is None else f'{v:.1f}'} |")
        out.append("")

    # The Python library timed on this machine in the same session (benches/python_nnsight.py),
    # its processes alternating with ours: medians per process, then the median over processes.
    py_runs = load_python_runs()
    rust_runs = load_paired_runs("minilm_b2_t1")
    same_day = {}
    if py_runs and rust_runs:
        def per_run(runs, case, base=None):
            v = []
            for r in runs:
                if case not in r or (base and base not in r):
                    continue
                v.append(median([(a - b) for a, b in zip(r[case], r[base])]) if base else median(r[case]))
            return (median(v), min(v), max(v)) if v else None

        def rng(x):
            return f"{x[0] / 1e6:.3f} ms ({x[1] / 1e6:.3f}–{x[2] / 1e6:.3f})"

        out.append(f"**The Python library on this machine, same session** (`benches/python_nnsight.py`: "
                   f"{len(py_runs)} Python processes alternating with {len(rust_runs)} of ours, 300 paired rounds "
                   f"each, MiniLM batch 2 on the tokenized batch, 1 thread; medians per process, then the median "
                   f"over processes and their range)\n")
        out.append("| case | Python nnsight | ours | ours faster by | Python: time above its plain forward | "
                   "ours: time above our plain forward | overhead smaller by |\n|---|---|---|---|---|---|---|")
        base = "plain_call_pretokenized"
        for case, what in [(base, "plain forward (no trace)"),
                           ("trace_save_1_pretokenized", "trace saving layer[2].output"),
                           ("trace_save_all_pretokenized", "trace saving all 6 layer outputs"),
                           ("trace_swap_all_pretokenized", "trace with 6 swaps (output * 1.0) + save")]:
            p, r = per_run(py_runs, case), per_run(rust_runs, case)
            if p is None or r is None:
                continue
            row = [what, rng(p), rng(r), f"{p[0] / r[0]:.2f}x"]
            if case == base:
                row += ["", "", ""]
            else:
                pa, ra = per_run(py_runs, case, base), per_run(rust_runs, case, base)
                row += [rng(pa), rng(ra), f"{pa[0] / ra[0]:.1f}x" if ra[0] > 0 else "—"]
            same_day[case] = (p[0], r[0])
            out.append("| " + " | ".join(row) + " |")
        out.append("")

    # Targets. Ratios: the paired runs' (criterion's medians beside them); absolute times: criterion's.
    t = []

    def target(name, figure, ok):
        status = "met" if ok else ("not met" if ok is not None else "not measured")
        t.append(f"| {name} | {figure} | {status} |")

    b2, b2p = groups.get("minilm_b2_t1", ({}, {}))
    for case, limit, name in [
        ("trace_empty", 1.01, "trace with no intervention (empty block), MiniLM batch 2, 1 thread: ratio <= 1.01"),
        ("trace_read_unsaved", 1.01, "trace with no intervention (one unsaved read), MiniLM batch 2, 1 thread: ratio <= 1.01"),
        ("trace_save_all", 1.03, "saving every layer, MiniLM batch 2, 1 thread: ratio <= 1.03"),
        ("trace_swap_all", 1.05, "every-layer swap, MiniLM batch 2, 1 thread: ratio <= 1.05"),
    ]:
        pr, pp = paired_ratio(b2p, case, "plain_forward"), paired_ratio(b2p, case, "plain_call_pretokenized")
        tt = paired_ratio(b2p, case + "_pretokenized", "plain_call_pretokenized")
        fig = (f"on text: {fmt_paired(pr)} to `model.forward` (both tokenize), paired; "
               f"{'—' if pp is None else f'{pp[0]:.3f}'} to the pre-tokenized call"
               + ("" if tt is None else f". On the tokenized batch: {fmt_paired(tt)} to the pre-tokenized call, paired"))
        ok = None if pr is None else (pr[0] <= limit and (tt is None or tt[0] <= limit))
        target(name, fig, ok)
    tiny, tiny_p = groups.get("tiny_linear_t1", ({}, {}))
    for case, key in [("trace_save", "viii"), ("trace_swap_save", "ix")]:
        m = median(tiny_p.get(case, [])) or tiny.get(case)
        pm = py[key]["median_ms"] * 1e6
        sp = ratio(pm, m)
        fig = f"{fmt_time(m)} vs Python {fmt_time(pm)}: {sp:.1f}x faster" if sp else "—"
        target(f">= 2x faster than Python end to end, tiny model, {py[key]['what'].split(': ', 1)[-1]}", fig,
               None if sp is None else sp >= 2)
    # Time above the plain forward, per round (same round, so load hits both alike): the
    # reference cases compare the Python library with us on this for MiniLM. Per process: the
    # median over its rounds; over processes: the median of those (a process's memory layout
    # moves its figure by more than the rounds' spread), with their range.
    b2_runs = load_paired_runs("minilm_b2_t1")

    def above(p, case, base):
        a, b = p.get(case), p.get(base)
        if not a or not b or len(a) != len(b):
            return None
        return median([(x - y) / 1e6 for x, y in zip(a, b)])

    def above_runs(case, base):
        v = [x for x in (above(p, case, base) for p in b2_runs) if x is not None]
        return (median(v), min(v), max(v), len(v)) if v else None

    by_hand = {"trace_save_all": "plain_keep_all_by_hand", "trace_swap_all": "plain_swap_all_by_hand"}
    for case, key in [("trace_save_1", "ii"), ("trace_save_all", "iii"), ("trace_swap_all", "iv")]:
        pre = above_runs(case + "_pretokenized", "plain_call_pretokenized")
        text = above_runs(case, "plain_call_pretokenized")
        hand = above_runs(by_hand[case], "plain_call_pretokenized") if case in by_hand else None
        if pre is None:
            continue
        theirs = py[key]["minus_i_ms"]
        sp = theirs / pre[0] if pre[0] > 0 else float("inf")
        times = f"{theirs / pre[0]:.1f}x smaller" if pre[0] > 0 else "no measurable overhead"
        fig = (f"time above the pre-tokenized plain forward, both given the tokenized batch (as the Python "
               f"library's traces of the wrapped BertModel are): {pre[0]:.3f} ms (median of {pre[3]} processes' "
               f"medians; range {pre[1]:.3f}–{pre[2]:.3f}) vs Python {theirs:.3f} ms: {times}. With text in "
               f"(tokenizing inside `trace!`): {'—' if text is None else f'{text[0]:.3f} ms (range {text[1]:.3f}–{text[2]:.3f})'}"
               + ("" if hand is None else f". The same tensor work in plain tch by hand, no trace: {hand[0]:.3f} ms "
                  f"(range {hand[1]:.3f}–{hand[2]:.3f})"))
        target(f"overhead >= 2x smaller than Python's, MiniLM batch 2, 1 thread, {py[key]['what'].replace('nnsight ', '')}",
               fig, sp >= 2)
    for case, key in [("trace_save_1", "ii"), ("trace_save_all", "iii"), ("trace_swap_all", "iv")]:
        m = median(b2p.get(case + "_pretokenized", []))
        pm = py[key]["median_ms"] * 1e6
        sp = ratio(pm, m)
        if sp is None:
            continue
        pre_call = median(b2p.get("plain_call_pretokenized", []))
        kp = groups.get("minilm_b2_t1_kernel", ({}, {}))[1]
        mkl = paired_ratio(kp, "plain_call_pretokenized_libtorch_linear", "plain_call_pretokenized")
        fig = (f"{fmt_time(m)} (paired rounds' median) vs Python {fmt_time(pm)}: {sp:.2f}x faster. Our plain forward on "
               f"the same input: {fmt_time(pre_call)}, {fmt_ratio(ratio(py['i']['median_ms'] * 1e6, pre_call))}x faster "
               f"than Python's. Most of the gain is the linear layers' kernel (oneDNN, `nnsight::models::linear`): with "
               f"libtorch's `linear` (MKL's AVX2 sgemm on this AMD CPU, what PyTorch runs) the same forward takes "
               f"{'—' if mkl is None else f'{mkl[0]:.3f}'}x as long (`minilm_b2_t1_kernel`, paired)")
        target(f">= 2x faster than Python end to end, MiniLM batch 2, 1 thread, {py[key]['what'].replace('nnsight ', '')}", fig,
               sp >= 2)
    for case, what in [("trace_save_1_pretokenized", "trace saving encoder.layer[2].output"),
                       ("trace_save_all_pretokenized", "trace saving all 6 layer outputs"),
                       ("trace_swap_all_pretokenized", "trace with 6 swaps (output * 1.0)")]:
        if case in same_day:
            p, r = same_day[case]
            target(f">= 2x faster than Python end to end, MiniLM batch 2, 1 thread, {what}: Python measured on this "
                   f"machine in the same session", f"{fmt_time(r)} vs Python {fmt_time(p)}: {p / r:.2f}x faster "
                   f"(table above)", p / r >= 2)
    for case, name in [("call_no_trace", "hook call, no trace active: < 50 ns"),
                       ("call_traced_module_not_in_graph", "hook call, trace active, module not in the graph: < 50 ns")]:
        v = micro.get(case)
        target(name, "—" if v is None else f"{v:.1f} ns", None if v is None else v < 50)
    out.append("**Targets**\n")
    out.append("| target | figure | |\n|---|---|---|")
    out.extend(t)
    tables = "\n".join(out)
    if "--stdout" in sys.argv[1:]:
        print(tables)
        return
    if not groups_measured(groups, micro, gen):
        sys.exit(f"no criterion results under {root}: run `cargo bench --bench interleave` first "
                 f"(BENCHMARKS.md left as it is)")
    write_benchmarks(tables)


def groups_measured(groups, micro, gen):
    """Whether any case of any group has a criterion result."""
    meds = [v for med, _ in groups.values() for v in med.values()] + list(micro.values()) + list(gen.values())
    return any(v is not None for v in meds)


BENCHMARKS = os.path.join(os.path.dirname(HERE), "BENCHMARKS.md")
MEMORY_HEADING = "## Memory"


def write_benchmarks(tables):
    """BENCHMARKS.md: title, the hand-written notes, the tables, the memory section."""
    with open(os.path.join(HERE, "benchmarks_notes.md")) as f:
        notes = f.read().strip()
    memory_file = os.path.join(target_dir(), "memory_report.md")
    if os.path.exists(memory_file):
        with open(memory_file) as f:
            memory = (f"{MEMORY_HEADING}\n\n`cargo run --release --example memory_report` (each row a fresh process, "
                      f"whose peak is reset after loading the model and one warm-up forward):\n\n{f.read().strip()}")
    else:
        try:
            with open(BENCHMARKS) as f:
                old = f.read()
            memory = old[old.index(MEMORY_HEADING):].strip()
        except (OSError, ValueError):
            memory = f"{MEMORY_HEADING}\n\nNot measured: run `cargo run --release --example memory_report > {memory_file}`."
    text = (f"# Benchmarks\n\n<!-- Written by benches/report.py: edit benches/benchmarks_notes.md for the text, "
            f"then run the script again. -->\n\n{notes}\n\n## Tables\n\n{tables}\n\n{memory}\n")
    with open(BENCHMARKS, "w") as f:
        f.write(text)
    print(f"wrote {BENCHMARKS}")


if __name__ == "__main__":
    main()
