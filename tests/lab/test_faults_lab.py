"""Faults injected into a real cluster: crashes, lost files, frozen runners, drift.

One module-scoped lab without Docker (runners are real `kohaku_overlay_runner.py serve`
processes; their "containers" are namespaces on the runner bridge) plus bare namespaces on the
underlay that register over HTTP like runners would. Each test starts the host on a fresh state
(`fresh_host`), so the tests are independent of each other's order.

Pass criteria, one per test:
- kill -9 at each failpoint of a registration commit: the state file parses, holds every
  answered registration, no id twice; after the next start no vxkr* device lacks an allocation
  (and none is missing); the retried registration gets the id the file promised (or the lowest
  free one when the crash came before the write).
- a second `serve` on the same state exits 1 with one line; the first keeps serving.
- 200 registrations from 20 namespaces at once: 200 answers, ids 1..200 each once, the file
  valid (0600) and equal to the answers, 200 devices.
- the state file deleted while devices exist: the ids come back from the devices, a newcomer gets
  an unused id, a runner at a recovered tunnel's address gets that id.
- state file and devices gone (a host reboot): real runners get their old subnets back
  (previous_runner_id, from the local file of a restarted runner and from the memory of a
  running one) and their containers talk again with unchanged addresses.
- a runner frozen with SIGSTOP past OVERLAY_INACTIVE_AFTER: Inactive, id and tunnel kept;
  resumed: Active with the same id.
- drift (rules deleted under a DROP policy, iptables flushed, route deleted, vxlan0 down, vxlan0
  detached from the bridge, a vxkr device deleted) is repaired by `serve` on the side it hit
  within a few intervals, and traffic flows again; so is `firewall-cmd --reload` on the host.
- iptables-legacy rules beside the nft ones: `kohaku_overlay_check.py` reports it.
"""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

import labkit
from kohaku_overlay_host import base36  # pinned by tests/unit/test_host.py

HOST = labkit.HOST_IP
PORT = 8000
FAILPOINTS = ["commit:before-save", "commit:after-save", "commit:after-device",
              "commit:before-answer"]

# Registrations sent at once from one namespace: JSON list of bodies on stdin, answers out.
REG_CLIENT = r'''
import http.client, json, sys, threading, time
host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
bodies = json.load(sys.stdin)
out = [None] * len(bodies)
def one(i):
    t0 = time.monotonic()
    try:
        c = http.client.HTTPConnection(host, port, timeout=30)
        c.request("POST", "/api/overlay/register", body=json.dumps(bodies[i]),
                  headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
        r = c.getresponse()
        out[i] = [r.status, json.loads(r.read().decode()), time.monotonic() - t0]
    except Exception as exc:
        out[i] = [None, repr(exc), time.monotonic() - t0]
threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
for t in threads: t.start()
for t in threads: t.join()
json.dump(out, sys.stdout)
'''


# ---- helpers ----------------------------------------------------------------------------------


def body(node, name, **extra):
    req = {"runner_name": name, "physical_ip": node.ip, "vxlan_id": 100, "vxlan_port": 4789,
           "mtu": 1450}
    req.update(extra)
    return req


