"""The runner's firewall for real (issue 11.3): the VXLAN filter.

One cluster for the module: the Host, two runners with their own dockerd, and a bare namespace
`outsider` (198.51.100.66) on the underlay that stands for "the internet" and for an attacker on
the LAN. Runner 1 also has a second Docker network (`other`, 172.31.0.0/16) with a container.

- 11.3: VXLAN frames of our VNI sent to a runner from the outsider are dropped by KOHAKU-VXLAN
  (the bridge never learns their source MAC on vxlan0); the same frames from the Host's address
  come out of vxlan0 (the control); a
  frame of a foreign VNI is not counted by our drop (Docker Swarm, EVPN keep the port).
"""

import struct
import sys

import pytest

import labkit

OUTSIDER_IP = "198.51.100.66"
OTHER_NET = "other"

# Sends each hex datagram (argv[2:]) to argv[1]:4789 from this namespace.
SENDER = r'''
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for h in sys.argv[2:]:
    s.sendto(bytes.fromhex(h), (sys.argv[1], 4789))
    time.sleep(0.05)
'''


@pytest.fixture(scope="module")
def c():
    labkit.require(docker=True)
    with labkit.Lab(runners=2, docker=True) as cluster:
        cluster.start_host()
        r1, r2 = cluster.runners
        # first, so that `up` puts our rules back above the jumps Docker inserted for it
        cluster.docker(r1, "network", "create", "--driver", "bridge", "--subnet",
                       "172.31.0.0/16", OTHER_NET)
        for node in (r1, r2):
            res = cluster.script(node, "runner", "up")
            assert res.returncode == 0, res.stdout + res.stderr
        cluster.outsider = cluster.add_bare_node("outsider", OUTSIDER_IP)
        cluster.a = cluster.container(r1, "ca")
        cluster.b = cluster.container(r2, "cb")
        cluster.stranger = cluster.container(r1, "stranger", network=OTHER_NET)
        yield cluster


def learnt(c, node, mac):
    """True when runner's bridge learnt mac on vxlan0: a frame from it came out of the tunnel."""
    out = c.sh(node, "bridge", "fdb", "show", "br", labkit.OVERLAY_BRIDGE).stdout
    return any(line.startswith(mac + " dev vxlan0") for line in out.splitlines())


def drop_count(c, node):
    """Packets counted by the DROP rule (our VNI range) of KOHAKU-VXLAN."""
    out = c.sh(node, "iptables", "-L", "KOHAKU-VXLAN", "-v", "-x", "-n").stdout
    drops = [line.split() for line in out.splitlines() if " DROP " in " %s " % line]
    assert len(drops) == 1, out
    return int(drops[0][0])


def arp_frames(vni, mac, n=3):
    """n VXLAN datagrams of `vni`, each a broadcast ARP request for 10.1.0.1 from `mac`."""
    src = bytes.fromhex(mac.replace(":", ""))
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src + bytes([10, 1, 0, 5]) + b"\0" * 6 + \
        bytes([10, 1, 0, 1])
    eth = b"\xff" * 6 + src + struct.pack("!H", 0x0806) + arp
    return [struct.pack("!II", 0x08000000, vni << 8) + eth for _ in range(n)]


def send(c, sender, dst, frames):
    c.sh(sender, sys.executable, "-c", SENDER, dst, *[f.hex() for f in frames])


# ---- 11.3: the runner-side VXLAN filter ----------------------------------------------------------


def test_vxlan_frames_of_our_vni_are_taken_from_the_host_only(c):
    r1 = c.runners[0]
    drops0 = drop_count(c, r1)
    send(c, c.outsider, r1.ip, arp_frames(101, "02:aa:bb:cc:dd:01"))
    assert drop_count(c, r1) - drops0 == 3
    # another runner's VNI (runner 2 injecting into runner 1's neighbour segment): dropped too
    send(c, c.outsider, r1.ip, arp_frames(102, "02:aa:bb:cc:dd:01"))
    assert drop_count(c, r1) - drops0 == 6
    assert not learnt(c, r1, "02:aa:bb:cc:dd:01")
    # the control: the same frames from the Host's address come out of vxlan0
    send(c, c.host, r1.ip, arp_frames(101, "02:aa:bb:cc:dd:02"))
    assert learnt(c, r1, "02:aa:bb:cc:dd:02")
    assert drop_count(c, r1) - drops0 == 6


def test_vxlan_frames_of_a_foreign_vni_are_left_to_the_rest_of_input(c):
    r1 = c.runners[0]
    drops0 = drop_count(c, r1)
    send(c, c.outsider, r1.ip, arp_frames(5000, "02:aa:bb:cc:dd:03"))
    assert drop_count(c, r1) == drops0
    out = c.sh(r1, "iptables", "-S", "INPUT").stdout.splitlines()
    assert out[1] == ("-A INPUT -p udp -m udp --dport 4789 -m comment --comment kohaku-overlay "
                      "-j KOHAKU-VXLAN")


def test_down_removes_the_vxlan_filter_and_up_builds_it_again(c):
    r2 = c.runners[1]
    c.docker(r2, "rm", "-f", c.b)
    res = c.script(r2, "runner", "down")
    assert res.returncode == 0, res.stdout + res.stderr
    save = c.sh(r2, "iptables-save").stdout
    assert "KOHAKU-VXLAN" not in save and "kohaku-overlay" not in save
    res = c.script(r2, "runner", "up")
    assert res.returncode == 0, res.stdout + res.stderr
    c.b = c.container(r2, "cb")
    assert "-N KOHAKU-VXLAN" in c.sh(r2, "iptables", "-S").stdout
    assert c.ping(r2, c.b, "10.0.0.1")
