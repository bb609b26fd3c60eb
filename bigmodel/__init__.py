"""bigmodel: pretrain, fine-tune, sample from and scale BERT- and GPT-style Transformers in JAX/Flax."""

__version__ = "0.1.0"
