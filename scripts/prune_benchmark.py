#!/usr/bin/env python3
"""Latency of pruned bundles against the unpruned ones, interleaved in one process, per bundle name.

Give the dist folders of one model built unpruned and pruned (the same targets); every bundle name found in
the first folder and runnable here (OpenVINO, LiteRT, ONNX Runtime) is opened from each folder through
edgeport's own runtime with the manifest's settings, and all of them are timed in interleaved rounds on one
golden input. Prints a Markdown table: median and p90 ms per folder, the ratio to the first folder's, and each
manifest's parameters and MACs (from its pruning record).

examples:
  .venv/bin/python scripts/prune_benchmark.py dist/camvid dist/camvid-p30 dist/camvid-p50
  .venv/bin/python scripts/prune_benchmark.py dist dist-p30 --iters 600
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeport.bench import measure  # noqa: E402
from edgeport.validate import open_bundle  # noqa: E402


def _size(manifest: dict) -> str:
    prov = (manifest.get("provenance") or {}).get("optimize") or {}
    after, before = prov.get("after"), prov.get("before")
    stats = after or before
    if not stats:
        return "unpruned"
    return f"{stats['params'] / 1e3:.0f}k params, {stats['macs'] / 1e6:.1f}M MACs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n")[-1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="dist folders: the unpruned first, then pruned ones")
    ap.add_argument("--iters", type=int, default=400, help="timed runs per bundle, over 5 interleaved rounds")
    args = ap.parse_args()
    folders = [Path(f) for f in args.folders]
    for f in folders:
        if not f.is_dir():
            print(f"error: {f} is not a folder", file=sys.stderr)
            return 2
    names = sorted(p.name for p in folders[0].iterdir() if (p / "manifest.json").is_file())
    rows = []
    with contextlib.ExitStack() as stack:
        contenders, sizes = {}, {}
        for name in names:
            for f in folders:
                bundle = f / name
                if not (bundle / "manifest.json").is_file():
                    continue
                manifest = json.loads((bundle / "manifest.json").read_text())
                try:
                    rt, _, _ = open_bundle(bundle, manifest)
                except Exception as e:  # a runtime not installed here: say so, time the rest
                    print(f"skipping {bundle}: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                rt = stack.enter_context(rt)
                x = np.load(bundle / manifest["golden"]["cases"][0]["input"])
                feed = {rt.inputs[0].name: x}
                contenders[f"{name} @ {f}"] = (lambda r=rt, fd=feed: r.infer(fd))
                sizes[f"{name} @ {f}"] = _size(manifest)
        print(f"timing {len(contenders)} bundles, interleaved ({args.iters} runs each)", file=sys.stderr)
        timings = measure(contenders, iters=args.iters)
    print("| bundle | folder | model | median ms | p90 ms | vs first folder |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        base = timings.get(f"{name} @ {folders[0]}")
        for f in folders:
            t = timings.get(f"{name} @ {f}")
            if t is None:
                continue
            ratio = f"{base.median / t.median:.2f}x faster" if base and f != folders[0] else "-"
            rows.append(f"| {name} | {f} | {sizes[f'{name} @ {f}']} | {t.median:.2f} | {t.p90:.2f} | {ratio} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
