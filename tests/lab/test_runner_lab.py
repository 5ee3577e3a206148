"""The runner agent for real: kohaku_overlay_runner.py in runner namespaces with their own dockerd.

One cluster (host + 2 runners) for the module; each test states what it needs (`up` is
idempotent, so tests call it rather than rely on order). Asserts with `ip -j`, `iptables -S`,
`docker network inspect` and real pings from busybox containers.
"""

import json
import signal
import time

import pytest

import labkit

MARKED_FWD = ["-A FORWARD -s 10.0.0.0/8 -d 10.0.0.0/8 -i kohaku-overlay -o kohaku-overlay "
              "-m comment --comment kohaku-overlay -j ACCEPT"]


@pytest.fixture(scope="module")
def c():
    labkit.require(docker=True)
    with labkit.Lab(runners=2, docker=True) as cluster:
        cluster.start_host()
        yield cluster


def up(c, i, *args):
    node = c.runners[i - 1]
    res = c.script(node, "runner", "up", *args)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def down(c, i, *args):
    return c.script(c.runners[i - 1], "runner", *(("down",) + args))


def forward(c, node):
    out = c.sh(node, "iptables", "-S", "FORWARD").stdout
    return [ln for ln in out.splitlines() if ln.startswith("-A ")]


def iptables_save(c, node):
    """iptables-save without the comment lines and counters (they change on their own)."""
    out = c.sh(node, "iptables-save").stdout
    return [ln.split(" [")[0] if ln.startswith(":") else ln for ln in out.splitlines()
            if not ln.startswith("#")]


def network_inspect(c, node):
    return json.loads(c.docker(node, "network", "inspect", labkit.OVERLAY_NETWORK).stdout)[0]


def links(c, node):
    return dict((link["ifname"], link) for link in json.loads(
        c.sh(node, "ip", "-j", "-d", "addr", "show").stdout))


def fresh(c, node, name):
    c.docker(node, "rm", "-f", name, check=False)
    return c.container(node, name)


def restart_dockerd(c, node):
    """Stop the runner's dockerd (containers die with it) and start it again, same argv."""
    key = "dockerd-" + node.ns[len(c.prefix):]
    popen, log = c._procs[key]
    argv = popen.args
    assert c._stop(key, signal.SIGTERM, grace=40) is not None
    c._spawn(key, log, argv, env=c._base_env())
    c.wait_for(lambda: c._docker_ready(node, key), timeout=60, interval=0.2,
               what="dockerd of %s to answer again" % node.name, log=[key])


def test_up_builds_the_runner_end_and_containers_talk_across_runners(c):
    r1, r2 = c.runners
    t0 = time.monotonic()
    up(c, 1)
    a = fresh(c, r1, "ca")
    assert c.ping(r1, a, "10.0.0.1")
    took = time.monotonic() - t0
    up(c, 2)
    b = fresh(c, r2, "cb")
    ip_a, ip_b = c.container_ip(r1, a), c.container_ip(r2, b)
    assert ip_a.startswith("10.1.0.") and ip_b.startswith("10.2.0.")
    assert c.ping(r1, a, ip_b) and c.ping(r2, b, ip_a)
    assert c.ping(r1, a, "10.1.0.1") and c.ping(r2, b, "10.2.0.1")
    assert c.ping(r2, b, "10.0.0.1")
    # the runner end as built
    l1 = links(c, r1)
    vx = l1["vxlan0"]["linkinfo"]["info_data"]
    assert (vx["id"], vx["local"], vx["remote"], vx["port"], vx["learning"]) == (
        101, r1.ip, labkit.HOST_IP, 4789, False)
    assert l1["vxlan0"]["mtu"] == 1450 and l1["vxlan0"]["master"] == labkit.OVERLAY_BRIDGE
    assert [(x["local"], x["prefixlen"]) for x in l1[labkit.OVERLAY_BRIDGE]["addr_info"]
            if x["family"] == "inet"] == [("10.1.0.1", 16)]
    assert forward(c, r1)[:len(MARKED_FWD)] == MARKED_FWD
    route = json.loads(c.sh(r1, "ip", "-j", "route", "show", "exact", "10.0.0.0/8").stdout)
    assert (route[0]["gateway"], route[0]["dev"]) == ("10.1.0.254", labkit.OVERLAY_BRIDGE)
    # informational here (bench/ measures it): up until a container answers, on a warm dockerd
    print("up -> container ping of 10.0.0.1: %.2f s" % took)


