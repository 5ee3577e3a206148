"""The host hub for real: `serve` in a host namespace, registrations from runner namespaces.

These tests register with a tiny HTTP client run inside the runner namespaces (not the runner
script), so they show the host's own behaviour: the devices and rules it builds, what survives
kill -9, what a restart recovers and what `down` removes.
"""

import json
import signal
import subprocess
import sys
import time

import pytest

import labkit

CLIENT = r"""
import json, sys, urllib.request, urllib.error
method, url, token, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
req = urllib.request.Request(url, data=body.encode() if body else None, method=method,
                             headers={"Authorization": "Bearer " + token,
                                      "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(json.dumps([r.status, json.loads(r.read().decode())]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, json.loads(e.read().decode())]))
"""


def api(c, node, method, path, body=None, token=labkit.TOKEN):
    res = c.sh(node, sys.executable, "-c", CLIENT, method,
               "http://%s:8000%s" % (labkit.HOST_IP, path),
               token, json.dumps(body) if body is not None else "")
    return json.loads(res.stdout)


def register(c, node, name=None, **extra):
    body = {"runner_name": name or node.name, "physical_ip": node.ip, "vxlan_id": 100,
            "vxlan_port": 4789, "mtu": 1450}
    body.update(extra)
    return api(c, node, "POST", "/api/overlay/register", body)


def links(c):
    """{name: ip -j -d addr entry} in the host namespace."""
    out = c.sh(c.host, "ip", "-j", "-d", "addr", "show").stdout
    return dict((link["ifname"], link) for link in json.loads(out))


def vxkr(c):
    return sorted(n for n, l in links(c).items()
                  if (l.get("linkinfo") or {}).get("info_kind") == "vxlan")


def ours(c, *argv):
    """Lines of iptables -S that carry our marker (or name our chain)."""
    out = c.sh(c.host, "iptables", "-S", *argv).stdout
    return [ln for ln in out.splitlines() if "kohaku-overlay" in ln or "KOHAKU-VXLAN" in ln]


@pytest.fixture(scope="module")
def cluster():
    labkit.require(docker=False)
    with labkit.Lab(runners=2, docker=False) as c:
        c.host_config(OVERLAY_REPAIR_INTERVAL=1)
        yield c


@pytest.fixture
def host(cluster):
    """A running host on a fresh state; stopped (SIGTERM) and torn down (`down`) afterwards."""
    c = cluster
    c.sh(c.host, "rm", "-f", str(c.host.workdir / "state.json"))
    c.start_host()
    yield c
    c.stop_host()
    c.script(c.host, "host", "down", check=True)


