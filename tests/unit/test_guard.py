"""The unit-test guard itself: mutating commands are caught, read-only probes are not."""

import subprocess

import pytest

from conftest import mutating


@pytest.mark.parametrize("argv", [
    ["ip", "link", "add", "x", "type", "bridge"], ["ip", "-force", "-batch", "-"],
    ["iptables", "-I", "FORWARD", "1", "-j", "ACCEPT"], ["iptables-restore", "--noflush"],
    ["sysctl", "-w", "net.ipv4.ip_forward=1"], ["firewall-cmd", "--state"],
    ["docker", "network", "create", "x"], ["wg", "set", "kohaku-wg", "listen-port", "1"],
    ["wg", "syncconf", "kohaku-wg", "/dev/stdin"], ["wireguard-go", "kohaku-wg"]])
def test_mutating_commands_are_caught(argv):
    assert mutating(argv) is True


@pytest.mark.parametrize("argv", [
    ["ip", "-j", "-d", "addr", "show"], ["iptables", "-S"], ["iptables-save"],
    ["sysctl", "-n", "net.ipv4.ip_forward"], ["python3", "-c", "pass"],
    ["wg", "show", "kohaku-wg", "dump"], ["wg", "genkey"], ["wg", "pubkey"]])
def test_read_only_probes_run(argv):
    assert mutating(argv) is False


def test_the_guard_refuses_before_anything_runs():
    with pytest.raises(AssertionError) as exc:
        subprocess.run(["ip", "link", "add", "kohaku-guard", "type", "bridge"])
    assert "unit tests never change the machine" in str(exc.value)
