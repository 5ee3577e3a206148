"""Unit tests of the Prometheus figures: the Host's GET /metrics, the runner's textfile and the
check script's --prometheus, checked line by line with promkit's strict reader and with
`promtool check metrics` (Debian's prometheus package, always installed in CI)."""

import contextlib
import io
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import kohaku_overlay_check as chk        # the module test_check's fake patches
import promkit
import test_check
import test_direct
import test_host
import test_runner

ROOT = Path(__file__).resolve().parents[2]


runner = test_runner.runner             # one module object for every runner test

ALLOC = {"runner_name": "runner1", "runner_id": 1, "subnet": "10.1.0.0/16",
         "gateway": "10.1.0.1", "host_overlay_ip": "10.0.0.1", "host_vxlan_ip": "10.1.0.254",
         "host_physical_ip": "198.51.100.1", "vni": 101, "vxlan_port": 4789, "mtu": 1450,
         "overlay_cidr": "10.0.0.0/8"}
LINK_STATS = ["ip", "-s", "-j", "link", "show"]


def stats_link(name, rx_bytes=0, tx_bytes=0, rx_packets=0, tx_packets=0, key="stats64"):
    return {"ifname": name, "flags": ["UP"], key: {
        "rx": {"bytes": rx_bytes, "packets": rx_packets, "errors": 1, "dropped": 2,
               "over_errors": 0, "multicast": 0},
        "tx": {"bytes": tx_bytes, "packets": tx_packets, "errors": 3, "dropped": 4,
               "carrier_errors": 0, "collisions": 0}}}


# ---- the exposition writer --------------------------------------------------------------------


def test_label_values_and_help_are_escaped_and_read_back_unchanged():
    nasty = 'a\\b "quoted"\nnext line'
    fam = runner.Family("x_total", "counter", "Help with a \\ and a\nnewline.",
                        [({"name": nasty, "kind": "k"}, 3), ({}, 0)])
    text = runner.render_metrics([fam])
    assert text.splitlines()[:3] == [
        "# HELP x_total Help with a \\\\ and a\\nnewline.",
        "# TYPE x_total counter",
        'x_total{kind="k",name="a\\\\b \\"quoted\\"\\nnext line"} 3']
    fams = promkit.parse(text)
    assert fams["x_total"].help == "Help with a \\ and a\nnewline."
    assert promkit.value(fams, "x_total", name=nasty, kind="k") == 3
    assert promkit.value(fams, "x_total") == 0
    promkit.promtool_check(text)


def test_sample_values_in_the_format_prometheus_reads():
    assert [runner.sample_value(v) for v in (True, False, 7, 0.25, float("nan"), float("inf"),
                                             float("-inf"), 1e21)] == [
        "1", "0", "7", "0.25", "NaN", "+Inf", "-Inf", "1e+21"]


def test_link_stats_read_stats64_and_the_older_stats_key():
    text = json.dumps([stats_link("vxlan0", 10, 20), stats_link("eth0", 1, 2, key="stats"),
                       {"ifname": "bare"}])
    stats = runner.parse_link_stats(text)
    assert sorted(stats) == ["eth0", "vxlan0"]
    assert stats["vxlan0"]["tx"]["bytes"] == 20 and stats["eth0"]["rx"]["bytes"] == 1


@pytest.mark.parametrize("change, kind", [
    ("net.ipv4.ip_forward set to 1", "sysctl"),
    ("bridge kohaku-overlay created", "device"),
    ("vxlan0 recreated (remote 1.2.3.4 (want 198.51.100.1))", "device"),
    ("vxlan0 mtu 1500 -> 1450, attached to kohaku-overlay, set up", "device"),
    ("route 10.0.0.0/8 via 10.1.0.254 fixed", "device"),
    ("gateway 10.1.0.1/16 added to kohaku-overlay", "device"),
    ("FORWARD accept rules for 10.0.0.0/8 moved to the top", "rules"),
    ("NAT masquerade for 10.0.0.0/8 added", "rules"),
    ("vxlan0 added to the firewalld trusted zone", "zone"),
    ("Docker network kohakuriver-overlay created on kohaku-overlay", "network"),
])
def test_repairs_count_under_their_kind(change, kind):
    assert runner.repair_kind(change) == kind


# ---- the runner's textfile --------------------------------------------------------------------


@pytest.fixture
def cfg(tmp_path):
    c = dict(runner.KEY_DEFAULTS)
    c.update(HOST_ADDRESS="198.51.100.1", RUNNER_NAME="runner1", OVERLAY_ENABLED=True,
             OVERLAY_STATE_FILE=str(tmp_path / "state" / "runner.json"),
             OVERLAY_METRICS_FILE=str(tmp_path / "textfile" / "kohaku-overlay.prom"),
             _path=str(tmp_path / "runner_config.py"))
    return c


