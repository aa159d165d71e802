"""The Jetson backend: host-side artifacts, build_engine.py and the runner part for TensorRT."""
