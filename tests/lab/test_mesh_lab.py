"""Direct routing plus encryption (issue 13 with issue 12): kohaku-wg becomes a full mesh.

One lab for the module: a Host with OVERLAY_DIRECT_ROUTING = True and OVERLAY_ENCRYPTION =
"wireguard", three runners whose "containers" are namespaces (docker=False), each node in its own
mount namespace (Lab(private_run=True)) for its wireguard-go's control socket. The tests run in
file order on that one cluster: the mesh as the kernel shows it, runner-to-runner traffic with the
Host's underlay link down, a capture between two runners (only the WireGuard port), the WireGuard
port blocked between two runners (the direct-path probe's echo gets no answer), a released runner
leaving every kohaku-wg, and last each switch turned off and on again. docker=False runners never
finish their build (no dockerd), so they do not probe: the paths asserted are the routes.
"""

import json
import signal
import subprocess
import time

import pytest

import labkit
import test_direct_lab as dl
import test_wireguard_lab as wgl

HOST = labkit.HOST_IP
MTU = wgl.MTU
PEERS_PROBE = ("import sys, urllib.request as u\n"
               "r = u.Request(sys.argv[1], headers={'Authorization': 'Bearer ' + sys.argv[2]})\n"
               "print(u.urlopen(r, timeout=3).read().decode())")
NAMES = {1: "a1", 2: "b1", 3: "c1"}


def host_config(c, direct=True, encryption="wireguard"):
    c.host_config(OVERLAY_DIRECT_ROUTING=direct, OVERLAY_ENCRYPTION=encryption, OVERLAY_MTU=MTU,
                  OVERLAY_REPAIR_INTERVAL=2)


def wg_ip(i):
    return "172.16.0.%d" % (i + 1)


def peer_table(c):
    res = c.sh(1, "python3", "-c", PEERS_PROBE, "http://%s:8000/api/overlay/peers" % HOST,
               labkit.TOKEN)
    return json.loads(res.stdout)


def wg_peers(c, i):
    """{public key: (allowed IPs, endpoint)} of runner i's kohaku-wg ({} without kohaku-wg)."""
    if not wgl.has_link(c, i, "kohaku-wg"):
        return {}
    return {k: (p["allowed"], p["endpoint"]) for k, p in wgl.wg_dump(c, i)["peers"].items()}


def keys(c, ids=(1, 2, 3)):
    """{node number (0 the Host): its kohaku-wg public key} of the Host and the runners ids."""
    return dict((i, wgl.wg_dump(c, c.host if i == 0 else i)["public_key"]) for i in (0,) + ids)


def mesh(c, ids):
    """Every runner of ids has the Host and every other one as a WireGuard peer."""
    k = keys(c, tuple(ids))
    for i in ids:
        want = {k[0]: ("172.16.0.1/32", HOST + ":51820")}
        want.update((k[j], (wg_ip(j) + "/32", "%s:51820" % c.runners[j - 1].ip))
                    for j in ids if j != i)
        if wg_peers(c, i) != want:
            return False
    return True


def all_direct(c, ids):
    """Every runner of ids routes every other one's subnet over vxdirect0."""
    return all(dl.direct_routes(c, i).get("10.%d.0.0/16" % j) == "10.%d.0.0" % j
               for i in ids for j in ids if j != i)


def ping(c, i, j, count=3):
    return c.ping(i, NAMES[i], c.container_ip(j, NAMES[j]), count=count, timeout=3)


def converged_ping(c, what):
    """After a switch: the first echoes may race the other runner's pass or a new WireGuard
    handshake, as in test_wireguard_lab; then every echo of a round from a1 to b1 comes back."""
    c.wait_for(lambda: ping(c, 1, 2, 1), timeout=20, interval=0.5, what="a1 -> b1, " + what,
               log=["host", "runner1", "runner2"])
    return ping(c, 1, 2)