class Links(object):
    """A fake run() that answers `ip -s -j link show` with growing counters and counts calls."""

    def __init__(self):
        self.calls = []
        self.rx = 0

    def __call__(self, argv, check=True, mutates=True, **kw):
        assert list(argv) == LINK_STATS and mutates is False
        self.calls.append(list(argv))
        self.rx += 1000
        return runner.Result(0, json.dumps([
            stats_link("lo", 5, 5), stats_link("vxlan0", self.rx, 2 * self.rx, 10, 20),
            stats_link("kohaku-overlay", 7, 8), stats_link("vethabc", 9, 9)]), "")


class Stop(object):
    def wait(self, t):
        return False

    def is_set(self):
        return False


@pytest.fixture
def agent(cfg, mocker):
    links = Links()
    mocker.patch.object(runner, "run", side_effect=links)
    a = runner.Agent(cfg, stop=Stop(), notify=mocker.Mock())
    a.alloc, a.address = runner.parse_allocation(ALLOC), "198.51.100.11"
    a.built = a.ready = True
    a.build = mocker.patch.object(runner, "build", return_value=[])
    mocker.patch.object(runner, "runner_address", return_value="198.51.100.11")   # unchanged
    a.links = links
    return a


def read(cfg):
    text = Path(cfg["OVERLAY_METRICS_FILE"]).read_text()
    return text, promkit.parse(text)


def test_every_heartbeat_rewrites_the_textfile_with_one_ip_process(agent, cfg, mocker):
    hb = mocker.patch.object(runner, "heartbeat")
    agent.beat()
    assert hb.call_count == 1 and agent.links.calls == [LINK_STATS]
    text, fams = read(cfg)
    promkit.promtool_check(text)
    me = {"runner_name": "runner1"}
    assert promkit.value(fams, "kohaku_overlay_runner_heartbeats_total", result="ok", **me) == 1
    assert promkit.value(fams, "kohaku_overlay_runner_heartbeat_round_trip_seconds", **me) >= 0
    assert promkit.value(fams, "kohaku_overlay_runner_interface_receive_bytes_total",
                         device="vxlan0", **me) == 1000
    assert promkit.value(fams, "kohaku_overlay_runner_interface_transmit_bytes_total",
                         device="vxlan0", **me) == 2000
    assert promkit.value(fams, "kohaku_overlay_runner_interface_receive_drops_total",
                         device="kohaku-overlay", **me) == 2
    assert promkit.value(fams, "kohaku_overlay_runner_interface_transmit_errors_total",
                         device="kohaku-overlay", **me) == 3
    devices = {d["device"] for d, _ in promkit.samples(
        fams, "kohaku_overlay_runner_interface_receive_packets_total")}
    assert devices == {"vxlan0", "kohaku-overlay"}           # not lo, not the containers' veths
    assert promkit.value(fams, "kohaku_overlay_runner_overlay_up", **me) == 0
    info = promkit.samples(fams, "kohaku_overlay_runner_info")
    assert info == [({"runner_name": "runner1", "runner_id": "1", "subnet": "10.1.0.0/16",
                      "version": runner.__version__}, 1)]
    mode = stat.S_IMODE(os.stat(cfg["OVERLAY_METRICS_FILE"]).st_mode)
    assert mode == 0o644                # node_exporter runs as another user
    assert sorted(os.listdir(os.path.dirname(cfg["OVERLAY_METRICS_FILE"]))) == [
        "kohaku-overlay.prom"]          # the tmp file was renamed, not left beside it
    agent.beat()
    assert len(agent.links.calls) == 2
    assert promkit.value(read(cfg)[1], "kohaku_overlay_runner_interface_receive_bytes_total",
                         device="vxlan0", **me) == 2000


def test_the_write_is_atomic_tmp_and_rename_in_the_same_folder(agent, cfg, mocker):
    mocker.patch.object(runner, "heartbeat")
    replaced = []
    real = os.replace

    def spy(a, b):
        replaced.append((a, b))
        return real(a, b)
    mocker.patch.object(runner.os, "replace", side_effect=spy)
    agent.beat()
    assert [r for r in replaced if r[1].endswith(".prom")] == [
        (cfg["OVERLAY_METRICS_FILE"] + ".tmp", cfg["OVERLAY_METRICS_FILE"])]


