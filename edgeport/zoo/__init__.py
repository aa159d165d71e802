"""The embedded models (``--model edgeport:NAME``): each with its input spec, its calibration and validation
data, and the files its fingerprint covers, so it builds with no other flag. Importing this imports
neither torch nor OpenCV."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeport.preprocess import InputSpec

_HERE = Path(__file__).resolve().parent
ROADSEG_CALIB = _HERE.parents[1] / "calibration" / "road-synth"
# name: (factory "module:function", files whose content is the model, the validation data without flags)
EMBEDDED = {
    "roadseg": ("edgeport.zoo.net:roadseg", ("net.py", "roadseg.pt"), "synthetic://?n=32"),
    "roaddet": ("edgeport.zoo.det:roaddet", ("net.py", "det.py", "roaddet.pt"), "synthetic://?objects=1&n=200"),
}


def embedded_name(source: str) -> str | None:
    """'roaddet' for 'edgeport:roaddet'; None for any other source."""
    if not source.startswith("edgeport:"):
        return None
    name = source.split(":", 1)[1]
    return name if name in EMBEDDED else None


def embedded_spec(name: str) -> InputSpec:
    """The input spec the embedded model ``name`` was trained with."""
    from edgeport.preprocess import InputSpec, default_spec

    if name == "roaddet":
        from edgeport.zoo.scene import DET_CLASSES

        return InputSpec(name="image", shape=(1, 3, 128, 160), task="detection", labels=list(DET_CLASSES),
                         task_options={"decoder": "boxes"})
    return default_spec()


def embedded_calibration(name: str) -> str:
    """Where the embedded model's calibration images come from without --calib."""
    if name == "roadseg":
        return str(ROADSEG_CALIB) if ROADSEG_CALIB.is_dir() else "synthetic://"
    return "synthetic://?objects=1"


def embedded_files(name: str) -> list[Path]:
    """The files whose content makes the embedded model (for its fingerprint)."""
    return [_HERE / f for f in EMBEDDED[name][1]]