@pytest.fixture(scope="module")
def c():
    labkit.require(docker=False, wireguard=True)
    with labkit.Lab(runners=3, docker=False, private_run=True) as cluster:
        host_config(cluster)
        for i in (1, 2, 3):
            cluster.runner_config(i, OVERLAY_MTU=MTU, HEARTBEAT_INTERVAL=1)
        cluster.start_host()
        for i in (1, 2, 3):
            cluster.start_runner(i)
        cluster.wait_active()
        for i in (1, 2, 3):
            cluster.container(i, NAMES[i])
        cluster.wait_for(lambda: mesh(cluster, (1, 2, 3)), timeout=30,
                         what="a full WireGuard mesh", log=["host", "runner1", "runner2"])
        yield cluster


def test_the_peer_table_carries_the_keys_and_the_stack_sits_on_the_tunnel_addresses(c):
    k = keys(c)
    table = peer_table(c)
    assert [(p["runner_id"], p["wg_public_key"], p["wg_ip"]) for p in table["peers"]] == [
        (i, k[i], wg_ip(i)) for i in (1, 2, 3)]
    for i in (1, 2, 3):
        info = wgl.vxlan_info(c, i, "vxdirect0")
        assert (info["local"], info["id"]) == (wg_ip(i), 100)
        assert dl.fdb(c, i) == dict(("02:6b:64:00:00:%02x" % j, wg_ip(j))
                                    for j in (1, 2, 3) if j != i)
        chain = c.sh(i, "iptables", "-S", "KOHAKU-VXLAN").stdout
        for j in (1, 2, 3):
            assert ("-s %s/32 " % wg_ip(j) in chain) == (j != i)
        assert "-s 198.51.100." not in chain          # no VXLAN accepted from the underlay
        assert "-s 172.16.0.1/32 " in chain             # the Host, through its tunnel
    res = c.script(1, "check", "--json")
    rows = dict((r["id"], r) for r in json.loads(res.stdout)["results"])
    assert dict((i, rows["runner." + i]["status"]) for i in (
        "wg.peers", "wg.handshake", "direct.device", "direct.peers")) == dict(
        (i, "PASS") for i in ("wg.peers", "wg.handshake", "direct.device", "direct.peers")), \
        res.stdout[-3000:]
    assert rows["runner.wg.peers"]["detail"].startswith("3 peer(s)")


def test_runner_to_runner_traffic_is_direct_with_the_hosts_underlay_link_down(c):
    c.wait_for(lambda: all_direct(c, (1, 2, 3)), timeout=20, what="every peer direct",
               log=["runner1", "runner2", "runner3"])
    assert ping(c, 1, 2) and ping(c, 3, 1)
    c.sh(c.host, "ip", "link", "set", "dev", "eth0", "down")
    try:
        assert ping(c, 1, 2)
        assert ping(c, 3, 1)
        assert ping(c, 2, 3)
        assert not c.ping(1, "a1", "10.0.0.1", count=1, timeout=1)    # the Host is really gone
    finally:
        c.sh(c.host, "ip", "link", "set", "dev", "eth0", "up")