def test_counters_follow_the_events_and_never_go_down_within_one_serve(agent, cfg, mocker):
    me = {"runner_name": "runner1"}
    seen = []
    outcomes = [None, runner.HostUnreachable("refused"), runner.NotRegistered("gone"),
                runner.OverlayError("boom"), None, None]
    mocker.patch.object(runner, "heartbeat", side_effect=outcomes)
    mocker.patch.object(runner, "register", return_value=runner.parse_allocation(ALLOC))
    agent.build.return_value = ["FORWARD accept rules for 10.0.0.0/8 moved to the top",
                                "vxlan0 set up"]
    for _ in outcomes:
        agent.beat()
        seen.append(read(cfg)[1])
    final = seen[-1]
    hb = "kohaku_overlay_runner_heartbeats_total"
    assert [promkit.value(final, hb, result=r, **me) for r in runner.HEARTBEAT_RESULTS] == [
        3, 1, 1, 1]
    assert promkit.value(final, "kohaku_overlay_runner_registrations_total", kind="again",
                         **me) == 1
    assert promkit.value(final, "kohaku_overlay_runner_repairs_total", kind="rules", **me) == 2
    assert promkit.value(final, "kohaku_overlay_runner_repairs_total", kind="device", **me) == 2
    assert promkit.value(final, "kohaku_overlay_runner_repairs_total", kind="zone", **me) == 0
    assert promkit.value(final, "kohaku_overlay_runner_overlay_up", **me) == 1
    for before, after in zip(seen, seen[1:]):
        for name, fam in before.items():
            if fam.type == "counter":
                for key, v in fam.samples.items():
                    assert after[name].samples[key] >= v, (name, key)


def test_a_new_serve_starts_its_counters_from_zero(agent, cfg, mocker):
    mocker.patch.object(runner, "heartbeat")
    for _ in range(3):
        agent.beat()
    assert promkit.value(read(cfg)[1], "kohaku_overlay_runner_heartbeats_total", result="ok",
                         runner_name="runner1") == 3
    again = runner.Agent(cfg, stop=Stop(), notify=mocker.Mock())
    again.alloc, again.built = agent.alloc, True
    mocker.patch.object(runner.time, "time", return_value=agent.metrics.started + 60)
    again.metrics = runner.RunnerMetrics()
    again.beat()
    fams = read(cfg)[1]
    assert promkit.value(fams, "kohaku_overlay_runner_heartbeats_total", result="ok",
                         runner_name="runner1") == 1
    assert promkit.value(fams, "kohaku_overlay_runner_start_time_seconds",
                         runner_name="runner1") == agent.metrics.started + 60


def test_a_failed_write_is_one_warning_and_serve_goes_on(agent, cfg, mocker, caplog, tmp_path):
    mocker.patch.object(runner, "heartbeat")
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg["OVERLAY_METRICS_FILE"] = str(blocker / "x.prom")        # a folder that is a file
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            agent.beat()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        "cannot write the metrics file %s/x.prom" % blocker)


def test_no_metrics_file_means_no_probe_and_no_file(agent, cfg, mocker, tmp_path):
    mocker.patch.object(runner, "heartbeat")
    cfg["OVERLAY_METRICS_FILE"] = ""
    agent.beat()
    assert agent.links.calls == []


def test_direct_peers_get_a_path_state_series_when_given():
    m = runner.RunnerMetrics()
    cfg = dict(runner.KEY_DEFAULTS, RUNNER_NAME="runner1")
    fams = m.families(cfg, runner.parse_allocation(ALLOC), {}, peers=[
        ({"peer": "runner2", "peer_id": 2}, 1), ({"peer": "runner3", "peer_id": 3}, 0)])
    text = runner.render_metrics(fams)
    promkit.promtool_check(text)
    assert promkit.samples(promkit.parse(text), "kohaku_overlay_runner_peer_direct") == [
        ({"peer": "runner2", "peer_id": "2", "runner_name": "runner1"}, 1),
        ({"peer": "runner3", "peer_id": "3", "runner_name": "runner1"}, 0)]
    assert "kohaku_overlay_runner_peer_direct" not in runner.render_metrics(
        m.families(cfg, None, {}))


@pytest.mark.parametrize("value", ["relative/x.prom", "/var/lib/node_exporter/x.txt"])
def test_metrics_file_must_be_an_absolute_prom_path(tmp_path, value):
    conf = tmp_path / "runner_config.py"
    conf.write_text("HOST_ADDRESS = '198.51.100.1'\nOVERLAY_METRICS_FILE = %r\n" % value)
    with pytest.raises(runner.ConfigError) as e:
        runner.load_config(str(conf))
    assert str(e.value).startswith("OVERLAY_METRICS_FILE in runner_config.py is %r, not an "
                                   "absolute path ending in .prom" % value)


