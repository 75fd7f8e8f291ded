"""Full-integer post-training quantisation with the TFLite converter.

The int8 graph ends at the logits, not the softmax: a uint8 softmax output has a
resolution of 1/256 and saturates at 255/256 for over 90% of digits, which leaves the
acceptance threshold nothing to separate sure from unsure reads. The runtime applies
the softmax to the dequantised int8 logits (manifest ``output_kind: logits``); the
argmax, and so the accuracy, is the same.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)


def representative_batches(images: np.ndarray) -> Iterator[list[np.ndarray]]:
    """Calibration samples in the float encoding the Keras model was trained on."""
    for image in images:
        yield [image.reshape(1, 28, 28, 1).astype(np.float32) / 255.0]


def forward_with_static_flatten(model: keras.Model, logit_scale: float = 1.0):
    """The Sequential model's forward pass to its logits, with Flatten as one static reshape.

    Keras traces Flatten with a dynamic batch as SHAPE/STRIDED_SLICE/PACK int32 ops;
    reshaping to [-1, features] keeps the graph full-integer and still lets the runtime
    resize the batch. The weights and arithmetic are the model's own; ``logit_scale``
    multiplies the last layer's kernel and bias (an ensemble's 1/members, folded in).
    """

    last = model.layers[-1]
    if not isinstance(last, keras.layers.Dense):
        raise ValueError(f"{model.name}: the last layer must be a Dense layer, not {type(last).__name__}")

    def serve(images):
        hidden = images
        for layer in model.layers:
            if isinstance(layer, keras.layers.Flatten):
                hidden = tf.reshape(hidden, [-1, int(np.prod(hidden.shape[1:]))])
            elif layer is last:  # logits: see module docstring
                if logit_scale == 1.0:
                    hidden = tf.matmul(hidden, layer.kernel) + layer.bias
                else:
                    hidden = tf.matmul(hidden, layer.kernel * logit_scale) + layer.bias * logit_scale
            else:
                hidden = layer(hidden, training=False)
        return hidden

    return serve


class AveragedLogits(keras.Model):
    """Independently trained members side by side on one input; the output is the mean of their logits.

    One graph, so a frame's digits still cost one invoke; the 1/members factor is folded into
    each member's last layer, so the merge itself is only the int8 ADDs of the sum.
    """

    def __init__(self, members: Sequence[keras.Model]):
        super().__init__(name=f"ensemble_of_{len(members)}")
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        scale = 1.0 / len(self.members)
        self._forwards = tuple(forward_with_static_flatten(m, scale if len(self.members) > 1 else 1.0)
                               for m in self.members)
        self.built = all(m.built for m in self.members)  # no weights of its own: built with its members

    def call(self, images):
        total = self._forwards[0](images)
        for forward in self._forwards[1:]:
            total = total + forward(images)
        return total


def convert_to_int8(members: keras.Model | Sequence[keras.Model], calibration: np.ndarray) -> bytes:
    """Every op an int8 builtin; uint8 input (raw pixels) and int8 output (logits).

    Given several models, the output is the mean of their logits, in one graph.
    """
    members = [members] if isinstance(members, keras.Model) else list(members)
    archive = keras.export.ExportArchive()
    if len(members) == 1:
        # The reference model's graph exactly as before the ensemble existed.
        archive.track(members[0])
        serve = forward_with_static_flatten(members[0])
    else:
        ensemble = AveragedLogits(members)
        archive.track(ensemble)
        serve = ensemble.call
    archive.add_endpoint("serve", serve,
                         input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, name="digit")])
    with tempfile.TemporaryDirectory() as saved_model_dir:
        # Through a SavedModel the converter freezes the Keras 3 variables into constants.
        archive.write_out(saved_model_dir, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: representative_batches(calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.int8
        return converter.convert()
