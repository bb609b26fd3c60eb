"""Input pipelines (tf.data) and tokenizers.

TensorFlow is only the input pipeline here: it must never take accelerator memory.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
