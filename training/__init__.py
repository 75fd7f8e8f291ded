"""Train the data scientist's Keras MNIST CNN (the only package, with quantize/, that imports TensorFlow)."""
