"""Runner core pieces that need no bundle: the inference thread policy and decoder threads."""
from __future__ import annotations

from pathlib import Path

from edgeport.runner.bench import available_cpus, leave_one_cpu
from edgeport.runner.sources import open_source


def test_leave_one_cpu_policy():
    assert leave_one_cpu(2)(2) == 1  # this host: one CPU for capture
    assert leave_one_cpu(8)(8) == 7
    assert leave_one_cpu(16)(8) == 8  # OpenVINO on physical cores already leaves the SMT siblings
    assert leave_one_cpu(4)(4) == 3  # TFLite's profile threads on a 4-core Pi
    assert leave_one_cpu(1)(1) == 1  # nothing to leave
    assert leave_one_cpu(2)(0) == 0  # a device without CPU threads (GPU, NPU) is left alone
    assert leave_one_cpu()(10_000) == max(1, available_cpus() - 1)


def test_decoder_threads_reach_ffmpeg(camvid: Path, tmp_path: Path):
    import cv2

    if not hasattr(cv2, "CAP_PROP_N_THREADS"):
        return  # older OpenCV (JetPack's 4.1): the option is a no-op there
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (480, 360))
    for f in sorted((camvid / "val").glob("*.png"))[:5]:
        writer.write(cv2.resize(cv2.imread(str(f)), (480, 360)))
    writer.release()
    for wanted in (1, 3):
        src = open_source(str(video), decode_threads=wanted)
        try:
            assert int(src.cap.get(cv2.CAP_PROP_N_THREADS)) == wanted
            assert src.read().shape == (360, 480, 3)
        finally:
            src.release()
