"""Hugging Face interop: `hf` converts BERT and GPT-2 checkpoints in both directions;
`workdir` turns them into bigmodel workdirs (`bigmodel convert`) and back."""
