"""Flax models. `build(name, cfg, mesh)` picks one from the registry."""

from bigmodel.models.decoder import Decoder
from bigmodel.models.encoder import Encoder
from bigmodel.models.heads import EncoderClassifier

MODELS = {"decoder": Decoder, "encoder": Encoder, "encoder_classifier": EncoderClassifier}


def build(name: str, cfg, mesh=None):
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  return MODELS[name](cfg, mesh)
