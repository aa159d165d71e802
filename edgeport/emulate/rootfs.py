"""A Debian 12 (bookworm) arm64 userland for emulated runs, made once from Debian's packages and cached.

``debootstrap --foreign`` downloads and unpacks the minimal base with Python and pip. Its second stage would run
arm64 programs through binfmt_misc, which these hosts lack (a chroot fails with "Exec format error"), so every
downloaded package is unpacked with ``dpkg-deb -x`` instead; no maintainer script runs, and none is needed to run
Python. qemu-user then runs the userland's programs with the root as its prefix (``qemu-aarch64-static -L ROOT``),
which also serves the prefix's files in place of the host's: the root's ``/proc/cpuinfo`` describes the emulated
core (``cpu_view``), where the host's x86 one would be read (XNNPACK reads it to choose kernels, and crashes on
it).

The root is built in a temporary folder and renamed into place, so a failed or interrupted build leaves nothing
that looks usable; ``RECIPE`` names what a root holds, and a root of another recipe is built again.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgeport.errors import ConfigError

RECIPE = "bookworm-arm64-minbase-python3-1"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-pip", "python3-venv")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
INSTALL = "apt-get install qemu-user-static debootstrap"
# qemu's CPU models of the cores ARM bundles meet: /proc/cpuinfo's part number and the features Linux lists.
_BASE = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
CPUS: dict[str, tuple[int, int, str]] = {
    "cortex-a72": (0xd08, 0x0, _BASE),  # Raspberry Pi 4
    "cortex-a76": (0xd0b, 0x4, _BASE + " atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp"),  # Raspberry Pi 5
    "neoverse-n1": (0xd0c, 0x3, _BASE + " atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp ssbs"),
}


def cache_folder() -> Path:
    """Where roots are kept between runs: $EDGEPORT_EMULATE_CACHE, else ~/.cache/edgeport/emulate."""
    env = os.environ.get("EDGEPORT_EMULATE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgeport" / "emulate"


def qemu() -> str:
    """The path of qemu-aarch64-static (Debian's qemu-user-static); ConfigError with the install line if absent."""
    found = shutil.which("qemu-aarch64-static")
    if not found:
        raise ConfigError(f"--emulate aarch64 needs qemu-user's qemu-aarch64-static: {INSTALL}")
    return found


def ensure_root(mirror: str = DEFAULT_MIRROR, say: object = print, cache: Path | None = None) -> Path:
    """The cached Debian 12 arm64 root, built first when there is none of this ``RECIPE`` (a minute on a
    2-core host, about 240 MB). ``say(line)`` reports the stages."""
    cache = cache or cache_folder()
    root = cache / "rootfs"
    if (root / ".edgeport-recipe").is_file() and (root / ".edgeport-recipe").read_text().strip() == RECIPE:
        return root
    missing = [t for t in ("debootstrap", "dpkg-deb") if not (shutil.which(t) or Path(f"/usr/sbin/{t}").is_file())]
    if missing:
        raise ConfigError(f"--emulate aarch64 makes a Debian 12 arm64 root once and needs {', '.join(missing)}: "
                          f"{INSTALL}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=cache))
    try:
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        say(f"rootfs: downloading Debian 12 arm64 ({', '.join(PACKAGES)}) from {mirror}")  # type: ignore[operator]
        res = subprocess.run([debootstrap, "--arch=arm64", "--foreign", "--variant=minbase",
                              f"--include={','.join(PACKAGES)}", SUITE, str(tmp), mirror],
                             capture_output=True, text=True)
        if res.returncode != 0:
            last = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
            raise ConfigError(f"debootstrap could not make the arm64 root from {mirror}: "
                              f"{last[-1] if last else f'exit {res.returncode}'}")
        debs = sorted((tmp / "var" / "cache" / "apt" / "archives").glob("*.deb"))
        say(f"rootfs: unpacking {len(debs)} packages")  # type: ignore[operator]
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True)
            deb.unlink()
        if not (tmp / "usr" / "bin" / "python3").exists():
            raise ConfigError("the arm64 root has no python3 after unpacking: its packages did not arrive")
        (tmp / ".edgeport-recipe").write_text(RECIPE + "\n")
        old = cache / ".rootfs-old"
        with contextlib.suppress(FileNotFoundError):
            root.rename(old)
        tmp.rename(root)
        shutil.rmtree(old, ignore_errors=True)
        for view in cache.glob("cpu-*"):  # views of an older root
            shutil.rmtree(view, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def cpu_view(root: Path, cpu: str) -> Path:
    """The root as one emulated core sees it: hard links of every file, and that core's /proc/cpuinfo."""
    if cpu not in CPUS:
        raise ConfigError(f"no emulated core {cpu!r}; known: {', '.join(CPUS)}")
    view = root.parent / f"cpu-{cpu}"
    stamp = view / ".edgeport-recipe"
    if stamp.is_file() and stamp.read_text() == (root / ".edgeport-recipe").read_text():
        return view
    tmp = Path(tempfile.mkdtemp(prefix=f".cpu-{cpu}-", dir=root.parent))
    try:
        shutil.rmtree(tmp)
        shutil.copytree(root, tmp, symlinks=True, copy_function=os.link)
        part, variant, features = CPUS[cpu]
        (tmp / "proc").mkdir(exist_ok=True)
        block = (f"BogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
                 f"CPU variant\t: {variant:#x}\nCPU part\t: {part:#05x}\nCPU revision\t: 1\n\n")
        (tmp / "proc" / "cpuinfo").write_text("".join(f"processor\t: {i}\n{block}" for i in range(4)))
        shutil.rmtree(view, ignore_errors=True)
        tmp.rename(view)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return view
