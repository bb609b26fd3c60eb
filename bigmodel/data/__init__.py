"""Input pipelines (tf.data) and tokenizers.

TensorFlow is only the input pipeline here: it must never take accelerator memory. The package
does not import it: the pipeline modules do, with `from bigmodel.data import tf` (which hides
the accelerators from it first), so that the tokenizers and the commands that need no tf.data
(sample, chat, serve) start without loading TensorFlow.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def __getattr__(name):
  if name == "tf":
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    globals()["tf"] = tf
    return tf
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
