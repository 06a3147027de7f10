#!/usr/bin/env python3
"""Generate the `tests/fixtures/tiny-qwen3/` reference fixture.

A tiny random `Qwen3ForCausalLM` (q_norm/k_norm over head_dim before RoPE, no attention
biases, tied embeddings, an explicit head_dim that is not hidden/heads, top-level
`rope_theta`) with reference logits computed by Hugging Face `transformers` in float32 on
the stored bfloat16 weights. The format and the thread-tree semantics are those of
`tests/fixtures/README.md`.

How to run (CPU only, a few seconds; needs network access to PyPI once):

    python3 -m venv /tmp/hfvenv                      # outside the repository
    /tmp/hfvenv/bin/pip install torch transformers safetensors numpy
    /tmp/hfvenv/bin/python scripts/make-qwen3-fixture.py    # from the repository root

It was run with torch 2.15.0 and transformers 5.24.0. It (re)writes config.json,
model.safetensors and reference.json in tests/fixtures/tiny-qwen3/ and copies
tokenizer.json and tokenizer_config.json from tests/fixtures/tiny-qwen2/ (vocab 384).
Everything is seeded, so a rerun with the same versions gives the same files.

Before writing, it checks that
  * the config post-edited to the top-level `rope_theta` layout loads to the same model
    (rope_theta 1e6) and gives bit-identical logits to the layout transformers wrote;
  * the flattening machinery is sound: the sequence case run with explicit position ids
    and a 4-D causal float mask matches a plain forward within 1e-5;
  * every tree token whose visible context is itself causally consistent matches a plain
    forward over that context (with its explicit positions) within 1e-5.
"""

import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
from transformers import Qwen3Config, Qwen3ForCausalLM

SEED = 20240607
STD = 0.15  # weight init, like the other fixtures (so logits are not flat)
NORM_STD = 0.3  # RMSNorm weights are 1 + NORM_STD * N(0, 1), q_norm/k_norm included
VOCAB = 384

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIXTURES, "tiny-qwen3")
TOKENIZER_FROM = os.path.join(FIXTURES, "tiny-qwen2")


def make_config():
    return Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # deliberately not hidden_size / num_attention_heads (= 16)
        hidden_act="silu",
        max_position_embeddings=4096,
        initializer_range=STD,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
        attention_bias=False,
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
        architectures=["Qwen3ForCausalLM"],
    )


