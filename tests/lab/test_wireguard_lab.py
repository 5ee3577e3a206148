"""The encrypted overlay (issue 13): OVERLAY_ENCRYPTION = "wireguard" on the Host, one line.

One lab for the module: a Host and two runners whose "containers" are namespaces (docker=False),
each node in its own mount namespace (Lab(private_run=True)) so that every node's wireguard-go
has its own control socket. This kernel has no WireGuard module: kohaku-wg is wireguard-go.
Bare nodes play the attacker (forged VXLAN on the underlay) and an impostor with a key the Host
never saw. The tests run in file order; the last ones switch encryption off and on again.
"""

import json
import os
import signal
import stat
import struct
import subprocess
import time

import pytest

import labkit
import test_attacks_lab as attacks

HOST = labkit.HOST_IP
ATTACKER_IP = "198.51.100.66"
IMPOSTOR_IP = "198.51.100.67"
PATTERN = "6b6f68616b752d77"                 # "kohaku-w": must never show on the underlay
MTU = 1390                                   # 1500 - 50 (VXLAN) - 60 (WireGuard)


def wg_dump(c, node):
    res = c.sh(node, "wg", "show", "kohaku-wg", "dump")
    lines = [line.split("\t") for line in res.stdout.splitlines()]
    return {"public_key": lines[0][1], "port": int(lines[0][2]),
            "peers": {f[0]: {"endpoint": f[2], "allowed": f[3], "handshake": int(f[4])}
                      for f in lines[1:]}}


def vxlan_info(c, node, dev):
    link = json.loads(c.sh(node, "ip", "-j", "-d", "link", "show", "dev", dev).stdout)[0]
    return link["linkinfo"]["info_data"]


def has_link(c, node, dev):
    return c.sh(node, "ip", "link", "show", "dev", dev, check=False).returncode == 0


def pings(c, i, name, dst, count=3):
    return c.ping(i, name, dst, count=count, timeout=3)


def pattern_ping(c, i, name, dst, count=5):
    """iputils ping with a payload pattern, from the container's namespace."""
    res = labkit._run(["nsenter", c._container_netns(c._node(i), name), "ping", "-n", "-c",
                       str(count), "-i", "0.2", "-W", "2", "-p", PATTERN, dst], check=False,
                      timeout=30)
    return res.returncode == 0


def encrypted(c):
    """Both runners' vxlan0 sit on their tunnel addresses and the Host has their keys."""
    st = c.status()
    if st.get("encryption") != "wireguard" or not all(
            a.get("wg_public_key") for a in st["allocations"]):
        return False
    return all(vxlan_info(c, r, "vxlan0").get("local", "").startswith("172.16.")
               for r in c.runners)


def plain(c):
    return all(vxlan_info(c, r, "vxlan0").get("local") == r.ip and not has_link(c, r, "kohaku-wg")
               for r in c.runners) and not has_link(c, c.host, "kohaku-wg")


def read_pcap(path):
    """[(proto, sport, dport, raw packet bytes)] of the IPv4 packets in a pcap file."""
    data = open(path, "rb").read()
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack("<I", data[off + 8:off + 12])[0]
        pkt = data[off + 16:off + 16 + incl]
        off += 16 + incl
        if len(pkt) < 34 or struct.unpack("!H", pkt[12:14])[0] != 0x0800:
            continue
        ihl = (pkt[14] & 0x0F) * 4
        proto = pkt[23]
        sport = dport = None
        if proto in (6, 17) and len(pkt) >= 14 + ihl + 4:
            sport, dport = struct.unpack("!HH", pkt[14 + ihl:18 + ihl])
        out.append((proto, sport, dport, pkt))
    return out


@pytest.fixture(scope="module")
def c():
    labkit.require(docker=False, wireguard=True)
    with labkit.Lab(runners=2, docker=False, private_run=True) as cluster:
        cluster.host_config(OVERLAY_ENCRYPTION="wireguard", OVERLAY_MTU=MTU,
                            OVERLAY_REPAIR_INTERVAL=2)
        for i in (1, 2):
            cluster.runner_config(i, OVERLAY_MTU=MTU, HEARTBEAT_INTERVAL=1)
        cluster.start_host()
        cluster.start_runner(1)
        cluster.start_runner(2)
        cluster.wait_active()
        cluster.container(1, "a1")
        cluster.container(1, "a2")
        cluster.container(2, "b1")
        cluster.attacker = cluster.add_bare_node("attacker", ATTACKER_IP)
        cluster.impostor = cluster.add_bare_node("impostor", IMPOSTOR_IP)
        cluster.wait_for(lambda: encrypted(cluster), timeout=20, what="an encrypted cluster",
                         log=["host", "runner1", "runner2"])
        yield cluster


# ---- the stack --------------------------------------------------------------------------------