def test_registrations_build_the_hub_end_of_each_tunnel(host):
    c = host
    r1, r2 = c.runners
    status, a1 = register(c, r1)
    assert status == 200
    assert a1 == {"runner_name": "runner1", "runner_id": 1, "subnet": "10.1.0.0/16",
                  "gateway": "10.1.0.1", "host_overlay_ip": "10.0.0.1",
                  "host_vxlan_ip": "10.1.0.254", "host_physical_ip": "198.51.100.1",
                  "vni": 101, "vxlan_port": 4789, "mtu": 1450, "overlay_cidr": "10.0.0.0/8",
                  "direct_routing": False, "peers_version": 0, "encryption": "none"}
    assert register(c, r2)[1]["runner_id"] == 2
    have = links(c)
    for n, runner in ((1, r1), (2, r2)):
        dev = have["vxkr%d" % n]
        data = dev["linkinfo"]["info_data"]
        assert (data["id"], data["local"], data["remote"], data["port"], data["learning"]) == \
            (100 + n, "198.51.100.1", runner.ip, 4789, False)
        assert dev["mtu"] == 1450
        assert dev["address"] == "02:6b:6f:00:00:%02x" % (100 + n)  # stable across re-creation
        assert "UP" in dev["flags"]
        assert [(a["local"], a["prefixlen"]) for a in dev["addr_info"] if a["family"] == "inet"] \
            == [("10.%d.0.254" % n, 16)]
    assert [(a["local"], a["prefixlen"]) for a in have["kohaku-host"]["addr_info"]
            if a["family"] == "inet"] == [("10.0.0.1", 8)]
    assert have["kohaku-host"]["linkinfo"]["info_kind"] == "bridge"  # this kernel has no dummy
    forward = c.sh(c.host, "iptables", "-S", "FORWARD").stdout.splitlines()
    assert forward[1:3] == [   # issue 11.1: between the tunnels only, and nothing else of ours
        "-A FORWARD -s 10.0.0.0/8 -d 10.0.0.0/8 -i vxkr+ -o vxkr+ -m comment --comment "
        "kohaku-overlay -j ACCEPT"]
    u32 = '-m u32 --u32 "0x0>>0x16&0x3c@0xc>>0x8=%s"'   # issue 11.3: each runner its own VNI
    assert c.sh(c.host, "iptables", "-S", "KOHAKU-VXLAN").stdout.splitlines() == [
        "-N KOHAKU-VXLAN", "-A KOHAKU-VXLAN -s 198.51.100.11/32 %s -j ACCEPT" % (u32 % "0x65"),
        "-A KOHAKU-VXLAN -s 198.51.100.12/32 %s -j ACCEPT" % (u32 % "0x66"),
        "-A KOHAKU-VXLAN %s -j DROP" % (u32 % "0x64:0x163")]
    assert c.sh(c.host, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    # the same name gets the same id back, and nothing is rebuilt
    before = links(c)["vxkr1"]["ifindex"]
    assert register(c, r1)[1]["runner_id"] == 1
    assert links(c)["vxkr1"]["ifindex"] == before
    st = c.status()
    assert [(a["runner_name"], a["runner_id"], a["active"]) for a in st["allocations"]] == \
        [("runner1", 1, True), ("runner2", 2, True)]


def test_kill_9_keeps_every_tunnel_and_a_restart_recovers_them(host):
    c = host
    for r in c.runners:
        assert register(c, r)[0] == 200
    before = dict((n, l["ifindex"]) for n, l in links(c).items() if n.startswith("vxkr"))
    c.stop_host(sig=signal.SIGKILL)
    after_kill = dict((n, l["ifindex"]) for n, l in links(c).items() if n.startswith("vxkr"))
    assert after_kill == before
    c.start_host()
    st = c.status()
    assert [(a["runner_name"], a["runner_id"], a["active"]) for a in st["allocations"]] == \
        [("runner1", 1, False), ("runner2", 2, False)]  # Inactive until they heartbeat again
    assert dict((n, l["ifindex"]) for n, l in links(c).items() if n.startswith("vxkr")) == before
    assert api(c, c.runners[0], "PUT", "/api/overlay/heartbeat/runner1") == [
        200, {"ok": True, "direct_routing": False, "peers_version": 0, "encryption": "none"}]
    assert [a["active"] for a in c.status()["allocations"]] == [True, False]


def test_restart_repairs_drift_and_removes_orphans(host):
    c = host
    r1 = c.runners[0]
    register(c, r1)
    c.stop_host()
    c.sh(c.host, "ip", "link", "set", "vxkr1", "mtu", "1300")
    c.sh(c.host, "ip", "link", "add", "vxkr9", "type", "vxlan", "id", "109", "local",
         labkit.HOST_IP, "remote", "198.51.100.99", "dstport", "4789")
    c.iptables_drift(c.host, delete=[     # issue 11.1: the Host's one scoped FORWARD rule
        "-A FORWARD -s 10.0.0.0/8 -d 10.0.0.0/8 -i vxkr+ -o vxkr+ -m comment --comment "
        "kohaku-overlay -j ACCEPT"])
    c.start_host()
    assert vxkr(c) == ["vxkr1"]
    assert links(c)["vxkr1"]["mtu"] == 1450
    assert len([ln for ln in ours(c, "FORWARD")]) == 1
    # and while serving, the periodic pass puts a deleted device back
    c.sh(c.host, "ip", "link", "del", "vxkr1")
    c.wait_for(lambda: vxkr(c) == ["vxkr1"], timeout=10, what="vxkr1 recreated", log=["host"])


def test_corrupt_state_is_kept_aside_and_rebuilt_from_devices(host):
    c = host
    for r in c.runners:
        register(c, r)
    c.stop_host(sig=signal.SIGKILL)
    state = c.host.workdir / "state.json"
    state.write_text("{ this is not json")
    c.start_host()
    aside = [p.name for p in c.host.workdir.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert len(aside) == 1
    st = c.status()
    assert [(a["runner_name"], a["runner_id"], a["physical_ip"]) for a in st["allocations"]] == \
        [(None, 1, c.runners[0].ip), (None, 2, c.runners[1].ip)]
    # a new runner never gets an id whose device exists; the old runner claims its tunnel
    extra = c.add_bare_node("extra", "198.51.100.30")
    assert register(c, extra)[1]["runner_id"] == 3
    assert register(c, c.runners[1])[1]["runner_id"] == 2
    assert vxkr(c) == ["vxkr1", "vxkr2", "vxkr3"]
    for p in c.host.workdir.iterdir():
        if p.name.startswith("state.json.corrupt-"):
            p.unlink()


def test_a_second_serve_on_the_same_state_refuses(host):
    c = host
    res = c.script(c.host, "host", "serve")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith(
        "error: another kohaku_overlay_host.py serve already uses")


def test_down_leaves_nothing_behind(cluster):
    c = cluster
    c.start_host()
    for r in c.runners:
        register(c, r)
    c.stop_host()
    res = c.script(c.host, "host", "down", check=True)
    assert "removed 3 device(s)" in res.stdout
    assert [n for n in links(c) if n == "kohaku-host" or n.startswith("vxkr")] == []
    assert ours(c) == []
    again = c.script(c.host, "host", "down", check=True)  # twice is fine
    assert "removed 0 device(s) and 0 rule change(s)" in again.stdout


def test_dry_run_prints_the_plan_and_changes_nothing(cluster):
    c = cluster
    c.script(c.host, "host", "down", check=True)
    before = (sorted(links(c)), c.sh(c.host, "iptables-save").stdout.count("\n-A"))
    res = c.script(c.host, "host", "serve", "--dry-run", check=True)
    assert "[#] ip link add kohaku-host type dummy" in res.stdout
    assert "[#] iptables -I FORWARD 1 -s 10.0.0.0/8 -d 10.0.0.0/8 -i vxkr+ -o vxkr+ -m comment " \
        "--comment kohaku-overlay -j ACCEPT" in res.stdout
    assert (sorted(links(c)), c.sh(c.host, "iptables-save").stdout.count("\n-A")) == before


def test_a_loopback_reachable_address_is_refused_with_one_line(cluster):
    c = cluster
    c.host_config(HOST_REACHABLE_ADDRESS="127.0.0.1", OVERLAY_REPAIR_INTERVAL=1)
    try:
        res = c.script(c.host, "host", "serve")
    finally:
        c.host_config(OVERLAY_REPAIR_INTERVAL=1)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "error: HOST_REACHABLE_ADDRESS is 127.0.0.1, which runners cannot reach (VXLAN tunnels "
        "would fail): set it to the Host's actual IP")
    assert "kohaku-host" not in links(c)


HEARTBEATS = r"""
import sys, time, urllib.request
url, token = sys.argv[1], sys.argv[2]
while True:
    try:
        urllib.request.urlopen(urllib.request.Request(
            url, method="PUT", headers={"Authorization": "Bearer " + token}), timeout=2).read()
    except Exception:
        pass
    time.sleep(0.5)
"""


def test_a_restart_with_a_full_pool_evicts_no_live_runner(host):
    """Issue 11.5: ids 1..3 (OVERLAY_SUBNET with 2 node bits), three runners heartbeating, a
    Host restart, a newcomer at once and again after the grace window: 503 both times, and a
    `cleanup` in the grace window releases nobody (before: the newcomer evicted a live one)."""
    c = host
    c.stop_host()
    c.sh(c.host, "rm", "-f", str(c.host.workdir / "state.json"))
    c.host_config(OVERLAY_REPAIR_INTERVAL=1, OVERLAY_SUBNET="10.0.0.0/8/2/22")
    beaters = []
    try:
        c.start_host()
        if len(c.bare) < 2:
            c.add_bare_node("third", "198.51.100.33")
            c.add_bare_node("newcomer", "198.51.100.34")
        nodes = [c.runners[0], c.runners[1], c.bare[0]]
        names = sorted(n.name for n in nodes)

        def beat():
            for node in nodes:
                beaters.append(subprocess.Popen(
                    ["ip", "netns", "exec", node.ns, sys.executable, "-c", HEARTBEATS,
                     "http://%s:8000/api/overlay/heartbeat/%s" % (labkit.HOST_IP, node.name),
                     labkit.TOKEN]))

        for node in nodes:
            assert register(c, node)[0] == 200
        beat()
        c.wait_active(names, timeout=20)
        c.stop_host()
        for p in beaters:           # their next heartbeat has not come yet when the newcomer does
            p.kill()
            p.wait()
        c.start_host()
        assert register(c, c.bare[1])[0] == 503                     # at once after the start
        assert api(c, c.host, "POST", "/api/overlay/cleanup") == [200, {"released": 0}]
        beat()
        c.wait_active(names, timeout=20)                            # they are back
        time.sleep(2 * 6 + 1)                                       # past the grace window
        assert register(c, c.bare[1])[0] == 503
        st = c.status()
        assert sorted(a["runner_name"] for a in st["allocations"]) == names
        assert st["active"] == 3
    finally:
        for p in beaters:
            p.kill()
            p.wait()
        c.host_config(OVERLAY_REPAIR_INTERVAL=1)


def test_ipv6_is_off_on_every_device_the_host_creates_and_stays_off(host):
    """Issue 11.9: a container could send router advertisements into vxlan0 that the Host
    accepted on vxkrN (accept_ra=1 by default): now IPv6 is off on kohaku-host and each vxkrN,
    and the repair pass switches it off again if someone turns it on."""
    c = host
    for r in c.runners:
        assert register(c, r)[0] == 200

    def knobs(dev):
        return [c.sh(c.host, "sysctl", "-n", "net.ipv6.conf.%s.%s" % (dev, key)).stdout.strip()
                for key in ("accept_ra", "forwarding", "disable_ipv6")]

    for dev in ("kohaku-host", "vxkr1", "vxkr2"):
        assert knobs(dev) == ["0", "0", "1"], dev
        assert [a for a in links(c)[dev]["addr_info"] if a["family"] == "inet6"] == []
    c.sh(c.host, "sysctl", "-w", "net.ipv6.conf.vxkr2.disable_ipv6=0",
         "net.ipv6.conf.vxkr2.accept_ra=1")
    c.wait_for(lambda: knobs("vxkr2") == ["0", "0", "1"], timeout=10,
               what="IPv6 off again on vxkr2", log="host")
    assert "IPv6 off on vxkr2" in c.log_tail("host")
