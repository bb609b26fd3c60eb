"""Input pipelines (tf.data) and tokenizers.

TensorFlow is only the input pipeline here: it must never take accelerator memory. The package
does not import it: the pipeline modules name it with `from bigmodel.data import lazy_tf as tf`,
which imports TensorFlow (hiding the accelerators from it first) at the first attribute used, when
a pipeline is built; so the tokenizers, the objectives, and the commands that build no tf.data
pipeline (sample, chat, serve, predict, load_pretrained) start without loading TensorFlow.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


class _LazyTF:
  """`tf.X` imports TensorFlow (as `bigmodel.data.tf`) at its first use."""

  def __getattr__(self, name):
    from bigmodel.data import tf
    return getattr(tf, name)


lazy_tf = _LazyTF()


def __getattr__(name):
  if name == "tf":
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    globals()["tf"] = tf
    return tf
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