def test_between_two_runners_the_underlay_carries_only_the_wireguard_port(c):
    r1, r2 = c.runners[0].ip, c.runners[1].ip
    pcap = str(c.workdir / "mesh.pcap")
    dump = subprocess.Popen(["ip", "netns", "exec", c.switch_ns, "tcpdump", "-i", c.prefix + "sw",
                             "-nn", "-U", "-w", pcap, "host", r1, "and", "host", r2],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        assert wgl.pattern_ping(c, 1, "a1", c.container_ip(2, "b1"))
        assert wgl.pattern_ping(c, 2, "b1", c.container_ip(1, "a1"))
        assert c.ping(1, None, "10.2.0.0", count=2)          # the direct-path probe's echo
        time.sleep(0.5)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    packets = wgl.read_pcap(pcap)
    assert len([p for p in packets if p[0] == 17]) >= 20      # both ways, straight between them
    assert {(p[0], p[1], p[2]) for p in packets} == {(17, 51820, 51820)}
    raw = b"".join(p[3] for p in packets)
    assert bytes.fromhex(wgl.PATTERN) not in raw and b"kohaku-w" not in raw


def test_the_direct_path_probe_travels_through_the_tunnel(c):
    """The probe is an ICMP echo from the runner to the peer's 10.M.0.0 over vxdirect0, whose FDB
    points at the tunnel address: with UDP 51820 (not the VXLAN port) blocked between runners 1
    and 2 it gets no answer, so the peer would fall back to the Host. (The fallback state machine
    itself needs a fully built runner, real dockerd: test_direct_lab runs it.)"""
    assert c.ping(1, None, "10.2.0.0", count=2, timeout=2)
    block = ("*filter\n-I INPUT 1 -s %s -p udp --dport 51820 -j DROP\n"
             "-I OUTPUT 1 -d %s -p udp --dport 51820 -j DROP\nCOMMIT\n") % ((c.runners[0].ip,) * 2)
    unblock = block.replace("-I INPUT 1", "-D INPUT").replace("-I OUTPUT 1", "-D OUTPUT")
    c.sh(2, "iptables-restore", "--noflush", input=block)
    try:
        assert not c.ping(1, None, "10.2.0.0", count=2, timeout=2)
        assert c.ping(1, None, "10.3.0.0", count=1, timeout=2)     # the others unaffected
    finally:
        c.sh(2, "iptables-restore", "--noflush", input=unblock)
    assert c.wait_for(lambda: c.ping(1, None, "10.2.0.0", count=1, timeout=1), timeout=15,
                      what="the direct path to runner2 back")
    assert ping(c, 1, 2)


def test_a_released_runner_leaves_every_kohaku_wg(c):
    gone_key = keys(c)[3]
    c.stop_runner(3)
    res = c.script(c.host, "host", "release", "runner3", "--yes")
    assert res.returncode == 0, res.stderr

    def gone(i):
        return gone_key not in wg_peers(c, i) and "02:6b:64:00:00:03" not in dl.fdb(c, i) and \
            "-s %s/32 " % wg_ip(3) not in c.sh(i, "iptables", "-S", "KOHAKU-VXLAN").stdout
    for i in (1, 2):
        c.wait_for(lambda: gone(i), timeout=10, what="runner3 gone from runner%d" % i,
                   log=["runner%d" % i, "host"])
    assert mesh(c, (1, 2))
    assert ping(c, 1, 2)


# ---- switching (last: it changes the cluster) -------------------------------------------------

def switch(c, **kw):
    c.stop_host()
    host_config(c, **kw)
    c.start_host()


def test_encryption_off_keeps_direct_routing_on_the_physical_addresses(c):
    switch(c, encryption="none")

    def plain_direct():
        return all(not wgl.has_link(c, i, "kohaku-wg") and
                   wgl.vxlan_info(c, i, "vxdirect0").get("local") == c.runners[i - 1].ip and
                   dl.fdb(c, i) == {"02:6b:64:00:00:%02x" % (3 - i): c.runners[2 - i].ip}
                   for i in (1, 2))
    c.wait_for(plain_direct, timeout=30, what="direct routing on plain VXLAN",
               log=["host", "runner1", "runner2"])
    c.wait_for(lambda: all_direct(c, (1, 2)), timeout=10, what="direct paths, plain")
    assert converged_ping(c, "plain direct")


def test_direct_routing_off_leaves_only_the_host_on_kohaku_wg_and_on_again_the_mesh(c):
    switch(c, direct=False)

    def hub_only():
        k = keys(c, (1, 2))
        return all(wg_peers(c, i) == {k[0]: ("172.16.0.1/32", HOST + ":51820")} and
                   not wgl.has_link(c, i, "vxdirect0") for i in (1, 2))
    c.wait_for(hub_only, timeout=30, what="encrypted hub only", log=["host", "runner1"])
    assert converged_ping(c, "encrypted hub")
    switch(c)
    c.wait_for(lambda: mesh(c, (1, 2)) and all_direct(c, (1, 2)), timeout=30,
               what="the mesh back", log=["host", "runner1", "runner2"])
    assert dl.fdb(c, 1) == {"02:6b:64:00:00:02": wg_ip(2)}
    assert converged_ping(c, "the mesh again")
