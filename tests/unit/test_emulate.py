"""The emulated device's parts that need no emulator: tool checks, the core's /proc/cpuinfo, the README lines run."""
from __future__ import annotations

import json

import pytest

from edgeport.emulate import check, rootfs
from edgeport.errors import ConfigError


def test_missing_tools_are_one_line_naming_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(rootfs.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="qemu-aarch64-static: apt-get install qemu-user-static debootstrap"):
        rootfs.qemu()
    monkeypatch.setattr(rootfs.Path, "is_file", lambda self: False)
    with pytest.raises(ConfigError, match="needs debootstrap, dpkg-deb: apt-get install"):
        rootfs.ensure_root(cache=tmp_path)


def test_a_core_view_links_the_root_and_describes_that_core(tmp_path):
    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "python3.11").write_text("elf")
    (root / ".edgeport-recipe").write_text(rootfs.RECIPE + "\n")
    view = rootfs.cpu_view(root, "cortex-a76")
    assert (view / "usr" / "bin" / "python3.11").stat().st_ino == (root / "usr" / "bin" / "python3.11").stat().st_ino
    info = (view / "proc" / "cpuinfo").read_text()
    assert info.count("processor\t:") == 4 and "CPU part\t: 0xd0b" in info and "asimddp" in info
    assert not (root / "proc").exists()  # the root itself is shared by every core's view
    assert "0xd08" in (rootfs.cpu_view(root, "cortex-a72") / "proc" / "cpuinfo").read_text()
    assert rootfs.cpu_view(root, "cortex-a76") == view  # kept
    with pytest.raises(ConfigError, match="no emulated core 'cortex-a99'"):
        rootfs.cpu_view(root, "cortex-a99")


def test_the_readme_lines_run_are_its_python_lines_without_a_camera(tmp_path):
    (tmp_path / "README.md").write_text(
        "# x\n\n## Run\n\n```\npython3 -m venv --system-site-packages .venv   # a venv (PEP 668)\n"
        ".venv/bin/python -m pip install -r requirements.txt\n.venv/bin/python runner.py --selftest\n"
        ".venv/bin/python runner.py csi://0\n.venv/bin/python runner.py synthetic:// --headless --max-frames 30\n"
        "```\n\n`.venv/bin/python runner.py --help` lists sources.\n")
    manifest = {"camera": {"source": "csi://0"}}
    install, run = check.split_steps(check.device_steps(tmp_path, manifest))
    assert install == ["python3 -m venv --system-site-packages .venv   # a venv (PEP 668)",
                       ".venv/bin/python -m pip install -r requirements.txt"]
    assert run == [".venv/bin/python runner.py --selftest", ".venv/bin/python runner.py synthetic:// --headless "
                   "--max-frames 30"]
    (tmp_path / "README.md").write_text("# an Android bundle: no commands\n")
    assert check.split_steps(check.device_steps(tmp_path, manifest)) == (check.DEFAULT_STEPS, [])


def test_a_readme_that_pips_outside_a_venv_is_refused_before_anything_runs(tmp_path):
    """Debian 12 and Raspberry Pi OS 12 refuse pip outside a venv (PEP 668): such a README fails its install."""
    done, line, error = check.install(None, tmp_path, ["python3 -m pip install -r requirements.txt"], print)
    assert not done and line == "python3 -m pip install -r requirements.txt" and "makes no venv" in error


def test_which_bundles_are_emulated_and_on_which_core():
    pi5 = {"backend": "tflite", "target_profile": {"arch": "aarch64", "emulation": {"cpu": "cortex-a76"}}}
    assert check.applies(pi5) and check.cpu_of(pi5) == "cortex-a76"
    old = {"backend": "tflite", "target_profile": {"arch": "aarch64"}}  # a profile that names no core
    assert check.cpu_of(old) == check.DEFAULT_CPU
    assert not check.applies({"backend": "tensorrt", "target_profile": {"arch": "aarch64"}})
    assert not check.applies({"backend": "openvino", "target_profile": {"arch": "x86_64"}})


def test_a_profile_naming_an_unknown_core_is_refused(tmp_path):
    from edgeport.target import BUILTIN_DIR, parse_target

    text = (BUILTIN_DIR / "raspberry-pi-5.toml").read_text().replace('cpu = "cortex-a76"', 'cpu = "cortex-a67"')
    (tmp_path / "pi.toml").write_text(text)
    with pytest.raises(ConfigError, match="cpu 'cortex-a67' is not one of .*did you mean"):
        parse_target(tmp_path / "pi.toml")
    assert json.loads(json.dumps(parse_target(BUILTIN_DIR / "raspberry-pi-5.toml").emulation)) == {
        "cpu": "cortex-a76"}
