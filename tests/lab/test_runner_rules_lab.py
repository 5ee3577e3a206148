"""The runner hardened, for real (issue 11.1, 11.3, 11.4, 11.8, 11.9).

One cluster for the module: the Host, two runners with their own dockerd, and a bare namespace
`outsider` (198.51.100.66) on the underlay that stands for "the internet" and for an attacker on
the LAN. Runner 1 also has a second Docker network (`other`, 172.31.0.0/16) with a container.

- 11.1: the container of `other` reaches no overlay address (its own runner's containers, the
  other runner's, the Host), nor does a machine of the LAN that routes the overlay via a runner,
  while overlay containers still reach each other across runners, the Host, and the outsider
  (through Docker's own rules and the runner's MASQUERADE).
- 11.3: VXLAN frames of our VNI sent to a runner from the outsider are dropped by KOHAKU-VXLAN
  (the bridge never learns their source MAC on vxlan0); the same frames from the Host's address
  come out of vxlan0 (the control); a frame of a foreign VNI is not counted by our drop (Docker
  Swarm, EVPN keep the port).
- 11.4: an operator's 10.0.0.0/8 route via the LAN makes `up` refuse with one sentence (exit 2),
  is left as it was, and `down` does not delete it.
- 11.9: IPv6 is off on the bridge and vxlan0 (no address, no router advertisement taken).
- 11.8: `serve` started while the Host is down builds from its saved allocation and sends
  READY=1 to NOTIFY_SOCKET; once the Host starts, the runner registers and is Active.
"""

import json
import socket
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


# ---- 11.1: FORWARD accepts overlay-to-overlay only ----------------------------------------------


def test_another_docker_network_of_the_runner_reaches_no_overlay_address(c):
    r1, r2 = c.runners
    ip_a, ip_b = c.container_ip(r1, c.a), c.container_ip(r2, c.b)
    # the control: overlay containers reach each other, the Host and the stranger's own gateway
    assert c.ping(r1, c.a, ip_b) and c.ping(r2, c.b, ip_a) and c.ping(r1, c.a, "10.0.0.1")
    assert c.ping(r1, c.stranger, "172.31.0.1")
    assert c.sh(r1, "iptables", "-S", "FORWARD").stdout.splitlines()[1].endswith(
        "--comment kohaku-overlay -j ACCEPT")         # ours first, Docker's isolation below
    for dst in (ip_a, ip_b, "10.0.0.1"):
        assert not c.ping(r1, c.stranger, dst), dst
    assert c.sh(r1, "iptables", "-S", "FORWARD").stdout.splitlines()[1] == (
        "-A FORWARD -s 10.0.0.0/8 -d 10.0.0.0/8 -i kohaku-overlay -o kohaku-overlay "
        "-m comment --comment kohaku-overlay -j ACCEPT")


def test_overlay_containers_still_reach_the_underlay_through_masquerade(c):
    r1, r2 = c.runners
    assert c.ping(r1, c.a, OUTSIDER_IP) and c.ping(r2, c.b, OUTSIDER_IP)


def test_a_machine_on_the_lan_cannot_route_into_the_overlay_through_a_runner(c):
    r1 = c.runners[0]
    ip_a = c.container_ip(r1, c.a)
    c.sh(c.outsider, "ip", "route", "replace", "10.1.0.0/16", "via", r1.ip)
    try:
        assert not c.ping(c.outsider, None, ip_a)
    finally:
        c.sh(c.outsider, "ip", "route", "del", "10.1.0.0/16", check=False)


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


# ---- 11.9: IPv6 off on the runner's overlay devices -------------------------------------------


def test_ipv6_is_off_on_the_bridge_and_vxlan0(c):
    r1 = c.runners[0]
    for dev in (labkit.OVERLAY_BRIDGE, "vxlan0"):
        assert c.sh(r1, "cat", "/proc/sys/net/ipv6/conf/%s/disable_ipv6" % dev).stdout == "1\n"
    out = json.loads(c.sh(r1, "ip", "-j", "addr", "show", "dev", labkit.OVERLAY_BRIDGE).stdout)
    assert [a for a in out[0]["addr_info"] if a["family"] == "inet6"] == []


# ---- 11.4: routes that are not ours ------------------------------------------------------------


def test_an_operator_route_covering_the_overlay_is_never_replaced_nor_deleted(c):
    r2 = c.runners[1]
    c.docker(r2, "rm", "-f", c.b)
    assert c.script(r2, "runner", "down").returncode == 0
    c.sh(r2, "ip", "route", "add", "10.0.0.0/8", "via", "198.51.100.254", "dev", "eth0")
    try:
        res = c.script(r2, "runner", "up")
        assert res.returncode == 2, res.stdout + res.stderr
        assert res.stderr.strip().splitlines()[-1] == (
            "error: the overlay CIDR 10.0.0.0/8 overlaps route 10.0.0.0/8 via 198.51.100.254 dev "
            "eth0 of this runner, which the overlay does not own and would take its traffic: set "
            "OVERLAY_SUBNET on the Host to a range clear of it, then restart the Host and its "
            "runners")
        route = c.sh(r2, "ip", "-j", "route", "show", "exact", "10.0.0.0/8").stdout
        assert [(r["gateway"], r["dev"]) for r in json.loads(route)] == [
            ("198.51.100.254", "eth0")]
        assert "vxlan0" not in c.sh(r2, "ip", "-br", "link").stdout
        assert c.script(r2, "runner", "down").returncode == 0
        route = c.sh(r2, "ip", "-j", "route", "show", "exact", "10.0.0.0/8").stdout
        assert [r["gateway"] for r in json.loads(route)] == ["198.51.100.254"]
    finally:
        c.sh(r2, "ip", "route", "del", "10.0.0.0/8", "via", "198.51.100.254", check=False)
    res = c.script(r2, "runner", "up")
    assert res.returncode == 0, res.stdout + res.stderr
    c.b = c.container(r2, "cb")
    assert c.ping(r2, c.b, "10.0.0.1")


# ---- 11.8: serve started while the Host is down -------------------------------------------------


def test_serve_with_the_host_down_builds_from_its_saved_allocation_and_says_ready(c, tmp_path):
    r2 = c.runners[1]
    c.docker(r2, "rm", "-f", c.b)
    assert c.script(r2, "runner", "down").returncode == 0       # devices gone, state file kept
    assert "vxlan0" not in c.sh(r2, "ip", "-br", "link").stdout
    c.stop_host()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    notify.bind(path)
    notify.settimeout(30)
    try:
        env = c._env(r2)
        env["NOTIFY_SOCKET"] = path
        c._spawn(r2.name, r2.workdir / "runner.log", c._script_argv(r2, "runner", ["serve"]), env)
        try:
            assert notify.recv(64) == b"READY=1"               # the Host is still down
        except socket.timeout:
            raise AssertionError("no READY=1 within 30 s:\n" + c.log_tail(r2.name))
        assert "vxlan0" in c.sh(r2, "ip", "-br", "link").stdout
        assert c.docker(r2, "network", "inspect", labkit.OVERLAY_NETWORK,
                        check=False).returncode == 0
        c.start_host()

        def active():
            return [a["active"] for a in c.status()["allocations"]
                    if a["runner_name"] == r2.name] == [True]
        c.wait_for(active, timeout=20, interval=0.3, what="runner2 Active once the Host runs",
                   log=[r2.name, "host"])
        c.b = c.container(r2, "cb")
        assert c.ping(r2, c.b, "10.0.0.1")
    finally:
        notify.close()
        if not c.proc_running("host"):
            c.start_host()
        c.stop_runner(2)