def test_every_node_has_kohaku_wg_with_the_others_keys(c):
    host = wg_dump(c, c.host)
    st = {a["runner_name"]: a for a in c.status()["allocations"]}
    assert host["port"] == 51820
    for i, r in enumerate(c.runners, 1):
        mine = wg_dump(c, r)
        assert st[r.name]["wg_public_key"] == mine["public_key"]
        assert host["peers"][mine["public_key"]]["allowed"] == "172.16.0.%d/32" % (i + 1)
        assert list(mine["peers"]) == [host["public_key"]]
        assert mine["peers"][host["public_key"]]["endpoint"] == HOST + ":51820"
        info = vxlan_info(c, r, "vxlan0")
        assert (info["local"], info["remote"], info["id"]) == (
            "172.16.0.%d" % (i + 1), "172.16.0.1", 100 + i)
        assert json.loads(c.sh(r, "ip", "-j", "link", "show", "dev", "kohaku-wg").stdout)[0][
            "mtu"] == 1440
        assert "userspace wireguard-go" in c.log_tail(r.name, 400)
    assert vxlan_info(c, c.host, "vxkr1")["local"] == "172.16.0.1"
    assert vxlan_info(c, c.host, "vxkr2")["remote"] == "172.16.0.3"


def test_cross_runner_same_runner_host_and_gateway_pings(c):
    b1 = c.container_ip(2, "b1")
    assert c.wait_for(lambda: pings(c, 1, "a1", b1, 1), timeout=10, what="a1 -> b1")
    assert pings(c, 1, "a1", b1)
    assert pings(c, 1, "a1", c.container_ip(1, "a2"))
    assert pings(c, 1, "a1", "10.0.0.1")
    assert pings(c, 2, "b1", "10.2.0.1")
    assert c.ping(1, "a1", b1, size=MTU - 28, df=True)       # the full overlay MTU passes
    assert not c.ping(1, "a1", b1, size=MTU - 27, df=True)   # one byte more does not


def test_the_check_script_sees_the_encrypted_stack(c):
    want = {"host": ["wg.interface", "wg.peers", "wg.handshake", "vxkr.local", "vxkr.remote",
                     "vxlan_port", "underlay_mtu"],
            "runner": ["wg.interface", "wg.peers", "wg.handshake", "vxlan0.local",
                       "vxlan0.remote", "vxlan_port", "ping", "ping_df", "underlay_mtu"]}
    for node in (c.host, c.runners[0]):
        res = c.script(node, "check", "--json")
        results = {r["id"]: r for r in json.loads(res.stdout)["results"]}
        got = {i: results["%s.%s" % (node.role, i)]["status"] for i in want[node.role]}
        assert got == {i: "PASS" for i in want[node.role]}, res.stdout[-3000:]
        assert "userspace wireguard-go" in results[node.role + ".wg.interface"]["detail"]


