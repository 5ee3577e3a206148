"""End-to-end: the three real scripts on a namespaced cluster with real dockerds and containers.

One module-scoped cluster (Host + 2 Runners, containers c1 and c1b on runner1, c2 on runner2)
serves the tests that leave it as they found it; the tests that tear things down (`down`) or need
firewalld build their own. Every test asserts through the kernel (ip -j, iptables-save), Docker
and real pings from inside containers.
"""

import ipaddress
import json
import re
import signal
import subprocess
import sys
import time

import pytest

import labkit

# The guide's "Check Overlay Status" output, with the lab's underlay addresses in place of the
# guide's 192.168.88.20 / .77 (same width, so the layout is the guide's to the character).
GUIDE_STATUS = """\
╭──────────────────── Overlay Network Status ────────────────────╮
│ Host IP: 10.0.0.1/8                                            │
│ Bridge: kohaku-overlay                                         │
│ Total Allocations: 2                                           │
│ Active: 2 | Inactive: 0                                        │
│ Available IDs: 253/255                                         │
╰────────────────────────────────────────────────────────────────╯

          Runner Allocations
┏━━━━━━━━━━━━━━━━┳━━━━┳━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━┳━━━━━━━━┓
┃ Runner         ┃ ID ┃ Subnet        ┃ Physical IP   ┃ Status ┃
┡━━━━━━━━━━━━━━━━╇━━━━╇━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━╇━━━━━━━━┩
│ runner1        │  1 │ 10.1.0.0/16   │ 198.51.100.11 │ Active │
│ runner2        │  2 │ 10.2.0.0/16   │ 198.51.100.12 │ Active │
└────────────────┴────┴───────────────┴───────────────┴────────┘
"""


def lines(text):
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def start_cluster(c):
    c.host_config()
    c.start_host()
    for i in range(1, len(c.runners) + 1):
        c.runner_config(i)
        c.start_runner(i)
    c.wait_active()


@pytest.fixture(scope="module")
def cluster():
    with labkit.Lab(runners=2) as c:
        start_cluster(c)
        c.container(1, "c1")
        c.container(1, "c1b")
        c.container(2, "c2")
        yield c


@pytest.fixture
def healthy(cluster):
    """The shared cluster, checked healthy before and after the test (tests restart daemons)."""
    c = cluster
    for i, node in enumerate(c.runners, 1):
        if not c.proc_running(node.name):
            c.start_runner(i)
    if not c.proc_running("host"):
        c.start_host()
    c.wait_active()
    yield c
    for i, node in enumerate(c.runners, 1):
        if not c.proc_running(node.name):
            c.start_runner(i)
    if not c.proc_running("host"):
        c.start_host()


def link_names(c, node):
    return [link["ifname"] for link in json.loads(c.sh(node, "ip", "-j", "link", "show").stdout)]


def allocation(status, name):
    found = [a for a in status["allocations"] if a["runner_name"] == name]
    assert len(found) == 1
    return found[0]


# ---- reachability ----

def test_containers_get_addresses_from_their_runner_subnet(healthy):
    c = healthy
    for node, name in ((1, "c1"), (1, "c1b"), (2, "c2")):
        ip = ipaddress.ip_address(c.container_ip(node, name))
        assert ip in ipaddress.ip_network("10.%d.0.0/16" % node)
        assert str(ip) not in ("10.%d.0.1" % node, "10.%d.0.254" % node)


def test_cross_node_container_to_container(healthy):
    c = healthy
    c1, c2 = c.container_ip(1, "c1"), c.container_ip(2, "c2")
    assert c.ping(1, "c1", c2, count=3) is True
    assert c.ping(2, "c2", c1, count=3) is True


def test_same_node_container_to_container_stays_on_the_bridge(healthy):
    c = healthy
    assert c.ping(1, "c1", c.container_ip(1, "c1b"), count=2) is True
    assert c.ping(1, "c1b", c.container_ip(1, "c1"), count=2) is True
    # the guide's check: container MACs are learned on their veths, never on vxlan0
    mac = c.cexec(1, "c1", "cat", "/sys/class/net/eth0/address", check=True).stdout.strip()
    entries = json.loads(c.sh(1, "bridge", "-j", "fdb", "show", "br", "kohaku-overlay").stdout)
    fdb = [e for e in entries if e.get("mac") == mac]
    assert len(fdb) >= 1
    assert [e["ifname"] for e in fdb if e["ifname"] == "vxlan0"] == []


