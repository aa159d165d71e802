"""Runner part: the bundle's self-test (hashes, preprocessing, golden outputs).

Python 3.6 syntax; numpy, cv2, the standard library and the bundle's runtime only: assembled into each bundle's
single runner.py (edgeport.bundle.RUNNER_PARTS, in order), where every part's names are one module's.
"""
import os
import sys

import cv2
import numpy as np

from edgeport.runner.manifest import verify_files
from edgeport.runner.metrics import compare
from edgeport.runner.preprocess import preprocess
from edgeport.runner.task import task_part


def selftest(bundle_dir, manifest, runtime_factory, out=sys.stdout):
    """Check hashes, the preprocessing and the golden outputs; print a table; True when all pass.

    The golden outputs are the PyTorch reference's, checked under the precision's tolerance; where the
    build host ran this very runtime its outputs are checked too, under a tight tolerance, so an
    artifact that diverged on the way (or on this device) cannot pass by agreeing with itself.
    """
    rows = []
    bad = verify_files(bundle_dir, manifest)
    rows.append(("files sha256", not bad, "%d files" % len(manifest["files"]) if not bad else
                 "; ".join("%s: %s" % b for b in bad)))
    if bad:
        _print_table(rows, out)
        return False
    spec = manifest["preprocess"]
    golden = manifest["golden"]
    part = task_part(spec["task"])(manifest, None)
    pairs = {}  # "vs pytorch" / "vs build host": (tolerance, [(reference outputs, this runtime's)] per case)
    rt = runtime_factory()
    lsb = max(abs(float(spec["scale"]) / float(s)) for s in spec["std"]) * 1.01
    for case in golden["cases"]:
        x = np.load(os.path.join(bundle_dir, case["input"]))
        if case.get("frame"):
            frame = cv2.imread(os.path.join(bundle_dir, case["frame"]))
            mine, _ = preprocess(frame, spec)
            err = float(np.abs(mine - x).max())
            # One grey level of resize rounding between OpenCV builds is tolerated.
            rows.append(("preprocess %s" % case["frame"], err <= lsb, "max abs %.2g (limit %.2g)" % (err, lsb)))
        outs = rt.infer({manifest["inputs"][0]["name"]: x})
        stem = os.path.basename(case["input"])
        for what, key, tolerance in (("vs pytorch", "outputs", golden["tolerance"]),
                                     ("vs build host", "host_outputs", golden.get("host_tolerance"))):
            refs = dict((name, np.load(os.path.join(bundle_dir, rel))) for name, rel in (case.get(key) or {}).items())
            if refs:
                pairs.setdefault(what, (tolerance, []))[1].append((refs, outs))
            for name in sorted(refs):
                m = compare(refs[name], outs[name], spec["task"], tolerance[name])
                detail = "max_rel %.2e cos %.6f" % (m.get("max_rel", -1), m.get("cosine", -1))
                if "agreement" in m:
                    detail += " agree %.4f" % m["agreement"]
                if m["failed"]:
                    detail += " FAILED: " + ", ".join(m["failed"])
                rows.append(("%s %s %s" % (stem, name, what), m["ok"], detail))
    for what in sorted(pairs):
        rows += part.selftest_rows(what, pairs[what][1], pairs[what][0])
    _print_table(rows, out)
    return all(ok for _, ok, _ in rows)


def _print_table(rows, out):
    width = max(len(r[0]) for r in rows)
    for name, ok, detail in rows:
        out.write("%-*s  %s  %s\n" % (width, name, "PASS" if ok else "FAIL", detail))
    out.write("selftest: %s\n" % ("PASS" if all(r[1] for r in rows) else "FAIL"))
    out.flush()
