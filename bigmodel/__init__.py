"""bigmodel: pretrain, fine-tune, sample from and scale BERT- and GPT-style Transformers in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):
  # `bigmodel.load_pretrained` without importing jax at `import bigmodel` (the CLI sets XLA
  # flags first).
  if name == "load_pretrained":
    from bigmodel.pretrained import load_pretrained
    return load_pretrained
  raise AttributeError(f"module 'bigmodel' has no attribute {name!r}")
