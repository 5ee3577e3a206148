"""A runner whose underlay address changes under a running serve (issue 11.7: DHCP, a cloud
re-address), for real, without Docker.

The Host answers heartbeats from the new address with 404 and refuses a registration from it
while the old one is still Active (409, two machines with one name); once the old allocation is
Inactive (OVERLAY_INACTIVE_AFTER = 3 here) the runner's registration from its new address goes
through. Pass: the runner rebuilds vxlan0 on the new local address, the Host's tunnel points at
it, and the runner's "container" reaches the Host over the overlay again.
"""

import json

import pytest

import labkit

NEW_IP = "198.51.100.42"


@pytest.fixture(scope="module")
def c():
    labkit.require(docker=False)
    with labkit.Lab(runners=1, docker=False) as cluster:
        cluster.host_config(OVERLAY_INACTIVE_AFTER=3)
        cluster.start_host()
        yield cluster


def vxlan_ends(c, node, dev):
    link = json.loads(c.sh(node, "ip", "-j", "-d", "link", "show", "dev", dev,
                           check=False).stdout or "[{}]")[0]
    data = (link.get("linkinfo") or {}).get("info_data") or {}
    return data.get("local"), data.get("remote")


def test_a_new_underlay_address_rebuilds_vxlan0_and_the_host_follows(c):
    r1 = c.runners[0]
    c.start_runner(1)
    try:
        k = c.container(r1, "k")
        assert c.ping(r1, k, "10.0.0.1")
        assert vxlan_ends(c, r1, "vxlan0") == (r1.ip, labkit.HOST_IP)
        # the DHCP server hands out another address: the new one first, then the old one goes
        # (promoted, the new one keeps its connected route when the old primary is deleted)
        c.sh(r1, "sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1")
        c.sh(r1, "ip", "addr", "add", NEW_IP + "/24", "dev", "eth0")
        c.sh(r1, "ip", "addr", "del", r1.ip + "/24", "dev", "eth0")

        def moved():
            return vxlan_ends(c, r1, "vxlan0") == (NEW_IP, labkit.HOST_IP) and \
                vxlan_ends(c, c.host, "vxkr1")[1] == NEW_IP
        c.wait_for(moved, timeout=30, interval=0.5,
                   what="vxlan0 on %s and the Host's vxkr1 pointing at it" % NEW_IP,
                   log=[r1.name, "host"])
        c.wait_for(lambda: c.ping(r1, k, "10.0.0.1"), timeout=30, interval=0.5,
                   what="the overlay to carry traffic again", log=[r1.name, "host"])
        assert "underlay address changed from %s to %s" % (r1.ip, NEW_IP) in \
            c.log_tail(r1.name, lines=80)
    finally:
        c.stop_runner(1)