def client(c, node, bodies):
    """Popen of REG_CLIENT in node's namespace, bodies already written to its stdin."""
    p = subprocess.Popen(["ip", "netns", "exec", node.ns, sys.executable, "-c", REG_CLIENT, HOST,
                          str(PORT), labkit.TOKEN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True)
    p.stdin.write(json.dumps(bodies))
    p.stdin.close()
    return p


def collect(p, timeout=60):
    out = p.stdout.read()
    err = p.stderr.read()
    p.wait(timeout)
    assert p.returncode == 0, err[-2000:]
    return json.loads(out)


def register(c, node, name, **extra):
    """(status, answer) of one registration from node (status None: no answer)."""
    status, answer, _ = collect(client(c, node, [body(node, name, **extra)]))[0]
    return status, answer


def state(c):
    path = c.host.workdir / "state.json"
    data = json.loads(path.read_text())
    assert data["version"] == 1
    allocs = data["allocations"]
    ids = [a["runner_id"] for a in allocs]
    assert len(ids) == len(set(ids))
    return dict((a["runner_id"], a) for a in allocs)


def devices(c):
    """{vxkrN: remote} of the host's vxlan devices."""
    out = json.loads(c.sh(c.host, "ip", "-j", "-d", "link", "show").stdout)
    return dict((link["ifname"], link["linkinfo"]["info_data"].get("remote")) for link in out
                if (link.get("linkinfo") or {}).get("info_kind") == "vxlan")


def allocations(c):
    return sorted((a["runner_id"], a["runner_name"], a["physical_ip"], a["active"])
                  for a in c.status()["allocations"])


def runner_pid(c, i):
    return c._procs[c.runners[i - 1].name][0].pid


def forward(c, node):
    return c.sh(node, "iptables", "-S", "FORWARD").stdout.splitlines()


def marked_forward(c, node):
    """Our FORWARD rules as the side built them (each side scopes them its own way)."""
    return [line for line in forward(c, node) if "--comment kohaku-overlay" in line]


def clean_runner(c, i):
    """Stop runner i (SIGCONT first, in case it is frozen) and remove what it built."""
    node = c.runners[i - 1]
    if c.proc_running(node.name):
        try:
            os.kill(runner_pid(c, i), signal.SIGCONT)
        except OSError:
            pass
        c.stop_runner(i)
    c.script(node, "runner", "down", "--force")
    c.sh(node, "rm", "-f", str(node.workdir / "runner-state.json"))


# ---- the lab ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def c():
    labkit.require(docker=False)
    with labkit.Lab(runners=2, docker=False) as cluster:
        cluster.bare_nodes = {}
        yield cluster


def bare(c, k):
    """Bare namespace k (1..20) at 198.51.100.(100+k), created on first use."""
    if k not in c.bare_nodes:
        c.bare_nodes[k] = c.add_bare_node("b%d" % k, "198.51.100.%d" % (100 + k))
    return c.bare_nodes[k]


def fresh_host(c, **config):
    """Stop the host and every runner, remove devices, rules and state; start it again."""
    for i in (1, 2):
        clean_runner(c, i)
    c.stop_host()
    c.script(c.host, "host", "down", check=True)
    for p in c.host.workdir.glob("state.json*"):
        p.unlink()
    settings = {"OVERLAY_REPAIR_INTERVAL": 1}
    settings.update(config)
    c.host_config(**settings)
    c.start_host()
    return c


# ---- kill -9 at each step of a registration -------------------------------------------------


@pytest.mark.parametrize("point", FAILPOINTS)
def test_kill_9_during_a_registration_loses_nothing(c, point, monkeypatch):
    fresh_host(c)
    b1, b2 = bare(c, 1), bare(c, 2)
    assert register(c, b1, "early")[1]["runner_id"] == 1
    c.stop_host()
    monkeypatch.setenv("KOHAKU_OVERLAY_FAILPOINT", point)
    c.start_host()
    monkeypatch.delenv("KOHAKU_OVERLAY_FAILPOINT")
    status, answer = register(c, b2, "late")
    assert status is None                       # the host died before it could answer
    assert c.stop_host() == -signal.SIGKILL     # it was the failpoint, not something else
    saved = state(c)
    names = dict((a["runner_name"], n) for n, a in saved.items())
    assert names.get("early") == 1              # every answered registration is in the file
    assert ("late" in names) == (point != "commit:before-save")
    c.start_host()
    st = c.status()
    assert sorted(devices(c)) == sorted(a["vxlan_device"] for a in st["allocations"])
    assert register(c, b2, "late")[1]["runner_id"] == 2
    assert register(c, b1, "early")[1]["runner_id"] == 1
    assert devices(c) == {"vxkr1": b1.ip, "vxkr2": b2.ip}
    assert sorted((n, a["runner_name"]) for n, a in state(c).items()) == [(1, "early"), (2, "late")]


def test_a_second_serve_on_the_same_state_refuses(c):
    fresh_host(c)
    res = c.script(c.host, "host", "serve", timeout=30)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1
    assert len(lines) == 1
    assert lines[0].startswith("error: another kohaku_overlay_host.py serve already uses ")
    assert c.proc_running("host")
    assert c.status()["total"] == 0


# ---- many at once -----------------------------------------------------------------------------


def test_200_concurrent_registrations_from_20_namespaces(c):
    fresh_host(c)
    nodes = [bare(c, k) for k in range(1, 21)]
    t0 = time.monotonic()
    procs = [(node, client(c, node, [body(node, "n%d-%d" % (k, j)) for j in range(10)]))
             for k, node in enumerate(nodes, 1)]
    answers = {}
    for node, p in procs:
        for status, answer, _ in collect(p, timeout=120):
            assert status == 200, answer
            answers[answer["runner_name"]] = (answer["runner_id"], node.ip)
    elapsed = time.monotonic() - t0
    assert len(answers) == 200
    assert sorted(n for n, _ in answers.values()) == list(range(1, 201))
    saved = state(c)
    assert dict((a["runner_name"], (n, a["physical_ip"])) for n, a in saved.items()) == answers
    mode = stat.S_IMODE(os.stat(str(c.host.workdir / "state.json")).st_mode)
    assert mode == 0o600
    devs = devices(c)
    assert len(devs) == 200
    assert all(devs["vxkr" + base36(n)] == ip for n, ip in answers.values())
    # the source filter (a tree of KOHAKU-VXLAN* chains) accepts exactly these 20 addresses
    rules = c.sh(c.host, "iptables", "-S").stdout.splitlines()
    accepted = [r.split()[3] for r in rules
                if r.startswith("-A KOHAKU-VXLAN") and r.endswith("-j ACCEPT")]
    assert sorted(set(accepted)) == sorted("%s/32" % n.ip for n in nodes)
    assert len(accepted) == 200         # issue 11.3: each runner its own VNI, from its address
    top = c.sh(c.host, "iptables", "-S", "KOHAKU-VXLAN").stdout.splitlines()
    assert top[-1] == '-A KOHAKU-VXLAN -m u32 --u32 "0x0>>0x16&0x3c@0xc>>0x8=0x64:0x163" -j DROP'
    assert elapsed < 30


# ---- lost state -------------------------------------------------------------------------------


def test_a_deleted_state_file_is_rebuilt_from_the_devices(c):
    fresh_host(c)
    b = [bare(c, k) for k in (1, 2, 3, 4)]
    for k, name in enumerate(("alpha", "beta", "gamma")):
        assert register(c, b[k], name)[1]["runner_id"] == k + 1
    c.stop_host()
    (c.host.workdir / "state.json").unlink()
    c.start_host()
    assert allocations(c) == [(1, None, b[0].ip, False), (2, None, b[1].ip, False),
                              (3, None, b[2].ip, False)]
    assert register(c, b[3], "newcomer")[1]["runner_id"] == 4    # no live id re-issued
    assert register(c, b[1], "beta")[1]["runner_id"] == 2        # claimed by its address
    assert sorted((n, a["runner_name"]) for n, a in state(c).items()) == \
        [(1, None), (2, "beta"), (3, None), (4, "newcomer")]
    assert devices(c) == {"vxkr1": b[0].ip, "vxkr2": b[1].ip, "vxkr3": b[2].ip, "vxkr4": b[3].ip}


def test_a_host_reboot_gives_real_runners_their_old_subnets_back(c):
    fresh_host(c)
    r1, r2 = c.runners
    try:
        c.start_runner(1)
        c.start_runner(2)
        c.wait_active(["runner1", "runner2"])
        assert [(a[0], a[1]) for a in allocations(c)] == [(1, "runner1"), (2, "runner2")]
        ca = c.container(r1, "reboot-a")
        cb = c.container(r2, "reboot-b")
        ip_a, ip_b = c.container_ip(r1, ca), c.container_ip(r2, cb)
        assert c.ping(r1, ca, ip_b)
        # the reboot: runner 1 frozen (it keeps its allocation in memory), runner 2 stopped
        # (it keeps it in its local file); the host loses its state file and every device
        os.kill(runner_pid(c, 1), signal.SIGSTOP)
        assert c.stop_runner(2) == 0
        assert c.stop_host(signal.SIGKILL) == -signal.SIGKILL
        (c.host.workdir / "state.json").unlink()
        assert c.script(c.host, "host", "down").returncode == 0
        assert devices(c) == {}
        c.start_host()
        # runner 2 registers first: without previous_runner_id it would get id 1
        c.start_runner(2)
        c.wait_for(lambda: [(a[0], a[1]) for a in allocations(c)] == [(2, "runner2")],
                   timeout=15, what="runner2 registered again", log=["host", "runner2"])
        os.kill(runner_pid(c, 1), signal.SIGCONT)
        c.wait_active(["runner1", "runner2"], timeout=30)
        assert [(a[0], a[1]) for a in allocations(c)] == [(1, "runner1"), (2, "runner2")]
        # within seconds, not once the runners' ARP entry for 10.N.0.254 (the old vxkrN's MAC)
        # has gone through DELAY and PROBE (>= 8 s) or expired (up to ~45 s; /work/host-bugs.md)
        c.wait_for(lambda: c.ping(r1, ca, ip_b), timeout=5, what="containers to talk again",
                   log=["host", "runner1", "runner2"])
        assert (c.container_ip(r1, ca), c.container_ip(r2, cb)) == (ip_a, ip_b)
    finally:
        clean_runner(c, 1)
        clean_runner(c, 2)


def test_a_frozen_runner_turns_inactive_and_comes_back_with_its_id(c):
    fresh_host(c)
    try:
        c.start_runner(1)
        c.wait_active(["runner1"])
        pid = runner_pid(c, 1)
        os.kill(pid, signal.SIGSTOP)
        c.wait_for(lambda: allocations(c) == [(1, "runner1", c.runners[0].ip, False)],
                   timeout=15, interval=0.5, what="runner1 Inactive with id 1")
        assert devices(c) == {"vxkr1": c.runners[0].ip}
        assert register(c, bare(c, 1), "other")[1]["runner_id"] == 2   # id 1 is kept
        os.kill(pid, signal.SIGCONT)
        c.wait_for(lambda: (1, "runner1", c.runners[0].ip, True) in allocations(c),
                   timeout=10, interval=0.3, what="runner1 Active again")
        assert [(n, a["runner_name"]) for n, a in sorted(state(c).items())] == \
            [(1, "runner1"), (2, "other")]
    finally:
        clean_runner(c, 1)


# ---- drift ------------------------------------------------------------------------------------


def _ours(c, node):
    """Our rules on node, in iptables-save order (filter and nat)."""
    return [line for table in ("filter", "nat") for line in
            c.sh(node, "iptables", "-t", table, "-S").stdout.splitlines()
            if "kohaku-overlay" in line or "KOHAKU-VXLAN" in line]


def test_the_host_forwards_only_between_tunnels(c):
    """Issue 11.1: the Host's FORWARD rule accepts overlay traffic from a vxkr to a vxkr only.
    Under a FORWARD policy DROP two runners' containers still talk through the Host, while a
    machine on the Host's LAN that routes 10.0.0.0/8 via the Host no longer reaches them
    (before: `-d 10.0.0.0/8 -j ACCEPT` let the LAN route into every container)."""
    fresh_host(c)
    r1, r2 = c.runners
    lan = bare(c, 20)
    c.sh(lan, "ip", "route", "replace", "10.0.0.0/8", "via", labkit.HOST_IP)
    try:
        c.start_runner(1)
        c.start_runner(2)
        c.wait_active(["runner1", "runner2"])
        ca, cb = c.container(r1, "fwd-a"), c.container(r2, "fwd-b")
        ip_b = c.container_ip(r2, cb)
        assert marked_forward(c, c.host) == [
            "-A FORWARD -s 10.0.0.0/8 -d 10.0.0.0/8 -i vxkr+ -o vxkr+ -m comment --comment "
            "kohaku-overlay -j ACCEPT"]
        c.iptables_drift(c.host, policy={"FORWARD": "DROP"})
        assert c.ping(r1, ca, ip_b, count=2)              # tunnel to tunnel: still first
        assert not c.ping(lan, None, ip_b, count=2)       # the LAN into the overlay: no
    finally:
        c.sh(c.host, "iptables", "-P", "FORWARD", "ACCEPT")
        c.sh(lan, "ip", "route", "del", "10.0.0.0/8", check=False)
        for i in (1, 2):
            clean_runner(c, i)


def test_drift_is_repaired_by_serve_on_both_sides(c):
    fresh_host(c)
    r1, r2 = c.runners
    try:
        c.start_runner(1)
        c.start_runner(2)
        c.wait_active(["runner1", "runner2"])
        ca = c.container(r1, "drift-a")
        cb = c.container(r2, "drift-b")
        ip_b = c.container_ip(r2, cb)
        assert c.ping(r1, ca, ip_b)
        want = {"host": _ours(c, c.host), "runner1": _ours(c, r1)}
        fwd = {"host": marked_forward(c, c.host), "runner1": marked_forward(c, r1)}
        # runner: FORWARD, the INPUT jump, the chain and its 2 rules, NAT
        assert len(want["host"]) >= 4 and len(want["runner1"]) >= 6
        assert fwd["host"] and fwd["runner1"]

        def repaired(node, key, extra=lambda: True):
            def ok():
                have = _ours(c, node)
                return (sorted(have) == sorted(want[key]) and
                        forward(c, node)[1:1 + len(fwd[key])] == fwd[key] and extra())
            return ok

        def drift(node, key, what, inject, extra=lambda: True, timeout=12):
            inject()          # one step: the serve loop may repair at any moment
            c.wait_for(repaired(node, key, extra), timeout=timeout, interval=0.3,
                       what="%s: serve to repair %s" % (node.name, what),
                       log=["host", "runner1"])
            c.wait_for(lambda: c.ping(r1, ca, ip_b), timeout=5, interval=0.2,
                       what="traffic across the host again after %s" % what)

        for node, key in ((c.host, "host"), (r1, "runner1")):
            drift(node, key, "FORWARD rules deleted under a DROP policy",
                  lambda: c.iptables_drift(node, delete=fwd[key], policy={"FORWARD": "DROP"}))
            c.sh(node, "iptables", "-P", "FORWARD", "ACCEPT")
            drift(node, key, "iptables flushed",
                  lambda: c.iptables_drift(node, flush=("filter", "nat")))

        def link(node, name):
            return json.loads(c.sh(node, "ip", "-j", "-d", "link", "show", "dev", name).stdout)[0]

        def route_ok():
            out = c.sh(r1, "ip", "-j", "route", "show", "10.0.0.0/8").stdout
            return [(r.get("gateway"), r.get("dev")) for r in json.loads(out)] == \
                [("10.1.0.254", labkit.OVERLAY_BRIDGE)]

        drift(r1, "runner1", "the overlay route",
              lambda: c.sh(r1, "ip", "route", "del", "10.0.0.0/8"), extra=route_ok)
        drift(r1, "runner1", "vxlan0 down", lambda: c.sh(r1, "ip", "link", "set", "vxlan0", "down"),
              extra=lambda: "UP" in link(r1, "vxlan0")["flags"])
        drift(r1, "runner1", "vxlan0 detached from the bridge",
              lambda: c.sh(r1, "ip", "link", "set", "vxlan0", "nomaster"),
              extra=lambda: link(r1, "vxlan0").get("master") == labkit.OVERLAY_BRIDGE)
        drift(c.host, "host", "vxkr1 deleted", lambda: c.sh(c.host, "ip", "link", "del", "vxkr1"),
              extra=lambda: devices(c).get("vxkr1") == r1.ip)
        assert "repaired drift" in (c.host.workdir / "host.log").read_text()
    finally:
        for node in (c.host, r1):
            c.sh(node, "iptables", "-P", "FORWARD", "ACCEPT", check=False)
        clean_runner(c, 1)
        clean_runner(c, 2)


# ---- iptables-legacy beside iptables-nft --------------------------------------------------------


def test_check_reports_iptables_legacy_rules_beside_nft(c):
    fresh_host(c)

    def backends():
        res = c.script(c.host, "check", "--json", timeout=90)
        report = json.loads(res.stdout)
        found = [r for r in report["results"] if r["id"].endswith("iptables.backends")]
        assert len(found) == 1, report["results"]
        return res.returncode, found[0]

    rc, clean = backends()
    assert clean["status"] == "PASS"
    try:
        c.sh(c.host, "iptables-legacy", "-A", "FORWARD", "-s", "10.0.0.0/8", "-j", "DROP")
        rc, mixed = backends()
        assert (rc, mixed["status"]) == (1, "FAIL")
        assert "legacy" in mixed["detail"]
        assert "iptables-legacy" in mixed["fix"]
    finally:
        c.sh(c.host, "iptables-legacy", "-F", "FORWARD", check=False)
    rc, after = backends()
    assert after["status"] == "PASS"


# ---- firewalld reload on the host --------------------------------------------------------------


def test_firewalld_reload_is_repaired_by_the_host_within_a_few_intervals():
    labkit.require(docker=False, firewalld=True)
    with labkit.Lab(runners=0, docker=False, firewalld=True) as fc:
        fc.host_config(OVERLAY_REPAIR_INTERVAL=1)
        fc.start_host()
        node = fc.add_bare_node("fw1", "198.51.100.31")
        assert register(fc, node, "fw1")[1]["runner_id"] == 1
        ifaces = ("kohaku-host", "vxkr1")

        def zones():
            return [fc.firewall_cmd("--get-zone-of-interface=" + i).stdout.strip() for i in ifaces]

        fc.wait_for(lambda: zones() == ["trusted", "trusted"], timeout=15, interval=0.5,
                    what="the host's interfaces in the trusted zone", log=["host"])
        log_path = fc.host.workdir / "host.log"

        def zone_repairs():
            return [line for line in log_path.read_text().splitlines()
                    if "repaired drift" in line and "firewalld zone trusted" in line]

        before = len(zone_repairs())
        t0 = time.monotonic()
        assert fc.firewall_cmd("--reload").returncode == 0
        # The reload drops the runtime bindings; with a 1 s repair interval the host may put
        # them back before two firewall-cmd probes (~0.5 s each) could see the gap, so the
        # gap is proven by the host's own repair line, which it writes only when it found the
        # interfaces outside the zone.
        fc.wait_for(lambda: len(zone_repairs()) > before and zones() == ["trusted", "trusted"],
                    timeout=15, interval=0.5,
                    what="the host to put its interfaces back after firewall-cmd --reload",
                    log=["host"])
        assert time.monotonic() - t0 < 10              # a few 1 s repair passes, not a restart
