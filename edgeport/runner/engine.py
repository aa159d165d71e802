"""Runner part: asynchronous inference over a runtime, and fixed-memory latency statistics.

Python 3.6 syntax; numpy, cv2, the standard library and the bundle's runtime only: assembled into each bundle's
single runner.py (edgeport.bundle.RUNNER_PARTS, in order), where every part's names are one module's.
"""
import math
import os
import queue
import sys
import threading
import time

import numpy as np


class ThreadedAsync(object):
    """submit()/wait_all() over a synchronous runtime: one worker thread, a bounded queue.

    The default for runtimes without their own asynchronous API (TFLite, TensorRT here). Results
    reach ``callback(userdata, outputs[, latency_ms])`` from the worker, in submission order.
    A runtime with asynchronous requests subclasses it (OpenVINO's part): _start() launches
    one and returns the queue item, _finish() waits for it and returns the callback's
    arguments, _release() frees what _start() took.
    """

    def __init__(self, rt, callback, jobs=2):
        self.rt, self.callback = rt, callback
        self.q = queue.Queue(maxsize=max(1, jobs))
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _start(self, feeds, userdata):
        return feeds, userdata

    def _finish(self, item):
        feeds, userdata = item
        return userdata, self.rt.infer(feeds)

    def _release(self, item):
        pass

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                self.q.task_done()
                return
            try:
                self.callback(*self._finish(item))
            except Exception as e:  # raised in the caller's thread by the next submit or wait_all
                self.error = e
            self._release(item)
            self.q.task_done()

    def submit(self, feeds, userdata):
        if self.error is not None:
            raise self.error
        self.q.put(self._start(feeds, userdata))

    def wait_all(self):
        self.q.join()
        if self.error is not None:
            raise self.error

    def close(self):
        self.q.put(None)
        self.thread.join(timeout=2)


def make_async(rt, callback, jobs):
    """The runtime's own asynchronous engine when it has one, else a worker thread."""
    if hasattr(rt, "make_async"):
        return rt.make_async(callback, jobs)
    return ThreadedAsync(rt, callback, jobs)




def thread_cpu():
    """CPU seconds of the calling thread (CLOCK_THREAD_CPUTIME_ID); where there is no such clock, the wall
    clock, which overstates a stage that waits."""
    try:
        return time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID)
    except (AttributeError, OSError):
        return time.time()


def max_rss_mb():
    """The process's peak resident memory in MB (0 where the platform does not say).

    Linux: VmHWM of /proc/self/status, this program's own peak. getrusage's ru_maxrss also counts the peak of
    the process that started it (Linux carries it over fork and exec): a runner started by a 950 MB test
    process reported 957 MB for a run that never passed 150."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0), 1)


def resident_bytes():
    """This process's resident memory now, in bytes (Linux /proc; 0 elsewhere); max_rss_mb is its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class LatencyStats(object):
    """Count, mean, min, max and percentiles of millisecond figures in fixed memory.

    A runner is a service that runs for days: keeping every latency grows without bound. Values go into
    log-spaced bins 1 % apart from 1 us to 1000 s (2,100 counters); a percentile is read back to within
    0.5 % of the exact one, the extremes exactly.
    """

    LOW, RATIO, BINS = 1e-3, 1.01, 2100

    def __init__(self):
        self.counts = np.zeros(self.BINS, np.int64)
        self.count, self.total = 0, 0.0
        self.min, self.max = float("inf"), 0.0
        self._log_ratio = math.log(self.RATIO)

    def add(self, ms):
        ms = float(ms)
        i = int(math.log(max(ms, self.LOW) / self.LOW) / self._log_ratio)  # math, not numpy: per frame
        self.counts[min(max(i, 0), self.BINS - 1)] += 1
        self.count += 1
        self.total += ms
        self.min = min(self.min, ms)
        self.max = max(self.max, ms)

    def percentile(self, q):
        if not self.count:
            return 0.0
        if q <= 0:
            return self.min
        if q >= 100:
            return self.max
        rank = q / 100.0 * self.count
        i = int(np.searchsorted(np.cumsum(self.counts), rank, side="left"))
        mid = self.LOW * self.RATIO ** (i + 0.5)  # geometric middle of the bin
        return min(max(mid, self.min), self.max)

    @property
    def mean(self):
        return self.total / self.count if self.count else 0.0
