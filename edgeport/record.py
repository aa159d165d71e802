"""The build's record of a bundle: what `edgeport validate` takes its reference from, and holds the manifest to.

A bundle's manifest is a file anyone can edit; the build folder keeps, for every bundle it wrote, the settings the
reference is made with (model source, weights, seed, name, the reference's preprocessing and optimisation, the
artifact's preprocessing, labels), in ``<build dir>/records/<build_key>.json`` with the sha256 of its content.
`edgeport validate` builds its PyTorch reference from that record, not from the manifest, and names every manifest
field that differs from it: a mean shifted in both ``preprocess`` and ``model.spec`` would otherwise move the
reference with the bundle, and the check would pass or fail only by the metric's chance.

Where the build folder is gone (a bundle copied elsewhere), the golden cases are the record: the manifest's
preprocessing must turn each golden frame into the golden input the build computed, as the device's selftest
checks.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("edgeport")
RECORDS = "records"
# The manifest fields the record holds, by where they sit in the manifest.
MODEL_FIELDS = ("source", "weights", "seed", "name", "spec", "optimize", "task", "labels")


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def record_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the build records of a manifest it writes: the model fields and the artifact's preprocessing."""
    model = manifest["model"]
    return {"model": {k: model.get(k) for k in MODEL_FIELDS}, "preprocess": manifest["preprocess"],
            "target": manifest["target"], "precision": manifest["precision"]}


def write_record(build_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write the record of a manifest the build is writing (idempotent), beside the stages of ``build_dir``."""
    body = json.loads(json.dumps(record_of(manifest), default=str))  # what a JSON round trip gives back
    path = build_dir / RECORDS / f"{manifest['build_key']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"record": body, "sha256": _digest(body)}, indent=1, sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def read_record(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The build's record of a bundle's manifest, from the build folder its provenance names; None when that
    folder or the record is not there (or the record's content does not match its own sha256)."""
    folder = (manifest.get("provenance") or {}).get("build_dir")
    key = manifest.get("build_key")
    if not folder or not key:
        return None
    path = Path(folder) / RECORDS / f"{key}.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    body = saved.get("record") if isinstance(saved, dict) else None
    if not isinstance(body, dict) or _digest(body) != saved.get("sha256"):
        log.warning("%s does not match its own sha256; the bundle's manifest is checked against its golden cases "
                    "only", path)
        return None
    return body


def _differences(recorded: Any, found: Any, where: str) -> list[str]:
    if isinstance(recorded, dict) and isinstance(found, dict):
        out = []
        for k in sorted(set(recorded) | set(found)):
            out += _differences(recorded.get(k), found.get(k), f"{where}.{k}")
        return out
    return [] if recorded == found else [f"{where} is {json.dumps(found)}, the build recorded {json.dumps(recorded)}"]


def manifest_differences(manifest: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """Each manifest field that differs from the build's record, named with both values."""
    mine = json.loads(json.dumps(record_of(manifest), default=str))
    return _differences(record, mine, "manifest")


def golden_differences(bundle: Path, manifest: dict[str, Any]) -> list[str]:
    """Golden cases whose frame the manifest's preprocessing does not turn into the golden input the build computed
    (beyond one grey level of resize rounding, as the device's selftest allows)."""
    import cv2

    from edgeport.runner.preprocess import preprocess

    spec = manifest["preprocess"]
    try:
        lsb = max(abs(float(spec["scale"]) / float(s)) for s in spec["std"]) * 1.01
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return ["manifest.preprocess cannot be read (scale, std)"]
    out = []
    for case in (manifest.get("golden") or {}).get("cases", []):
        if not case.get("frame"):
            continue
        frame = cv2.imread(str(bundle / case["frame"]), cv2.IMREAD_COLOR)
        try:
            want = np.load(bundle / case["input"])
            got, _ = preprocess(frame, spec)
            err = float(np.abs(got - want).max())
        except Exception as e:  # a shape or dtype edited out of reach of the golden input: that is the finding
            out.append(f"manifest.preprocess cannot turn {case['frame']} into {case['input']} ({type(e).__name__})")
            continue
        if err > lsb:
            out.append(f"manifest.preprocess turns {case['frame']} into an input {err:.3g} away from {case['input']} "
                       f"(the build's, limit {lsb:.2g})")
    return out
