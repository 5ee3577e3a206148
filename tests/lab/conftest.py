"""Rules for every test under tests/lab/ (end-to-end tests in network namespaces).

- Each test here is marked ``lab`` (``-m "not lab"`` runs the unit tests alone).
- Where the lab cannot run (not root, tools missing) the tests skip with the reason, except with
  ``CI=true``: there a lab that cannot run is a failure, never a silent skip.
- When the session ends, nothing of this run may be left: no namespace, no dockerd or other
  process of a lab workdir, and the root namespace's links, addresses, routes, iptables/nftables
  rules, ip_forward and the machine's D-Bus files must be what they were before. A difference
  is reported as an error.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

import labkit

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.lab)


def _root_snapshot():
    """What the root namespace looks like (the parts the lab must never change)."""
    def out(argv):
        try:
            res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 universal_newlines=True, timeout=30)
            return res.stdout
        except (OSError, subprocess.TimeoutExpired):
            return "(%s not available)" % argv[0]

    def iptables(argv):
        return "\n".join(line.split(" [")[0] if line.startswith(":") else line
                         for line in out(argv).splitlines() if not line.startswith("#"))

    snap = {
        "links": "\n".join(line.split(" link/")[0]
                           for line in out(["ip", "-o", "link"]).splitlines()),
        # lifetimes and expiry count down on their own (SLAAC, DHCP): not a change
        "addresses": re.sub(r"(valid|preferred)_lft \S+", "", out(["ip", "-o", "addr"])),
        "routes": re.sub(r"expires \S+", "", out(["ip", "route", "show", "table", "all"])),
        "iptables": iptables(["iptables-save"]),
        "ip6tables": iptables(["ip6tables-save"]),
        "nftables": out(["nft", "list", "ruleset"]),
    }
    try:
        snap["ip_forward"] = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    except OSError:
        snap["ip_forward"] = "?"
    # the machine's D-Bus files (labkit.SYSTEM_BUS_FILES): a lab's dbus-daemon never makes them
    snap["system bus files"] = " ".join(p for p in labkit.SYSTEM_BUS_FILES if os.path.lexists(p))
    return snap


def leftovers():
    """Namespaces, processes and workdirs of labs this process built that still exist."""
    found = []
    names = labkit.list_netns()
    for prefix, workdir in labkit.CREATED:
        found += ["namespace %s" % n for n in names if n.startswith(prefix)]
        found += ["process %d (%s)" % (p, _comm(p))
                  for p in labkit._pids_with_arg(str(workdir) + "/")]
        if Path(workdir).exists():
            found.append("workdir %s" % workdir)
    return found


def _comm(pid):
    try:
        return Path("/proc/%d/comm" % pid).read_text().strip()
    except OSError:
        return "?"


@pytest.fixture(scope="session", autouse=True)
def lab_guard():
    """Session-wide: the can-it-run decision first, the nothing-left check last."""
    labkit.require(docker=True)
    before = _root_snapshot()
    yield
    labkit._teardown_all()
    problems = leftovers()
    after = _root_snapshot()
    for key in before:
        if before[key] != after[key]:
            problems.append("the root namespace's %s changed:\n--- before\n%s\n--- after\n%s"
                            % (key, before[key], after[key]))
    if problems:
        pytest.fail("the lab left traces:\n" + "\n".join(problems), pytrace=False)
