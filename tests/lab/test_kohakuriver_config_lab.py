"""KohakuRiver's own config files run a real cluster (issue 11.13).

The Host and the Runner start with files in the shape `kohakuriver init config --generate`
writes (tests/fixtures/kohakuriver/: docstring, imports of modules that are not installed here,
`list[str]`, `LogLevel.INFO`, `def config_gen():`) with the lab's overlay lines appended, as an
operator appends them. Before the fix both daemons refused the file ("remove it"). The runner's
file keeps KohakuRiver's HEARTBEAT_INTERVAL_SECONDS and has no HEARTBEAT_INTERVAL: it must
heartbeat at that interval. A second Host `serve` on the port the first one holds (KohakuRiver's
own host listens on 8000) fails in one sentence naming HOST_PORT.
"""

import json
import re
import time

import pytest

import labkit

FIXTURES = labkit.REPO / "tests" / "fixtures" / "kohakuriver"
PORT_TAKEN = ("HOST_PORT 8000 is already in use on 0.0.0.0 (KohakuRiver's own host listens on "
              "8000 by default): set HOST_PORT to a free port in the Host's config and the same "
              "HOST_PORT in every runner's config")


def kohakuriver_file(path, fixture, replace=()):
    """KohakuRiver's generated file (the fixture) with the lab's lines appended after it."""
    text = (FIXTURES / fixture).read_text()
    for old, new in replace:
        assert old in text
        text = text.replace(old, new)
    lab_lines = path.read_text()
    path.write_text(text + "\n# ---- the lab's overlay lines ----\n" + lab_lines)
    return path


@pytest.fixture(scope="module")
def cluster():
    labkit.require(docker=False)
    with labkit.Lab(runners=1, docker=False) as c:
        c.files = {"host": kohakuriver_file(c.host_config(), "host_config.py"),
                   "runner1": kohakuriver_file(c.runner_config(1, HEARTBEAT_INTERVAL=None),
                                               "runner_config.py",
                                               [("HEARTBEAT_INTERVAL_SECONDS: int = 5",
                                                 "HEARTBEAT_INTERVAL_SECONDS: int = 1")])}
        c.start_host()
        c.start_runner(1)
        c.wait_active(["runner1"])
        yield c


def test_host_and_runner_run_from_kohakurivers_files(cluster):
    c = cluster
    config = c.files["runner1"].read_text()
    assert "def config_gen():" in config and "LogLevel.INFO" in config
    assert "HEARTBEAT_INTERVAL =" not in config and "HEARTBEAT_INTERVAL:" not in config
    st = c.status()
    assert [(a["runner_name"], a["runner_id"], a["active"]) for a in st["allocations"]] == [
        ("runner1", 1, True)]
    for name in ("host", "runner1"):
        log = c.log_tail(name, lines=400)
        assert re.findall(r"unknown key|Traceback|must be|is set by", log) == [], log


def test_the_runner_heartbeats_at_kohakurivers_interval(cluster):
    """HEARTBEAT_INTERVAL_SECONDS = 1 (ours unset): four heartbeats within 9 s; at our default
    of 5 s there would be at most three distinct last_seen values in that time."""
    c = cluster
    seen = set()

    def heard():
        seen.add(c.status()["allocations"][0]["last_seen"])
        return len(seen) >= 4

    start = time.monotonic()
    c.wait_for(heard, timeout=9, interval=0.3, what="four heartbeats", log=["runner1", "host"])
    assert time.monotonic() - start < 9.5


def test_the_check_reads_both_files_without_a_word(cluster):
    c = cluster
    for node, check_id in ((c.host, "host.config.file"), (c.runners[0], "runner.config.file")):
        res = c.script(node, "check", "--json")
        report = json.loads(res.stdout)
        row = [r for r in report["results"] if r["id"] == check_id]
        assert [r["status"] for r in row] == ["PASS"], row
        assert "other keys ignored" in row[0]["detail"]


def test_a_second_serve_on_the_taken_host_port_names_the_key(cluster):
    c = cluster
    other = c.host.workdir / "second_host_config.py"
    other.write_text(c.files["host"].read_text() + "\nOVERLAY_ENABLED = False\n"
                     "OVERLAY_STATE_FILE = %r\n" % str(c.host.workdir / "second-state.json"))
    res = c.script(c.host, "host", "serve", "--config", other, timeout=30)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "error: " + PORT_TAKEN
    assert c.proc_running("host")