def test_the_underlay_carries_only_the_wireguard_port_and_no_plaintext(c):
    pcap = str(c.workdir / "underlay.pcap")
    dump = subprocess.Popen(["ip", "netns", "exec", c.switch_ns, "tcpdump", "-i", c.prefix + "sw",
                             "-nn", "-U", "-w", pcap, "not", "tcp", "port", "8000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        assert pattern_ping(c, 1, "a1", c.container_ip(2, "b1"))
        assert pattern_ping(c, 2, "b1", "10.0.0.1")
        time.sleep(0.5)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    packets = read_pcap(pcap)
    udp = [p for p in packets if p[0] == 17]
    assert len(udp) >= 20                      # the pings really crossed the switch
    assert {(p[0], 51820 in (p[1], p[2])) for p in packets} == {(17, True)}
    assert not any(4789 in (p[1], p[2]) for p in packets)
    raw = b"".join(p[3] for p in packets)
    assert bytes.fromhex(PATTERN) not in raw
    assert b"kohaku-w" not in raw


# ---- attacks ----------------------------------------------------------------------------------

def guard_drops(c):
    """Packets counted by the Host's drop of VXLAN that did not come out of kohaku-wg."""
    for line in c.sh(c.host, "iptables", "-v", "-x", "-n", "-L", "INPUT").stdout.splitlines():
        if "DROP" in line and "!kohaku-wg" in line and "4789" in line:
            return int(line.split()[0])
    raise AssertionError("no drop rule for VXLAN outside kohaku-wg on the host")


@pytest.mark.parametrize("forged,inner", [("198.51.100.11", "10.1.0.66"),
                                          ("172.16.0.2", "10.1.0.67")])
def test_forged_runner_sources_are_dropped_with_encryption_on(c, forged, inner):
    """The attack test_attacks_lab pins as "not stopped" in plain VXLAN: frames with runner 1's
    physical (or tunnel) address forged, sent on the underlay, never reach vxkr1. Had the ARP
    request reached it, the Host would hold a neighbour entry for its sender."""
    mac = json.loads(c.sh(c.host, "ip", "-j", "link", "show", "dev", "vxkr1").stdout)[0][
        "address"]
    frames = [attacks.vxlan_frame(101, "ff:ff:ff:ff:ff:ff",
                                  attacks.arp_request(inner, "10.1.0.254")),
              attacks.vxlan_frame(101, mac, attacks.icmp_echo(inner, "10.1.0.254"))]
    drops = guard_drops(c)
    attacks.py(c, c.attacker, attacks.SPOOF_SENDER, forged, HOST, *[f.hex() for f in frames])
    time.sleep(0.5)
    assert guard_drops(c) - drops == len(frames)       # they arrived, and were dropped
    assert c.sh(c.host, "ip", "neigh", "show", inner, "dev", "vxkr1").stdout.strip() == ""


def test_a_node_with_a_key_the_host_never_saw_cannot_reach_the_overlay(c):
    imp = c.impostor
    key = str(imp.workdir / "impostor.key")
    c.sh(imp, "sh", "-c", "umask 077; wg genkey > %s" % key)
    host_key = wg_dump(c, c.host)["public_key"]
    c.sh(imp, "wireguard-go", "kohaku-wg")
    c.sh(imp, "wg", "set", "kohaku-wg", "private-key", key, "peer", host_key, "allowed-ips",
         "172.16.0.0/23,10.0.0.0/8", "endpoint", HOST + ":51820", "persistent-keepalive", "1")
    c.sh(imp, "ip", "addr", "add", "172.16.0.2/23", "dev", "kohaku-wg")   # runner 1's address
    c.sh(imp, "ip", "link", "set", "kohaku-wg", "up")
    c.sh(imp, "ip", "route", "add", "10.0.0.0/8", "dev", "kohaku-wg")
    assert not c.ping(imp, None, "172.16.0.1", count=2, timeout=2)
    assert not c.ping(imp, None, "10.0.0.1", count=2, timeout=2)
    assert wg_dump(c, imp)["peers"][host_key]["handshake"] == 0
    assert pings(c, 1, "a1", c.container_ip(2, "b1"))          # the real runner 1 is unharmed


# ---- restarts ---------------------------------------------------------------------------------

def test_keys_survive_a_runner_restart(c):
    key = c.runners[0].workdir / "runner-state-wg.key"
    before = key.read_text()
    public = wg_dump(c, c.runners[0])["public_key"]
    assert stat.S_IMODE(os.stat(str(key)).st_mode) == 0o600
    c.stop_runner(1)
    c.start_runner(1)
    c.wait_active()
    assert key.read_text() == before
    assert wg_dump(c, c.runners[0])["public_key"] == public
    assert public in wg_dump(c, c.host)["peers"]
    assert before.strip() not in c.log_tail("runner1", 10000)
    assert c.wait_for(lambda: pings(c, 1, "a1", c.container_ip(2, "b1"), 1), timeout=10,
                      what="a1 -> b1 after the restart")


def test_kill_9_of_the_host_keeps_traffic_flowing(c):
    stream = c.ping_stream(1, "a1", c.container_ip(2, "b1"), interval=0.2)
    time.sleep(1.0)
    c.stop_host(signal.SIGKILL)
    time.sleep(3.0)
    sent, received = stream.stop()
    assert sent >= 15
    assert received >= sent - 1
    host_key = wg_dump(c, c.host)["public_key"]
    c.start_host()
    c.wait_active()
    assert wg_dump(c, c.host)["public_key"] == host_key      # the host's key survived too
    assert pings(c, 1, "a1", c.container_ip(2, "b1"))


# ---- switching off and on (last: it changes the cluster) ---------------------------------------

def switch(c, mode):
    c.stop_host()
    c.host_config(OVERLAY_ENCRYPTION=mode, OVERLAY_MTU=MTU, OVERLAY_REPAIR_INTERVAL=2)
    c.start_host()


def test_switching_encryption_off_and_on_converges_without_restarting_containers(c):
    b1 = c.container_ip(2, "b1")
    switch(c, "none")
    c.wait_for(lambda: plain(c), timeout=30, what="every node back on plain VXLAN",
               log=["host", "runner1", "runner2"])
    assert c.container_ip(2, "b1") == b1
    assert c.wait_for(lambda: pings(c, 1, "a1", b1, 1), timeout=10, what="a1 -> b1, plain")
    assert "kohaku-overlay -j DROP" not in c.sh(c.host, "iptables", "-S", "INPUT").stdout
    switch(c, "wireguard")
    c.wait_for(lambda: encrypted(c), timeout=30, what="every node encrypted again",
               log=["host", "runner1", "runner2"])
    assert c.wait_for(lambda: pings(c, 1, "a1", b1, 1), timeout=10, what="a1 -> b1, encrypted")
    assert pings(c, 2, "b1", "10.0.0.1")
