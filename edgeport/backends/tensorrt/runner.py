"""TensorRT part of runner.py (Python 3.6 syntax; numpy, cv2, tensorrt, pycuda or cuda-python only).

Defines open_runtime(manifest, bundle_dir, device, threads): the engine comes from build_engine.py beside
runner.py (built and cached on first use), and runs with page-locked host buffers, one
device buffer per tensor and one CUDA stream. Both runtime APIs: bindings
(execute_async_v2) on TensorRT 8.2-8.4, tensor names (set_tensor_address, execute_async_v3)
on 8.5+ and 10.x, where the bindings API is gone.
"""
import ctypes
import os
import sys
import threading

import numpy as np

from edgeport.runner.manifest import RunnerError


class PyCudaMemory(object):
    """CUDA memory and streams through pycuda (JetPack 4.6: pip install pycuda)."""

    def __init__(self):
        import pycuda.autoinit  # creates the context, current in this thread
        import pycuda.driver as cuda

        self.cuda = cuda
        self.context = pycuda.autoinit.context
        self.owner = threading.current_thread()
        self.name = "pycuda"

    def enter(self):
        """Make the context current in a worker thread (the runner infers off the main thread)."""
        if threading.current_thread() is self.owner:
            return False
        self.context.push()
        return True

    def leave(self, pushed):
        if pushed:
            self.cuda.Context.pop()

    def pinned(self, shape, dtype):
        return self.cuda.pagelocked_empty(tuple(shape), dtype)

    def device(self, nbytes):
        return self.cuda.mem_alloc(max(1, nbytes))

    def pointer(self, dev):
        return int(dev)

    def stream(self):
        s = self.cuda.Stream()
        return s, s.handle

    def to_device(self, dev, host, stream):
        self.cuda.memcpy_htod_async(dev, host, stream)

    def to_host(self, host, dev, stream):
        self.cuda.memcpy_dtoh_async(host, dev, stream)

    def synchronize(self, stream):
        stream.synchronize()


class CudaPythonMemory(object):
    """CUDA memory and streams through NVIDIA's cuda-python (cuda.bindings.runtime or cuda.cudart)."""

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        self.rt = cudart
        self.name = "cuda-python"

    def enter(self):
        return False  # the runtime API uses the primary context in every thread

    def leave(self, pushed):
        return None

    def _ok(self, result):
        err = result[0]
        if int(err) != 0:
            raise RuntimeError("CUDA error %s" % (err,))
        return result[1] if len(result) > 1 else None

    def pinned(self, shape, dtype):
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr = self._ok(self.rt.cudaMallocHost(max(1, nbytes)))
        buf = (ctypes.c_byte * nbytes).from_address(int(ptr))
        return np.frombuffer(buf, dtype).reshape(tuple(shape))

    def device(self, nbytes):
        return self._ok(self.rt.cudaMalloc(max(1, nbytes)))

    def pointer(self, dev):
        return int(dev)

    def stream(self):
        s = self._ok(self.rt.cudaStreamCreate())
        return s, int(s)

    def to_device(self, dev, host, stream):
        self._ok(self.rt.cudaMemcpyAsync(dev, host.ctypes.data, host.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def to_host(self, host, dev, stream):
        self._ok(self.rt.cudaMemcpyAsync(host.ctypes.data, dev, host.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))

    def synchronize(self, stream):
        self._ok(self.rt.cudaStreamSynchronize(stream))


def cuda_memory():
    """pycuda when installed, else cuda-python; a clear error when neither is."""
    errors = []
    for cls in (PyCudaMemory, CudaPythonMemory):
        try:
            return cls()
        except ImportError as e:
            errors.append(str(e))
    raise RunnerError("neither pycuda nor cuda-python is installed: pip3 install pycuda (JetPack 4.x/5.x) or "
                       "pip3 install cuda-python (JetPack 6): %s" % "; ".join(errors))


class TensorRTDeviceRuntime(object):
    """A deserialized engine, its execution context, pinned buffers and one stream."""

    def __init__(self, manifest, bundle_dir, device=None):
        try:
            import tensorrt as trt
        except ImportError:
            raise RunnerError("TensorRT's Python module is missing; on a Jetson it comes with JetPack "
                               "(python3-libnvinfer)") from None
        if bundle_dir not in sys.path:
            sys.path.insert(0, bundle_dir)
        import build_engine

        path = build_engine.build(bundle_dir, manifest)
        logger = trt.Logger(trt.Logger.WARNING)
        with open(path, "rb") as f:
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RunnerError("cannot deserialize %s (built by another TensorRT?); run build_engine.py --rebuild"
                               % path)
        self.context = self.engine.create_execution_context()
        self.mem = cuda_memory()
        self.stream, self.stream_handle = self.mem.stream()
        self.tensor_api = hasattr(self.engine, "num_io_tensors")
        self.io = []  # (name, is_input, shape, host, device)
        if self.tensor_api:
            for i in range(self.engine.num_io_tensors):
                name = self.engine.get_tensor_name(i)
                is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                self._add(name, is_input, self.engine.get_tensor_shape(name),
                          trt.nptype(self.engine.get_tensor_dtype(name)))
                self.context.set_tensor_address(name, self.mem.pointer(self.io[-1][4]))
        else:
            for i in range(self.engine.num_bindings):
                self._add(self.engine.get_binding_name(i), self.engine.binding_is_input(i),
                          self.engine.get_binding_shape(i), trt.nptype(self.engine.get_binding_dtype(i)))
            self.bindings = [self.mem.pointer(entry[4]) for entry in self.io]
        self.name = "tensorrt %s (%s, %s)" % (trt.__version__, os.path.basename(path), self.mem.name)

    def _add(self, name, is_input, shape, dtype):
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise RunnerError("tensor %s has a dynamic shape %s; build the bundle with static shapes" % (name, shape))
        host = self.mem.pinned(shape, dtype)
        self.io.append((name, is_input, shape, host, self.mem.device(host.nbytes)))

    def infer(self, feeds):
        pushed = self.mem.enter()
        try:
            return self._infer(feeds)
        finally:
            self.mem.leave(pushed)

    def _infer(self, feeds):
        for name, is_input, shape, host, dev in self.io:
            if is_input:
                np.copyto(host, feeds[name].reshape(shape), casting="same_kind")
                self.mem.to_device(dev, host, self.stream)
        if self.tensor_api:
            self.context.execute_async_v3(self.stream_handle)
        else:
            self.context.execute_async_v2(self.bindings, self.stream_handle)
        for _name, is_input, _shape, host, dev in self.io:
            if not is_input:
                self.mem.to_host(host, dev, self.stream)
        self.mem.synchronize(self.stream)
        return dict((name, np.array(host, np.float32)) for name, is_input, shape, host, dev in self.io
                    if not is_input)


RUNTIME_OPTIONS = ()  # the runner options this runtime honours (the core refuses the others)


def open_runtime(manifest, bundle_dir, device=None, threads=None):
    """The runtime for this bundle: builds the engine on first use (build_engine.py).

    ``threads`` is accepted for the core's sake and unused: TensorRT runs on the GPU/DLA.
    """
    return TensorRTDeviceRuntime(manifest, bundle_dir, device)
