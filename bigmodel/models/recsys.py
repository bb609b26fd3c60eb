"""The BERT4Rec model: the shared BERT trunk with its MLM head only (`Encoder(heads=("mlm",))`),
over item ids. The head's output is tied to the item embedding (plus a per-item bias); the
pooler and segment embedding of the trunk stay in the tree but no loss reads them. SASRec is
the plain `Decoder` (tied output, learned positions). Objectives: bigmodel/objectives/recsys.py.
"""

from __future__ import annotations

from typing import Sequence

from bigmodel.models.encoder import Encoder


class ItemEncoder(Encoder):
  heads: Sequence[str] = ("mlm",)
