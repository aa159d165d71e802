"""The copy of a bundle onto a device: files already there skipped, a partly sent file resumed from its verified
prefix, every sha256 checked on the device."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from edgeport.deploy.ssh import SSH, StepError, remote_path
from edgeport.model import file_sha256

log = logging.getLogger("edgeport")


# ---------------------------------------------------------------- copy
def expected_digests(bundle: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """sha256 of every file to copy: the manifest's files (verified before flashing) and the manifest itself."""
    return {**manifest["files"], "manifest.json": file_sha256(bundle / "manifest.json")}


def copy_bundle(ssh: SSH, bundle: Path, expected: dict[str, str], dest: str,
                bytes_limit: int | None = None) -> dict[str, int]:
    """Copy into ``dest`` with resume, then verify every sha256 on the device.

    ``bytes_limit`` stops after that many bytes have been sent (used to test an interrupted copy).
    Returns counts: sent bytes, skipped files, resumed files.
    """
    where = remote_path(dest)
    listing = ssh.run(f"mkdir -p {where} && cd {where} && for f in $(find . -type f | sed 's|^./||'); do "
                      "printf '%s %s %s\\n' \"$(wc -c < \"$f\")\" \"$(sha256sum \"$f\" | cut -d' ' -f1)\" \"$f\"; "
                      "done", step="copy")
    remote = {}
    for ln in listing.stdout.decode().splitlines():
        size, digest, name = ln.split(" ", 2)
        remote[name] = (int(size), digest)
    stats = {"sent": 0, "skipped": 0, "resumed": 0}
    for name in sorted(expected, key=lambda n: n == "manifest.json"):  # the manifest last
        local = bundle / name
        size = local.stat().st_size
        have = remote.get(name)
        if have == (size, expected[name]):
            stats["skipped"] += 1
            continue
        offset = 0
        if have and 0 < have[0] < size and file_sha256(local, limit=have[0]) == have[1]:
            offset = have[0]
            stats["resumed"] += 1
        with open(local, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        if bytes_limit is not None and stats["sent"] + len(data) > bytes_limit:
            data = data[:max(0, bytes_limit - stats["sent"])]
            _put(ssh, dest, name, data, offset)
            raise StepError("copy", f"{ssh.host.label}: copy interrupted after {bytes_limit} bytes")
        _put(ssh, dest, name, data, offset)
        stats["sent"] += len(data)
    bad = verify_remote(ssh, dest, expected)
    if bad:
        raise StepError("verify", f"{ssh.host.label}: checksum mismatch on the device: {'; '.join(bad[:3])}")
    return stats


def verify_remote(ssh: SSH, dest: str, expected: dict[str, str]) -> list[str]:
    """sha256sum -c on the device: the lines of the files that do not match (empty when all do)."""
    check = ssh.run(f"cd {remote_path(dest)} && sha256sum -c --quiet -", stdin="".join(
        f"{d}  {n}\n" for n, d in expected.items()).encode(), check=False, step="verify")
    if check.returncode == 0:
        return []
    return check.stdout.decode(errors="replace").strip().splitlines() or [f"exit {check.returncode}"]


def _put(ssh: SSH, dest: str, name: str, data: bytes, offset: int) -> None:
    target = f"{dest}/{name}"
    op = ">>" if offset else ">"
    ssh.run(f"mkdir -p {remote_path(os.path.dirname(target))} && cat {op} {remote_path(target)}", stdin=data,
            step="copy")
