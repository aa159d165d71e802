"""The runner side of the task seam: the registry of task parts and the interface each implements.

Python 3.6 syntax, numpy only (embedded into runner.py). A task part (edgeport/tasks/<task>/runner.py)
turns one inference's outputs into a JSON record and an annotated frame, and says how two raw outputs
of the task agree. A bundle's runner.py holds exactly one part, its model's; on the host every part is
imported on first use, so shared code asks ``task_part(name)`` and never names a task.
"""
import importlib

from edgeport.runner.manifest import RunnerError

TASK_PARTS = {}


def register_task(cls):
    """Class decorator: make a task part known under its ``name``."""
    TASK_PARTS[cls.name] = cls
    return cls


def task_part(name):
    """The part (class) of task ``name``; RunnerError when this runner (or host) has none."""
    if name not in TASK_PARTS:
        try:  # on the host; a device's runner.py has its part registered already
            importlib.import_module("edgeport.tasks.%s.runner" % name)
        except ImportError:
            pass
    if name not in TASK_PARTS:
        raise RunnerError("no runner part for task %r (this runner has: %s)"
                          % (name, ", ".join(sorted(TASK_PARTS)) or "none"))
    return TASK_PARTS[name]


class TaskPart(object):
    """One task's postprocessing on the device. Subclasses set ``name``, implement ``agreement`` and
    ``__call__``, and list in ``cli_options`` the runner options they read (core refuses the others)."""

    name = ""
    cli_options = ()

    def __init__(self, manifest, args):
        spec = manifest["preprocess"]
        self.spec = spec
        self.labels = spec.get("labels") or []
        self.palette = spec.get("palette") or []
        self.out_name = manifest["outputs"][0]["name"]
        self.nhwc = manifest["outputs"][0].get("layout") == "NHWC" or spec["layout"] == "NHWC"
        self.args = args

    @staticmethod
    def agreement(ref, got):
        """Share (0..1) of the reference's decisions that ``got`` repeats, from two raw outputs (None where one
        output carries no decisions of its own)."""
        raise NotImplementedError

    @staticmethod
    def extra_agreement(ref, got):
        """Further agreement figures for the comparison table ({name: 0..1}); none by default."""
        return {}

    def selftest_rows(self, what, pairs, tolerance):
        """Extra selftest rows [(name, ok, detail)] comparing what the task reports for the golden reference's
        outputs and this runtime's over every golden case (``pairs``: [(reference outputs, this runtime's
        outputs)], all outputs by name); ``what`` is 'vs pytorch' or 'vs build host'; ``tolerance`` the golden
        tolerance by output. None by default: the per-output comparison covers tasks whose outputs are their
        decisions."""
        return []

    def deepstack(self, record, minimum):
        """DeepStack's ``predictions`` (POST /v1/vision/detection) from a record, those scoring at least
        ``minimum``; None for a task that detects nothing."""
        return None

    def __call__(self, outs, frame, geom, record, draw):
        """Fill ``record`` (the JSON line) from ``outs``; the annotated frame when ``draw``, else None."""
        raise NotImplementedError
