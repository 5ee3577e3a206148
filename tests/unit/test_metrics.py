"""Unit tests of the Prometheus figures: the runner's textfile and the check script's
--prometheus, checked line by line with promkit's strict reader and with `promtool check metrics`
(Debian's prometheus package, always installed in CI)."""

import contextlib
import importlib.util
import io
import json
import logging
import os
import stat
from pathlib import Path

import pytest

import kohaku_overlay_check as chk        # the module test_check's fake patches
import promkit
import test_check

ROOT = Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, str(ROOT / (name + ".py")))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = load("kohaku_overlay_runner")

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
    assert counts == {"PASS": len(ids) - 2, "WARN": 0, "FAIL": 0, "SKIP": 2}
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