def test_the_host_address_on_the_segment_is_never_given_to_a_container(c):
    r1 = c.runners[0]
    up(c, 1)
    ipam = network_inspect(c, r1)["IPAM"]["Config"][0]
    assert ipam["AuxiliaryAddresses"] == {"host": "10.1.0.254"}
    c.docker(r1, "rm", "-f", "taker", check=False)
    res = c.docker(r1, "run", "-d", "--name", "taker", "--network", labkit.OVERLAY_NETWORK,
                   "--ip", "10.1.0.254", labkit.IMAGE, "sleep", "1d", check=False)
    c.docker(r1, "rm", "-f", "taker", check=False)
    assert res.returncode != 0
    assert "10.1.0.254" in res.stderr or "in use" in res.stderr
    ips = [c.container_ip(r1, fresh(c, r1, "n%d" % k)) for k in range(3)]
    assert "10.1.0.254" not in ips
    for k in range(3):
        c.docker(r1, "rm", "-f", "n%d" % k)


def test_dont_fragment_1422_crosses_and_1423_does_not(c):
    r1, r2 = c.runners
    up(c, 1)
    up(c, 2)
    a = fresh(c, r1, "ca")
    b = fresh(c, r2, "cb")
    ip_b = c.container_ip(r2, b)
    assert c.ping(r1, a, ip_b, size=1422, df=True)
    assert not c.ping(r1, a, ip_b, size=1423, df=True)


def test_a_second_up_changes_nothing(c):
    r1 = c.runners[0]
    up(c, 1)
    fresh(c, r1, "ca")
    rules, net = iptables_save(c, r1), network_inspect(c, r1)
    res = up(c, 1)
    assert "already up, nothing to change" in res.stdout
    assert "[#]" not in res.stderr
    assert iptables_save(c, r1) == rules
    assert network_inspect(c, r1) == net


def test_down_refuses_with_containers_then_force_and_twice(c):
    r1 = c.runners[0]
    up(c, 1)
    fresh(c, r1, "ca")
    res = down(c, 1)
    assert res.returncode == 1
    assert "containers are still attached (ca)" in res.stderr
    assert res.stderr.count("\n") == 1
    assert "vxlan0" in links(c, r1)
    assert down(c, 1, "--force").returncode == 0
    res = down(c, 1)
    assert res.returncode == 0 and "already down" in res.stdout
    l1 = links(c, r1)
    assert "vxlan0" not in l1 and labkit.OVERLAY_BRIDGE not in l1
    assert not [ln for ln in iptables_save(c, r1) if "kohaku-overlay" in ln]
    assert c.docker(r1, "network", "inspect", labkit.OVERLAY_NETWORK, check=False).returncode != 0
    c.docker(r1, "rm", "-f", "ca")
    up(c, 1)                                    # back for the tests that follow


def test_network_names_the_overlay_when_built_and_the_default_otherwise(c):
    r1 = c.runners[0]
    up(c, 1)
    res = c.script(r1, "runner", "network")
    assert (res.returncode, res.stdout) == (0, "kohakuriver-overlay\n")
    cfg = c.runner_config(1, OVERLAY_ENABLED=False)
    try:
        res = c.script(r1, "runner", "network", "--config", str(cfg))
        assert (res.returncode, res.stdout) == (0, "kohakuriver-net\n")
        ipam = json.loads(c.docker(r1, "network", "inspect", "kohakuriver-net").stdout)[0]
        assert ipam["IPAM"]["Config"][0]["Subnet"] == "172.30.0.0/16"
    finally:
        c.runner_config(1)


def test_serve_repairs_deleted_forward_rules_and_a_downed_vxlan(c):
    r1, r2 = c.runners
    up(c, 2)
    c.start_runner(1)
    try:
        a = fresh(c, r1, "ca")
        b = fresh(c, r2, "cb")
        ip_b = c.container_ip(r2, b)
        c.iptables_drift(r1, delete=MARKED_FWD)
        c.sh(r1, "ip", "link", "set", "vxlan0", "down", "nomaster")
        c.sh(r1, "ip", "route", "del", "10.0.0.0/8")
        assert not c.ping(r1, a, ip_b)

        def repaired():
            l1 = links(c, r1)["vxlan0"]
            route = c.sh(r1, "ip", "-j", "route", "show", "exact", "10.0.0.0/8").stdout
            return forward(c, r1)[:len(MARKED_FWD)] == MARKED_FWD and "UP" in l1["flags"] and \
                l1.get("master") == labkit.OVERLAY_BRIDGE and "10.1.0.254" in route
        c.wait_for(repaired, timeout=8, what="serve to repair rules, vxlan0 and the route",
                   log=[r1.name])
        assert c.ping(r1, a, ip_b)
        c.wait_for(lambda: "repaired: FORWARD" in c.log_tail(r1.name, lines=60),
                   timeout=5, what="the repair's log lines", log=[r1.name])
        log = c.log_tail(r1.name, lines=60)
        assert "repaired: vxlan0 attached to kohaku-overlay, set up" in log
        assert "repaired: route 10.0.0.0/8 via 10.1.0.254 added" in log
        assert "repaired: FORWARD accept rules for 10.0.0.0/8 added" in log
    finally:
        assert c.stop_runner(1) == 0
    assert "vxlan0" in links(c, r1)             # SIGTERM tears nothing down


