"""Rollout time of `edgeport fleet` over six real OpenSSH servers on 127.0.0.1, by batch size.

Starts the devices of tests/fleet_devices.py (root only: it creates users epfleet1..6), then rolls a
fresh version of BUNDLE (a copy with a new build key, so every file is sent) out with each batch
setting, and once more with the same version (nothing to send); prints wall seconds per rollout.
A benchmark, not a test.

Example:
  .venv/bin/python scripts/fleet_benchmark.py dist/intel-cpu-int8 --batches 1 2 3 6
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fleet_devices import start_devices, stop_devices, write_inventory  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--hosts", type=int, default=6)
    p.add_argument("--batches", nargs="+", default=["1", "2", "3", "6"], help="Ansible serial values to time")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeport-fleet-bench-"))
    devices = start_devices(work, args.hosts)
    if isinstance(devices, str):
        print(f"cannot run here: {devices}")
        return 2
    inv = write_inventory(devices, work / "hosts.ini")
    rows = []
    try:
        for i, batch in enumerate([*args.batches, args.batches[-1]]):
            again = i == len(args.batches)
            if not again:
                bundle = work / f"v{i}" / args.bundle.name
                shutil.copytree(args.bundle, bundle)
                m = json.loads((bundle / "manifest.json").read_text())
                m["build_key"] = f"bench{i:011d}"
                (bundle / "manifest.json").write_text(json.dumps(m))
            t = time.time()
            res = subprocess.run([sys.executable, "-m", "edgeport.cli", "fleet", "rollout", str(bundle), "--inventory",
                                  str(inv), "--known-hosts", str(devices["known_hosts"]), "--batches", batch,
                                  "--json"], capture_output=True, text=True)
            seconds = time.time() - t
            out = json.loads(res.stdout) if res.stdout.strip().startswith("[") else []
            statuses = sorted({r["status"] for r in out})
            label = f"serial {batch}" + (" (same version again)" if again else "")
            rows.append((label, seconds, statuses, res.returncode))
            print(f"{label:32s} {seconds:6.1f} s  exit {res.returncode}  {statuses}", flush=True)
    finally:
        stop_devices(devices)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
