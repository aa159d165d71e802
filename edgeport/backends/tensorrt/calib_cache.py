"""The TensorRT 8.x calibration cache: a ``TRT-<version>-EntropyCalibration2`` header and one ``tensor: hex``
line per tensor, the hex being the scale (amax / 127) as big-endian float32 (what IInt8EntropyCalibrator2 writes,
and what TensorRT reads back without calibrating on the device)."""
from __future__ import annotations

import struct
from pathlib import Path


# ---------------------------------------------------------------- calibration cache (TensorRT 8.x)
def trt_version_tag(version: str) -> str:
    """'8.2.1' -> '8201', as TensorRT writes it in a cache header (major*1000 + minor*100 + patch)."""
    parts = [int(p) for p in (version.split(".") + ["0", "0"])[:3]]
    return str(parts[0] * 1000 + parts[1] * 100 + parts[2])


def scale_of(amax: float) -> float:
    """Symmetric int8 scale for a range; never zero (TensorRT requires positive scales)."""
    return max(float(amax), 1e-8) / 127.0


def write_cache(ranges: dict[str, float], trt_version: str, path: Path) -> None:
    """A TensorRT 8.x calibration cache (IInt8EntropyCalibrator2) for these ranges."""
    lines = [f"TRT-{trt_version_tag(trt_version)}-EntropyCalibration2"]
    for name, amax in ranges.items():
        lines.append(f"{name}: {struct.pack('>f', scale_of(amax)).hex()}")
    path.write_text("\n".join(lines) + "\n")


def read_cache(path: Path) -> tuple[str, str, dict[str, float]]:
    """(version tag, algorithm, {tensor: scale}) of a calibration cache."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    head = lines[0].split("-")
    if len(head) != 3 or head[0] != "TRT":
        raise ValueError(f"{path}: not a TensorRT calibration cache header: {lines[0]!r}")
    scales = {}
    for ln in lines[1:]:
        name, _, hexval = ln.rpartition(": ")
        scales[name] = struct.unpack(">f", bytes.fromhex(hexval.strip()))[0]
    return head[1], head[2], scales
