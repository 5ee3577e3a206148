"""The Host with exactly the systemd unit's capabilities beside a real firewalld (issue 11.2).

`setpriv` gives `serve` the unit's bounding set (CAP_NET_ADMIN, CAP_NET_RAW), no inheritable or
ambient capabilities and no_new_privs, as CapabilityBoundingSet=/AmbientCapabilities=/
NoNewPrivileges= do. Such a process may not read another process's /proc/PID/ns/net (the
detection before this issue did, and so never saw firewalld); it may read /proc/PID/cmdline,
and `firewall-cmd --state` over the node's D-Bus confirms. Lab(firewalld=True) runs firewalld in
the Host's namespace as `/usr/bin/python3 /usr/sbin/firewalld ...` (Debian's command line; the
RHEL one, with `-s`, runs under systemd in test_systemd_lab.py).
"""

import os
import shutil
from pathlib import Path

import pytest

import labkit

CAPS = 1 << 12 | 1 << 13                # CAP_NET_ADMIN, CAP_NET_RAW


@pytest.fixture(scope="module")
def c():
    labkit.require(docker=False, firewalld=True)
    if not shutil.which("setpriv"):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but setpriv (util-linux) is missing", pytrace=False)
        pytest.skip("setpriv (util-linux) is not installed")
    with labkit.Lab(runners=1, docker=False, firewalld=True) as cluster:
        # the interpreter the lab starts the scripts with, behind the unit's capability limits
        wrapper = cluster.workdir / "python-with-unit-caps"
        wrapper.write_text("#!/bin/sh\nexec setpriv --bounding-set=-all,+net_admin,+net_raw "
                           "--inh-caps=-all --ambient-caps=-all --no-new-privs %s \"$@\"\n"
                           % cluster.python)
        wrapper.chmod(0o755)
        cluster.python = str(wrapper)
        cluster.host_config(OVERLAY_REPAIR_INTERVAL=2)
        cluster.start_host()
        cluster.start_runner(1)
        cluster.wait_active(["runner1"])
        yield cluster


def caps_of(pid):
    status = dict(line.split(":\t", 1) for line in
                  Path("/proc/%d/status" % pid).read_text().splitlines() if ":\t" in line)
    return {k: int(status[k], 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb")}


def test_the_host_runs_with_exactly_the_units_capabilities(c):
    pid = c._procs["host"][0].pid
    assert Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")[1].endswith(
        b"kohaku_overlay_host.py")
    assert caps_of(pid) == {"CapEff": CAPS, "CapPrm": CAPS, "CapBnd": CAPS, "CapInh": 0,
                            "CapAmb": 0}


def test_with_those_capabilities_it_puts_its_interfaces_into_the_trusted_zone(c):
    def trusted():
        res = c.firewall_cmd("--zone=trusted", "--list-interfaces", check=True)
        return set(res.stdout.split())
    c.wait_for(lambda: {"kohaku-host", "vxkr1"} <= trusted(), timeout=20, interval=0.5,
               what="kohaku-host and vxkr1 in the Host's trusted zone", log=["host", "firewalld"])
    assert c.ping(c.runners[0], None, "10.0.0.1", count=2)