def test_serve_repairs_after_dockerd_restarts(c):
    r1, r2 = c.runners
    up(c, 2)
    c.start_runner(1)
    try:
        fresh(c, r1, "ca")
        restart_dockerd(c, r1)
        c.wait_for(lambda: forward(c, r1)[:len(MARKED_FWD)] == MARKED_FWD, timeout=10,
                   what="serve to put the FORWARD rules back on top", log=[r1.name])
        assert forward(c, r1)[1:3] == ["-A FORWARD -j DOCKER-USER",
                                       "-A FORWARD -j DOCKER-ISOLATION-STAGE-1"]
        a = fresh(c, r1, "ca")
        b = fresh(c, r2, "cb")
        assert c.ping(r1, a, c.container_ip(r2, b))
        assert c.ping(r1, a, "10.0.0.1")
    finally:
        assert c.stop_runner(1) == 0


def test_status_json_reports_the_allocation_and_devices(c):
    r1 = c.runners[0]
    up(c, 1)
    res = c.script(r1, "runner", "status", "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["allocation"]["subnet"] == "10.1.0.0/16"
    assert st["devices"]["vxlan0"]["present"] and st["devices"]["vxlan0"]["up"]
    assert st["devices"][labkit.OVERLAY_BRIDGE]["addresses"] == ["10.1.0.1/16"]
    assert st["route"] == {"present": True, "via": "10.1.0.254", "dev": labkit.OVERLAY_BRIDGE}
    assert st["network"]["present"] is True
    assert st["registered_at"] > 0


def test_a_host_that_lost_state_and_devices_gives_serve_its_old_subnet_back(c):
    r1, r2 = c.runners
    up(c, 1)
    up(c, 2)
    c.start_runner(2)
    try:
        cb = fresh(c, r2, "cb")
        ip_b = c.container_ip(r2, cb)
        assert ip_b.startswith("10.2.0.")
        # a host reboot: no state file, no devices; the runner keeps its saved allocation
        c.stop_host()
        (c.host.workdir / "state.json").unlink()
        assert c.script(c.host, "host", "down").returncode == 0
        assert not c.ping(r2, cb, "10.0.0.1")
        c.start_host()
        c.wait_for(lambda: c.ping(r2, cb, "10.0.0.1"), timeout=15,
                   what="runner 2 to register again and reach the host", log=[r2.name, "host"])
        assert "registered again as runner 2" in c.log_tail(r2.name, lines=80)
        assert c.container_ip(r2, cb) == ip_b
        mine = [a for a in c.status()["allocations"] if a["runner_name"] == r2.name]
        assert [(a["runner_id"], a["subnet"]) for a in mine] == [(2, "10.2.0.0/16")]
    finally:
        assert c.stop_runner(2) == 0


def test_a_settings_mismatch_or_a_wrong_token_is_exit_2_with_one_sentence(c):
    r1 = c.runners[0]
    try:
        res = c.script(r1, "runner", "up", "--config", str(c.runner_config(1, OVERLAY_MTU=1400)))
        assert res.returncode == 2
        assert res.stderr.splitlines()[-1] == (
            "error: the host at 198.51.100.1:8000 refused the registration: mtu is 1400 on the "
            "runner but 1450 on the host: set OVERLAY_MTU = 1450 in runner_config.py")
        res = c.script(r1, "runner", "up", "--config", str(c.runner_config(1, OVERLAY_TOKEN="x")))
        assert res.returncode == 2
        assert res.stderr == ("error: the host refused the token: set OVERLAY_TOKEN to the "
                              "host's\n")
    finally:
        c.runner_config(1)


def test_a_failed_up_rolls_back_what_it_built(c):
    r1 = c.runners[0]
    c.docker(r1, "rm", "-f", "ca", check=False)
    assert down(c, 1, "--force").returncode == 0
    # a network of the admin's that holds the runner's subnet: docker network create must fail.
    # macvlan: Docker's address pool holds the subnet, but no route or address of the node is
    # in the overlay (a bridge network would be, and up refuses before anything: issue 11.4)
    c.docker(r1, "network", "create", "-d", "macvlan", "-o", "parent=eth0", "--subnet",
             "10.1.0.0/16", "blocker")
    try:
        res = c.script(r1, "runner", "up")
        assert res.returncode == 1
        assert res.stderr.splitlines()[-1].startswith("error: `docker network create")
        assert "rolling back: delete vxlan0" in res.stderr
        l1 = links(c, r1)
        assert "vxlan0" not in l1 and labkit.OVERLAY_BRIDGE not in l1
        assert not [ln for ln in iptables_save(c, r1) if "kohaku-overlay" in ln]
    finally:
        c.docker(r1, "network", "rm", "blocker")
    up(c, 1)
    assert forward(c, r1)[:len(MARKED_FWD)] == MARKED_FWD
