"""edgeport fleet's pieces that need no device: batches, groups, the playbook, the inventory's hosts, and the
command's refusals (one error line each, before anything runs)."""
from __future__ import annotations

import hashlib
import json

import pytest

from edgeport.deploy.fleet import FleetOptions, check_batches, check_rollout, group_of, inventory_hosts, playbook_text
from edgeport.errors import ConfigError
from tests.conftest import has, run_cli


def test_batches_groups_and_the_play():
    assert check_batches(["1", "10%", " 50% ", "100%"]) == [1, "10%", "50%", "100%"]
    for bad in (["0"], ["x"], ["150%"], []):
        with pytest.raises(ConfigError, match="--batches"):
            check_batches(bad)
    assert group_of("jetson-orin-nano") == "jetson_orin_nano"
    play = playbook_text("rollout", FleetOptions(batches=[1, "25%"], max_fail_percentage=10))
    assert 'serial: [1, "25%"]' in play and "max_fail_percentage: 10" in play
    assert "connection: local" in play and "gather_facts: false" in play


def test_inventory_hosts_and_their_groups():
    inv = {"_meta": {"hostvars": {"a": {"ansible_port": 2201}, "b": {}, "c": {}}},
           "all": {"children": ["ungrouped", "jetson_orin_nano", "pis"]}, "ungrouped": {"hosts": ["c"]},
           "jetson_orin_nano": {"hosts": ["a"]}, "pis": {"children": ["raspberry_pi_5"]},
           "raspberry_pi_5": {"hosts": ["b"]}}
    hosts = inventory_hosts(inv)
    assert list(hosts) == ["c", "a", "b"] and hosts["a"] == {"groups": ["jetson_orin_nano"], "ansible_port": 2201}
    assert hosts["b"]["groups"] == ["pis", "raspberry_pi_5"] and hosts["c"]["groups"] == []
    with pytest.raises(ConfigError, match="1 host\\(s\\) in no group of a given bundle's target \\(c\\)"):
        check_rollout({"jetson_orin_nano": "x", "raspberry_pi_5": "y"}, hosts)
    check_rollout({"jetson_orin_nano": "x", "raspberry_pi_5": "y"}, {k: hosts[k] for k in ("a", "b")})


@pytest.mark.skipif(not has("ansible_runner"), reason="the fleet extra (ansible) is not installed")
def test_refusals_are_one_line(tmp_path):
    inv = tmp_path / "hosts.ini"
    inv.write_text("[jetson_orin_nano]\ncam ansible_host=10.0.0.1\n")
    bundle = tmp_path / "intel-cpu-int8"
    bundle.mkdir()
    (bundle / "runner.py").write_text("")
    digest = hashlib.sha256(b"").hexdigest()
    (bundle / "manifest.json").write_text(json.dumps({"schema": 2, "target": "intel-cpu", "precision": "int8",
                                                      "files": {"runner.py": digest}}))
    cases = [(["rollout", "--inventory", str(inv)], "name at least one bundle folder"),
             (["rollout", str(bundle), "--inventory", str(inv), "--batches", "0"], "--batches '0'"),
             (["rollout", str(bundle), "--inventory", str(tmp_path / "nope.ini")], "no such file"),
             (["rollout", str(bundle), "--inventory", str(inv)], "in no group of a given bundle's target (cam)"),
             (["rollout", str(tmp_path), "--inventory", str(inv)], "not a bundle folder"),
             (["status", str(bundle), "--inventory", str(inv)], "takes no bundles"),
             (["rollout", str(bundle), "--inventory", str(inv), "--max-fail-percentage", "101"], "give 0 to 100")]
    for args, message in cases:
        res = run_cli("fleet", *args)
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 2 and len(errors) == 1 and message in errors[0], (args, res.stderr)
        assert "Traceback" not in res.stderr
