"""Frontends (ONNX, Keras, Caffe) and the Deep Compression pipeline; installed as ``dcrt.converters``."""
