"""The backend seam: shared code asks a backend (edgeport.backends.base) and never branches on a backend's name,
as the task seam is fenced (tests/unit/test_task_seam.py)."""
from __future__ import annotations

import ast
from pathlib import Path

from edgeport.backends import HOST_RUNTIMES, REGISTRY, get_backend

PKG = Path(__file__).resolve().parents[2] / "edgeport"
NAMES = set(REGISTRY) | set(HOST_RUNTIMES)


def _named(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value in NAMES


def _branches_on_a_backend(path: Path, root: Path = PKG) -> list[str]:
    """'file:line' of every comparison against a backend's name, every dict keyed by one, every lookup by one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        hit = False
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                hit = hit or any(_named(v) for v in values)
        elif isinstance(node, ast.Dict):
            hit = any(k is not None and _named(k) for k in node.keys)
        elif isinstance(node, ast.Subscript):
            hit = _named(node.slice)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("get", "startswith"):
            hit = any(_named(a) for a in node.args)
        if hit:
            found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_shared_code_never_branches_on_a_backend_name():
    shared = [p for p in PKG.rglob("*.py") if "backends" not in p.relative_to(PKG).parts]
    assert len(shared) > 40
    offenders = [hit for p in shared for hit in _branches_on_a_backend(p)]
    assert not offenders, offenders


def test_the_fence_sees_a_branch(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def f(m):\n    if m["backend"] == "tensorrt":\n        return {"tflite": 1}\n'
                     '    return m.get("openvino") or m["onnxruntime"] or m["backend"] in ("x", "tflite")\n')
    assert [h.split(":")[1] for h in _branches_on_a_backend(probe, tmp_path)] == ["2", "3", "4", "4", "4"]


def test_every_device_backend_answers_what_shared_code_asks():
    for name in REGISTRY:
        b = get_backend(name)
        assert b.name == name and b.device_modules
        for method in ("device_import_check", "device_preflight", "device_setup", "readme_run", "layer_outputs",
                       "qdq_model", "host_check", "host_precision", "bundle_checks", "int8_settings"):
            assert hasattr(b, method), (name, method)
        assert b.device_import_check("python3").startswith("python3 -c 'import numpy, cv2' && (")