def test_containers_reach_the_host_and_their_gateway(healthy):
    c = healthy
    for node, name in ((1, "c1"), (2, "c2")):
        assert c.ping(node, name, "10.0.0.1", count=2) is True
        assert c.ping(node, name, "10.%d.0.1" % node, count=2) is True
        assert c.ping(node, name, "10.%d.0.254" % node, count=1) is True


def test_mtu_1422_bytes_cross_with_dont_fragment_and_1423_do_not(healthy):
    c = healthy
    c2 = c.container_ip(2, "c2")
    assert c.ping(1, "c1", c2, size=1422, df=True) is True
    assert c.ping(1, "c1", c2, size=1423, df=True) is False
    assert c.ping(1, "c1", "10.0.0.1", size=1422, df=True) is True
    assert c.ping(2, "c2", c.container_ip(1, "c1"), size=1422, df=True) is True


# ---- status ----

def test_status_prints_the_guides_table(healthy):
    res = healthy.script(healthy.host, "host", "status")
    assert res.returncode == 0, res.stderr
    assert lines(res.stdout) == lines(GUIDE_STATUS)


def test_status_ascii_has_the_same_rows_in_plain_ascii(healthy):
    res = healthy.script(healthy.host, "host", "status", "--ascii")
    assert res.returncode == 0, res.stderr
    assert all(ord(ch) < 128 for ch in res.stdout)
    rows = [re.sub(r"[|+ ]+", " ", line).strip() for line in lines(res.stdout)]
    assert "runner1 1 10.1.0.0/16 198.51.100.11 Active" in rows
    assert "runner2 2 10.2.0.0/16 198.51.100.12 Active" in rows


