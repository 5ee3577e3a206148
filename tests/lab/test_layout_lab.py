"""Another address layout is one config line: OVERLAY_SUBNET on the host, nothing on the runners.

The runners take their subnet, gateway, the host's address on their segment and the overlay
CIDR from the allocation, so the whole cluster follows the host's layout.
"""

import json

import pytest

import labkit

LAYOUT = "172.20.0.0/16/4/12"   # 15 runners of a /20 each; the host lives in node 0's /20


@pytest.fixture(scope="module")
def cluster():
    labkit.require(docker=True)
    with labkit.Lab(runners=2, docker=True) as c:
        c.host_config(OVERLAY_SUBNET=LAYOUT, OVERLAY_HOST_IP="172.20.0.1")
        c.start_host()
        for i in (1, 2):
            c.start_runner(i)
        c.wait_active()
        yield c


def test_the_cluster_follows_the_hosts_layout(cluster):
    c = cluster
    st = c.status()
    assert (st["overlay_cidr"], st["host_ip"], st["host_prefix"], st["max_ids"]) == \
        ("172.20.0.0/16", "172.20.0.1", 16, 15)
    assert [(a["runner_name"], a["subnet"], a["gateway"], a["host_vxlan_ip"])
            for a in st["allocations"]] == [
        ("runner1", "172.20.16.0/20", "172.20.16.1", "172.20.16.254"),
        ("runner2", "172.20.32.0/20", "172.20.32.1", "172.20.32.254")]
    r1, r2 = c.runners
    net = json.loads(c.docker(r1, "network", "inspect", labkit.OVERLAY_NETWORK).stdout)[0]
    assert net["IPAM"]["Config"][0]["Subnet"] == "172.20.16.0/20"
    assert net["IPAM"]["Config"][0]["Gateway"] == "172.20.16.1"
    route = c.sh(r1, "ip", "-j", "route", "show", "172.20.0.0/16").stdout
    assert json.loads(route)[0]["gateway"] == "172.20.16.254"
    a = c.container(r1, "lay-a")
    b = c.container(r2, "lay-b")
    ip_a, ip_b = c.container_ip(r1, a), c.container_ip(r2, b)
    assert ip_a.startswith("172.20.16.") and ip_b.startswith("172.20.32.")
    assert c.ping(r1, a, ip_b, count=2)
    assert c.ping(r2, b, ip_a, count=2)
    assert c.ping(r1, a, "172.20.0.1", count=2)     # the host
    assert c.ping(r1, a, "172.20.16.1", count=2)    # its gateway


def test_check_is_clean_on_every_node_of_the_other_layout(cluster):
    c = cluster
    for node in [c.host] + c.runners:
        res = c.script(node, "check", "--json")
        report = json.loads(res.stdout)
        assert [r["id"] for r in report["results"] if r["status"] == "FAIL"] == []
        assert res.returncode == 0
