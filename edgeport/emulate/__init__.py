"""Bundles run on emulated aarch64: a Debian 12 arm64 userland made from Debian's packages (rootfs.py), its
Python under qemu-user with the device's own core (machine.py), and the checks `edgeport validate --emulate`
adds to each ARM bundle (check.py)."""