def test_dry_run_writes_no_metrics(cfg, mocker):
    links = Links()
    mocker.patch.object(runner, "run", side_effect=links)
    mocker.patch.object(runner, "DRY_RUN", True)
    assert runner.RunnerMetrics().write(cfg, runner.parse_allocation(ALLOC)) is False
    assert links.calls == [] and not os.path.exists(cfg["OVERLAY_METRICS_FILE"])


# ---- the check script's --prometheus ----------------------------------------------------------

fake = test_check.fake                  # the check tests' scripted node (patches chk's doors)
HOST_CFG, healthy_host, f_host_ip_forward = (test_check.HOST_CFG, test_check.healthy_host,
                                             test_check.f_host_ip_forward)


def check_prometheus(fake, node, *extra):
    fake.node = node
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = chk.main(["--role", node.role, "--config", HOST_CFG, "--prometheus"] + list(extra))
    return rc, out.getvalue()


def test_check_prometheus_output_is_one_series_per_check_with_its_status(fake):
    rc, text = check_prometheus(fake, healthy_host())
    assert rc == 0
    promkit.promtool_check(text)
    fams = promkit.parse(text)
    status = promkit.samples(fams, "kohaku_overlay_check_status", role="host")
    ids = [c.id("host") for c in chk.checks_for("host")]
    assert sorted(d["check"] for d, _ in status) == sorted(ids)      # each check exactly once
    assert all(v == 1 for _, v in status)
    by_id = dict((d["check"], d["status"]) for d, _ in status)
    assert by_id["host.ip_forward"] == "PASS"
    assert by_id["host.firewalld.trusted"] == "SKIP"
    counts = dict((d["status"], v)
                  for d, v in promkit.samples(fams, "kohaku_overlay_check_results"))
    assert counts == {"PASS": len(ids) - 5, "WARN": 0, "FAIL": 0, "SKIP": 5}   # firewalld, wg
    assert promkit.samples(fams, "kohaku_overlay_check_info") == [
        ({"role": "host", "version": chk.__version__}, 1)]


def test_check_prometheus_shows_a_failure_and_keeps_the_exit_code(fake):
    node = healthy_host()
    f_host_ip_forward(node)
    rc, text = check_prometheus(fake, node)
    assert rc == 1
    fams = promkit.parse(text)
    assert promkit.value(fams, "kohaku_overlay_check_status", role="host",
                         check="host.ip_forward", status="FAIL") == 1
    assert promkit.value(fams, "kohaku_overlay_check_results", role="host", status="FAIL") >= 1


def test_check_json_and_prometheus_together_are_bad_usage(fake, capsys):
    fake.node = healthy_host()
    assert chk.main(["--role", "host", "--config", HOST_CFG, "--json", "--prometheus"]) == 2


def test_check_label_values_are_escaped():
    text = chk.render_metrics([("x", "gauge", "h", [({"check": 'a"b\\c\nd'}, 1)])])
    assert promkit.samples(promkit.parse(text), "x") == [({"check": 'a"b\\c\nd'}, 1)]


# ---- the Host's GET /metrics ------------------------------------------------------------------

host = test_host.host                   # the module test_host's helpers build hubs of
isolated = test_host.isolated           # autouse: no dry-run, no firewalld, ip_forward 1
AUTH = test_host.AUTH
HOST_LINKS = ["ip", "-s", "-j", "link", "show"]


def host_links(n, extra=()):
    """`ip -s -j link show` of a Host with vxkr1..vxkrN (runner k: rx k*1000, tx k*2000)."""
    links = [stats_link("lo", 1, 1), stats_link("eth0", 9, 9), stats_link("kohaku-host")]
    links += [stats_link(host.Layout.device(k), k * 1000, k * 2000, k, 2 * k)
              for k in range(1, n + 1)]
    return json.dumps(links + list(extra))


@pytest.fixture
def served(tmp_path, mocker):
    fake = test_host.FakeRun()
    mocker.patch.object(host, "run", fake)
    fake.answer(HOST_LINKS, (0, host_links(3), ""))
    hub = test_host.make_hub(tmp_path, chain=False)
    with test_host.writer_running(hub):
        yield host.Api(hub), hub, fake


def scrape(api, headers=AUTH):
    status, text = api.dispatch("GET", "/metrics", headers, None, "198.51.100.200")
    assert status == 200 and isinstance(text, host.MetricsText)
    return text, promkit.parse(text)


def counter_values(fams):
    """The process's own counters (not the kernel's tunnel counters, which follow devices)."""
    return dict(((name, key), v) for name, fam in fams.items()
                if fam.type in ("counter", "histogram") and "_tunnel_" not in name
                for key, v in fam.samples.items())


