"""Calibration sets from folders, videos, .npy and the generator; size and decode checks."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from edgeport.calibration import MINIMUM, fingerprint, load_calibration
from edgeport.errors import CalibrationError
from edgeport.preprocess import InputSpec

SPEC = InputSpec(shape=(1, 3, 64, 64))


@pytest.fixture()
def camvid_folder(camvid, tmp_path):
    dest = tmp_path / "imgs"
    dest.mkdir()
    for f in sorted((camvid / "val").glob("*.png"))[:60]:
        shutil.copy(f, dest / f.name)
    return dest


def test_folder_with_corrupt_files_skips_and_counts(camvid_folder, caplog):
    (camvid_folder / "broken.png").write_bytes(b"\x89PNG not really")
    (camvid_folder / "empty.jpg").write_bytes(b"")
    cs = load_calibration(str(camvid_folder), SPEC)
    assert len(cs) == 60 and cs.skipped == 2
    assert cs.data.shape == (60, 3, 64, 64) and cs.data.dtype == np.float32
    assert "recommended" in caplog.text  # 60 < 300 warns


def test_too_few_images_refused_with_numbers(camvid_folder):
    for f in sorted(camvid_folder.iterdir())[10:]:
        f.unlink()
    with pytest.raises(CalibrationError, match=f"has 10 usable image.*at least {MINIMUM}.*300"):
        load_calibration(str(camvid_folder), SPEC)


def test_empty_folder_and_missing_source(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CalibrationError, match="holds no images"):
        load_calibration(str(tmp_path), SPEC)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(str(tmp_path / "nope"), SPEC)


def test_video_source(camvid, tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (480, 360))
    for f in sorted((camvid / "val").glob("*.png"))[:55]:
        writer.write(cv2.imread(str(f)))
    writer.release()
    cs = load_calibration(str(path), SPEC)
    assert len(cs) == 55 and len(cs.frames) == 8


def test_npy_frames_and_preprocessed(tmp_path):
    frames = np.random.RandomState(0).randint(0, 255, (52, 40, 50, 3), np.uint8)
    np.save(tmp_path / "f.npy", frames)
    cs = load_calibration(str(tmp_path / "f.npy"), SPEC)
    assert cs.data.shape == (52, 3, 64, 64)
    np.save(tmp_path / "x.npy", cs.data)
    cs2 = load_calibration(str(tmp_path / "x.npy"), SPEC)
    np.testing.assert_array_equal(cs2.data, cs.data)
    np.save(tmp_path / "bad.npy", np.zeros((60, 3, 32, 32), np.float32))
    with pytest.raises(CalibrationError, match="neither"):
        load_calibration(str(tmp_path / "bad.npy"), SPEC)


def test_content_hash_follows_content(camvid_folder):
    a = fingerprint(str(camvid_folder))
    assert fingerprint(str(camvid_folder)) == a
    first = sorted(camvid_folder.iterdir())[0]
    img = cv2.imread(str(first))
    img[0, 0] = 255 - img[0, 0]
    cv2.imwrite(str(first), img)
    assert fingerprint(str(camvid_folder)) != a


def test_synthetic_source_is_deterministic():
    a = load_calibration("synthetic://?n=60", SPEC)
    b = load_calibration("synthetic://?n=60", SPEC)
    assert a.sha256 == b.sha256 and np.array_equal(a.data, b.data) and len(a) == 60
