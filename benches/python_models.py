#!/usr/bin/env python3
"""Random ~100M-parameter checkpoints of every decoder family for `benches/models.rs`, and
transformers' own timings of them (the baseline of "our plain forward is not slower"). Not part
of the build or the tests; the weights are made here, under `target/`, and never committed.

Needs torch and transformers (`/work/venv/bin/python` has torch 2.15 and transformers 5.24):

    python benches/python_models.py make               # target/bench-models/<family>/ (once)
    python benches/python_models.py time --tag run1    # -> target/bench-models/python.run1.json
    python benches/python_models.py report [--tags run1 run2 run3]
                                                       # the tables, from every python.*.json
                                                       # and rust.*.json (markdown on stdout,
                                                       # target/bench-models/summary.json)

`make`: per family a transformers config of hidden 768, 12 layers, 12 heads (head dim 64),
vocabulary 32,000, eager attention, float32 (see FAMILIES), initialised with `torch.manual_seed(0)`
and saved with `save_pretrained` (safetensors) into `target/bench-models/<family>/`, with
`input_ids.json`: the 1 x 128 prompt both sides run (ids from a fixed-seed generator), and
`python_reference.json`: the 20 tokens transformers' greedy generation makes from it (the Rust
bench checks its own generation against them, so both sides provably run the same model).

`time`: one process, 1 thread (`torch.set_num_threads(1)`, OMP/MKL_NUM_THREADS=1), under
`torch.no_grad()`, model in eval mode. Per family, as `benches/models.rs` does: a warm-up call,
then `--rounds` (8) timed forward passes, then a warm-up and `--gen-rounds` (4) timed
generations. The forward is `model(input_ids, attention_mask)` with
`use_cache=False` (our plain forward keeps no KV cache either; logits of all 128 positions on
both sides) and `model.generate(.., max_new_tokens=20, min_new_tokens=20, do_sample=False)`
(greedy, KV cache). Each call's wall-clock time and the process's CPU time
(`time.process_time_ns`) in ns go to `target/bench-models/python.<tag>.json`.

`report`: the ratios of `benches/models.rs`' paired rounds (median over rounds of per-round
ratios, per process, then the median over processes) and ours against transformers (per
process the median over its rounds; then the median over the processes of each side, which
alternated: python run1, rust run1, python run2, rust run2, ...).
"""

import argparse
import glob
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
OUT = os.path.join(TARGET, "bench-models")
SEQ = 128
NEW_TOKENS = 20
VOCAB = 32000

COMMON = dict(vocab_size=VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=2048)

# family folder -> (config class name, keyword arguments). Llama-style MLPs (3 matrices) get
# intermediate 2048, the 2-matrix MLPs (GPT-2, NeoX) 3072: the same ~7.1M parameters a layer.
FAMILIES = {
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=768, n_layer=12, n_head=12, n_inner=3072, n_positions=1024)),
    "llama": ("LlamaConfig", dict(COMMON, intermediate_size=2048, num_key_value_heads=12)),
    "gpt_neox": ("GPTNeoXConfig", dict(COMMON, intermediate_size=3072, rotary_pct=0.25, use_parallel_residual=True)),
    "gemma2": ("Gemma2Config", dict(COMMON, intermediate_size=2048, num_key_value_heads=4, head_dim=64,
                                   query_pre_attn_scalar=64, sliding_window=4096)),
    "gemma3_text": ("Gemma3TextConfig", dict(COMMON, intermediate_size=2048, num_key_value_heads=4, head_dim=64,
                                            query_pre_attn_scalar=64, sliding_window=512)),
    "qwen2": ("Qwen2Config", dict(COMMON, intermediate_size=2048, num_key_value_heads=4)),
    "qwen3": ("Qwen3Config", dict(COMMON, intermediate_size=2048, num_key_value_heads=4, head_dim=64)),
    "olmo2": ("Olmo2Config", dict(COMMON, intermediate_size=2048, num_key_value_heads=12)),
    "phi3": ("Phi3Config", dict(COMMON, intermediate_size=2048, num_key_value_heads=12)),
    "mistral": ("MistralConfig", dict(COMMON, intermediate_size=2048, num_key_value_heads=4)),
}


def folders(only):
    names = [f for f in FAMILIES if not only or f in only]
    return [(n, os.path.join(OUT, n)) for n in names]


def load_ids(folder):
    with open(os.path.join(folder, "input_ids.json")) as f:
        return json.load(f)


