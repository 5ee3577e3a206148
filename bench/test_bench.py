"""Unit tests of the bench's own logic (no root, no lab): python3 -m pytest bench/ -q"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agent  # noqa: E402
import procs  # noqa: E402
import run  # noqa: E402


@pytest.fixture
def fake_tools(tmp_path):
    """A folder with a fake `ip` that echoes its argv and stdin and exits 3."""
    real = tmp_path / "real"
    real.mkdir()
    ip = real / "ip"
    ip.write_text('#!/bin/sh\necho "argv0=${0##*/} args=$*"\n'
                  'while IFS= read -r line; do echo "$line"; done\nexit 3\n')
    ip.chmod(0o755)
    return real


def test_shim_logs_tag_and_parent_and_keeps_argv_stdin_and_exit_code(tmp_path, fake_tools):
    shims = procs.Shims(tmp_path / "shims", path=str(fake_tools))
    assert shims.tools == ["ip"]
    mark = shims.mark()
    env = dict(os.environ, PATH=shims.path, **{procs.TAG_VAR: "host"})
    res = subprocess.run(["ip", "-batch", "-"], input="link del x\n", env=env,
                         stdout=subprocess.PIPE, universal_newlines=True)
    assert res.returncode == 3
    assert res.stdout == "argv0=ip args=-batch -\nlink del x\n"
    assert shims.since(mark, "host") == [("ip", "-batch -")]
    assert shims.since(mark, "host", ppid=os.getpid()) == [("ip", "-batch -")]
    assert shims.since(mark, "host", not_ppid=os.getpid()) == []
    assert shims.since(mark, "runner") == []
    assert shims.since(shims.mark(), "host") == []


def test_untagged_calls_are_logged_as_dash_and_never_counted(tmp_path, fake_tools):
    shims = procs.Shims(tmp_path / "shims", path=str(fake_tools))
    env = dict(os.environ, PATH=shims.path)
    env.pop(procs.TAG_VAR, None)
    subprocess.run(["ip", "link"], env=env, stdout=subprocess.DEVNULL, input="")
    assert shims.since(0, "-") == [("ip", "link")]
    assert shims.since(0, "host") == []


def test_env_context_sets_and_restores_path_and_tag(tmp_path, fake_tools):
    shims = procs.Shims(tmp_path / "shims", path=str(fake_tools))
    before = os.environ.get("PATH")
    os.environ.pop(procs.TAG_VAR, None)
    with procs.Env(shims, "check"):
        assert os.environ["PATH"].split(":")[0] == str(tmp_path / "shims")
        assert os.environ[procs.TAG_VAR] == "check"
    assert os.environ.get("PATH") == before
    assert procs.TAG_VAR not in os.environ


def test_summarize_counts_tool_and_first_argument():
    spawned = [("ip", "-j -d addr show"), ("iptables", "-S"), ("ip", "-j -d addr show"),
               ("ip", "-force -batch -")]
    assert run.summarize(spawned) == "ip -force x1, ip -j x2, iptables -S x1"
    assert run.summarize([]) == "none"


def test_results_render_counts_verdicts_and_keeps_notes():
    r = run.Results()
    r.add("control plane", "burst", "0.6 s", "raw", "< 5 s", True)
    r.add("control plane", "restart", "0.5 s", "", "< 0.4 s", False)
    r.add("data plane", "ratio", "0.55")
    r.note("a note")
    text = r.render("header")
    assert text.splitlines()[0] == "header"
    assert "targets: 1 PASS, 1 MISS" in text
    assert "note: a note" in text
    assert [row["verdict"] for row in r.rows] == ["PASS", "MISS", ""]


def test_a_failed_phase_is_a_row_and_an_error():
    r = run.Results()
    r.error("burst", run.labkit.LabError("agent failed\nsecond line"))
    assert r.rows[0]["verdict"] == "ERROR"
    assert r.errors == ["burst: agent failed / second line"]
    assert "1 phase(s) failed" in r.render("h")


def test_number_formats():
    assert run.fmt_ms(0.000137) == "137 us"
    assert run.fmt_ms(0.2901) == "290.1 ms"
    assert run.fmt_gbps(8.32e9) == "8.32 Gbit/s"
    assert run.fmt_r(None) == "n/a"
    assert run.fmt_r(0.8974) == "0.897"
    assert run.ratio(1.0, 0) is None
    assert run.median([3, None, 1, 2]) == 2


def test_agent_url_split():
    assert agent._split("http://198.51.100.1:8000") == ("198.51.100.1", 8000)
    assert agent._split("http://127.0.0.1:8000/") == ("127.0.0.1", 8000)


def test_bad_usage_exits_2_before_anything_is_built(capsys):
    assert run.main(["--phases", "up,nope"]) == 2
    assert "unknown phase nope" in capsys.readouterr().err
    assert run.main(["--reps", "-1"]) == 2


IPTABLES_S = """-P INPUT ACCEPT
-N KOHAKU-VXLAN
-N KOHAKU-VXLAN-c6336400-25
-A INPUT -p udp -m udp --dport 4789 -m comment --comment kohaku-overlay -j KOHAKU-VXLAN
-A KOHAKU-VXLAN -s 198.51.100.1/32 -j ACCEPT
-A KOHAKU-VXLAN -s 198.51.100.0/25 -j KOHAKU-VXLAN-c6336400-25
-A KOHAKU-VXLAN -s 198.51.100.200/32 -j ACCEPT
-A KOHAKU-VXLAN -j DROP
-A KOHAKU-VXLAN-c6336400-25 -s 198.51.100.11/32 -j ACCEPT
-A KOHAKU-VXLAN-c6336400-25 -s 198.51.100.12/32 -j ACCEPT
"""


def test_rules_walked_follows_the_tree_of_filter_chains():
    chains = run.filter_chains(IPTABLES_S)
    assert sorted(chains) == ["KOHAKU-VXLAN", "KOHAKU-VXLAN-c6336400-25"]
    assert len(chains["KOHAKU-VXLAN"]) == 4
    assert run.rules_walked(chains, "198.51.100.1") == 1
    assert run.rules_walked(chains, "198.51.100.12") == 2 + 2
    assert run.rules_walked(chains, "198.51.100.200") == 3
    # an address of the /25 that has no rule: back from the sub-chain, on to the DROP
    assert run.rules_walked(chains, "198.51.100.50") == 2 + 2 + 2
    assert run.rules_walked({}, "198.51.100.1") is None
