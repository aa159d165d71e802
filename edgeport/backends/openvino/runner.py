"""OpenVINO part of runner.py (Python 3.6 syntax; numpy, cv2 and openvino only).

Defines open_runtime(manifest, bundle_dir, device, threads), which the runner core calls.
"""
import os
import queue

import numpy as np

from edgeport.runner.engine import ThreadedAsync
from edgeport.runner.manifest import RunnerError


class OpenVINODeviceRuntime(object):
    """Compiled model with the manifest's device, hint and inference precision.

    infer() is synchronous (self-test); make_async() gives the camera loop and --bench several
    infer requests in flight, so capture, inference and drawing overlap.
    """

    def __init__(self, manifest, bundle_dir, device=None, threads=None, hint=None):
        import openvino as ov

        rt = manifest["runtime"]
        core = ov.Core()
        device = device or rt["device"]
        if device not in core.available_devices and device != "AUTO":
            raise RunnerError("OpenVINO device %s is not present here (found: %s); pass --device CPU to run on "
                               "the CPU" % (device, ", ".join(core.available_devices)))
        config = {"PERFORMANCE_HINT": hint.upper() if hint else rt.get("performance_hint", "LATENCY")}
        if device in ("CPU", "GPU"):
            config["INFERENCE_PRECISION_HINT"] = rt.get("inference_precision", "f32")
        model = core.read_model(os.path.join(bundle_dir, manifest["files_by_role"]["model"]))
        self.device = device
        if device == "CPU" and threads and not callable(threads):
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, device, config)
        self.threads = self._cpu_threads()
        # A policy needs the plugin's own choice, known only once compiled: compiled again only when the
        # policy changes it (a host where OpenVINO would take every CPU).
        wanted = threads(self.threads) if callable(threads) else None
        if device == "CPU" and wanted and wanted != self.threads:
            config["INFERENCE_NUM_THREADS"] = int(wanted)
            self.compiled = core.compile_model(model, device, config)
            self.threads = self._cpu_threads()
        self.request = self.compiled.create_infer_request()
        # The IR's names by position (compiling can add a fused node's name to an output's names).
        self.output_names = [p.get_any_name() for p in model.outputs]
        self.name = "openvino %s on %s" % (ov.__version__.split("-")[0], device)
        if self.threads:
            self.name += ", %d thread%s" % (self.threads, "" if self.threads == 1 else "s")
        self.name += ", %s hint" % config["PERFORMANCE_HINT"].lower()

    def _cpu_threads(self):
        """Threads the CPU plugin chose or was given (0 on other devices)."""
        if self.device != "CPU":
            return 0
        try:
            return int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        except Exception:  # older OpenVINO without the property
            return 0

    def infer(self, feeds):
        res = self.request.infer(feeds)
        return dict((n, np.asarray(res[i], np.float32)) for i, n in enumerate(self.output_names))

    def make_async(self, callback, jobs):
        """An engine with submit(feeds, userdata)/wait_all() calling callback(userdata, outputs)."""
        return OpenVINOAsync(self, callback, jobs)


class OpenVINOAsync(ThreadedAsync):
    """``jobs`` infer requests: submit() starts one that is free; the worker thread waits for them
    in submission order, copies the outputs and calls ``callback(userdata, outputs, latency_ms)``.

    No completion callbacks: a Python callback runs on OpenVINO's inference thread and waits
    there for the GIL while the capture and drawing threads hold it, which stalls inference.
    Here the inference threads never touch Python; only the worker waits for the GIL, and a
    request is reused once it has been collected. latency_ms is OpenVINO's own measure from
    start_async to completion.
    """

    def __init__(self, rt, callback, jobs):
        self.names = rt.output_names
        self.requests = [rt.compiled.create_infer_request() for _ in range(max(1, int(jobs)))]
        self.free = queue.Queue()
        for index in range(len(self.requests)):
            self.free.put(index)
        ThreadedAsync.__init__(self, rt, callback, len(self.requests))

    def _start(self, feeds, userdata):
        index = self.free.get()  # waits (GIL released) while every request is in flight
        self.requests[index].start_async(feeds)
        return index, userdata

    def _finish(self, item):
        index, userdata = item
        request = self.requests[index]
        request.wait()
        outs = dict((n, np.array(request.get_output_tensor(i).data, np.float32)) for i, n in enumerate(self.names))
        return userdata, outs, getattr(request, "latency", None)

    def _release(self, item):
        self.free.put(item[0])


RUNTIME_OPTIONS = ("device", "threads", "hint")  # the runner options this runtime honours (the core refuses the others)


def open_runtime(manifest, bundle_dir, device=None, threads=None, hint=None):
    """The runtime for this bundle.

    ``threads``: CPU inference threads, or a function from the plugin's own choice to the
    number wanted (the core's policy that leaves a core to capture); None keeps the choice.
    ``hint``: "latency" or "throughput" in place of the bundle's performance hint.
    """
    return OpenVINODeviceRuntime(manifest, bundle_dir, device, threads, hint)
