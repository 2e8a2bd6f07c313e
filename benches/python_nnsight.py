#!/usr/bin/env python3
"""Times the Python library (nnsight) on the MiniLM cases of `benches/interleave.rs`, on this
machine, so that its figures and ours can be taken minutes apart instead of on another day.

Not part of the build or the tests. Needs a Python environment with torch, transformers and
nnsight (the reference cases used torch 2.13.0, transformers 5.24.0, nnsight 0.8.1):

    python3 -m venv /tmp/pyvenv
    /tmp/pyvenv/bin/pip install torch==2.13.0 transformers==5.24.0 nnsight==0.8.1
    /tmp/pyvenv/bin/python benches/python_nnsight.py [--rounds 300] [--tag run1]

The model is `.nnsight/minilm` (made by `cargo xtask setup`): the wrapped `BertModel`
(eager attention, no pooler, eval) on the two reference sentences tokenized beforehand
(batch 2, 14 tokens), 1 torch thread, everything under `torch.no_grad()`. Cases, as the Rust
benchmark's `minilm_b2_t1` group names them:

- `plain_call_pretokenized`: `bert(**batch)`;
- `trace_save_1_pretokenized`: a trace saving `encoder.layer[2].output`;
- `trace_save_all_pretokenized`: a trace saving the 6 layer outputs;
- `trace_swap_all_pretokenized`: a trace setting each layer's output to itself * 1.0, saving the
  last.

Paired rounds, as in the Rust benchmark: each round times every case once, in a rotated order,
so load that comes and goes hits every case alike. Writes the per-round times (ns) to
`target/interleave-paired/python_minilm_b2_t1.<tag>.json` and prints medians and the median time
above the plain forward per round.
"""

import argparse
import json
import os
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from nnsight import NNsight  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = ["The Eiffel Tower is in the city of Paris.", "The Colosseum is in the city of Rome."]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--tag", default="run1")
    args = ap.parse_args()

    torch.set_num_threads(1)
    folder = os.path.join(ROOT, ".nnsight", "minilm")
    bert = BertModel.from_pretrained(folder, attn_implementation="eager", add_pooling_layer=False).eval()
    batch = dict(AutoTokenizer.from_pretrained(folder)(SENTENCES, padding=True, return_tensors="pt"))
    model = NNsight(bert)
    layers = len(bert.encoder.layer)

    def plain():
        return bert(**batch).last_hidden_state

    def save_1():
        with model.trace(**batch):
            h = model.encoder.layer[2].output.save()
        return h

    def save_all():
        hs = []
        with model.trace(**batch):
            for i in range(layers):
                hs.append(model.encoder.layer[i].output.save())
        return hs

    def swap_all():
        with model.trace(**batch):
            for i in range(layers):
                model.encoder.layer[i].output = model.encoder.layer[i].output * 1.0
            h = model.encoder.layer[layers - 1].output.save()
        return h

    cases = [
        ("plain_call_pretokenized", plain),
        ("trace_save_1_pretokenized", save_1),
        ("trace_save_all_pretokenized", save_all),
        ("trace_swap_all_pretokenized", swap_all),
    ]
    with torch.no_grad():
        reference = plain()
        assert torch.equal(save_all()[-1], reference), "the last saved layer is the model's output"
        assert torch.equal(swap_all(), reference), "x * 1.0 swaps leave the output unchanged"
        for _, f in cases:  # warm-up
            for _ in range(3):
                f()
        times = {name: [] for name, _ in cases}
        for r in range(args.rounds):
            for k in range(len(cases)):
                name, f = cases[(k + r) % len(cases)]
                t0 = time.perf_counter_ns()
                f()
                times[name].append(time.perf_counter_ns() - t0)

    out_dir = os.path.join(ROOT, "target", "interleave-paired")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"python_minilm_b2_t1.{args.tag}.json")
    meta = {"torch": torch.__version__, "nnsight": getattr(__import__("nnsight"), "__version__", "?"),
            "rounds": args.rounds, "threads": torch.get_num_threads()}
    with open(path, "w") as f:
        json.dump({"meta": meta, "times_ns": times}, f)
    base = times["plain_call_pretokenized"]
    for name, _ in cases:
        above = statistics.median([(a - b) / 1e6 for a, b in zip(times[name], base)])
        print(f"{name:32} median {statistics.median(times[name]) / 1e6:8.3f} ms   above plain {above:7.3f} ms")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
