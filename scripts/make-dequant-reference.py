#!/usr/bin/env python3
"""Make `model-loader/tests/data/dequant-reference.json`: random ggml blocks (seeded; the f16
scale fields set to finite values) and their values dequantised by gguf-py, llama.cpp's own
Python package, for every quantised type model-loader reads. Run with the venv of
scripts/make-smollm2-reference.py (`pip install gguf numpy`):

    /work/venv-ref/bin/python scripts/make-dequant-reference.py
"""

import json
import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "model-loader", "tests", "data", "dequant-reference.json")
# type -> (ggml id, block bytes, byte offsets of f16 scale fields)
TYPES = {
    "Q4_0": (Q.Q4_0, 18, [0]),
    "Q4_1": (Q.Q4_1, 20, [0, 2]),
    "Q8_0": (Q.Q8_0, 34, [0]),
    "Q4_K": (Q.Q4_K, 144, [0, 2]),
    "Q6_K": (Q.Q6_K, 210, [208]),
}
BLOCKS = 2


def main():
    rng = np.random.default_rng(20251201)
    out = {"gguf_py": gguf.__version__ if hasattr(gguf, "__version__") else "unknown"}
    for name, (qt, nbytes, scales) in TYPES.items():
        raw = rng.integers(0, 256, size=(BLOCKS, nbytes), dtype=np.uint8)
        for b in range(BLOCKS):
            for off in scales:
                v = np.float16(rng.uniform(-0.5, 0.5))
                raw[b, off:off + 2] = np.frombuffer(v.tobytes(), dtype=np.uint8)
        values = gguf.quants.dequantize(raw.reshape(1, -1), qt).reshape(-1)
        out[name] = {"id": int(qt), "bytes": raw.tobytes().hex(),
                     "values": [float(x) for x in values.astype(np.float32)]}
        print(name, values.shape)
    with open(OUT, "w") as f:
        json.dump(out, f)
    print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
