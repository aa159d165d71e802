"""The pieces that keep what ships what was proven: verdicts, archives, locks, sweeps, flag checks, stats."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tomllib

from edgeport.bundle import archive_matches, archive_of, read_manifest, remove_bundle, write_archive, write_bundle
from edgeport.cache import TMP_PREFIX, folder_lock, sweep_stale, writable_folder
from edgeport.errors import BundleError, ConfigError, ModelError
from edgeport.runner.manifest import SCHEMA, failed_gates, refusal, schema_problem
from tests.conftest import ROOT


def _bundle(dest: Path, verdict: str = "passed", archive: bool = True, payload: bytes = b"weights") -> Path:
    src = dest.parent / f"src-{dest.name}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "model.bin").write_bytes(payload)
    x = np.zeros((1, 3, 4, 4), np.float32)
    manifest = {"build_key": payload.hex()[:16], "verdict": {"status": verdict, "reasons": ["cosine 0.5 < 0.98"]
                                                             if verdict == "failed" else []}}
    return write_bundle(dest, files={"model": src / "model.bin"}, runner="print('hi')\n", manifest=manifest,
                        golden=([], x, {"out": x}, {"out": x}, {"out": {"min_cosine": 0.98}},
                                {"out": {"min_cosine": 0.999}}),
                        readme="# test\n", requirements=["numpy"], archive=archive)


def test_bundle_is_world_readable_archived_and_checked_against_its_folder(tmp_path):
    b = _bundle(tmp_path / "dist" / "t-int8")
    assert (b.stat().st_mode & 0o777) == 0o755 and ((b / "runner.py").stat().st_mode & 0o777) == 0o755
    assert ((b / "manifest.json").stat().st_mode & 0o777) == 0o644
    assert ((b / "golden" / "input_0.npy").stat().st_mode & 0o777) == 0o644
    assert read_manifest(b)["schema"] == SCHEMA
    assert archive_matches(b)
    with tarfile.open(archive_of(b)) as tar:
        assert {m.name for m in tar if m.isfile()} >= {"t-int8/manifest.json", "t-int8/model.bin"}
    # an archive of another build beside the folder (a kill between the two renames, an old edgeport)
    other = _bundle(tmp_path / "other" / "t-int8", payload=b"other weights")
    archive_of(b).write_bytes(archive_of(other).read_bytes())
    assert not archive_matches(b)
    write_archive(b)
    assert archive_matches(b)
    archive_of(b).write_bytes(archive_of(b).read_bytes()[:200])  # a truncated archive
    assert not archive_matches(b)
    assert not list((tmp_path / "dist").glob(f"{TMP_PREFIX}*"))


def test_failed_bundle_has_no_archive_and_is_refused(tmp_path):
    b = _bundle(tmp_path / "dist" / "failed" / "t-int8", verdict="failed", archive=False)
    assert not archive_of(b).exists()
    m = read_manifest(b)
    assert failed_gates(m) == ["cosine 0.5 < 0.98"]
    assert "FAILED its build gates (cosine 0.5 < 0.98)" in refusal(m)
    assert refusal(m, force=True) is None
    assert remove_bundle(b) and not b.exists() and not remove_bundle(b)


def test_unknown_schema_is_refused_by_host_and_runner_rules(tmp_path):
    b = _bundle(tmp_path / "t-fp32")
    m = json.loads((b / "manifest.json").read_text())
    for schema, words in ((SCHEMA + 1, "newer than this edgeport reads"), (1, "rebuild it"), (None, "rebuild it")):
        m["schema"] = schema
        (b / "manifest.json").write_text(json.dumps(m))
        assert words in schema_problem(m) and words in refusal(m, force=True)
        with pytest.raises(BundleError, match=words):
            read_manifest(b)


def test_rewriting_a_bundle_never_leaves_old_files_or_temporaries(tmp_path):
    b = _bundle(tmp_path / "dist" / "t-int8")
    (b / "stale.txt").write_text("from an older build")
    _bundle(tmp_path / "dist" / "t-int8", payload=b"new weights")
    assert not (b / "stale.txt").exists() and (b / "model.bin").read_bytes() == b"new weights"
    assert archive_matches(b)
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["src-t-int8", "t-int8", "t-int8.tar.gz"]


def test_sweep_removes_only_what_interrupted_builds_left(tmp_path):
    keep = [tmp_path / "dist" / "a-int8", tmp_path / "dist" / ".gitignore", tmp_path / "build" / "export" / "k1"]
    junk = [tmp_path / "dist" / f"{TMP_PREFIX}a-int8-x1", tmp_path / "dist" / f"{TMP_PREFIX}a-int8-y.tar.gz.part",
            tmp_path / "build" / "target" / "a-int8" / f"{TMP_PREFIX}k2-z", tmp_path / "dist" / "failed" /
            f"{TMP_PREFIX}b-fp16-old-q"]
    for p in keep + junk:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix in (".part",) or p.name == ".gitignore":
            p.write_text("x")
        else:
            p.mkdir()
            (p / "file").write_text("x")
    assert sweep_stale(tmp_path / "dist", tmp_path / "build") == len(junk)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in junk)


def test_folder_lock_excludes_a_second_holder(tmp_path):
    with folder_lock(tmp_path):
        with pytest.raises(ConfigError, match=r"in use by another edgeport build \(pid \d+\)"):
            with folder_lock(tmp_path, wait=False):
                pass
        probe = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                                "from edgeport.cache import folder_lock\n"
                                f"with folder_lock(Path({str(tmp_path)!r}), wait=False): print('got it')"],
                               capture_output=True, text=True, cwd=ROOT)
        assert probe.returncode != 0 and "in use by another edgeport build" in probe.stderr
    with folder_lock(tmp_path, wait=False):  # released
        pass


def test_writable_folder_names_the_flag(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="--out .*is a file"):
        writable_folder(tmp_path / "afile", "--out")
    with pytest.raises(ConfigError, match="--build-dir .*is a file"):
        writable_folder(tmp_path / "afile" / "sub", "--build-dir")
    with pytest.raises(ConfigError, match="--build-dir /proc/edgeport-cache cannot be"):
        writable_folder(Path("/proc/edgeport-cache"), "--build-dir")
    assert not (tmp_path / "new").exists()
    writable_folder(tmp_path / "new" / "dist", "--out", create=False)
    assert not (tmp_path / "new").exists()


def test_model_sources_are_checked_without_torch(tmp_path):
    from edgeport.model import check_source

    with pytest.raises(ModelError, match="model file .*nothere.py does not exist"):
        check_source("nothere.py:make", None, tmp_path)
    with pytest.raises(ModelError, match="no module named 'no_such_pkg.models'"):
        check_source("no_such_pkg.models:make", None, tmp_path)
    (tmp_path / "mine.py").write_text("def make():\n    return None\n")
    check_source("mine:make", None, tmp_path)  # a module in the project folder is found
    with pytest.raises(ModelError, match="weights file .*w.pth does not exist"):
        check_source("edgeport:roadseg", "w.pth", tmp_path)
    with pytest.raises(ModelError, match="the embedded models are edgeport:roadseg, edgeport:roaddet"):
        check_source("edgeport:roadsge", None, tmp_path)


def test_every_package_is_listed_for_the_wheel():
    from setuptools import find_packages

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(ROOT), include=["edgeport*"]))
    assert found <= listed and listed - found == {"edgeport.targets"}
    assert (ROOT / "targets" / "intel-cpu.toml").is_file() and not (ROOT / "edgeport" / "targets").exists()


def test_latency_stats_in_fixed_memory_match_numpy():
    from edgeport.runner.engine import LatencyStats

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(0.5, 0.6, 20000), [0.0004, 2500.0]])
    stats = LatencyStats()
    size = stats.counts.nbytes
    for v in values:
        stats.add(v)
    assert stats.counts.nbytes == size and stats.count == len(values)
    for q in (1, 50, 90, 99, 99.9):
        exact = float(np.percentile(values, q))
        assert abs(stats.percentile(q) - exact) <= 0.011 * exact, q
    assert stats.percentile(0) == pytest.approx(0.0004) and stats.percentile(100) == 2500.0
    assert stats.mean == pytest.approx(values.mean())
    assert LatencyStats().percentile(50) == 0.0


def test_input_dependence_names_vanishing_and_constant_outputs():
    from edgeport.export import input_dependence

    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3, 4, 4)).astype(np.float32)
    good = rng.normal(size=(8, 10))
    assert input_dependence(x, {"a": good}) == {}
    tiny = input_dependence(x, {"a": good * 1e-9})
    assert "at most" in tiny["a"]
    flat = input_dependence(x, {"a": np.ones((8, 10)) + 1e-9 * good})
    assert "barely depends on the input" in flat["a"]
    assert input_dependence(np.repeat(x[:1], 8, 0), {"a": np.ones((8, 10))}) == {}  # identical frames


def _cfg(**quant):
    from edgeport.config import ProjectConfig

    cfg = ProjectConfig()
    for k, v in quant.items():
        setattr(cfg.quantize, k, v)
    return cfg


@pytest.mark.parametrize(("targets", "given", "words"), [
    (["intel-igpu:fp16"], {"int8_preset": "mixed"}, "--int8-preset has no effect: no selected target builds INT8"),
    (["intel-cpu:int8"], {"calib_method": "max"}, "--calib-method has no effect on the selected INT8 targets"),
    (["intel-cpu:int8"], {"calib_method": "entropy"}, "only tflite and tensorrt INT8 read it"),
    (["jetson-orin-nano:int8"], {"int8_preset": "mixed"}, "only openvino INT8 read it"),
    (["intel-cpu:int8"], {"max_drop": 0.5}, "--max-drop has no effect without labelled validation data"),
    (["intel-cpu:int8"], {"val_labels": "x"}, "--val-labels has no effect without --val-images"),
])
def test_flags_that_cannot_take_effect_are_errors(targets, given, words):
    from edgeport.build.run import resolve_targets
    from edgeport.flagcheck import check_build_flags

    with pytest.raises(ConfigError) as e:
        check_build_flags(_cfg(), resolve_targets(targets, None, ROOT), given)
    assert words in str(e.value)


@pytest.mark.parametrize("field", ["int8_ignore_names", "int8_ignore", "int8_ignore_types"])
def test_ignored_layers_are_read_by_every_int8_backend(field):
    from edgeport.backends import get_backend
    from edgeport.build.run import resolve_targets
    from edgeport.flagcheck import check_build_flags

    chosen = resolve_targets(["intel-cpu:int8", "raspberry-pi-5:int8", "jetson-orin-nano:int8"], None, ROOT)
    assert all(field in get_backend(t.backend).int8_settings for t, _ in chosen)
    check_build_flags(_cfg(**{field: ["Conv"]}), chosen, {"int8_ignore": ["Conv"]})


def test_flags_that_take_effect_pass():
    from edgeport.build.run import resolve_targets
    from edgeport.flagcheck import check_build_flags

    check_build_flags(_cfg(), resolve_targets(["raspberry-pi-5:int8"], None, ROOT), {"calib_method": "entropy"})
    chosen = resolve_targets(["intel-cpu:int8", "jetson-orin-nano:int8"], None, ROOT)
    check_build_flags(_cfg(), chosen, {"int8_ignore": [".*"], "calib_method": "max", "int8_preset": "mixed",
                                       "int8_subset": 100, "accuracy_control": False})
    cfg = _cfg()
    cfg.validation.val_images = "val"
    check_build_flags(cfg, chosen, {"max_drop": 0.5, "accuracy_control": True, "val_labels": "lab"})


def test_precision_conflicts_and_unsupported_precisions_are_errors():
    from edgeport.build.run import resolve_targets

    with pytest.raises(ConfigError, match="--target intel-cpu:int8 and --precision fp16 conflict"):
        resolve_targets(["intel-cpu:int8"], "fp16", ROOT)
    with pytest.raises(ConfigError, match="intel-npu does not support precision 'fp32'"):
        resolve_targets(["intel-cpu", "intel-npu"], "fp32", ROOT)
    with pytest.raises(ConfigError, match="selected twice"):
        resolve_targets(["intel-cpu:int8", "intel-cpu"], None, ROOT)
    assert [(t.name, p) for t, p in resolve_targets(["intel-cpu", "jetson-nano"], None, ROOT)] == \
        [("intel-cpu", "int8"), ("jetson-nano", "fp16")]


def test_bad_int8_ignore_regex_names_the_flag():
    from edgeport.config import QuantizeConfig

    with pytest.raises(ConfigError, match=r"ignored pattern '\(head' \(--int8-ignore / int8_ignore\) is not a "
                                          "regular expression"):
        QuantizeConfig(int8_ignore=["(head"]).validate("flags")