def test_host_metrics_show_the_hub_and_pass_promtool(served):
    api, hub, fake = served
    for k in (1, 2, 3):
        assert test_host.register(api, "runner%d" % k, "198.51.100.1%d" % k)[0] == 200
    assert api.dispatch("PUT", "/api/overlay/heartbeat/runner2", AUTH, b"", "198.51.100.12") \
        == (200, {"ok": True, "direct_routing": False, "peers_version": 0,
                  "encryption": "none"})
    with hub.lock:
        hub.beats["runner3"] -= 3600            # runner3 went quiet an hour ago
    before = len(fake.calls)
    text, fams = scrape(api)
    assert fake.calls[before:] == [HOST_LINKS]          # one process for every tunnel
    promkit.promtool_check(text)
    assert promkit.value(fams, "kohaku_overlay_runners", state="active") == 2
    assert promkit.value(fams, "kohaku_overlay_runners", state="inactive") == 1
    assert promkit.value(fams, "kohaku_overlay_free_ids") == 252
    assert promkit.value(fams, "kohaku_overlay_max_ids") == 255
    assert promkit.value(fams, "kohaku_overlay_runner_active", runner_name="runner3",
                         runner_id=3) == 0
    assert 3599 < promkit.value(fams, "kohaku_overlay_runner_heartbeat_age_seconds",
                                runner_name="runner3", runner_id=3) < 3700
    assert promkit.value(fams, "kohaku_overlay_runner_heartbeat_age_seconds",
                         runner_name="runner2", runner_id=2) < 60
    who = {"device": "vxkr2", "runner_name": "runner2", "runner_id": 2}
    assert promkit.value(fams, "kohaku_overlay_tunnel_receive_bytes_total", **who) == 2000
    assert promkit.value(fams, "kohaku_overlay_tunnel_transmit_bytes_total", **who) == 4000
    assert promkit.value(fams, "kohaku_overlay_tunnel_receive_packets_total", **who) == 2
    assert promkit.value(fams, "kohaku_overlay_tunnel_transmit_drops_total", **who) == 4
    assert promkit.value(fams, "kohaku_overlay_tunnel_receive_errors_total", **who) == 1
    devices = [d["device"] for d, _ in promkit.samples(
        fams, "kohaku_overlay_tunnel_transmit_bytes_total")]
    assert devices == ["vxkr1", "vxkr2", "vxkr3"]       # tunnels only, not lo/eth0/kohaku-host
    assert promkit.samples(fams, "kohaku_overlay_build_info") == [
        ({"encryption": "none", "mode": "hub", "version": host.__version__}, 1)]
    assert promkit.value(fams, "kohaku_overlay_state_write_duration_seconds",
                         "kohaku_overlay_state_write_duration_seconds_bucket", le="+Inf") >= 3


def test_host_counters_follow_the_events_and_never_go_down(served, tmp_path):
    api, hub, fake = served
    seen = [counter_values(scrape(api)[1])]

    def delta(name, **labels):
        key = (name, (name, tuple(sorted((k, str(v)) for k, v in labels.items()))))
        return seen[-1][key] - seen[0][key]

    test_host.register(api, "runner1", "198.51.100.11")
    seen.append(counter_values(scrape(api)[1]))
    api.dispatch("PUT", "/api/overlay/heartbeat/runner1", AUTH, b"", "198.51.100.11")
    api.dispatch("PUT", "/api/overlay/heartbeat/ghost", AUTH, b"", "198.51.100.11")   # 404
    test_host.register(api, "runner2", "198.51.100.12", mtu=1400)                      # 409
    test_host.register(api, "runner2", "198.51.100.12")
    api.dispatch("POST", "/api/overlay/release/runner2", AUTH, b"", "127.0.0.1")
    assert test_host.wait_for(lambda: 2 not in hub.allocs)
    seen.append(counter_values(scrape(api)[1]))
    status, _ = api.dispatch("GET", "/metrics", {"authorization": "Bearer wrong"}, None, "x")
    assert status == 401
    # a second hub in the same process (serve started again in it): nothing goes down
    hub2 = test_host.make_hub(tmp_path / "again", chain=False)
    seen.append(counter_values(scrape(host.Api(hub2))[1]))
    for earlier, later in zip(seen, seen[1:]):
        for key, v in earlier.items():
            assert later.get(key, 0) >= v, key
    assert delta("kohaku_overlay_registrations_total") == 2
    assert delta("kohaku_overlay_heartbeats_total") == 1
    assert delta("kohaku_overlay_releases_total", how="release") == 1
    # refusals reach the counter where the answer is sent (http_response), by reason
    for status, answer in ((404, {"error": "x"}), (409, {"error": "x"}), (401, {"error": "x"}),
                           (503, {"error": "no free runner id: all 255 are held"})):
        host.http_response(status, answer)
    last = counter_values(scrape(api)[1])
    refused = "kohaku_overlay_refused_requests_total"
    for reason in ("not_found", "settings_mismatch", "unauthorized", "no_free_id"):
        key = (refused, (refused, (("reason", reason),)))
        assert last[key] >= seen[0][key] + 1, reason


