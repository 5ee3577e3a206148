"""Unit tests of the bench's own logic (no root, no lab): python3 -m pytest bench/ -q"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agent  # noqa: E402
import measure  # noqa: E402
import phases  # noqa: E402
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
    assert procs.summarize(spawned) == "ip -force x1, ip -j x2, iptables -S x1"
    assert procs.summarize([]) == "none"


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
    assert measure.fmt_ms(0.000137) == "137 us"
    assert measure.fmt_ms(0.2901) == "290.1 ms"
    assert measure.fmt_gbps(8.32e9) == "8.32 Gbit/s"
    assert measure.fmt_r(None) == "n/a"
    assert measure.fmt_r(0.8974) == "0.897"
    assert measure.ratio(1.0, 0) is None
    assert measure.median([3, None, 1, 2]) == 2


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
    chains = measure.filter_chains(IPTABLES_S)
    assert sorted(chains) == ["KOHAKU-VXLAN", "KOHAKU-VXLAN-c6336400-25"]
    assert len(chains["KOHAKU-VXLAN"]) == 4
    assert measure.rules_walked(chains, "198.51.100.1") == 1
    assert measure.rules_walked(chains, "198.51.100.12") == 2 + 2
    assert measure.rules_walked(chains, "198.51.100.200") == 3
    # an address of the /25 that has no rule: back from the sub-chain, on to the DROP
    assert measure.rules_walked(chains, "198.51.100.50") == 2 + 2 + 2
    assert measure.rules_walked({}, "198.51.100.1") is None


# ---- phases: registered once, dependencies declared once ----

def test_every_phase_is_registered_once_with_a_summary_and_runs_in_registry_order():
    names = [p.name for p in phases.all_phases()]
    assert names == ["up", "data", "why", "burst", "data255", "check", "scrape", "restart",
                     "cost", "wg", "bisect"]
    for p in phases.all_phases():
        assert p.summary and callable(p.run), p.name
        assert all(n in names[:names.index(p.name)] for n in p.needs), p.name


def docstring_phases():
    """{name: its text} of the Phases list in bench/run.py's docstring, in order."""
    block = run.__doc__.split("\nPhases (")[1].split("\n\n")[0].splitlines()[1:]
    entries = []
    for line in block:
        if line.startswith("    ") and not line.startswith("     "):
            name, text = line.split(None, 1)
            entries.append([name, text])
        elif line.startswith("     ") and entries:
            entries[-1][1] += " " + line.strip()
        else:
            break
    return entries


def test_the_docstring_lists_every_phase_in_order_with_its_needs():
    entries = docstring_phases()
    assert [name for name, _ in entries] == [p.name for p in phases.all_phases()]
    for (name, text), p in zip(entries, phases.all_phases()):
        assert ("needs %s" % " and ".join(p.needs) in text) == bool(p.needs), name
        assert ("full run" in text) == (not p.quick), name


def test_help_lists_every_phase_with_its_needs():
    text = run.build_parser().format_help()
    for p in phases.all_phases():
        assert "  %-8s %s" % (p.name, p.summary) in text
    assert "needs data" in text and "full run only" in text


@pytest.mark.parametrize("asked, quick, want", [
    (None, False, ["up", "data", "why", "burst", "data255", "check", "scrape", "restart",
                   "cost", "wg", "bisect"]),
    (None, True, ["up", "data", "burst", "check", "scrape", "restart", "cost"]),
    (["cost", "up"], False, ["up", "cost"]),                 # always in registry order
    (["up", "data", "data255"], True, ["up", "data", "data255"]),   # asked for: kept
    (["burst", "check"], False, ["burst", "check"]),
])
def test_phase_selection(asked, quick, want):
    assert [p.name for p in phases.resolve(asked, quick=quick)] == want


@pytest.mark.parametrize("asked, message", [
    (["up", "data255"], "phase data255 needs data in the same run (it measures what data "
                        "leaves): use --phases up,data,data255"),
    (["data"], "phase data needs up in the same run (it measures what up leaves): "
               "use --phases up,data"),
    (["why", "burst"], "phase why needs data in the same run (it measures what data leaves): "
                       "use --phases up,data,why,burst"),
    (["up", "nope"], "unknown phase nope: choose from up, data, why, burst, data255, check, "
                     "scrape, restart, cost, wg, bisect"),
])
def test_a_selection_that_cannot_run_is_refused_in_one_sentence(asked, message):
    with pytest.raises(phases.UsageError) as exc:
        phases.resolve(asked)
    assert str(exc.value) == message


def test_main_refuses_a_missing_dependency_before_anything_is_built(capsys, monkeypatch):
    def no_lab(*a, **kw):
        raise AssertionError("the lab must not be built")
    monkeypatch.setattr(run.labkit, "Lab", no_lab)
    assert run.main(["--phases", "up,data255"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: phase data255 needs data in the same run (it measures what data "
                   "leaves): use --phases up,data,data255\n")


def test_a_new_phase_is_one_module_in_the_registry(tmp_path, monkeypatch):
    (tmp_path / "kbtestphase.py").write_text(
        '"""a phase added by a test\n\nMore words."""\n'
        'NEEDS = ("burst",)\nQUICK = False\n\n\ndef run(b):\n    b.r.add("s", "f", "1")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import kbtestphase
    registry = phases.REGISTRY + [kbtestphase]
    got = phases.all_phases(registry)[-1]
    assert (got.name, got.needs, got.quick, got.summary) == (
        "kbtestphase", ("burst",), False, "a phase added by a test")
    assert [p.name for p in phases.resolve(None, quick=True, registry=registry)][-1] == "cost"
    with pytest.raises(phases.UsageError):
        phases.resolve(["kbtestphase"], registry=registry)
    assert [p.name for p in phases.resolve(["burst", "kbtestphase"], registry=registry)] == [
        "burst", "kbtestphase"]


def test_no_note_or_docstring_of_the_bench_points_outside_the_repository():
    for path in sorted(Path(__file__).resolve().parent.glob("**/*.py")):
        if path.name == "test_bench.py":
            continue
        text = path.read_text()
        assert "../" not in text and "/work/" not in text, path
