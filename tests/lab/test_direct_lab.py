"""Lab: direct routing (issue 12) on one namespaced cluster with real dockerds.

One module-scoped cluster: a Host with OVERLAY_DIRECT_ROUTING = True, runners 1-3 with a
container each from the start, runner 4 joining later. The tests run in file order on that one
cluster (each leaves it as the next expects, the switch-off last): traffic between runners
without the Host, a Host killed and restarted under a 10 Hz ping, a runner that joins later, UDP
blocked between two runners (fallback through the Host and back), `down` on a runner with direct
routing, a released runner, and the switch turned off; a runner restarted while the Host is
down rebuilds its direct routes from its state file. Everything is asserted through the kernel
(ip -j, bridge -j, iptables -S), the runners' `status --json` and real pings from containers.
"""

import json
import signal
import time

import pytest

import labkit

BASE_VNI = 100
HEARTBEAT = 1          # the lab's HEARTBEAT_INTERVAL (labkit's runner config)


def host_config(c, direct=True):
    c.host_config(OVERLAY_DIRECT_ROUTING=direct, OVERLAY_REPAIR_INTERVAL=2)


@pytest.fixture(scope="module")
def lab():
    labkit.require(docker=True)
    with labkit.Lab(runners=4) as c:
        host_config(c)
        c.start_host()
        for i in (1, 2, 3):
            c.runner_config(i)
            c.start_runner(i)
        c.wait_active(["runner1", "runner2", "runner3"])
        c.ips = {}
        for i in (1, 2, 3):
            c.container(i, "c%d" % i)
            c.ips[i] = c.container_ip(i, "c%d" % i)
        yield c


def status(c, i):
    return json.loads(c.script(i, "runner", "status", "--json", check=True).stdout)


def paths(c, i):
    """{peer name: path} as runner i's status shows it."""
    return dict((p["runner_name"], p["path"]) for p in status(c, i)["direct"]["peers"])


def jsh(c, node, *argv):
    return json.loads(c.sh(node, *argv).stdout or "[]")


def direct_routes(c, i):
    """{dst: gateway or None} of runner i's routes on vxdirect0 (none when it does not exist)."""
    res = c.sh(i, "ip", "-j", "route", "show", "dev", "vxdirect0", check=False)
    if res.returncode != 0:
        return {}
    return dict((r["dst"], r.get("gateway")) for r in json.loads(res.stdout or "[]"))


def fdb(c, i):
    res = c.sh(i, "bridge", "-j", "fdb", "show", "dev", "vxdirect0", check=False)
    if res.returncode != 0:
        return {}
    return dict((e["mac"], e["dst"]) for e in json.loads(res.stdout or "[]") if e.get("dst"))


def marked(c, node, *table):
    return [r for r in c.sh(node, "iptables", *(list(table) + ["-S"])).stdout.splitlines()
            if "kohaku-overlay" in r or "KOHAKU" in r]


def all_direct(c, i, peers):
    want = dict(("runner%d" % p, "direct") for p in peers)
    return paths(c, i) == want and all(
        direct_routes(c, i).get("10.%d.0.0/16" % p) == "10.%d.0.0" % p for p in peers)


def wait_direct(c, peers_of, timeout=15):
    for i, peers in peers_of.items():
        c.wait_for(lambda: all_direct(c, i, peers), timeout=timeout,
                   what="runner%d to reach %s directly" % (i, peers),
                   log=["runner%d" % i, "host"])