def randomize(model, gen):
    """Normal(0, STD) for every matrix; 1 + NORM_STD * N(0, 1) for every RMSNorm weight."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * STD)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * NORM_STD)
            else:
                raise SystemExit(f"unexpected parameter {name} {tuple(p.shape)}")


def load(path):
    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


# ---------------------------------------------------------------- tree flattening


class Flat:
    """The tree flattened into one sequence: token, position and visible entries per entry."""

    def __init__(self):
        self.tokens = []
        self.positions = []
        self.visible = []  # entry indices this entry attends to (itself last)

    def push(self, token, pos, ctx):
        ctx.append(len(self.tokens))
        self.tokens.append(token)
        self.positions.append(pos)
        self.visible.append(list(ctx))
        return len(self.tokens) - 1


def flatten(node, ctx, nxt, flat):
    """Flatten `node` whose thread has context `ctx` (entry indices, extended in place) and
    next position `nxt`. Returns (next position, index tree shaped like the node)."""
    idx = {"own": [], "join": [], "children": [], "then": None}
    for t in node["tokens"]:
        idx["own"].append(flat.push(t, nxt, ctx))
        nxt += 1
    fork = node.get("fork")
    if fork is not None:
        base = list(ctx)
        p = nxt
        owns = []
        extent = 0
        for child in fork["children"]:
            cctx = list(base)  # children start with the parent's context ...
            cnext, cidx = flatten(child, cctx, p, flat)  # ... at the parent's next position
            idx["children"].append(cidx)
            owns.append((child.get("returns"), cctx[len(base):]))  # the child's own part
            extent = max(extent, cnext - p)
        if fork["join"] == "reuse":
            for _, own in owns:  # the children's cached entries, child by child
                ctx.extend(own)
            nxt = p + extent
        elif fork["join"] == "reprefill":
            for returns, own in owns:  # transcripts fed again at sequential positions
                toks = returns if returns is not None else [flat.tokens[i] for i in own]
                for t in toks:
                    idx["join"].append(flat.push(t, nxt, ctx))
                    nxt += 1
        else:
            raise ValueError(fork["join"])
        if node.get("then") is not None:
            nxt, idx["then"] = flatten(node["then"], ctx, nxt, flat)
    return nxt, idx


def float_mask(visible, n):
    mask = torch.full((1, 1, n, n), float("-inf"), dtype=torch.float32)
    for r, vis in enumerate(visible):
        mask[0, 0, r, vis] = 0.0
    return mask


@torch.no_grad()
def masked_forward(model, tokens, positions, visible):
    n = len(tokens)
    out = model(
        input_ids=torch.tensor([tokens]),
        position_ids=torch.tensor([positions]),
        attention_mask=float_mask(visible, n),
        use_cache=False,
    )
    return out.logits[0].float()


@torch.no_grad()
def plain_forward(model, tokens, positions=None):
    kw = {}
    if positions is not None:
        kw["position_ids"] = torch.tensor([positions])
    return model(input_ids=torch.tensor([tokens]), use_cache=False, **kw).logits[0].float()


def fill(node, idx, logits):
    """Put the logits of the flattened entries into the tree (README `NODE` layout)."""
    out = {"tokens": node["tokens"], "logits": [logits[i].tolist() for i in idx["own"]]}
    fork = node.get("fork")
    if fork is not None:
        f = {"join": fork["join"], "children": []}
        for child, cidx in zip(fork["children"], idx["children"]):
            f["children"].append(fill(child, cidx, logits))
        if fork["join"] == "reprefill":
            f["join_logits"] = [logits[i].tolist() for i in idx["join"]]
        out["fork"] = f
        if node.get("then") is not None:
            out["then"] = fill(node["then"], idx["then"], logits)
    return out


def describe(node, depth=0, label="root"):
    pad = "  " * depth
    lines = [f"{pad}{label}: {len(node['tokens'])} tokens"]
    fork = node.get("fork")
    if fork is not None:
        extra = f", {len(fork['join_logits'])} join_logits" if "join_logits" in fork else ""
        lines.append(f"{pad}  fork {fork['join']} into {len(fork['children'])}{extra}")
        for i, c in enumerate(fork["children"]):
            lines += describe(c, depth + 2, f"child {i}")
        if "then" in node:
            lines += describe(node["then"], depth + 1, "then")
    return lines


# ---------------------------------------------------------------- main


def main():
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    # 1. Random model, stored as bfloat16 (tied embeddings: no lm_head.weight in the file).
    model = Qwen3ForCausalLM(make_config())
    randomize(model, gen)
    model = model.to(torch.bfloat16)
    os.makedirs(OUT, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="qwen3-fixture-")
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.copy(os.path.join(tmp, "model.safetensors"), os.path.join(OUT, "model.safetensors"))

    # 2. config.json in the published layout: top-level rope_theta, no rope_parameters.
    with open(os.path.join(tmp, "config.json")) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    assert rope.get("rope_type", "default") == "default", rope
    cfg["rope_theta"] = float(rope["rope_theta"])
    cfg.pop("rope_scaling", None)
    assert cfg["head_dim"] == 32 and cfg["tie_word_embeddings"] is True, cfg
    assert cfg["dtype"] == "bfloat16" and cfg["eos_token_id"] == 0, cfg
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_FROM, name), os.path.join(OUT, name))

    # 3. Reference model: the shipped files, float32 math, eager attention.
    ref = load(OUT)
    assert ref.config.rope_parameters["rope_theta"] == 1e6, ref.config.rope_parameters
    assert ref.config.head_dim == 32 and ref.config.tie_word_embeddings
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr(), "not tied"
    qn = ref.model.layers[0].self_attn.q_norm.weight
    assert qn.shape == (32,) and (qn - 1).abs().max() > 0.1, "q_norm should be random"
    assert ref.model.layers[0].self_attn.q_proj.bias is None
    as_written = load(tmp)  # the rope_parameters layout transformers wrote
    shutil.rmtree(tmp)

    rng = torch.Generator().manual_seed(SEED + 1)

    def rand_tokens(n):
        return torch.randint(0, VOCAB, (n,), generator=rng).tolist()

    # 4. sequence45
    seq = rand_tokens(45)
    plain = plain_forward(ref, seq)
    causal = [list(range(i + 1)) for i in range(len(seq))]
    masked = masked_forward(ref, seq, list(range(len(seq))), causal)
    d = (plain - masked).abs().max().item()
    print(f"sequence45: masked vs plain forward max |diff| = {d:.3g}")
    assert d < 1e-5, d
    d = (plain - plain_forward(as_written, seq)).abs().max().item()
    print(f"sequence45: top-level rope_theta vs rope_parameters config max |diff| = {d:.3g}")
    assert d == 0.0, d
    cases = [{"name": "sequence45", "kind": "sequence", "tokens": seq, "logits": plain.tolist()}]

    # 5. fork3_reuse_nested: the root forks (reuse) into 2 children; the second child forks
    # (reprefill) into 2 grandchildren and continues; then the root continues.
    tree = {
        "tokens": rand_tokens(12),
        "fork": {
            "join": "reuse",
            "children": [
                {"tokens": rand_tokens(7)},
                {
                    "tokens": rand_tokens(5),
                    "fork": {
                        "join": "reprefill",
                        "children": [{"tokens": rand_tokens(6)}, {"tokens": rand_tokens(4)}],
                    },
                    "then": {"tokens": rand_tokens(3)},
                },
            ],
        },
        "then": {"tokens": rand_tokens(6)},
    }
    flat = Flat()
    end, idx = flatten(tree, [], 0, flat)
    n = len(flat.tokens)
    logits = masked_forward(ref, flat.tokens, flat.positions, flat.visible)
    print(f"fork3_reuse_nested: {n} entries, final next position {end}")
    print(f"  positions: {flat.positions}")

    # Independent check: an entry whose visible entries each see exactly the prefix of its
    # visible list before them is an ordinary causal sequence at its explicit positions.
    checked, worst = 0, 0.0
    for e, vis in enumerate(flat.visible):
        if all(flat.visible[i] == vis[: k + 1] for k, i in enumerate(vis)):
            got = plain_forward(ref, [flat.tokens[i] for i in vis], [flat.positions[i] for i in vis])
            worst = max(worst, (got[-1] - logits[e]).abs().max().item())
            checked += 1
    print(f"  {checked}/{n} causally-consistent entries vs plain forward: max |diff| = {worst:.3g}")
    assert worst < 1e-5, worst
    # The entries after the reuse join (the root's then) are the ones that need the mask.
    assert checked < n

    node = fill(tree, idx, logits)
    print("\n".join("  " + line for line in describe(node)))
    cases.append({"name": "fork3_reuse_nested", "kind": "tree", "tree": node})

    reference = {
        "model": "tiny-qwen3",
        "arch": "qwen3",
        "weights_dtype": "bfloat16",
        "reference": f"transformers {transformers.__version__}, float32 math",
        "cases": cases,
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(reference, f)
    for name in sorted(os.listdir(OUT)):
        print(f"  {name}: {os.path.getsize(os.path.join(OUT, name))} bytes")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    sys.exit(main())
