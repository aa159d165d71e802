"""edgeport: one PyTorch vision model to Jetson (TensorRT), Intel (OpenVINO) and ARM (TFLite) bundles."""

__version__ = "0.1.0"
