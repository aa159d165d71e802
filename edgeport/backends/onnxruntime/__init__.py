"""The ONNX Runtime host reference (not a device target)."""
