#!/usr/bin/env python3
"""An independent check of chapter 1's checkpoints and of the book's evaluation protocol.

Hugging Face's GPT-2, re-written in numpy from its published definition (not from our Rust):
Conv1D weights stored [in, out], pre-LayerNorm blocks with eps from config.json, "gelu_new" (the
tanh form), causal attention, the output projection tied to wte. It loads `model.safetensors` +
`config.json` from a checkpoint directory, then computes the validation loss by the protocol of
the book ("Reproducing our numbers"): the byte tokenizer, the last 10% of the corpus, batch k row r
= the window starting at token (k*B + r)*T. The result must match the val loss the trainer printed.

    scripts/check-hf-checkpoint.py CKPT_DIR DATA_FILE B T VAL_BATCHES EXPECTED_VAL_LOSS

Needs: numpy, safetensors (pip install numpy safetensors).
"""
import json
import sys

import numpy as np
from safetensors.numpy import load_file


def layernorm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def gpt2_logits(p, cfg, tokens):
    """tokens [B, T] -> logits [B, T, V], exactly as transformers' GPT2LMHeadModel (eval mode)."""
    B, T = tokens.shape
    C, H, eps = cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
    assert cfg["activation_function"] == "gelu_new" and cfg.get("tie_word_embeddings", True)
    x = p["wte.weight"][tokens] + p["wpe.weight"][:T]
    mask = np.triu(np.ones((T, T), dtype=bool), 1)
    for l in range(cfg["n_layer"]):
        h = lambda name: p[f"h.{l}.{name}"]
        a = layernorm(x, h("ln_1.weight"), h("ln_1.bias"), eps)
        qkv = a @ h("attn.c_attn.weight") + h("attn.c_attn.bias")  # Conv1D: x @ W[in, out] + b
        q, k, v = np.split(qkv, 3, axis=-1)
        q, k, v = (z.reshape(B, T, H, C // H).transpose(0, 2, 1, 3) for z in (q, k, v))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(C // H)
        s = np.where(mask, -np.inf, s)
        s = np.exp(s - s.max(-1, keepdims=True))
        att = s / s.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + y @ h("attn.c_proj.weight") + h("attn.c_proj.bias")
        m = layernorm(x, h("ln_2.weight"), h("ln_2.bias"), eps)
        m = gelu_new(m @ h("mlp.c_fc.weight") + h("mlp.c_fc.bias"))
        x = x + m @ h("mlp.c_proj.weight") + h("mlp.c_proj.bias")
    x = layernorm(x, p["ln_f.weight"], p["ln_f.bias"], eps)
    return x @ p["wte.weight"].T  # tied output projection


def validation_loss(logits_of, data, B, T, batches):
    """The book's evaluation protocol: the mean over `batches` batches of the mean cross-entropy
    of `logits_of(tokens [B, T]) -> logits [B, T, V]`, batch k row r being the window of the
    byte-tokenized corpus's last 10% that starts at token (k*B + r)*T, wrapping around."""
    tokens = np.frombuffer(open(data, "rb").read(), dtype=np.uint8).astype(np.int64)
    val = tokens[len(tokens) * 9 // 10 :]
    losses = []
    for k in range(batches):
        starts = [((k * B + r) * T) for r in range(B)]
        idx = np.array([[(s + i) % len(val) for i in range(T + 1)] for s in starts])
        x, y = val[idx[:, :-1]], val[idx[:, 1:]]
        logits = np.array(logits_of(x), dtype=np.float64)  # a copy: a JAX array is read-only
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        losses.append(-np.take_along_axis(logp, y[..., None], -1).mean())
    return float(np.mean(losses))


def main():
    ckpt, data, B, T, batches, expected = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), float(sys.argv[6])
    cfg = json.load(open(f"{ckpt}/config.json"))
    assert cfg["model_type"] == "gpt2"
    p = {k: v.astype(np.float64) for k, v in load_file(f"{ckpt}/model.safetensors").items()}
    assert p["wte.weight"].shape == (cfg["vocab_size"], cfg["n_embd"]), "vocabulary must be unpadded"
    loss = validation_loss(lambda x: gpt2_logits(p, cfg, x), data, B, T, batches)
    print(f"numpy GPT-2 on the checkpoint: val loss {loss:.4f}; the trainer printed {expected:.4f}")
    if abs(loss - expected) > 1e-3:
        sys.exit("error: the checkpoint does not compute what the trainer computed")


if __name__ == "__main__":
    main()