def make(args):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=g)
    for name, folder in folders(args.only):
        cls_name, kw = FAMILIES[name]
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            print(f"{name}: transformers {transformers.__version__} has no {cls_name}, skipped")
            continue
        cfg = cls(**kw)
        cfg.pad_token_id = 0
        cfg.bos_token_id = 1
        cfg.eos_token_id = 2
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
        os.makedirs(folder, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True)
        with open(os.path.join(folder, "input_ids.json"), "w") as f:
            json.dump(ids[0].tolist(), f)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        n = sum(p.numel() for p in model.parameters())
        with open(os.path.join(folder, "python_reference.json"), "w") as f:
            json.dump({"generated": out[0, SEQ:].tolist(), "parameters": n, "config_class": cls_name,
                       "transformers": transformers.__version__, "torch": torch.__version__}, f)
        print(f"{name}: {cls_name}, {n / 1e6:.1f}M parameters -> {folder}")


def time_it(args):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    result = {"tag": args.tag, "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "gen_rounds": args.gen_rounds,
              "families": {}}
    for name, folder in folders(args.only):
        if not os.path.exists(os.path.join(folder, "input_ids.json")):
            print(f"{name}: no checkpoint in {folder} (run `make` first), skipped")
            continue
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
        ids = torch.tensor([load_ids(folder)])
        mask = torch.ones_like(ids)

        def forward():
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

        def generate():
            return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False, pad_token_id=0)

        # As benches/models.rs: a warm-up call, then the forward passes, then the generations.
        # Wall clock and the process's CPU time (time.process_time_ns, as the Rust bench's).
        times = {"forward": [], "generate": [], "forward_cpu": [], "generate_cpu": []}
        with torch.no_grad():
            for c, f, rounds in [("forward", forward, args.rounds), ("generate", generate, args.gen_rounds)]:
                f()
                for _ in range(rounds):
                    c0, t0 = time.process_time_ns(), time.perf_counter_ns()
                    f()
                    times[c].append(time.perf_counter_ns() - t0)
                    times[c + "_cpu"].append(time.process_time_ns() - c0)
        result["families"][name] = {c + "_ns": v for c, v in times.items()}
        print(f"{name}: forward median {statistics.median(times['forward']) / 1e6:.1f} ms, "
              f"generate median {statistics.median(times['generate']) / 1e6:.1f} ms")
        del model
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"python.{args.tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


