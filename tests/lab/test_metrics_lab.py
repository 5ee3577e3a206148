"""Prometheus figures for real: the runners' textfiles and the Host's /metrics on a namespaced
cluster, read by promtool and scraped by a real prometheus server started in the Host's
namespace (tests/promkit.py). Real dockerds: without one a runner's build is never complete (its
Docker network step fails), so its overlay is never up and nothing counts as a repair.
"""

import pytest

import labkit
import promkit


def metrics_file(node):
    return node.workdir / "textfile" / "kohaku-overlay.prom"


@pytest.fixture(scope="module")
def cluster():
    labkit.require(docker=True)
    with labkit.Lab(runners=2, docker=True) as c:
        c.host_config()
        c.start_host()
        for node in c.runners:
            c.runner_config(node, OVERLAY_METRICS_FILE=str(metrics_file(node)))
            c.start_runner(node)
        c.wait_active()
        c.container(1, "c1")
        c.container(2, "c2")
        yield c


def textfile(c, node):
    """The runner's textfile, read strictly (AssertionError while it is not there yet)."""
    path = metrics_file(node)
    assert path.exists(), "%s not written yet" % path
    return promkit.parse(path.read_text())


def test_each_runner_writes_a_valid_textfile_that_follows_the_overlay(cluster):
    c = cluster
    r1 = c.runners[0]
    me = {"runner_name": r1.name}

    def answered(fams):
        return promkit.value(fams, "kohaku_overlay_runner_heartbeats_total", result="ok", **me)

    c.wait_for(lambda: answered(textfile(c, r1)) >= 2, timeout=20,
               what="two answered heartbeats in the textfile", log=[r1.name])
    fams = textfile(c, r1)
    promkit.promtool_check(metrics_file(r1).read_text())
    assert promkit.value(fams, "kohaku_overlay_runner_overlay_up", **me) == 1
    assert promkit.value(fams, "kohaku_overlay_runner_registrations_total", kind="first",
                         **me) == 1
    assert 0 < promkit.value(fams, "kohaku_overlay_runner_heartbeat_round_trip_seconds",
                             **me) < 5
    assert promkit.samples(fams, "kohaku_overlay_runner_info") == [
        ({"runner_id": "1", "runner_name": r1.name, "subnet": "10.1.0.0/16",
          "version": promkit.samples(fams, "kohaku_overlay_runner_info")[0][0]["version"]}, 1)]
    tx = "kohaku_overlay_runner_interface_transmit_bytes_total"
    before = promkit.value(fams, tx, device="vxlan0", **me)
    dst = c.container_ip(2, "c2")
    assert c.ping(1, "c1", dst, count=5, size=1000) is True
    # the next write (one heartbeat later) holds the ~5 kB the pings sent through vxlan0
    c.wait_for(lambda: promkit.value(textfile(c, r1), tx, device="vxlan0", **me) >= before + 5000,
               timeout=10, what="vxlan0's transmit bytes to grow by the pings", log=[r1.name])
    rx = promkit.value(textfile(c, r1), "kohaku_overlay_runner_interface_receive_bytes_total",
                       device="kohaku-overlay", **me)
    assert rx > 0


def test_a_repair_is_counted_under_its_kind(cluster):
    c = cluster
    r2 = c.runners[1]
    me = {"runner_name": r2.name}
    repairs = "kohaku_overlay_runner_repairs_total"
    before = promkit.value(textfile(c, r2), repairs, kind="device", **me)
    c.sh(r2, "ip", "link", "set", "dev", "vxlan0", "down")
    c.wait_for(lambda: promkit.value(textfile(c, r2), repairs, kind="device", **me) > before,
               timeout=20, what="the vxlan0 repair to be counted", log=[r2.name])
    assert c.ping(2, "c2", c.container_ip(1, "c1"), count=1) is True
    fams = textfile(c, r2)
    assert promkit.value(fams, "kohaku_overlay_runner_overlay_up", **me) == 1
    assert promkit.value(fams, repairs, kind="rules", **me) == 0


def test_check_prometheus_output_on_a_real_runner_is_promtool_valid(cluster):
    c = cluster
    res = c.script(1, "check", "--prometheus", timeout=120)
    promkit.promtool_check(res.stdout)
    fams = promkit.parse(res.stdout)
    status = dict((d["check"], d["status"]) for d, _ in promkit.samples(
        fams, "kohaku_overlay_check_status", role="runner"))
    assert status["runner.ping"] == "PASS"
    failed = sorted(k for k, v in status.items() if v == "FAIL")
    assert res.returncode == (1 if failed else 0), res.stderr


FETCH = r"""
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2]})
print(urllib.request.urlopen(req, timeout=10).read().decode(), end="")
"""


def test_the_host_endpoint_is_promtool_valid(cluster):
    c = cluster
    res = c.sh(c.host, c.python, "-c", FETCH, "http://%s:8000/metrics" % labkit.HOST_IP,
               labkit.TOKEN)
    promkit.promtool_check(res.stdout)
    fams = promkit.parse(res.stdout)
    assert promkit.value(fams, "kohaku_overlay_runners", state="active") == 2
    assert [d["device"] for d, _ in promkit.samples(
        fams, "kohaku_overlay_tunnel_receive_bytes_total")] == ["vxkr1", "vxkr2"]


def test_a_real_prometheus_scrapes_the_host_with_the_token(cluster):
    c = cluster
    with promkit.Prometheus(c, c.host, targets=["%s:8000" % labkit.HOST_IP],
                            token=labkit.TOKEN) as prom:
        prom.wait_up()
        rows = prom.query('kohaku_overlay_runners{state="active"}')
        assert [v for _, v in rows] == [2]
        assert rows[0][0]["job"] == "kohaku-overlay-host"
        series = 'kohaku_overlay_tunnel_transmit_bytes_total{runner_name="runner2"}'
        first = prom.query(series)
        assert [(r["device"], r["runner_id"]) for r, _ in first] == [("vxkr2", "2")]
        stream = c.ping_stream(1, "c1", c.container_ip(2, "c2"), interval=0.2)
        try:
            # the host forwards c1's echo requests to runner2 through vxkr2
            grown = prom.wait_for_query(series, lambda rows: rows and rows[0][1] >=
                                        first[0][1] + 10 * 84, timeout=30,
                                        what="vxkr2's transmit bytes to grow in prometheus")
            rate = prom.wait_for_query(
                'rate(kohaku_overlay_tunnel_receive_packets_total{device="vxkr1"}[5s])',
                lambda rows: rows and rows[0][1] > 0, timeout=15)
        finally:
            sent, received = stream.stop()
        assert received > 0 and grown[0][1] > first[0][1] and rate[0][1] > 0
        assert prom.query("kohaku_overlay_heartbeats_total")[0][1] > 0
