"""OpenVINO part of runner.py (Python 3.6 syntax; numpy, cv2 and openvino only).

Defines open_runtime(manifest, bundle_dir), which the runner core calls.
"""
import os

import numpy as np


class OpenVINODeviceRuntime(object):
    """Compiled model with the manifest's device, hint and inference precision.

    infer() is synchronous (self-test, --bench); make_async() gives the camera loop an
    AsyncInferQueue, so capture, inference and drawing overlap.
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
        return dict((n, np.asarray(res[i], np.float32)) for i, n in enumerate(self.output_names))

    def make_async(self, callback, jobs):
        """An engine with submit(feeds, userdata)/wait_all() calling callback(userdata, outputs)."""
        return OpenVINOAsync(self, callback, jobs)


class OpenVINOAsync(object):
    """openvino.AsyncInferQueue with ``jobs`` requests; results are copied out in the callback."""

    def __init__(self, rt, callback, jobs):
        import openvino as ov

        self.names = rt.output_names
        self.error = None
        self.queue = ov.AsyncInferQueue(rt.compiled, max(1, int(jobs)))
        self.callback = callback
        self.queue.set_callback(self._done)

    def _done(self, request, userdata):
        try:
            outs = dict((n, np.array(request.get_output_tensor(i).data, np.float32))
                        for i, n in enumerate(self.names))
            self.callback(userdata, outs)
        except Exception as e:  # raised in the caller's thread by the next submit or wait_all
            self.error = e

    def submit(self, feeds, userdata):
        if self.error is not None:
            raise self.error
        self.queue.start_async(feeds, userdata)

    def wait_all(self):
        self.queue.wait_all()
        if self.error is not None:
            raise self.error


def open_runtime(manifest, bundle_dir, device=None):
    """The runtime for this bundle."""
    return OpenVINODeviceRuntime(manifest, bundle_dir, device)
