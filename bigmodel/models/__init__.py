"""Flax models. `build(name, cfg, mesh)` picks one from the registry."""

from bigmodel.models.decoder import Decoder
from bigmodel.models.encoder import Encoder
from bigmodel.models.heads import DecoderClassifier, EncoderClassifier
from bigmodel.models.maths import MLP, Linear
from bigmodel.models.qa import EncoderSpanExtractor
from bigmodel.models.recsys import ItemEncoder
from bigmodel.models.tagger import EncoderTagger

MODELS = {"decoder": Decoder, "encoder": Encoder, "encoder_classifier": EncoderClassifier,
          "decoder_classifier": DecoderClassifier,
          "encoder_span": EncoderSpanExtractor,
          "encoder_tagger": EncoderTagger,
          "linear": Linear, "mlp": MLP, "item_encoder": ItemEncoder}


def build(name: str, cfg, mesh=None, **head):
  """`head`: a task head's settings (num_classes, pooling), from `Objective.head_args`."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  return MODELS[name](cfg, mesh, **head)
