"""A bundle's model on preprocessed inputs through its own runner's runtime, the outputs saved: the same code on the
build host and on the emulated device, so that what differs is the ISA's kernels (Python 3.6 syntax; numpy and
what the runner imports).

    python3 probe.py RUNNER_DIR BUNDLE INPUTS.npy OUT.npz

RUNNER_DIR holds the runner.py to import (the bundle's own, or one assembled for a bundle that ships none);
INPUTS holds N inputs in the model's layout, float32; OUT gets each output's N results by output name, as the
runner's runtime gives them (dequantized).
"""
import sys

import numpy as np


def main(argv):
    runner_dir, bundle, inputs, out = argv
    sys.path.insert(0, runner_dir)
    import runner

    manifest = runner.load_manifest(bundle)
    rt = runner.open_runtime(manifest, bundle, threads=1)
    name = manifest["inputs"][0]["name"]
    x = np.load(inputs)
    got = {}
    for i in range(len(x)):
        for key, value in rt.infer({name: x[i:i + 1]}).items():
            got.setdefault(key, []).append(np.array(value))
        print("frame %d/%d" % (i + 1, len(x)), file=sys.stderr)
        sys.stderr.flush()
    np.savez(out, **dict((k, np.concatenate(v, 0)) for k, v in got.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
