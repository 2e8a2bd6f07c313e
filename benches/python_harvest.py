#!/usr/bin/env python3
"""The harvest of `benches/harvest.rs` written with the Python library (nnsight), for the ratio
against ours. Not part of the build or the tests.

Needs a Python environment with torch, transformers, nnsight, numpy and safetensors:

    python3 -m venv /tmp/pyvenv
    /tmp/pyvenv/bin/pip install torch transformers nnsight numpy safetensors
    /tmp/pyvenv/bin/python benches/python_harvest.py [--n 10240] [--rounds 3]

Same dataset (the Rust bench's sentence generator, reproduced below), same model
(`.nnsight/minilm`, the wrapped `BertModel`, eager attention, no pooler, eval, no_grad), batch
32, hook point `encoder.layer[3].output`. Per round:

- plain: the forward pass on the batches tokenized beforehand (not timed);
- harvest: for each batch, tokenize, trace saving the hook point, keep the rows of real tokens,
  and write shards of >= 65,536 rows (safetensors, with token_id, line, position) from a writer
  thread behind a bounded queue, as ours does.

Prints tokens/s of both and their ratio per round; writes `target/python_harvest.json`.
"""

import argparse
import json
import os
import queue
import tempfile
import threading
import time
import warnings

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from nnsight import NNsight  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK = (1 << 64) - 1
BATCH = 32
ROWS_PER_SHARD = 65536

SUBJECTS = ["The old tower", "A small museum", "The river", "Every visitor", "The new bridge", "Our guide",
            "The market square", "A famous painter", "The city council", "Most students", "The night train", "An ancient wall"]
VERBS = ["stands near", "was built beside", "looks over", "leads to", "was painted by", "crosses", "surrounds", "welcomes", "faces", "follows"]
OBJECTS = ["the cathedral", "a quiet harbour", "the main station", "the royal palace", "a busy street", "the university",
           "the botanical garden", "an old fortress", "the opera house", "a narrow canal"]
TAILS = ["", " in the morning", " during the long winter months", " after the great fire of the last century",
         " while tourists take pictures from every corner of the square", " on weekends",
         " as the sun sets behind the hills and the lights come on one by one", " since the war"]


def sentence(i):
    """Sentence `i` of benches/harvest.rs's dataset (the same 64-bit arithmetic)."""
    x = (i * 6364136223846793005 + 1442695040888963407) & MASK

    def pick(n):
        nonlocal x
        x ^= x >> 29
        x = (x * 0xBF58476D1CE4E5B9) & MASK
        return (x >> 33) % n

    s, v, o, t = SUBJECTS[pick(12)], VERBS[pick(10)], OBJECTS[pick(10)], TAILS[pick(8)]
    return f"{s} {v} {o}{t}."


def writer(q, out):
    parts, n, shard = [], 0, 0

    def flush():
        nonlocal parts, n, shard
        if not parts:
            return
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        save_file(cols, os.path.join(out, f"shard.{shard:06}.safetensors"))
        parts, n, shard = [], 0, shard + 1

    while True:
        item = q.get()
        if item is None:
            flush()
            return
        parts.append(item)
        n += len(item["line"])
        if n >= ROWS_PER_SHARD:
            flush()


def harvest(model, tok, texts, out):
    q = queue.Queue(maxsize=2)
    w = threading.Thread(target=writer, args=(q, out))
    w.start()
    tokens = 0
    for b in range(0, len(texts), BATCH):
        batch = dict(tok(texts[b:b + BATCH], padding=True, return_tensors="pt"))
        with model.trace(**batch):
            h = model.encoder.layer[3].output.save()
        h = h[0] if isinstance(h, tuple) else h
        mask = batch["attention_mask"].bool()
        lines = torch.arange(b, b + mask.shape[0]).unsqueeze(1).expand_as(mask)
        pos = mask.long().cumsum(1) - 1
        q.put({"encoder.layer.3.output": h[mask].numpy(), "token_id": batch["input_ids"][mask].numpy(),
               "line": lines[mask].numpy(), "position": pos[mask].numpy()})
        tokens += int(mask.sum())
    q.put(None)
    w.join()
    return tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10240)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    folder = os.path.join(ROOT, ".nnsight", "minilm")
    bert = BertModel.from_pretrained(folder, attn_implementation="eager", add_pooling_layer=False).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    model = NNsight(bert)
    texts = [sentence(i) for i in range(args.n)]
    batches = [dict(tok(texts[b:b + BATCH], padding=True, return_tensors="pt")) for b in range(0, len(texts), BATCH)]
    plain_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    rounds = []
    with torch.no_grad():
        for b in batches[:4]:  # warm-up
            bert(**b)
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for b in batches:
                bert(**b)
            plain = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                tokens = harvest(model, tok, texts, out)
                hv = time.perf_counter() - t0
            assert tokens == plain_tokens
            ratio = (tokens / hv) / (plain_tokens / plain)
            print(f"round {r}: plain {plain_tokens / plain:.0f} tokens/s ({plain:.2f} s), "
                  f"harvest {tokens / hv:.0f} tokens/s ({hv:.2f} s), ratio {ratio:.3f}")
            rounds.append({"plain_s": plain, "harvest_s": hv, "tokens": tokens, "ratio": ratio})
    meta = {"torch": torch.__version__, "nnsight": getattr(__import__("nnsight"), "__version__", "?"),
            "threads": torch.get_num_threads(), "sentences": args.n, "batch": BATCH}
    os.makedirs(os.path.join(ROOT, "target"), exist_ok=True)
    with open(os.path.join(ROOT, "target", "python_harvest.json"), "w") as f:
        json.dump({"meta": meta, "rounds": rounds}, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
