"""Flax models. `build(name, cfg, mesh)` picks one from the registry."""

from bigmodel.models.decoder import Decoder

MODELS = {"decoder": Decoder}


def build(name: str, cfg, mesh=None):
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  return MODELS[name](cfg, mesh)