def test_status_json(healthy):
    res = healthy.script(healthy.host, "host", "status", "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert (st["enabled"], st["host_ip"], st["host_prefix"], st["bridge"], st["overlay_cidr"]) == \
        (True, "10.0.0.1", 8, "kohaku-overlay", "10.0.0.0/8")
    assert (st["total"], st["active"], st["inactive"], st["available_ids"], st["max_ids"]) == \
        (2, 2, 0, 253, 255)
    for n in (1, 2):
        a = allocation(st, "runner%d" % n)
        assert (a["runner_id"], a["subnet"], a["gateway"], a["host_vxlan_ip"], a["physical_ip"],
                a["vxlan_device"], a["vni"], a["active"]) == \
            (n, "10.%d.0.0/16" % n, "10.%d.0.1" % n, "10.%d.0.254" % n, "198.51.100.1%d" % n,
             "vxkr%d" % n, 100 + n, True)


def test_status_without_the_token_is_refused(healthy):
    c = healthy
    path = c.host.workdir / "no-token.py"
    config = (c.host.workdir / "host_config.py").read_text()
    assert "'lab-token'" in config
    path.write_text(config.replace("'lab-token'", "'wrong-token'"))
    res = c.script(c.host, "host", "status", "--config", path)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr


# ---- diagnostics ----

@pytest.mark.parametrize("who", ["host", "runner1", "runner2"])
def test_check_is_clean_on_every_node(healthy, who):
    c = healthy
    res = c.script(who, "check")
    assert res.returncode == 0, res.stdout + res.stderr
    res = c.script(who, "check", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    results = report["results"] if isinstance(report, dict) else report
    assert len(results) >= 5
    assert [r for r in results if r["status"] == "FAIL"] == []


# ---- failures and restarts ----

def test_host_kill_9_during_a_continuous_ping_loses_at_most_one_packet(healthy):
    c = healthy
    stream = c.ping_stream(1, "c1", c.container_ip(2, "c2"), interval=0.1)
    try:
        time.sleep(1)
        c.stop_host(signal.SIGKILL)
        time.sleep(1.5)
        # the kernel keeps the tunnels: nothing of the hub went away with the process
        assert {"vxkr1", "vxkr2", "kohaku-host"} <= set(link_names(c, c.host))
        c.start_host()
        st = c.wait_active(timeout=30)
        time.sleep(1)
    finally:
        sent, received = stream.stop()
    assert sent >= 25, stream.output
    assert sent - received <= 1, stream.output
    assert sorted((a["runner_id"], a["runner_name"]) for a in st["allocations"]) == \
        [(1, "runner1"), (2, "runner2")]


def test_runner_restart_keeps_its_subnet_and_containers_keep_talking(healthy):
    c = healthy
    ip_before = c.container_ip(1, "c1")
    c.stop_runner(1)
    # SIGTERM of the agent never tears the tunnel down
    assert "vxlan0" in link_names(c, 1)
    assert c.ping(1, "c1", c.container_ip(2, "c2"), count=2) is True
    c.start_runner(1)
    st = c.wait_active()
    a = allocation(st, "runner1")
    assert (a["runner_id"], a["subnet"]) == (1, "10.1.0.0/16")
    assert c.container_ip(1, "c1") == ip_before
    assert c.ping(1, "c1", c.container_ip(2, "c2"), count=2) is True


def test_corrupt_state_file_is_kept_aside_and_allocations_survive(healthy):
    c = healthy
    state = c.host.workdir / "state.json"
    c.stop_host()
    state.write_text('{"version": 1, "allocations": [{"runner_id": ')
    c.start_host()
    kept = sorted(p.name for p in c.host.workdir.glob("state.json.corrupt-*"))
    assert len(kept) >= 1
    st = c.wait_active(timeout=30)
    assert sorted((a["runner_name"], a["runner_id"], a["subnet"]) for a in st["allocations"]) == \
        [("runner1", 1, "10.1.0.0/16"), ("runner2", 2, "10.2.0.0/16")]
    assert json.loads(state.read_text())["version"] == 1
    assert c.ping(2, "c2", c.container_ip(1, "c1"), count=2) is True


def test_host_that_lost_file_and_devices_gives_every_runner_its_old_subnet(healthy):
    c = healthy
    c.stop_host()
    res = c.script(c.host, "host", "down")
    assert res.returncode == 0, res.stdout + res.stderr
    assert [n for n in link_names(c, c.host) if n.startswith("vxkr")] == []
    (c.host.workdir / "state.json").unlink()
    # runner2 re-registers first: without its previous id it would take id 1
    c.stop_runner(1)
    c.start_host()
    c.wait_active(["runner2"], timeout=30)
    c.start_runner(1)
    st = c.wait_active(timeout=30)
    assert sorted((a["runner_name"], a["runner_id"]) for a in st["allocations"]) == \
        [("runner1", 1), ("runner2", 2)]
    # The rebuilt vxkrN carries the same MAC as before, so no runner or container holds a stale
    # ARP entry for 10.N.0.254 (one would take up to ~50 s to age out): traffic is back at once.
    c.wait_for(lambda: c.ping(1, "c1", c.container_ip(2, "c2")), timeout=5, interval=0.2,
               what="c1 -> c2 after the host rebuilt its tunnels")


# ---- rollback ----

def rules_of(c, node):
    return c.sh(node, "iptables-save").stdout


def test_down_on_both_sides_leaves_nothing():
    with labkit.Lab(runners=2) as c:
        start_cluster(c)
        c.container(1, "c1")
        for node in c.runners:
            c.stop_runner(node)
        c.stop_host()

        refused = c.script(1, "runner", "down")
        assert refused.returncode != 0
        assert "vxlan0" in link_names(c, 1)

        for argv in ((1, "down", "--force"), (2, "down")):
            res = c.script(argv[0], "runner", *argv[1:])
            assert res.returncode == 0, res.stdout + res.stderr
        res = c.script(c.host, "host", "down")
        assert res.returncode == 0, res.stdout + res.stderr

        host_links = link_names(c, c.host)
        assert [n for n in host_links if n.startswith("vxkr") or n == "kohaku-host"] == []
        assert "kohaku-overlay" not in rules_of(c, c.host)
        assert "KOHAKU-VXLAN" not in rules_of(c, c.host)
        for node in c.runners:
            links = link_names(c, node)
            assert [n for n in links if n in ("vxlan0", "kohaku-overlay")] == []
            assert "kohaku-overlay" not in rules_of(c, node)
            nets = c.docker(node, "network", "ls", "--format", "{{.Name}}").stdout.split()
            assert "kohakuriver-overlay" not in nets
            routes = c.sh(node, "ip", "route", "show", "10.0.0.0/8").stdout
            assert routes.strip() == ""

        # a second down finds nothing to do and still succeeds
        for ref, kind in ((1, "runner"), (2, "runner"), (c.host, "host")):
            res = c.script(ref, kind, "down")
            assert res.returncode == 0, res.stdout + res.stderr


# ---- firewalld in the Host namespace ----

def root_nft():
    return subprocess.run(["nft", "list", "ruleset"], stdout=subprocess.PIPE,
                          universal_newlines=True).stdout


def etc_firewalld():
    return sorted((str(p), p.read_bytes()) for p in labkit.Path("/etc/firewalld").rglob("*")
                  if p.is_file())


def test_firewalld_trusted_zone_and_reload_repair():
    labkit.require(docker=True, firewalld=True)
    root_before, etc_before = root_nft(), etc_firewalld()
    with labkit.Lab(runners=2, firewalld=True) as c:
        start_cluster(c)
        c.container(1, "c1")
        c.container(2, "c2")
        ifaces = ("kohaku-host", "vxkr1", "vxkr2")

        def zones():
            return [c.firewall_cmd("--get-zone-of-interface=%s" % i).stdout.strip() for i in ifaces]

        c.wait_for(lambda: zones() == ["trusted"] * 3, timeout=15,
                   what="overlay interfaces trusted", log=["host"])
        assert c.ping(1, "c1", c.container_ip(2, "c2"), count=2) is True

        res = c.firewall_cmd("--reload")
        assert res.returncode == 0, res.stderr
        assert zones() != ["trusted"] * 3     # the reload really dropped the runtime bindings
        c.wait_for(lambda: zones() == ["trusted"] * 3, timeout=40, interval=1,
                   what="the host to put its interfaces back into the trusted zone", log=["host"])
        assert c.ping(1, "c1", c.container_ip(2, "c2"), count=2) is True
        assert c.ping(2, "c2", "10.0.0.1", count=1) is True
        zone = c.firewall_cmd("--get-default-zone").stdout.strip()
        ports = c.firewall_cmd("--zone=" + zone, "--list-ports").stdout.split()
        assert sorted(ports) == ["4789/udp", "8000/tcp"]
    assert root_nft() == root_before
    assert etc_firewalld() == etc_before


# ---- the newcomer's command ----

def run_demo(*args):
    """`python3 tests/labkit.py demo ARGS`, as the README has a newcomer run it."""
    return subprocess.run([sys.executable, str(labkit.REPO / "tests" / "labkit.py"), "demo"]
                          + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=240)


def test_demo_command_shows_both_runners_active_and_every_ping_passing():
    res = run_demo()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "198.51.100.11 │ Active" in res.stdout
    assert "198.51.100.12 │ Active" in res.stdout
    results = re.findall(r"^  runner\d/c\d .*  (PASS|FAIL)$", res.stdout, re.M)
    assert results == ["PASS"] * 6
    prefix = re.search(r"namespaces (ko\w+-)\*", res.stderr).group(1)
    assert [n for n in labkit.list_netns() if n.startswith(prefix)] == []


def test_demo_without_docker_uses_namespaces_as_containers_and_still_connects():
    res = run_demo("--no-docker")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "--no-docker; containers are plain namespaces instead." in res.stdout
    assert "dockerd" not in res.stderr
    results = re.findall(r"^  runner\d/c\d .*  (PASS|FAIL)$", res.stdout, re.M)
    assert results == ["PASS"] * 6