def test_a_new_host_process_starts_every_counter_at_zero(tmp_path):
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('h', sys.argv[1])\n"
            "h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h)\n"
            "print(h.render_metrics(h.counter_families(*h.METRICS.snapshot())), end='')\n")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "kohaku_overlay_host.py")],
                         stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    promkit.promtool_check(out)
    values = counter_values(promkit.parse(out))
    assert len(values) > 10 and set(values.values()) == {0}


def test_metrics_need_the_token_and_come_as_prometheus_text(served):
    api, hub, fake = served
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic x"}):
        status, answer = api.dispatch("GET", "/metrics", headers, None, "198.51.100.200")
        assert status == 401 and "bearer token" in answer["error"]
    assert api.dispatch("POST", "/metrics", AUTH, b"", "x")[0] == 405
    with test_host.api_server(api.dispatch) as srv:
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", "/metrics", headers={"Authorization": AUTH["authorization"]})
        resp = conn.getresponse()
        body = resp.read().decode()
        conn.close()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
        promkit.parse(body)
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 401
        conn.close()


def test_without_a_token_metrics_are_open_like_every_endpoint(tmp_path, mocker):
    fake = test_host.FakeRun()
    mocker.patch.object(host, "run", fake)
    fake.answer(HOST_LINKS, (0, host_links(0), ""))
    hub = test_host.make_hub(tmp_path, OVERLAY_TOKEN="")
    assert host.Api(hub).dispatch("GET", "/metrics", {}, None, "x")[0] == 200


def test_a_slow_scrape_does_not_hold_up_registrations(served):
    api, hub, fake = served
    started, release = threading.Event(), threading.Event()

    def slow_links(argv, input):
        started.set()
        release.wait(10)
        return 0, host_links(1), ""
    fake.answer(HOST_LINKS, slow_links)
    scraper = threading.Thread(target=scrape, args=(api,))
    scraper.start()
    try:
        assert started.wait(5)
        t0 = time.monotonic()
        assert test_host.register(api, "runner1", "198.51.100.11")[0] == 200
        assert api.dispatch("GET", "/api/overlay/status", AUTH, None, "x")[0] == 200
        assert time.monotonic() - t0 < 2
    finally:
        release.set()
        scraper.join(10)
    assert not scraper.is_alive()


