#!/usr/bin/env python3
"""Writes the starting corpora under fuzz/corpus/<target>/ from the repository's fixtures plus
a few small hand-made files. Run from anywhere: python3 fuzz/seeds.py"""
import json
import struct
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
FIX = ROOT / "tests" / "fixtures"
FIXTURES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]


def out(target, name, data):
    d = FUZZ / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def safetensors(header, data_len):
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + bytes(data_len)


def seed_safetensors():
    for f in FIXTURES:
        raw = (FIX / f / "model.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        # The real header with its data cut off (offsets out of range), and a small valid file
        # with the first few tensors re-laid out over a short data region.
        out("safetensors_header", f"{f}-header", raw[: 8 + n])
        small, off = {"__metadata__": header.get("__metadata__", {"format": "pt"})}, 0
        for name in sorted(k for k in header if k != "__metadata__")[:4]:
            e = header[name]
            shape = [min(d, 2) for d in e["shape"]]
            size = {"F32": 4, "F16": 2, "BF16": 2}[e["dtype"]]
            for d in shape:
                size *= d
            small[name] = {"dtype": e["dtype"], "shape": shape, "data_offsets": [off, off + size]}
            off += size
        out("safetensors_header", f"{f}-small", safetensors(small, off))
    out("safetensors_header", "empty-tensor", safetensors(
        {"a": {"dtype": "F16", "shape": [0, 3], "data_offsets": [0, 0]},
         "b": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, 4))


def gguf(meta, tensors, version=3, align=32):
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    def val(v):
        kind, x = v
        if kind == "str":
            return struct.pack("<I", 8) + s(x)
        if kind == "u32":
            return struct.pack("<II", 4, x)
        if kind == "f32":
            return struct.pack("<If", 6, x)
        if kind == "bool":
            return struct.pack("<IB", 7, x)
        if kind == "u32s":
            return struct.pack("<IIQ", 9, 4, len(x)) + b"".join(struct.pack("<I", i) for i in x)
        if kind == "strs":
            return struct.pack("<IIQ", 9, 8, len(x)) + b"".join(s(i) for i in x)
        raise ValueError(kind)

    body = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(meta))
    for k, v in meta:
        body += s(k) + val(v)
    offset, data = 0, b""
    for name, dims, ty, blob in tensors:
        body += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        body += struct.pack("<IQ", ty, offset)
        pad = (-len(blob)) % align
        data += blob + bytes(pad)
        offset += len(blob) + pad
    body += bytes((-len(body)) % align)
    return body + data


def f32(n, start=0.0):
    return b"".join(struct.pack("<f", start + i * 0.25) for i in range(n))


def seed_gguf():
    for arch in ["llama", "qwen2", "qwen3"]:
        meta = [
            ("general.architecture", ("str", arch)),
            (f"{arch}.block_count", ("u32", 1)),
            (f"{arch}.context_length", ("u32", 64)),
            (f"{arch}.embedding_length", ("u32", 8)),
            (f"{arch}.feed_forward_length", ("u32", 16)),
            (f"{arch}.attention.head_count", ("u32", 2)),
            (f"{arch}.attention.head_count_kv", ("u32", 1)),
            (f"{arch}.rope.freq_base", ("f32", 10000.0)),
            (f"{arch}.attention.layer_norm_rms_epsilon", ("f32", 1e-6)),
            ("tokenizer.ggml.tokens", ("strs", [chr(97 + i) for i in range(16)])),
            ("tokenizer.ggml.eos_token_id", ("u32", 0)),
        ]
        q8 = (struct.pack("<e", 0.5) + bytes(range(32))) * 2  # two Q8_0 blocks of 32
        q4 = (struct.pack("<e", 0.5) + bytes(range(16)))  # one Q4_0 block
        tensors = [
            ("token_embd.weight", [8, 16], 0, f32(128)),
            ("blk.0.attn_q.weight", [8, 8], 0, f32(64)),
            ("blk.0.attn_k.weight", [8, 4], 0, f32(32)),
            ("blk.0.ffn_up.weight", [32, 2], 8, q8),
            ("blk.0.ffn_gate.weight", [32, 1], 2, q4),
            ("output_norm.weight", [8], 0, f32(8, 1.0)),
        ]
        out("gguf_header", f"{arch}.gguf", gguf(meta, tensors))
    # A tokenizer in the metadata: a few byte-level tokens, merges, a control token, BOS.
    toks = ["a", "b", "c", "Ġ", "ab", "Ġc", "<Thread>", "1", ":", "Ċ"]
    meta = [
        ("tokenizer.ggml.model", ("str", "gpt2")),
        ("tokenizer.ggml.pre", ("str", "smollm")),
        ("tokenizer.ggml.tokens", ("strs", toks)),
        ("tokenizer.ggml.token_type", ("u32s", [1, 1, 1, 1, 1, 1, 3, 1, 1, 1])),
        ("tokenizer.ggml.merges", ("strs", ["a b", "Ġ c"])),
        ("tokenizer.ggml.add_bos_token", ("bool", 1)),
        ("tokenizer.ggml.bos_token_id", ("u32", 6)),
        ("tokenizer.chat_template", ("str", "<|im_start|>user\n{{ m }}<|im_end|>")),
    ]
    out("gguf_header", "tokenizer.gguf", gguf(meta, []))
    out("gguf_header", "v2-empty.gguf", gguf([("general.alignment", ("u32", 64))], [], version=2, align=64))


def seed_config():
    for f in FIXTURES:
        out("config_json", f, (FIX / f / "config.json").read_bytes())
    out("config_json", "minimal", json.dumps({
        "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
        "eos_token_id": [1, 2], "bos_token_id": 0, "rope_scaling": None}))


def seed_tree():
    for f in FIXTURES:
        ref = json.loads((FIX / f / "reference.json").read_text())
        for case in ref["cases"]:
            if case.get("kind") != "tree":
                continue
            tree = case["tree"]

            def strip(node):
                # Logits are ignored by the parser and make inputs huge: drop them.
                node = {k: v for k, v in node.items() if k != "logits"}
                if "fork" in node:
                    fork = {k: v for k, v in node["fork"].items() if k != "join_logits"}
                    fork["children"] = [strip(c) for c in fork["children"]]
                    node["fork"] = fork
                if "then" in node:
                    node["then"] = strip(node["then"])
                return node

            out("tree_file", f"{f}-{case['name']}", json.dumps(strip(tree)))
    out("tree_file", "returns", json.dumps({"tokens": [1, 2], "fork": {"join": "reprefill", "children": [
        {"tokens": [3]}, {"tokens": [4, 5], "returns": [6]}]}, "then": {"tokens": [7]}}))


def seed_protocol():
    # Byte 0: bits 0-1 preset, bits 2-3 role (0 root, k child k-1), bit 4 char-level tokenizer.
    # Control bytes (< 0x20) index the tag table: container open/close, entry open/close,
    # child end, [block open/close], [result], [prime tag, labels], merge tokens.
    fork = bytes([0, 0x41, 2, 0x42, 0x43, 3, 2, 0x44, 3, 1, 0x45])
    for sel in range(0x20):
        out("protocol_tokens", f"sel{sel:02x}-fork", bytes([sel]) + fork)
        out("protocol_tokens", f"sel{sel:02x}-end", bytes([sel, 0x46, 0x47, 4, 0x48]))
    out("protocol_tokens", "raw-ids", bytes([0x14, 0xF0, 0xFF, 0xFF, 0x41, 0xF0, 0x05, 0x00]))


if __name__ == "__main__":
    seed_safetensors()
    seed_gguf()
    seed_config()
    seed_tree()
    seed_protocol()
    for d in sorted((FUZZ / "corpus").iterdir()):
        print(d.name, len(list(d.iterdir())))
