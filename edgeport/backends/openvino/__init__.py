"""The openvino backend (see backend.py; runner.py is its part of the on-device runner)."""
