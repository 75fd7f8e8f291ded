"""Turn the trained Keras model into a full-integer int8 TFLite model bundle, behind an accuracy gate."""
