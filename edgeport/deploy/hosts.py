"""Devices as edgeport reaches them: a host (user, address, port, key), its result, and the options of one
flash; --host and inventory entries parsed and checked before anything connects."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from edgeport.errors import ConfigError

log = logging.getLogger("edgeport")


DEFAULT_ROOT = "~/edgeport"


@dataclass
class Host:
    """One device: user@address, port, identity file, the python that runs the runner."""

    address: str
    port: int = 22
    identity: str | None = None
    python: str = "python3"
    name: str = ""

    @property
    def label(self) -> str:
        """How tables name this host."""
        return self.name or (self.address if self.port == 22 else f"{self.address}:{self.port}")

    @property
    def hostname(self) -> str:
        """The address without the user."""
        return self.address.rpartition("@")[2]


@dataclass
class HostResult:
    """What happened on one host."""

    host: str
    status: str  # flashed | unchanged | rolled-back | refused | failed
    step: str
    version: str = ""
    previous: str = ""
    message: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- many hosts
@dataclass
class FlashOptions:
    """Settings shared by every host of one flash."""

    root: str = DEFAULT_ROOT
    known_hosts: Path = field(default_factory=lambda: Path.home() / ".ssh" / "known_hosts")
    accept_fingerprint: str | None = None
    interactive: bool = False
    install: bool = False
    service: bool = False
    source: str | None = None
    serve: str | None = None  # --service --serve [HOST:]PORT
    unit_dir: str | None = None
    rollback: bool = False
    force: bool = False  # flash a bundle whose build failed its gates (recorded in history.log)
    jobs: int = 8
    bytes_limit: int | None = None  # tests: stop the copy after this many bytes


_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?\Z")


def check_port(port: Any, where: str) -> int:
    """``port`` as an int in 1-65535; ConfigError naming ``where`` otherwise."""
    text = str(port).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{where}: port {text or repr(port)} is not a port number from 1 to 65535")
    return int(text)


def parse_address(text: str, where: str = "--host") -> tuple[str, int | None]:
    """(USER@ADDRESS or ADDRESS, port or None) of ``[USER@]ADDRESS[:PORT]`` (an IPv6 address in brackets when a
    port follows it: [fe80::1]:2222), checked before anything connects: a user name, a host name or an IP
    address, a port from 1 to 65535, and no leading '-' anywhere (ssh would read it as an option). ConfigError
    naming what is wrong and ``where``."""
    import ipaddress

    given = text
    text = text.strip()
    if not text:
        raise ConfigError(f"{where}: empty; give USER@ADDRESS, e.g. pi@192.168.1.20")
    if text.startswith("-"):
        raise ConfigError(f"{where} {given!r} begins with '-': give USER@ADDRESS[:PORT], e.g. pi@192.168.1.20 "
                          "(ssh options are not taken here)")
    user, at, rest = text.rpartition("@")
    if at and not _USER.match(user):
        raise ConfigError(f"{where} {given!r}: {user!r} is not a user name (letters, digits, '.', '_', '-'; not "
                          "beginning with '-' or '.')" if user else f"{where} {given!r}: no user before '@'")
    port = None
    if rest.startswith("["):  # [v6]:port or [v6]
        addr, close, tail = rest[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise ConfigError(f"{where} {given!r}: an IPv6 address in brackets is [ADDRESS] or [ADDRESS]:PORT")
        if tail:
            port = check_port(tail[1:], f"{where} {given!r}")
    elif rest.count(":") == 1:
        addr, _, p = rest.partition(":")
        port = check_port(p, f"{where} {given!r}")
    else:
        addr = rest
    if not addr:
        raise ConfigError(f"{where} {given!r}: no address" + (" after '@'" if at else "") +
                          "; give USER@ADDRESS, e.g. pi@192.168.1.20")
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        if ":" in addr or not _HOSTNAME.match(addr) or addr.replace(".", "").isdigit():
            raise ConfigError(f"{where} {given!r}: {addr!r} is neither a host name nor an IP address") from None
    return (f"{user}@{addr}" if at else addr), port


def parse_hosts(hosts: list[str] | None, inventory: str | None, port: int | None, identity: str | None,
                python: str | None) -> list[Host]:
    """Hosts from repeated --host USER@ADDR[:PORT] and an inventory TOML ([[host]] address, port, ...), every
    address and port checked before anything connects (parse_address)."""
    out = []
    if port is not None:
        port = check_port(port, "--port")
    for h in hosts or []:
        addr, p = parse_address(h)
        out.append(Host(addr, p or port or 22, identity, python or "python3"))
    if inventory:
        path = Path(inventory)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"inventory {path}: {e}") from None
        for i, entry in enumerate(data.get("host", [])):
            if "address" not in entry:
                raise ConfigError(f"inventory {path}: host {i + 1} has no address")
            unknown = set(entry) - {"address", "port", "identity", "python", "name"}
            if unknown:
                raise ConfigError(f"inventory {path}: unknown key(s) {sorted(unknown)} in host {i + 1}")
            where = f"inventory {path} host {i + 1}"
            addr, p = parse_address(str(entry["address"]), where)
            if "port" in entry:
                p = check_port(entry["port"], where)
            out.append(Host(addr, p or port or 22, entry.get("identity", identity),
                            entry.get("python", python or "python3"), entry.get("name", "")))
    if not out:
        raise ConfigError("no host: pass --host USER@ADDRESS (repeatable) or --inventory hosts.toml")
    for h in out:
        if h.identity and not Path(h.identity).expanduser().is_file():
            raise ConfigError(f"--identity {h.identity}: no such key file")
    return out