def test_traffic_between_runners_needs_no_host(lab):
    c = lab
    wait_direct(c, {1: [2, 3], 2: [1, 3], 3: [1, 2]})
    link = jsh(c, 1, "ip", "-j", "-d", "addr", "show", "dev", "vxdirect0")[0]
    data = link["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data.get("learning"), link["mtu"]) == (
        BASE_VNI, 4789, False, 1450)
    assert data.get("remote") is None
    assert link["address"] == "02:6b:64:00:00:01"
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] \
        == [("10.1.0.0", 32)]
    route = jsh(c, 1, "ip", "-j", "route", "show", "10.2.0.0/16")[0]
    assert (route["dev"], route["gateway"], "onlink" in route["flags"]) == (
        "vxdirect0", "10.2.0.0", True)
    neigh = jsh(c, 1, "ip", "-j", "neigh", "show", "dev", "vxdirect0")
    assert sorted((n["dst"], n["lladdr"], n["state"]) for n in neigh) == [
        ("10.2.0.0", "02:6b:64:00:00:02", ["PERMANENT"]),
        ("10.3.0.0", "02:6b:64:00:00:03", ["PERMANENT"])]
    assert fdb(c, 1) == {"02:6b:64:00:00:02": "198.51.100.12",
                         "02:6b:64:00:00:03": "198.51.100.13"}
    # the hub route stays for the Host and for peers that cannot go direct
    assert jsh(c, 1, "ip", "-j", "route", "show", "10.0.0.0/8")[0]["gateway"] == "10.1.0.254"
    # no ICMP redirects that a container would cache, in the runner's namespace only
    for name in ("all", "kohaku-overlay"):
        assert c.sh(1, "sysctl", "-n", "net.ipv4.conf.%s.send_redirects" % name).stdout.strip() \
            == "0"
    # the FORWARD pair of vxdirect0 right after the bridge's own rule; each peer accepted on VNI
    # 100 by the VXLAN filter
    fwd = [r for r in c.sh(1, "iptables", "-S", "FORWARD").stdout.splitlines()
           if r.startswith("-A")]
    ours = [r for r in fwd if "--comment kohaku-overlay" in r]
    assert fwd[:len(ours)] == ours
    assert [("-i kohaku-overlay -o vxdirect0" in r, "-i vxdirect0 -o kohaku-overlay" in r)
            for r in ours[-2:]] == [(True, False), (False, True)]
    chain = c.sh(1, "iptables", "-S", "KOHAKU-VXLAN").stdout
    for ip in ("198.51.100.12", "198.51.100.13"):
        assert "-s %s/32 " % ip in chain
    # the Host's underlay link down: runner to runner traffic still flows
    c.sh(c.host, "ip", "link", "set", "dev", "eth0", "down")
    try:
        assert c.ping(1, "c1", c.ips[2], count=3)
        assert c.ping(3, "c3", c.ips[1], count=3)
        assert not c.ping(1, "c1", "10.0.0.1", count=1, timeout=1)   # the Host is really gone
    finally:
        c.sh(c.host, "ip", "link", "set", "dev", "eth0", "up")


def test_a_10hz_ping_loses_nothing_while_the_host_is_killed_and_restarted(lab):
    c = lab
    stream = c.ping_stream(1, "c1", c.ips[2], interval=0.1)
    time.sleep(1.0)
    c.stop_host(sig=signal.SIGKILL)
    time.sleep(3 * HEARTBEAT)
    c.start_host()
    time.sleep(2 * HEARTBEAT)
    sent, received = stream.stop()
    assert sent >= 40
    assert received == sent
    c.wait_active(["runner1", "runner2", "runner3"])


def test_a_runner_restarted_while_the_host_is_down_restores_its_direct_routes(lab):
    c = lab
    c.stop_host()
    try:
        c.stop_runner(1)
        c.sh(1, "ip", "link", "del", "vxdirect0")          # as after a reboot
        c.start_runner(1, wait=False)
        c.wait_for(lambda: direct_routes(c, 1).get("10.2.0.0/16") == "10.2.0.0" and
                   direct_routes(c, 1).get("10.3.0.0/16") == "10.3.0.0", timeout=15,
                   what="runner1 to rebuild vxdirect0 from its state file", log=["runner1"])
        assert c.ping(1, "c1", c.ips[2], count=3)
        assert c.ping(3, "c3", c.ips[1], count=3)
    finally:
        c.start_host()
    c.wait_active(["runner1", "runner2", "runner3"])


def test_a_runner_joining_later_is_reached_directly_within_two_heartbeats(lab):
    c = lab
    c.runner_config(4)
    c.start_runner(4)
    t0 = time.time()
    c.wait_for(lambda: all(direct_routes(c, i).get("10.4.0.0/16") == "10.4.0.0"
                           for i in (1, 2, 3)),
               timeout=2 * HEARTBEAT + 2, what="runners 1-3 to route 10.4.0.0/16 directly",
               log=["runner1", "runner4", "host"])
    took = time.time() - t0
    c.container(4, "c4")
    c.ips[4] = c.container_ip(4, "c4")
    assert c.ping(1, "c1", c.ips[4], count=2)
    wait_direct(c, {4: [1, 2, 3]})
    assert took <= 2 * HEARTBEAT + 2


