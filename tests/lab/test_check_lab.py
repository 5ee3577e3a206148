"""kohaku_overlay_check.py on a real namespaced cluster (tests/labkit.py): the real host and runner
scripts build the overlay, the check runs inside each namespace as an operator would run it.

- A healthy host and two runners (real dockerd, containers): every check PASSes (firewalld is not
  part of this lab, so its checks SKIP).
- Each fault of issue 5, injected one at a time: the named check FAILs with the right fix and exit
  1; then the fix the check printed is applied as printed and the check PASSes again, so the fix
  is proven, not only quoted. Whatever a fault broke beyond that is undone before the next one.
- With firewalld running in the host namespace, an overlay interface outside the trusted zone is
  the "admin prohibited filter" case.
- 255 tunnels on a host: the full check stays under 2 seconds.

The daemons re-assert their work periodically; these clusters run them with long repair and
heartbeat intervals so that an injected fault stays until the check has seen it.
"""

import ipaddress
import json
import shlex
import time

import pytest

import labkit

NET = "kohakuriver-overlay"


def check(c, node, *args):
    """Run the check with --json in node's namespace -> (exit code, {id: result})."""
    res = c.script(node, "check", "--json", *args, timeout=60)
    try:
        data = json.loads(res.stdout)
    except ValueError:
        raise AssertionError("check printed no JSON (exit %s):\n%s\n%s" % (
            res.returncode, res.stdout, res.stderr))
    return res.returncode, dict((r["id"], r) for r in data["results"])


def not_passing(results):
    return dict((i, (r["status"], r["detail"])) for i, r in results.items()
                if r["status"] != "PASS")


def apply_fix(c, node, fix):
    """Run each line of a fix as printed (ip/iptables/sysctl lines in the node's namespace)."""
    for line in fix.splitlines():
        argv = shlex.split(line)
        if argv[0] == "docker":
            c.docker(node, *argv[1:])
        else:
            c.sh(node, *argv)


def assert_fault(c, node, cid, detail, fix_words):
    """The named check FAILs with detail and a fix holding fix_words; exit 1. -> the fix."""
    rc, results = check(c, node)
    res = results[cid]
    assert (res["status"], rc) == ("FAIL", 1), not_passing(results)
    assert detail in res["detail"]
    for words in fix_words:
        assert words in res["fix"]
    return res["fix"]


def assert_hub_fault_fixed(c, cid, detail, fix_words):
    """The hub drops a1 -> b1; the host's check cid FAILs with detail and a fix holding
    fix_words; that fix, applied as printed, makes cid PASS and a1 reach b1 again."""
    b1 = c.container_ip(c.runners[1], "b1")
    assert not c.ping(c.runners[0], "a1", b1)      # the fault is real: the hub drops
    fix = assert_fault(c, c.host, cid, detail, fix_words)
    apply_fix(c, c.host, fix)
    rc, results = check(c, c.host, "--only", cid)
    assert (rc, results[cid]["status"]) == (0, "PASS")
    assert c.ping(c.runners[0], "a1", b1)


def firewalld_skips(c, node, results):
    """What a healthy node of a lab without firewalld (and without encryption: the WireGuard
    checks) reports as not PASS."""
    role = "host" if node is c.host else "runner"
    ids = ["%s.firewalld.%s" % (role, n) for n in ("trusted", "vxlan_port")] + [
        "%s.wg.%s" % (role, n) for n in ("interface", "peers", "handshake")]
    return dict((i, ("SKIP", results[i]["detail"])) for i in ids)


def assert_healthy(c, nodes=None):
    for node in nodes or [c.host] + c.runners:
        rc, results = check(c, node)
        assert not_passing(results) == firewalld_skips(c, node, results), node.name
        assert rc == 0


@pytest.fixture(scope="module")
def cluster():
    labkit.require(docker=True)
    with labkit.Lab(runners=2, docker=True) as c:
        c.host_config(OVERLAY_REPAIR_INTERVAL=3600, OVERLAY_INACTIVE_AFTER=3600)
        for i in (1, 2):
            c.runner_config(i, HEARTBEAT_INTERVAL=600)
        c.start_host()
        c.start_runner(1)
        c.start_runner(2)
        c.wait_active()
        c.container(c.runners[0], "a1")
        c.container(c.runners[1], "b1")
        yield c


@pytest.fixture
def healthy(cluster):
    """Each test starts and ends on a healthy cluster (all checks PASS everywhere)."""
    assert_healthy(cluster)
    yield cluster
    assert_healthy(cluster)


