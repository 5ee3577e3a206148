"""Unit tests never change the machine: a mutating network command started from a unit test
fails the test instead of running.

The machine's own namespace must never be configured (its DNS server sits inside 10.0.0.0/8).
A unit test that forgot to mock a script's run() would otherwise add links, rules or sysctls
to it for real; this guard turns that mistake into a failure naming the command. Read-only
probes (`ip -j addr show`, `iptables -S`) still run.
"""

import os
import subprocess

import pytest

MUTATING_VERBS = {"add", "del", "delete", "replace", "set", "flush", "change", "append"}
ALWAYS = {"iptables-restore", "ip6tables-restore", "iptables-legacy-restore",
          "iptables-nft-restore", "firewall-cmd", "nsenter", "dockerd", "wireguard-go"}
WG_WRITES = {"set", "setconf", "addconf", "syncconf"}
IPTABLES_WRITES = {"-A", "-I", "-D", "-R", "-N", "-X", "-F", "-P", "-Z", "-E",
                   "--append", "--insert", "--delete", "--new-chain", "--flush", "--policy"}


def mutating(argv):
    if isinstance(argv, (str, bytes)):
        return False  # shell strings: none of the scripts use them
    argv = [a.decode() if isinstance(a, bytes) else str(a) for a in argv]
    if not argv:
        return False
    tool = os.path.basename(argv[0])
    rest = argv[1:]
    if tool in ALWAYS:
        return True
    if tool.startswith("iptables") or tool.startswith("ip6tables"):
        return any(a in IPTABLES_WRITES for a in rest)
    if tool in ("ip", "bridge"):
        return "-batch" in rest or "-b" in rest or any(a in MUTATING_VERBS for a in rest)
    if tool == "wg":
        return any(a in WG_WRITES for a in rest[:1])
    if tool == "sysctl":
        return "-w" in rest or any("=" in a for a in rest)
    if tool == "docker":
        return any(a in ("create", "rm", "connect", "disconnect", "run", "network")
                   for a in rest[:2])
    return False


@pytest.fixture(autouse=True)
def no_real_network_changes(monkeypatch):
    real = subprocess.Popen

    class GuardedPopen(real):
        def __init__(self, args, *a, **kw):
            if mutating(args):
                raise AssertionError("a unit test tried to run %r for real: mock the script's "
                                     "run() (unit tests never change the machine)" % (args,))
            super(GuardedPopen, self).__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", GuardedPopen)
