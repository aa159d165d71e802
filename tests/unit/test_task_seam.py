"""The task seam: every task has a host part and a runner part, shared code asks the task and never names
one, and a bundle's runner.py carries its own task's part only."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from edgeport import tasks
from edgeport.runner.metrics import compare, task_agreement
from edgeport.runner.task import TASK_PARTS, TaskPart, register_task, task_part

PKG = Path(tasks.__file__).resolve().parents[1]
OV_PART = PKG / "backends" / "openvino" / "runner.py"


@pytest.mark.parametrize("name", tasks.NAMES)
def test_each_task_has_both_parts(name):
    host = tasks.get(name)
    assert host.name == name and host.primary and host.label
    part = task_part(name)
    assert issubclass(part, TaskPart) and part.name == name
    ast.parse(tasks.runner_part(name).read_text(), feature_version=(3, 6))


def test_unknown_task_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown task 'pose'"):
        tasks.get("pose")
    from edgeport.runner.manifest import RunnerError

    with pytest.raises(RunnerError, match="no runner part for task 'pose'"):
        task_part("pose")


def _task_names_compared(path: Path) -> list[str]:
    """'file:line' of every comparison against a task's name (== / != / in) in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(isinstance(v, ast.Constant) and v.value in tasks.NAMES + ("detection",) for v in values):
                    found.append(f"{path.relative_to(PKG)}:{node.lineno}")
    return found


def test_shared_code_never_branches_on_a_task_name():
    shared = [p for p in PKG.rglob("*.py") if "tasks" not in p.relative_to(PKG).parts]
    assert len(shared) > 30
    offenders = [hit for p in shared for hit in _task_names_compared(p)]
    assert not offenders, offenders


def test_a_new_task_flows_through_the_shared_comparison():
    @register_task
    class Counting(TaskPart):
        name = "counting-test"

        @staticmethod
        def agreement(ref, got):
            return float(np.mean(np.round(ref) == np.round(got)))

        @staticmethod
        def extra_agreement(ref, got):
            return {"total_agreement": float(np.round(ref).sum() == np.round(got).sum())}

    try:
        ref = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
        got = np.array([[1.1, 2.0, 2.4, 4.0]], np.float32)
        assert task_agreement(ref, got, "counting-test") == 0.75
        m = compare(ref, got, "counting-test", {"min_agreement": 0.8})
        assert m["agreement"] == 0.75 and m["total_agreement"] == 0.0
        assert not m["ok"] and m["failed"] == ["agreement 0.7500 < 0.8000"]
    finally:
        TASK_PARTS.pop("counting-test")


def test_runner_carries_only_its_tasks_part():
    from edgeport.bundle import assemble_runner

    seg = assemble_runner(OV_PART, "segmentation")
    cls = assemble_runner(OV_PART, "classification")
    assert "class SegmentationPart" in seg and "class ClassificationPart" not in seg
    assert "class ClassificationPart" in cls and "class SegmentationPart" not in cls
    every = assemble_runner(OV_PART)
    assert all(f"class {n.capitalize()}Part" in every for n in tasks.NAMES)


def _packed(name: str, rng: np.random.Generator) -> tuple[np.ndarray, object]:
    """A packed output batch of task ``name`` and a spec for it."""
    from edgeport.preprocess import InputSpec, default_spec
    from edgeport.zoo import embedded_spec

    if name == "segmentation":
        return rng.normal(size=(4, 7, 8, 8)).astype(np.float32), default_spec()
    if name == "detection":
        xy = rng.uniform(0, 0.7, (4, 50, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0.05, 0.3, (4, 50, 2))], -1)
        return np.concatenate([boxes, rng.uniform(0, 1, (4, 50, 3))], -1).astype(np.float32), \
            embedded_spec("roaddet")
    return rng.normal(size=(4, 10)).astype(np.float32), InputSpec()


@pytest.mark.parametrize("name", tasks.NAMES)
def test_tasks_agree_with_themselves_and_not_with_a_shuffle(name):
    packed, spec = _packed(name, np.random.default_rng(0))
    task = tasks.get(name)
    assert task.agreement(packed, packed.copy(), spec) == 1.0
    assert task.agreement(packed, -packed, spec) < 0.5
