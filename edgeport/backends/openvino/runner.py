"""OpenVINO part of runner.py (Python 3.6 syntax; numpy, cv2 and openvino only).

Defines open_runtime(manifest, bundle_dir), which the runner core calls.
"""
import os

import numpy as np


class OpenVINODeviceRuntime(object):
    """Compiled model with the manifest's device, hint and inference precision.

    infer() is synchronous; the runner core overlaps capture with it in a thread.
    """

    def __init__(self, manifest, bundle_dir, device=None):
        import openvino as ov

        rt = manifest["runtime"]
        core = ov.Core()
        device = device or rt["device"]
        if device not in core.available_devices and device != "AUTO":
            raise RuntimeError("OpenVINO device %s is not present here (found: %s); pass --device CPU to run on "
                               "the CPU" % (device, ", ".join(core.available_devices)))
        config = {"PERFORMANCE_HINT": rt.get("performance_hint", "LATENCY")}
        if device in ("CPU", "GPU"):
            config["INFERENCE_PRECISION_HINT"] = rt.get("inference_precision", "f32")
        xml = os.path.join(bundle_dir, manifest["files_by_role"]["model"])
        self.device = device
        self.compiled = core.compile_model(xml, device, config)
        self.request = self.compiled.create_infer_request()
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]
        self.name = "openvino %s on %s" % (ov.__version__.split("-")[0], device)

    def infer(self, feeds):
        res = self.request.infer(feeds)
        return dict((p.get_any_name(), np.asarray(res[p], np.float32)) for p in self.compiled.outputs)


def open_runtime(manifest, bundle_dir, device=None):
    """The runtime for this bundle."""
    return OpenVINODeviceRuntime(manifest, bundle_dir, device)