def test_healthy_cluster_every_check_passes(cluster):
    c = cluster
    b1 = c.container_ip(c.runners[1], "b1")
    assert c.ping(c.runners[0], "a1", b1)
    for node in [c.host] + c.runners:
        t0 = time.monotonic()
        rc, results = check(c, node)
        took = time.monotonic() - t0
        assert not_passing(results) == firewalld_skips(c, node, results)
        assert results[sorted(firewalld_skips(c, node, results))[0]]["detail"].startswith(
            "firewalld is not running")
        assert rc == 0
        assert took < 2.0
    rc, results = check(c, c.runners[0])
    assert results["runner.fdb"]["detail"] == "1 container MACs, none on vxlan0"
    assert results["runner.ping_df"]["status"] == "PASS"


def test_ip_forward_off_on_the_host(healthy):
    c = healthy
    c.sh(c.host, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    try:
        fix = assert_fault(c, c.host, "host.ip_forward", "net.ipv4.ip_forward = 0",
                           ["sysctl -w net.ipv4.ip_forward=1"])
        apply_fix(c, c.host, fix)
        rc, results = check(c, c.host, "--only", "host.ip_forward")
        assert (rc, results["host.ip_forward"]["status"]) == (0, "PASS")
    finally:
        c.sh(c.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")


def test_forward_rules_deleted_with_policy_drop(healthy):
    c = healthy
    # the daemon's marked rules, whichever form it builds (broad before issue 11.1, scoped after)
    ours = [r for r in c.sh(c.host, "iptables", "-S", "FORWARD").stdout.splitlines()
            if "kohaku-overlay" in r]
    c.iptables_drift(c.host, policy={"FORWARD": "DROP"}, delete=ours)
    try:
        # the check's fix is the scoped rule (issue 11.1): it carries the hub's traffic
        assert_hub_fault_fixed(c, "host.forward_rules",
                               "FORWARD accept rule `-s 10.0.0.0/8 -d 10.0.0.0/8 -i vxkr+ -o "
                               "vxkr+` missing: policy DROP drops",
                               ["iptables -I FORWARD 1 -s 10.0.0.0/8 -d 10.0.0.0/8 -i vxkr+ -o "
                                "vxkr+ -m comment --comment kohaku-overlay -j ACCEPT"])
    finally:
        c.sh(c.host, "iptables", "-P", "FORWARD", "ACCEPT")


def test_a_native_nftables_forward_drop_breaks_the_hub_and_is_named(healthy):
    """Issue 11.11: a native nftables table (not iptables-nft's) with policy drop on the forward
    hook; iptables-save does not show it, the nftables check names it and its fix works."""
    c = healthy
    c.sh(c.host, "nft", "-f", "-", input="table inet kolabfw {\n chain lab_forward { type filter "
         "hook forward priority 0; policy drop; ct state established,related accept; }\n}\n")
    try:
        rc, results = check(c, c.host, "--only", "host.forward_rules")
        assert (rc, results["host.forward_rules"]["status"]) == (0, "PASS")  # iptables: fine
        assert_hub_fault_fixed(c, "host.nftables",
                               "table inet kolabfw chain lab_forward (hook forward) drops "
                               "10.1.0.2 -> 10.2.0.2: policy drop",
                               ["nft insert rule inet kolabfw lab_forward ip saddr 10.0.0.0/8 "
                                "ip daddr 10.0.0.0/8 accept"])
    finally:
        c.sh(c.host, "nft", "delete", "table", "inet", "kolabfw", check=False)


def test_forward_rules_buried_below_a_drop_on_a_runner(healthy):
    c = healthy
    r1 = c.runners[0]
    c.iptables_drift(r1, insert=["-A FORWARD -i eth9 -j DROP"])
    try:
        fix = assert_fault(c, r1, "runner.forward_rules",
                           "at bottom: below rule 1 `-A FORWARD -i eth9 -j DROP`",
                           ["iptables -D FORWARD -s 10.0.0.0/8", "iptables -I FORWARD 1 -s"])
        apply_fix(c, r1, fix)
        rc, results = check(c, r1, "--only", "runner.forward_rules")
        assert (rc, results["runner.forward_rules"]["status"]) == (0, "PASS")
    finally:
        c.iptables_drift(r1, delete=["-A FORWARD -i eth9 -j DROP"])


def test_vxkr1_recreated_with_remote_loopback(healthy):
    c = healthy
    r1 = c.runners[0]
    c.sh(c.host, "ip", "link", "del", "vxkr1")
    for argv in (["ip", "link", "add", "vxkr1", "type", "vxlan", "id", "101", "local",
                  labkit.HOST_IP, "remote", "127.0.0.1", "dstport", "4789", "nolearning"],
                 ["ip", "link", "set", "vxkr1", "mtu", "1450"],
                 ["ip", "addr", "add", "10.1.0.254/16", "dev", "vxkr1"],
                 ["ip", "link", "set", "vxkr1", "up"]):
        c.sh(c.host, *argv)
    fix = assert_fault(c, c.host, "host.vxkr.remote",
                       "vxkr1 remote is 127.0.0.1, not %s: the HOST_REACHABLE_ADDRESS is not "
                       "configured correctly" % r1.ip,
                       ["ip link del vxkr1", "remote %s dstport 4789" % r1.ip])
    apply_fix(c, c.host, fix)
    rc, results = check(c, c.host, "--only", "host.vxkr")
    assert rc == 0 and not_passing(results) == {}
    # the fix re-creates the device with the daemon's fixed MAC: the runner's ARP entry for
    # 10.1.0.254 stays right and the tunnel carries traffic at once
    rc, results = check(c, r1, "--only", "runner.ping")
    assert results["runner.ping"]["status"] == "PASS"


def test_kohaku_host_address_removed(healthy):
    c = healthy
    r1 = c.runners[0]
    c.sh(c.host, "ip", "addr", "del", "10.0.0.1/8", "dev", "kohaku-host")
    try:
        fix = assert_fault(c, c.host, "host.kohaku_host.address",
                           "kohaku-host has no IPv4 address, not 10.0.0.1/8",
                           ["ip addr add 10.0.0.1/8 dev kohaku-host"])
        # seen from the runner: the host's overlay IP stops answering
        rc, results = check(c, r1)
        assert (rc, results["runner.ping"]["status"]) == (1, "FAIL")
        assert results["runner.ping"]["detail"].startswith("10.0.0.1 does not answer")
        assert results["runner.ping_df"]["detail"] == "needs runner.ping"
        apply_fix(c, c.host, fix)
    finally:
        c.sh(c.host, "ip", "addr", "replace", "10.0.0.1/8", "dev", "kohaku-host")


def test_vxlan0_detached_from_the_bridge(healthy):
    c = healthy
    r1 = c.runners[0]
    c.sh(r1, "ip", "link", "set", "vxlan0", "nomaster")
    try:
        fix = assert_fault(c, r1, "runner.bridge.vxlan0",
                           "vxlan0 is detached, not a port of kohaku-overlay",
                           ["ip link set vxlan0 master kohaku-overlay"])
        apply_fix(c, r1, fix)
    finally:
        c.sh(r1, "ip", "link", "set", "vxlan0", "master", "kohaku-overlay")


def test_docker_network_removed(healthy):
    c = healthy
    r1 = c.runners[0]
    c.docker(r1, "rm", "-f", "a1")
    c.docker(r1, "network", "rm", NET)
    try:
        fix = assert_fault(c, r1, "runner.docker.network",
                           "Docker network %s does not exist" % NET,
                           ["docker network create --driver bridge --subnet 10.1.0.0/16 "
                            "--gateway 10.1.0.1 --aux-address host=10.1.0.254 "
                            "-o com.docker.network.bridge.name=kohaku-overlay "
                            "-o com.docker.network.driver.mtu=1450 " + NET])
        apply_fix(c, r1, fix)
        rc, results = check(c, r1, "--only", "runner.docker.network")
        assert (rc, results["runner.docker.network"]["status"]) == (0, "PASS")
    finally:
        if c.docker(r1, "network", "inspect", NET, check=False).returncode != 0:
            c.stop_runner(1)
            c.start_runner(1)
        c.container(r1, "a1")


def test_mtu_mismatch_between_host_and_runner_config(healthy):
    c = healthy
    r1 = c.runners[0]
    path = c.runner_config(1, HEARTBEAT_INTERVAL=600, OVERLAY_MTU=1400)
    try:
        fix = assert_fault(c, r1, "runner.settings",
                           "OVERLAY_MTU = 1400 here but 1450 on the host",
                           ["OVERLAY_MTU = 1450   # in %s" % path])
        key, value = fix.splitlines()[0].split("#")[0].split("=")
        c.runner_config(1, HEARTBEAT_INTERVAL=600, **{key.strip(): int(value)})
        rc, results = check(c, r1, "--only", "runner.settings")
        assert (rc, results["runner.settings"]["status"]) == (0, "PASS")
    finally:
        c.runner_config(1, HEARTBEAT_INTERVAL=600)


def test_bundle_from_a_runner_holds_the_diagnostics_but_not_the_token(healthy, tmp_path):
    import tarfile
    c = healthy
    r1 = c.runners[0]
    path = tmp_path / "diag.tar.gz"
    res = c.script(r1, "check", "--bundle", str(path), timeout=60)
    assert res.returncode == 0
    with tarfile.open(str(path)) as tar:
        files = dict((m.name.split("/", 1)[1], tar.extractfile(m).read().decode())
                     for m in tar.getmembers())
    assert "vxlan0" in files["ip-link.txt"]
    assert "kohaku-overlay" in files["iptables-save.nft.txt"]
    assert json.loads(files["docker-network.json"])[0]["Name"] == NET
    assert json.loads(files["host-status.json"])["total"] == 2
    assert files["report.txt"].splitlines()[-1].endswith("0 failed, 5 skipped")  # firewalld, wg
    for name, text in files.items():
        assert labkit.TOKEN not in text, name


# ---- firewalld in the host namespace -----------------------------------------------------------

@pytest.fixture(scope="module")
def fw_cluster():
    labkit.require(docker=True, firewalld=True)
    with labkit.Lab(runners=1, docker=True, firewalld=True) as c:
        c.host_config(OVERLAY_REPAIR_INTERVAL=3600, OVERLAY_INACTIVE_AFTER=3600)
        c.runner_config(1, HEARTBEAT_INTERVAL=600)
        c.start_host()
        c.start_runner(1)
        c.wait_active()
        yield c


def test_firewalld_untrusted_interface_is_the_admin_prohibited_case(fw_cluster):
    c = fw_cluster
    rc, results = check(c, c.host)
    assert rc == 0                                   # firewalld checks included
    assert sorted(not_passing(results)) == ["host.wg.handshake", "host.wg.interface",
                                            "host.wg.peers"]    # encryption is off here
    assert results["host.firewalld.trusted"]["detail"] == \
        "kohaku-host, vxkr1 in the trusted zone"
    c.firewall_cmd("--zone=trusted", "--remove-interface=vxkr1", check=True)
    try:
        rc, results = check(c, c.host)
        res = results["host.firewalld.trusted"]
        assert (res["status"], rc) == ("FAIL", 1)
        assert "vxkr1 in zone" in res["detail"]
        assert "'admin prohibited filter'" in res["detail"]
        assert res["fix"] == "firewall-cmd --zone=trusted --add-interface=vxkr1"
        c.firewall_cmd(*shlex.split(res["fix"])[1:], check=True)
        rc, results = check(c, c.host, "--only", "host.firewalld.trusted")
        assert (rc, results["host.firewalld.trusted"]["status"]) == (0, "PASS")
    finally:
        c.firewall_cmd("--zone=trusted", "--add-interface=vxkr1")


# ---- speed ------------------------------------------------------------------------------------

def test_check_takes_under_two_seconds_with_255_tunnels():
    """A host restarted on a state file of 255 runners builds 255 tunnels; the check reads them
    all (one command per kind of fact) well inside the 2 s the benchmark asks."""
    labkit.require(docker=False)
    with labkit.Lab(runners=0, docker=False) as c:
        first = ipaddress.IPv4Address("198.51.100.2")
        allocs = [{"runner_id": n, "runner_name": "fake%d" % n,
                   "physical_ip": str(first + (n - 1) % 253), "last_seen": time.time()}
                  for n in range(1, 256)]
        state = c.host.workdir / "state.json"
        state.write_text(json.dumps({"version": 1, "allocations": allocs}))
        state.chmod(0o600)
        c.host_config(OVERLAY_REPAIR_INTERVAL=3600, OVERLAY_INACTIVE_AFTER=3600)
        c.start_host()
        took = []
        for _ in range(3):
            t0 = time.monotonic()
            rc, results = check(c, c.host)
            took.append(time.monotonic() - t0)
        assert results["host.tunnels"]["detail"] == "255 allocations, 255 tunnels"
        assert results["host.vxkr.remote"]["status"] == "PASS"
        assert rc == 0
        assert min(took) < 2.0, took
