"""firewalld on a runner, for real: the runner puts kohaku-overlay and vxlan0 into the trusted
zone (runtime only), traffic flows through firewalld's own nftables rules, and after
`firewall-cmd --reload` wipes the runtime zone entries, `serve` puts them back.
"""

import pytest

import labkit


def trusted(c, node):
    res = c.firewall_cmd("--zone=trusted", "--list-interfaces", node=node, check=True)
    return sorted(res.stdout.split())


@pytest.fixture(scope="module")
def c():
    labkit.require(docker=True, firewalld=True)
    with labkit.Lab(runners=2, docker=True, firewalld=["runner1"]) as cluster:
        cluster.start_host()
        cluster.start_runner(1)
        cluster.start_runner(2)
        cluster.wait_active()
        yield cluster


def test_the_runner_trusts_its_overlay_interfaces_and_traffic_flows(c):
    r1, r2 = c.runners
    # Docker reloads firewalld when it first creates its own "docker" zone, which drops runtime
    # entries made a moment before; the runner's repair pass puts them back, so wait for it
    c.wait_for(lambda: trusted(c, r1) == ["kohaku-overlay", "vxlan0"], timeout=20, interval=0.5,
               what="kohaku-overlay and vxlan0 in the trusted zone", log=["runner1"])
    # runtime only: the lab's permanent configuration of that firewalld does not name them
    permanent = c.firewall_cmd("--permanent", "--zone=trusted", "--list-interfaces", node=r1,
                               check=True)
    assert permanent.stdout.split() == []
    a = c.container(r1, "fw-a")
    b = c.container(r2, "fw-b")
    assert c.ping(r1, a, c.container_ip(r2, b), count=2)
    assert c.ping(r2, b, c.container_ip(r1, a), count=2)
    assert c.ping(r1, a, "10.0.0.1", count=2)


def test_a_reload_is_repaired_by_serve_within_a_few_heartbeats(c):
    r1, r2 = c.runners
    log = r1.workdir / "runner.log"
    before = len(log.read_text())
    c.firewall_cmd("--reload", node=r1, check=True)   # drops every runtime zone entry

    def repaired():
        # a repair pass that runs while firewalld is still reloading can lose an entry to the
        # reload; the next pass puts it back, so wait for the state, not for the first pass
        return "repaired: " in log.read_text()[before:] and \
            trusted(c, r1) == ["kohaku-overlay", "vxlan0"]
    c.wait_for(repaired, timeout=20, interval=0.5,
               what="runner1 to put its interfaces back into the trusted zone", log=["runner1"])
    # the reload also flushed iptables in that namespace: the FORWARD rules are first again
    c.wait_for(lambda: c.sh(r1, "iptables", "-S", "FORWARD").stdout.splitlines()[1:2] == [
        "-A FORWARD -s 10.0.0.0/8 -d 10.0.0.0/8 -i kohaku-overlay -o kohaku-overlay "
        "-m comment --comment kohaku-overlay -j ACCEPT"],
        timeout=20, interval=0.5, what="the FORWARD rules back on top", log=["runner1"])
    a = c.container(r1, "fw-c")
    b = c.container(r2, "fw-d")
    assert c.ping(r1, a, c.container_ip(r2, b), count=2)