def quartiles(v):
    s = sorted(v)
    n = len(s)
    return s[n // 4], s[(3 * n) // 4]


def report(args):
    def runs(side):
        files = sorted(glob.glob(os.path.join(OUT, f"{side}.*.json")))
        if args.tags:
            files = [p for p in files if os.path.basename(p)[len(side) + 1:-5] in args.tags]
        return [json.load(open(p)) for p in files]

    py, rs = runs("python"), runs("rust")
    if not rs:
        sys.exit(f"no rust.*.json under {OUT}: run `cargo bench --bench models` first")
    fams = []
    for r in rs:
        for f in r["families"]:
            if f not in fams:
                fams.append(f)
    summary = {"python_processes": len(py), "rust_processes": len(rs), "python_tags": [p["tag"] for p in py],
               "rust_tags": [r["tag"] for r in rs], "families": {}}

    def paired(fam, case, base, key):
        """Per process: median over rounds of case/base in the same round; then over processes.
        Quartiles: over every round of every process."""
        per, allr = [], []
        for r in rs:
            c = r["families"].get(fam, {}).get(key, {})
            if case in c and base in c:
                rat = [a / b for a, b in zip(c[case], c[base])]
                per.append(statistics.median(rat))
                allr += rat
        if not per:
            return None
        lo, hi = quartiles(allr)
        return {"median": statistics.median(per), "process_min": min(per), "process_max": max(per),
                "processes": len(per), "rounds": len(allr), "round_q1": lo, "round_q3": hi}

    def per_process(runs, get):
        v = [statistics.median(x) for x in (get(r) for r in runs) if x]
        return {"median": statistics.median(v), "min": min(v), "max": max(v), "processes": len(v)} if v else None

    def vs(o, t):
        if o is None or t is None:
            return None
        return {"ratio": o["median"] / t["median"], "ours": o, "transformers": t}

    for fam in fams:
        info = next(r["families"][fam] for r in rs if fam in r["families"])
        pname = info.get("python_name", fam)
        s = {"parameters": info.get("parameters")}
        for metric, key, pysuf in [("wall", "cases", ""), ("cpu", "cpu_cases", "_cpu")]:
            m = {}
            m["trace_save_all/plain_forward"] = paired(fam, "trace_save_all", "plain_forward", key)
            m["generate_traced/generate_plain"] = paired(fam, "generate_traced", "generate_plain", key)
            for extra in ["cache_all_run_with_cache", "cache_all_trace_option"]:
                p = paired(fam, extra, "trace_save_all", key)
                if p:
                    m[extra + "/trace_save_all"] = p
                    m[extra + "/plain_forward"] = paired(fam, extra, "plain_forward", key)
            # Ours against transformers: only our processes that alternated with a Python one
            # (same tag); further Rust-only processes add rounds to the ratios above.
            tags = {p["tag"] for p in py}
            rs_alt = [r for r in rs if r["tag"] in tags]
            for case, pcase in [("plain_forward", "forward"), ("generate_plain", "generate")]:
                ours = per_process(rs_alt, lambda r: r["families"].get(fam, {}).get(key, {}).get(case))
                theirs = per_process(py, lambda p: p["families"].get(pname, {}).get(pcase + pysuf + "_ns"))
                m[case + "/transformers"] = vs(ours, theirs)
            s[metric] = m
        summary["families"][fam] = s

    def fp(p):
        if p is None:
            return "—"
        return f"**{p['median']:.3f}** ({p['round_q1']:.3f}–{p['round_q3']:.3f})"

    def fv(v):
        if v is None:
            return "—"
        return f"**{v['ratio']:.3f}** ({v['ours']['median'] / 1e6:.0f} / {v['transformers']['median'] / 1e6:.0f} ms)"

    out = []
    for metric, title in [("wall", "Wall-clock time"), ("cpu", "CPU time of the process")]:
        out.append(f"**{title}**\n")
        out.append("| family | params | ours / transformers, forward (ms / ms) | trace saving every layer / plain forward "
                   "| `generate!` saving each step / plain generation | ours / transformers, 20-token generation (ms / ms) |")
        out.append("|---|---|---|---|---|---|")
        for fam, s in summary["families"].items():
            m = s[metric]
            n = s["parameters"]
            out.append(f"| {fam} | {'—' if not n else f'{n / 1e6:.0f}M'} | {fv(m['plain_forward/transformers'])} "
                       f"| {fp(m['trace_save_all/plain_forward'])} | {fp(m['generate_traced/generate_plain'])} "
                       f"| {fv(m['generate_plain/transformers'])} |")
        out.append("")
        cache = []
        for fam, s in summary["families"].items():
            m = s[metric]
            for extra, what in [("cache_all_run_with_cache", "`run_with_cache(&ids, CacheOptions::default())`"),
                                ("cache_all_trace_option", "`trace!(model, &ids, cache = &mut slot, {})`")]:
                if extra + "/trace_save_all" in m:
                    cache.append(f"| {fam} | {what} | {fp(m[extra + '/trace_save_all'])} | {fp(m[extra + '/plain_forward'])} |")
        if cache:
            out.append("| family | cache of every module | / trace saving every layer by hand | / plain forward |")
            out.append("|---|---|---|---|")
            out += cache
            out.append("")
    spread = []
    for fam, s in summary["families"].items():
        for metric in ["wall", "cpu"]:
            m = s[metric]
            for k in ["trace_save_all/plain_forward", "generate_traced/generate_plain"]:
                p = m[k]
                if p:
                    spread.append(f"{fam} {metric} {k}: processes {p['process_min']:.3f}–{p['process_max']:.3f} "
                                  f"({p['processes']} processes, {p['rounds']} rounds)")
            for k in ["plain_forward/transformers", "generate_plain/transformers"]:
                v = m[k]
                if v:
                    o, t = v["ours"], v["transformers"]
                    spread.append(f"{fam} {metric} {k}: ours {o['min'] / 1e6:.0f}–{o['max'] / 1e6:.0f} ms over "
                                  f"{o['processes']} processes, transformers {t['min'] / 1e6:.0f}–{t['max'] / 1e6:.0f} ms "
                                  f"over {t['processes']}")
    faults = []
    for fam in fams:
        per = {}
        for r in rs:
            for case, f in r["families"].get(fam, {}).get("minor_faults_per_call", {}).items():
                per.setdefault(case, []).append(f)
        if per:
            faults.append(f"{fam}: " + ", ".join(f"{c} {statistics.median(v):.0f}" for c, v in per.items()))
            summary["families"][fam]["minor_faults_per_call"] = {c: statistics.median(v) for c, v in per.items()}
    if faults:
        out.append("Minor page faults per call (median over processes): " + "; ".join(faults) + ".")
    print("\n".join(out))
    if args.spread:
        print("\n".join(spread))
    with open(os.path.join(OUT, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["make", "time", "report"])
    ap.add_argument("--tag", default="run1")
    ap.add_argument("--rounds", type=int, default=8, help="timed forward passes per family")
    ap.add_argument("--gen-rounds", type=int, default=4, help="timed generations per family")
    ap.add_argument("--tags", nargs="*", help="report: only these tags (default: every file)")
    ap.add_argument("--spread", action="store_true", help="report: also print each ratio's range over processes")
    ap.add_argument("--only", nargs="*", help="family folders (default: all of FAMILIES)")
    args = ap.parse_args()
    {"make": make, "time": time_it, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
