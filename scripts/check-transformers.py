#!/usr/bin/env python3
"""Hugging Face's own GPT-2 reads chapter 1's checkpoint and computes the validation loss the
trainer printed.

scripts/check-hf-checkpoint.py is GPT-2 as we read its definition; this is `transformers`
itself: `FlaxGPT2LMHeadModel.from_pretrained(CKPT_DIR, from_pt=True)` (transformers below 5 still
ships the Flax models; `from_pt=True` reads a PyTorch-format model.safetensors with no PyTorch
installed). The batches and the loss are the book's evaluation protocol, shared with the numpy
check.

    scripts/check-transformers.py CKPT_DIR DATA_FILE B T VAL_BATCHES EXPECTED_VAL_LOSS

Needs: pip install 'transformers<5' 'jax[cpu]' flax (see .ci/run for the versions CI pins).
"""
import importlib.util
import pathlib
import sys


def main():
    ckpt, data, B, T, batches, expected = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), float(sys.argv[6])
    import jax

    jax.config.update("jax_enable_x64", True)  # GPT-2 in f64, as the numpy check computes it
    import transformers
    from transformers import FlaxGPT2LMHeadModel

    numpy_check = pathlib.Path(__file__).with_name("check-hf-checkpoint.py")
    spec = importlib.util.spec_from_file_location("check_hf_checkpoint", numpy_check)
    protocol = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(protocol)

    model = FlaxGPT2LMHeadModel.from_pretrained(ckpt, from_pt=True, dtype=jax.numpy.float64)
    params = jax.tree_util.tree_map(lambda a: a.astype(jax.numpy.float64), model.params)
    loss = protocol.validation_loss(lambda x: model(x, params=params).logits, data, B, T, batches)
    print(
        f"transformers {transformers.__version__} FlaxGPT2LMHeadModel on the checkpoint: val loss {loss:.4f};"
        f" the trainer printed {expected:.4f}"
    )
    if abs(loss - expected) > 1e-3:
        sys.exit("error: transformers' GPT-2 does not compute what the trainer computed")


if __name__ == "__main__":
    main()
