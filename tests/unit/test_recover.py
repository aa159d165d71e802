"""Recovery after pruning (edgeport.recover): distillation pulls a pruned model back towards the original, within
its step and time budgets; the loss chart; the tasks' distillation losses; the pruning gate's verdict."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgeport.artifacts import verdict_of  # noqa: E402
from edgeport.config import OptimizeConfig  # noqa: E402
from edgeport.recover import distill, loss_chart  # noqa: E402
from edgeport.tasks import get as get_task  # noqa: E402


def _seg_net(width: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
                               torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(width, 5, 1)).eval()


def _images(n: int = 32) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1, (n, 3, 24, 32)).astype(np.float32)


def _mismatch(a: torch.nn.Module, b: torch.nn.Module, x: np.ndarray) -> float:
    with torch.no_grad():
        t = torch.from_numpy(x)
        return float(get_task("segmentation").distill_loss([b(t)], [a(t)]))


def test_distillation_pulls_a_damaged_copy_back_towards_the_original():
    teacher = _seg_net()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[3].weight.mul_(0.3)  # what pruning does to the function, in one place
    x = _images()
    before = _mismatch(teacher, student, x)
    rep = distill(teacher, student, x, "segmentation", OptimizeConfig(prune=0.3, recover_steps=150, recover_lr=3e-3),
                  "test images")
    after = _mismatch(teacher, student, x)
    assert rep.steps == 150 and rep.stopped == "steps" and len(rep.loss) == 150 and not student.training
    assert after < 0.3 * before, (before, after)
    d = rep.to_dict()
    assert d["loss_last"] < d["loss_first"] and d["images"] == 32 and d["source"] == "test images"


def test_the_time_budget_ends_recovery_first():
    teacher = _seg_net()
    rep = distill(teacher, copy.deepcopy(teacher), _images(), "segmentation",
                  OptimizeConfig(prune=0.3, recover_steps=100000, recover_seconds=0.5), "x")
    assert rep.stopped == "time" and 0 < rep.steps < 100000


def test_distillation_losses_of_the_tasks():
    logits = torch.randn(2, 4, 6, 6)
    seg = get_task("segmentation").distill_loss
    assert float(seg([logits], [logits])) == pytest.approx(0.0, abs=1e-6)
    assert float(seg([logits], [logits.flip(1)])) > 0.1
    cls = get_task("classification").distill_loss
    assert float(cls([torch.zeros(3, 10)], [torch.eye(10)[:3] * 5])) > 0.1
    det = get_task("detection").distill_loss  # each output's squared error over its variance, summed
    boxes, scores = torch.rand(1, 50, 4), torch.rand(1, 50, 3)
    assert float(det([boxes, scores], [boxes, scores])) == 0.0
    assert float(det([boxes + 0.1, scores], [boxes, scores])) == pytest.approx(0.01 / float(boxes.var()), rel=1e-4)


def test_the_loss_chart_is_a_png(tmp_path):
    import cv2

    path = loss_chart(list(np.exp(-np.linspace(0, 3, 200))), tmp_path / "recovery.png", "recovery")
    img = cv2.imread(str(path))
    assert img is not None and img.shape == (360, 640, 3) and (img < 128).any()


def _info(precision: str, drop: float) -> dict:
    return {"parity": {"out": {"ok": True}}, "accuracy": {"drop": drop, "metric": "miou", "source": "val"},
            "artifacts": {"host_runnable": True, "backend": "openvino", "info": {}}}


def test_after_pruning_every_precision_is_held_to_max_drop_against_the_original():
    assert verdict_of(_info("fp32", 2.0), "fp32", 1.0)["status"] == "passed"  # no pruning: FP32 is the reference
    v = verdict_of(_info("fp32", 2.0), "fp32", 1.0, gate_all=True)
    assert v["status"] == "failed" and "FP32 after pruning loses 2.00" in v["reasons"][0]
    assert "against the original model" in v["reasons"][0]
    assert verdict_of(_info("int8", 0.5), "int8", 1.0, gate_all=True)["status"] == "passed"