def test_udp_blocked_between_two_runners_falls_back_to_the_host_and_comes_back(lab):
    c = lab
    block = ("*filter\n-I INPUT 1 -s 198.51.100.11 -p udp --dport 4789 -j DROP\n"
             "-I OUTPUT 1 -d 198.51.100.11 -p udp --dport 4789 -j DROP\nCOMMIT\n")
    unblock = block.replace("-I INPUT 1", "-D INPUT").replace("-I OUTPUT 1", "-D OUTPUT")
    stream = c.ping_stream(1, "c1", c.ips[2], interval=0.1)
    t0 = time.time()
    c.sh(2, "iptables-restore", "--noflush", input=block)
    try:
        c.wait_for(lambda: paths(c, 1).get("runner2") == "relayed" and
                   paths(c, 2).get("runner1") == "relayed", timeout=8,
                   what="runner1 and runner2 to relay each other", log=["runner1", "runner2"])
        fell = time.time() - t0
        assert "10.2.0.0/16" not in direct_routes(c, 1)
        assert direct_routes(c, 1).get("10.3.0.0/16") == "10.3.0.0"    # others stay direct
        assert c.ping(1, "c1", c.ips[2], count=3)                      # through the Host
        check = c.script(1, "check", "--json")
        rows = dict((r["id"], r) for r in json.loads(check.stdout)["results"])
        relayed = rows["runner.direct.paths"]
        assert relayed["status"] == "WARN"
        assert "runner2" in relayed["detail"] and "UDP 4789" in relayed["detail"]
    finally:
        c.sh(2, "iptables-restore", "--noflush", input=unblock)
    t1 = time.time()
    wait_direct(c, {1: [2, 3, 4], 2: [1, 3, 4]}, timeout=8)
    back = time.time() - t1
    sent, received = stream.stop()
    assert fell <= 5 + 1.5 and back <= 5 + 1.5          # 5 s, plus the status poll's own time
    assert sent - received <= 60                         # at most ~6 s of loss, not an outage


def test_down_on_a_direct_runner_leaves_nothing(lab):
    c = lab
    c.stop_runner(4)
    res = c.script(4, "runner", "down", "--force")
    assert res.returncode == 0, res.stderr
    links = [x["ifname"] for x in jsh(c, 4, "ip", "-j", "link", "show")]
    assert "vxdirect0" not in links and "vxlan0" not in links
    assert marked(c, 4) == [] and marked(c, 4, "-t", "nat") == []
    assert [r for r in jsh(c, 4, "ip", "-j", "route", "show") if r["dst"].startswith("10.")] == []


def test_a_released_runner_disappears_from_every_peer(lab):
    c = lab
    c.stop_runner(3)
    res = c.script(c.host, "host", "release", "runner3", "--yes")
    assert res.returncode == 0, res.stderr

    def gone(i):
        return "runner3" not in paths(c, i) and "10.3.0.0/16" not in direct_routes(c, i) and \
            "10.3.0.0" not in direct_routes(c, i) and "02:6b:64:00:00:03" not in fdb(c, i) and \
            "198.51.100.13/32" not in c.sh(i, "iptables", "-S", "KOHAKU-VXLAN").stdout
    for i in (1, 2):
        c.wait_for(lambda: gone(i), timeout=3 * HEARTBEAT + 3,
                   what="runner3 gone from runner%d" % i, log=["runner%d" % i, "host"])
    assert c.ping(1, "c1", c.ips[2], count=2)


def test_switching_direct_routing_off_returns_to_the_host(lab):
    c = lab
    host_config(c, direct=False)
    c.stop_host()
    c.start_host()

    def off(i):
        names = [x["ifname"] for x in jsh(c, i, "ip", "-j", "link", "show")]
        return "vxdirect0" not in names and not any("vxdirect0" in r for r in marked(c, i)) \
            and not status(c, i)["direct"]["enabled"]
    for i in (1, 2):
        c.wait_for(lambda: off(i), timeout=3 * HEARTBEAT + 3,
                   what="runner%d to drop vxdirect0" % i, log=["runner%d" % i, "host"])
    assert c.ping(1, "c1", c.ips[2], count=3)
    assert c.ping(2, "c2", c.ips[1], count=3)
    assert "-s 198.51.100.12/32" not in c.sh(1, "iptables", "-S", "KOHAKU-VXLAN").stdout