def test_255_tunnels_in_one_scrape_with_one_process(tmp_path, mocker):
    fake = test_host.FakeRun()
    mocker.patch.object(host, "run", fake)
    fake.answer(HOST_LINKS, (0, host_links(255), ""))
    hub = test_host.make_hub(tmp_path, allocs=dict(
        (k, test_host.alloc(k, "r%d" % k, "198.51.%d.%d" % (100 + k // 200, k % 200 + 1)))
        for k in range(1, 256)))
    text, fams = scrape(host.Api(hub))
    assert fake.calls == [HOST_LINKS]
    assert len(promkit.samples(fams, "kohaku_overlay_tunnel_receive_bytes_total")) == 255
    assert promkit.value(fams, "kohaku_overlay_free_ids") == 0
    assert promkit.value(fams, "kohaku_overlay_runners", state="inactive") == 255
    promkit.promtool_check(text)


def test_repairs_are_counted_by_kind_but_not_the_start_up_build(tmp_path, mocker, isolated):
    fake = test_host.FakeRun()
    mocker.patch.object(host, "run", fake)
    hub = test_host.make_hub(tmp_path, chain=False)
    hub.allocs = hub.store.update(lambda a: a.update({1: test_host.alloc(1, "r1",
                                                                         "198.51.100.11")}))
    fake.answer(test_host.IPT_S, (0, test_host.CLEAN_RULES, ""))

    def repairs():
        values = host.METRICS.snapshot()[0]
        return dict((k, values.get(("repairs", k), 0)) for k in host.REPAIR_KINDS)
    before = repairs()
    hub.kernel.links = {}
    hub.reconcile(startup=True)
    assert repairs() == before
    isolated["ip_forward"] = "0\n"
    fake.answer(test_host.IP_SHOW, (0, test_host.CAPTURED_LINKS, ""))
    fake.answer(test_host.IPT_S, (0, test_host.CAPTURED_RULES_BURIED, ""))
    hub.allocs = hub.store.update(lambda a: a.update({2: test_host.alloc(2, "r2",
                                                                         "198.51.100.12")}))
    assert hub.reconcile() == ["net.ipv4.ip_forward=1", "vxkra", "iptables rules"]
    after = repairs()
    assert dict((k, after[k] - before[k]) for k in after) == {
        "device": 1, "rules": 1, "zone": 0, "sysctl": 1}


def test_state_writes_are_timed_and_a_failed_write_is_counted(tmp_path, mocker):
    store = host.StateStore(str(tmp_path / "s" / "state.json"))
    count = lambda: host.METRICS.snapshot()[1]            # noqa: E731
    before = sum(count())
    store.update(lambda a: None)
    store.update(lambda a: None)
    assert sum(count()) == before + 2
    failures = host.METRICS.snapshot()[0].get(("state_write_failures", None), 0)
    mocker.patch.object(host.os, "fsync", side_effect=OSError(28, "No space left on device"))
    with pytest.raises(OSError):
        store.update(lambda a: None)
    assert host.METRICS.snapshot()[0][("state_write_failures", None)] == failures + 1


@pytest.mark.parametrize("status, error, reason", [
    (400, "bad", "bad_request"), (401, "x", "unauthorized"), (404, "x", "not_found"),
    (409, "x", "settings_mismatch"), (413, "x", "too_large"), (408, "x", "timeout"),
    (503, "no free runner id: all 255 are held by active runners", "no_free_id"),
    (503, "the overlay is disabled on this host", "disabled"),
    (503, "the host is busy: try again", "busy"), (418, "x", "http_418")])
def test_refusal_reasons(status, error, reason):
    assert host.refusal_reason(status, {"error": error}) == reason


def test_host_and_runner_writers_escape_alike():
    fam = ("x_total", "counter", "Help \\ and\nmore.", [({"a": 'q"\\\n'}, 1)])
    assert host.render_metrics([host.Family(*fam)]) == runner.render_metrics([runner.Family(*fam)])


# ---- the examples in contrib/prometheus (README shows them) ----------------------------------

CONTRIB = ROOT / "contrib" / "prometheus"


def promtool(*args):
    promkit.promtool_check("")                  # skip (fail under CI) without promtool
    return subprocess.run(["promtool"] + [str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)


def test_the_example_scrape_config_and_rules_are_valid():
    res = promtool("check", "config", CONTRIB / "prometheus.yml")
    assert res.returncode == 0, res.stdout
    assert "1 rule files found" in res.stdout


def test_the_readme_shows_the_example_files_as_they_are():
    readme = (ROOT / "README.md").read_text()
    for name in ("prometheus.yml", "kohaku-overlay.rules.yml"):
        assert "```yaml\n" + (CONTRIB / name).read_text() + "```\n" in readme, name


def series(name, values, **labels):
    labels.setdefault("instance", "host:8000")
    return {"series": "%s{%s}" % (name, ",".join('%s="%s"' % kv for kv in sorted(
        labels.items()))), "values": values}


def alert(labels, summary, description):
    return {"exp_labels": labels,
            "exp_annotations": {"summary": summary, "description": description}}


def test_the_three_alerts_fire_on_what_they_are_for_and_not_otherwise(tmp_path):
    """promtool test rules: each alert on made-up series, once firing and once quiet."""
    r1 = {"runner_name": "runner1", "runner_id": "1"}
    tunnel = dict(r1, device="vxkr1")
    inactive = ("No heartbeat reached the Host for over OVERLAY_INACTIVE_AFTER; run "
                "kohaku_overlay_check.py --role runner on it.")
    repairs = ("Find what undoes the overlay (journalctl -u kohakuriver-overlay-host / -runner "
               "shows each repair).")
    blocked = ("UDP 4789 is likely blocked between Host and runner; kohaku_overlay_check.py "
               "names the check that fails.")
    tests = {"rule_files": [str(CONTRIB / "kohaku-overlay.rules.yml")],
             "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": [
                 series("kohaku_overlay_runner_active", "1 1 0 0 0 0 0", **r1),
                 series("kohaku_overlay_runner_active", "1 1 1 1 1 1 1", runner_name="runner2",
                        runner_id="2"),
                 series("kohaku_overlay_repairs_total", "0 0 1 2 3 4 5", kind="rules"),
                 series("kohaku_overlay_repairs_total", "0 0 0 0 0 0 0", kind="zone"),
                 series("kohaku_overlay_tunnel_transmit_packets_total", "0+60x30", **tunnel),
                 series("kohaku_overlay_tunnel_receive_packets_total", "0x30", **tunnel),
                 series("kohaku_overlay_tunnel_transmit_packets_total", "0+60x30",
                        runner_name="runner2", runner_id="2", device="vxkr2"),
                 series("kohaku_overlay_tunnel_receive_packets_total", "0+60x30",
                        runner_name="runner2", runner_id="2", device="vxkr2"),
             ], "alert_rule_test": [
                 {"eval_time": "3m", "alertname": "KohakuOverlayRunnerInactive",
                  "exp_alerts": []},
                 {"eval_time": "5m", "alertname": "KohakuOverlayRunnerInactive", "exp_alerts": [
                     alert(dict(r1, instance="host:8000", severity="warning"),
                           "runner runner1 (id 1) is inactive", inactive)]},
                 {"eval_time": "2m", "alertname": "KohakuOverlayRepairsGrowing",
                  "exp_alerts": []},
                 {"eval_time": "6m", "alertname": "KohakuOverlayRepairsGrowing", "exp_alerts": [
                     alert({"instance": "host:8000", "kind": "rules", "severity": "warning"},
                           "host:8000: 5 rules repairs in 30 minutes", repairs)]},
                 {"eval_time": "8m", "alertname": "KohakuOverlayTunnelTxNoRx",
                  "exp_alerts": []},
                 {"eval_time": "20m", "alertname": "KohakuOverlayTunnelTxNoRx", "exp_alerts": [
                     alert(dict(tunnel, instance="host:8000", severity="critical"),
                           "vxkr1 of runner1 sends but receives nothing", blocked)]},
             ]}]}
    path = tmp_path / "alerts_test.yml"
    path.write_text(json.dumps(tests, indent=1))        # JSON is YAML
    res = promtool("test", "rules", path)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout


def test_ci_install_refuses_a_prometheus_daemon_in_the_root_namespace(tmp_path):
    import test_lab_hygiene as hygiene
    root, lab = "net:[4026531840]", "net:[4026532999]"
    proc = hygiene.fake_proc(tmp_path, {11: ("prometheus", root), 12: ("prometheus", lab)})
    assert hygiene.root_daemons(proc=proc) == ["11 prometheus"]   # the lab's own is not one


def test_the_direct_peers_path_state_reaches_the_textfile(cfg, mocker):
    mocker.patch.object(runner, "run", side_effect=Links())
    a = runner.Agent(cfg, stop=Stop(), notify=mocker.Mock())
    a.alloc = test_direct.direct_alloc()
    a.peers = test_direct.table(2, 3)
    a.paths = {"runner2": {"path": "direct", "since": 1.0},
               "runner3": {"path": "relayed", "since": 2.0}}
    assert a.metrics.write(cfg, a.alloc, a.metric_peers()) is True
    text, fams = read(cfg)
    promkit.promtool_check(text)
    assert promkit.samples(fams, "kohaku_overlay_runner_peer_direct") == [
        ({"peer": "runner2", "peer_id": "2", "runner_name": "runner1"}, 1),
        ({"peer": "runner3", "peer_id": "3", "runner_name": "runner1"}, 0)]
    a.alloc = test_runner.alloc()               # direct routing off: no such series
    assert a.metric_peers() is None


def test_build_info_says_direct_when_direct_routing_is_on(tmp_path, mocker):
    fake = test_host.FakeRun()
    mocker.patch.object(host, "run", fake)
    fake.answer(HOST_LINKS, (0, host_links(0), ""))
    hub = test_host.make_hub(tmp_path, OVERLAY_DIRECT_ROUTING=True)
    text, fams = scrape(host.Api(hub))
    assert promkit.samples(fams, "kohaku_overlay_build_info") == [
        ({"encryption": "none", "mode": "direct", "version": host.__version__}, 1)]


def test_a_failed_link_read_still_serves_the_rest(served, caplog):
    api, hub, fake = served
    test_host.register(api, "runner1", "198.51.100.11")
    fake.answer(HOST_LINKS, (1, "", "Cannot open netlink socket"))
    with caplog.at_level(logging.WARNING):
        text, fams = scrape(api)
    promkit.promtool_check(text)
    assert promkit.value(fams, "kohaku_overlay_tunnel_stats_ok") == 0
    assert promkit.value(fams, "kohaku_overlay_runners", state="active") == 1
    assert promkit.samples(fams, "kohaku_overlay_tunnel_receive_bytes_total") == []
    assert "GET /metrics without the tunnel counters" in caplog.text
    fake.answer(HOST_LINKS, (0, host_links(1), ""))
    assert promkit.value(scrape(api)[1], "kohaku_overlay_tunnel_stats_ok") == 1
