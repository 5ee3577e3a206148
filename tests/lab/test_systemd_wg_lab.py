"""The shipped units with OVERLAY_ENCRYPTION = "wireguard" under a real systemd (issues 13, 15):
the Host and runner1 of test_systemd_lab.py (RHEL-style Host, Debian runner, firewalld as a
service on both, the README's steps), encrypted. This kernel has no WireGuard module, so both
daemons run wireguard-go: it needs /dev/net/tun in the unit's private /dev, a writable
/run/wireguard for its control socket, and it must outlive a restart or stop of the unit that
started it (KillMode=process), or the encrypted overlay stops with the daemon.
"""

import re

import pytest

import nspawn
from test_systemd_lab import UNITS, active, booted_cluster, ping_from_gateway, state, wait


@pytest.fixture(scope="module")
def nodes():
    yield from booted_cluster(encryption=True, runner2=False)


def wireguard_go(m):
    """Pids (seen from here) of the container's wireguard-go processes, by /proc/PID/comm."""
    tree, todo, found = nspawn._children(), [m.leader], []
    while todo:
        pid = todo.pop()
        try:
            with open("/proc/%d/comm" % pid) as f:
                if f.read().strip() == "wireguard-go":
                    found.append(pid)
        except OSError:
            continue
        todo += tree.get(pid, [])
    return sorted(found)


def test_both_units_start_ready_with_wireguard_go(nodes):
    h, r, _info = nodes
    for m, role in ((h, "host"), (r, "runner")):
        st = state(m, UNITS[role])
        assert (st["ActiveState"], st["Result"]) == ("active", "success")
        assert "kohaku-wg" in m.sh("ip", "-o", "link").stdout
        assert len(wireguard_go(m)) == 1
        # its control socket, in the RuntimeDirectory= the unit gives it
        assert m.sh("test", "-S", "/run/wireguard/kohaku-wg.sock", check=False).returncode == 0


def test_the_encrypted_overlay_answers(nodes):
    _h, r, _info = nodes
    wait(lambda: ping_from_gateway(r)[0], 30, "ping 10.1.0.1 -> 10.0.0.1 through kohaku-wg", r,
         UNITS["runner"])
    out = r.sh("wg", "show", "kohaku-wg", "latest-handshakes").stdout
    assert re.search(r"\s[1-9]\d*$", out.strip())


def test_restart_and_stop_of_either_unit_keep_the_encrypted_overlay(nodes):
    h, r, _info = nodes
    for m, role in ((h, "host"), (r, "runner")):
        before = wireguard_go(m)
        m.sh("systemctl", "restart", UNITS[role], timeout=60)
        assert active(m, UNITS[role])
        assert wireguard_go(m) == before        # the same wireguard-go: the tunnel never went
        ok, out = ping_from_gateway(r)
        assert ok, out
    h.sh("systemctl", "stop", UNITS["host"], timeout=60)
    try:
        assert wireguard_go(h) != []
        ok, out = ping_from_gateway(r)
        assert ok, out
    finally:
        h.sh("systemctl", "start", UNITS["host"], timeout=60)
    assert active(h, UNITS["host"])
