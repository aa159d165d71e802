"""Putting bundles on devices: hosts, ssh, preflight, copy, service, flash (a host at a time), fleet (Ansible)."""
