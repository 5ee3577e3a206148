"""CI and lab hygiene (issue 10.8), no root needed: the root-daemon check of .ci/install, the
lab's private D-Bus config and its clean-up of the machine's bus files, and the one-step
iptables drift the lab tests inject.

The lab half of each (a real dbus-daemon, a real iptables-restore) is in
tests/lab/test_labkit_lab.py.
"""

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

import labkit

ROOT = Path(__file__).resolve().parent.parent.parent


# ---- .ci/install: root_daemons ----

def root_daemons(*names, proc=None):
    """Run .ci/install's root_daemons function (alone) -> its output lines."""
    text = (ROOT / ".ci" / "install").read_text()
    func = re.search(r"^root_daemons\(\) \{\n.*?^\}\n", text, re.S | re.M).group(0)
    env = dict(os.environ)
    if proc is not None:
        env["PROC"] = str(proc)
    res = subprocess.run(["bash", "-c", func + 'root_daemons "$@"', "root_daemons"]
                         + list(names), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, env=env, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def fake_proc(tmp_path, procs, me="net:[4026531840]"):
    """A /proc with `self` in namespace `me` and {pid: (comm, netns link)}."""
    proc = tmp_path / "proc"
    (proc / "self" / "ns").mkdir(parents=True)
    os.symlink(me, str(proc / "self" / "ns" / "net"))
    for pid, (comm, net) in procs.items():
        (proc / str(pid) / "ns").mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(comm + "\n")
        os.symlink(net, str(proc / str(pid) / "ns" / "net"))
    return proc


def test_root_daemons_finds_each_daemon_of_this_namespace_by_its_exact_name(tmp_path):
    root, other = "net:[4026531840]", "net:[4026532999]"
    proc = fake_proc(tmp_path, {
        101: ("dockerd", root), 102: ("containerd", root), 103: ("firewalld", root),
        104: ("dbus-daemon", root),
        201: ("dockerd", other),             # a lab's dockerd, in its own namespace
        301: ("containerd-shim", root),      # not exactly a daemon's name
        302: ("dockerd2", root), 303: ("python3", root), 304: ("bash", root),
    })
    assert sorted(root_daemons(proc=proc)) == ["101 dockerd", "102 containerd",
                                               "103 firewalld", "104 dbus-daemon"]
    assert root_daemons("firewalld", proc=proc) == ["103 firewalld"]


def test_root_daemons_is_empty_when_there_is_none(tmp_path):
    proc = fake_proc(tmp_path, {7: ("sleep", "net:[4026531840]")})
    assert root_daemons(proc=proc) == []


def test_root_daemons_finds_a_real_process_in_the_real_proc(tmp_path):
    # a harmless sleep under a name no daemon has (comm is the executable's file name)
    exe = tmp_path / "kohakuprobe"
    shutil.copy2(shutil.which("sleep"), str(exe))
    probe = subprocess.Popen([str(exe), "60"])
    try:
        assert "%d kohakuprobe" % probe.pid in root_daemons("kohakuprobe")
    finally:
        probe.kill()
        probe.wait()
    assert "%d kohakuprobe" % probe.pid not in root_daemons("kohakuprobe")


def test_install_fails_when_installing_started_a_root_daemon():
    text = (ROOT / ".ci" / "install").read_text()
    assert "$(pgrep" not in text
    assert text.index("before=$(root_daemons)") < text.index("apt-get install")
    assert text.index("apt-get install") < text.index("after=$(root_daemons)")
    assert 'if [ -n "$new" ]; then' in text and "    exit 1\n" in text


# ---- the lab's D-Bus ----

SYSTEM_CONF = """<busconfig>
  <type>system</type>
  <user>messagebus</user>
  <fork/>
  <standard_system_servicedirs/>
  <servicehelper>/usr/lib/dbus-1.0/dbus-daemon-launch-helper</servicehelper>
  <pidfile>/run/dbus/pid</pidfile>
  <syslog/>
  <auth>EXTERNAL</auth>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <policy context="default"><allow user="*"/></policy>
  <include ignore_missing="yes">/etc/dbus-1/system.conf</include>
  <includedir>system.d</includedir>
  <includedir>/etc/dbus-1/system.d</includedir>
  <include ignore_missing="yes">/etc/dbus-1/system-local.conf</include>
  <include if_selinux_enabled="yes" selinux_root_relative="yes">contexts/dbus_contexts</include>
</busconfig>
"""


def test_bus_config_keeps_the_policies_and_nothing_of_the_machines_bus():
    out = labkit.bus_config(SYSTEM_CONF, "/tmp/kolab/x/host/dbus.sock", "/usr/share/dbus-1")
    assert re.findall(r"<listen>.*?</listen>", out) == [
        "<listen>unix:path=/tmp/kolab/x/host/dbus.sock</listen>"]
    for gone in ("<user>", "<fork", "<pidfile>", "<syslog", "<servicehelper>",
                 "<standard_system_servicedirs", "/run/dbus", "/etc/dbus-1/system.conf",
                 "system-local.conf"):
        assert gone not in out
    assert re.findall(r"<includedir>(.*?)</includedir>", out) == [
        "/usr/share/dbus-1/system.d", "/etc/dbus-1/system.d"]
    assert '<policy context="default"><allow user="*"/></policy>' in out
    assert "contexts/dbus_contexts</include>" in out


@pytest.mark.skipif(not Path("/usr/share/dbus-1/system.conf").exists(),
                    reason="no D-Bus system.conf on this machine (package dbus)")
def test_bus_config_of_this_machines_system_conf_names_no_machine_bus_path():
    text = Path("/usr/share/dbus-1/system.conf").read_text()
    out = labkit.bus_config(text, "/lab/dbus.sock", "/usr/share/dbus-1")
    assert "/run/dbus" not in re.sub(r"<!--.*?-->", "", out, flags=re.S)


def test_dbus_daemon_argv_overrides_every_listen_and_pid_file():
    argv = labkit.dbus_argv("/lab/dbus.conf", "/lab/dbus.sock")
    assert argv[0] == "dbus-daemon"
    assert "--address=unix:path=/lab/dbus.sock" in argv
    assert "--nopidfile" in argv and "--nofork" in argv
    assert "--config-file=/lab/dbus.conf" in argv


def stale_socket(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()                     # the file stays, nobody listens: what a killed daemon leaves


def test_bus_leftovers_are_only_what_the_labs_daemons_left(tmp_path):
    sock, pid = tmp_path / "system_bus_socket", tmp_path / "pid"
    paths = (str(sock), str(pid))
    before = labkit._identities(paths)
    assert before == {}
    stale_socket(sock)
    pid.write_text("4242\n")
    assert labkit.bus_leftovers(before, [4242], paths) == sorted(paths)
    # another process's pid file is not the lab's
    assert labkit.bus_leftovers(before, [4243], paths) == [str(sock)]


def test_bus_leftovers_never_name_a_file_that_was_there_before_or_a_live_bus(tmp_path):
    sock, pid = tmp_path / "system_bus_socket", tmp_path / "pid"
    paths = (str(sock), str(pid))
    pid.write_text("4242\n")
    stale_socket(sock)
    before = labkit._identities(paths)
    assert labkit.bus_leftovers(before, [4242], paths) == []
    # the machine's own bus starts meanwhile: a socket someone listens on stays
    sock.unlink()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(sock))
    live.listen(1)
    try:
        assert labkit.bus_leftovers(before, [4242], paths) == []
    finally:
        live.close()


def test_teardown_removes_the_bus_files_its_daemon_left_and_no_other(tmp_path, monkeypatch):
    sock, pid, other = tmp_path / "system_bus_socket", tmp_path / "pid", tmp_path / "other"
    monkeypatch.setattr(labkit, "SYSTEM_BUS_FILES", (str(sock), str(pid)))
    lab = labkit.Lab(runners=0, docker=False, prefix="kounit-")
    monkeypatch.setattr(lab, "workdir", tmp_path)
    lab._bus_files_before = labkit._identities(labkit.SYSTEM_BUS_FILES)

    class Gone(object):
        pid = 4242

    lab._procs["dbus"] = (Gone(), tmp_path / "dbus.log")
    stale_socket(sock)
    pid.write_text("4242\n")
    other.write_text("4242\n")
    lab._remove_bus_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab.log", "other"]
    log = (tmp_path / "lab.log").read_text()
    assert "removing %s: left by this lab's dbus-daemon" % sock in log


# ---- iptables drift in one iptables-restore ----

SAVE = """# Generated by iptables-save v1.8.9 (nf_tables) on Mon Dec  1 21:00:00 2025
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [10:840]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -s 10.0.0.0/8 -m comment --comment kohaku-overlay -j ACCEPT
-A FORWARD -d 10.0.0.0/8 -m comment --comment kohaku-overlay -j ACCEPT
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
# Completed on Mon Dec  1 21:00:00 2025
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Dec  1 21:00:00 2025
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 10.0.0.0/8 ! -d 10.0.0.0/8 -m comment --comment kohaku-overlay -j MASQUERADE
COMMIT
"""
OURS = ["-A FORWARD -s 10.0.0.0/8 -m comment --comment kohaku-overlay -j ACCEPT",
        "-A FORWARD -d 10.0.0.0/8 -m comment --comment kohaku-overlay -j ACCEPT"]


def test_drift_deletes_rules_and_sets_a_policy_in_one_table():
    out = labkit.edit_iptables_save(SAVE, delete=OURS, policy={"FORWARD": "DROP"})
    assert out == ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [10:840]\n:OUTPUT ACCEPT [0:0]\n"
                   ":DOCKER-USER - [0:0]\n-A FORWARD -j DOCKER-USER\n-A DOCKER-USER -j RETURN\n"
                   "COMMIT\n")


def test_drift_flush_keeps_the_chains_of_each_table_named():
    out = labkit.edit_iptables_save(SAVE, flush=("filter", "nat"))
    assert [line for line in out.splitlines() if line.startswith("-A")] == []
    assert out.count("COMMIT") == 2
    assert ":DOCKER-USER - [0:0]" in out and ":POSTROUTING ACCEPT [0:0]" in out


def test_drift_inserts_first_in_the_chain_in_the_order_given():
    out = labkit.edit_iptables_save(SAVE, insert=["-A FORWARD -i eth9 -j DROP",
                                                  "-A FORWARD -i eth8 -j DROP"])
    rules = [line for line in out.splitlines() if line.startswith("-A FORWARD")]
    assert rules == ["-A FORWARD -i eth9 -j DROP", "-A FORWARD -i eth8 -j DROP"] + OURS + [
        "-A FORWARD -j DOCKER-USER"]


def test_drift_in_the_nat_table_leaves_the_filter_table_out():
    nat = ("nat", "-A POSTROUTING -s 10.0.0.0/8 ! -d 10.0.0.0/8 -m comment --comment "
                  "kohaku-overlay -j MASQUERADE")
    out = labkit.edit_iptables_save(SAVE, delete=[nat])
    assert out == "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"


@pytest.mark.parametrize("kwargs, message", [
    ({"delete": ["-A FORWARD -j NOPE"]}, "cannot delete '-A FORWARD -j NOPE' from table filter"),
    ({"flush": ["mangle"]}, "iptables-save has no table mangle"),
    ({"policy": {"NOPE": "DROP"}}, "the filter table has no chain NOPE"),
])
def test_drift_that_cannot_be_made_is_an_error_not_a_silent_no_op(kwargs, message):
    with pytest.raises(labkit.LabError) as exc:
        labkit.edit_iptables_save(SAVE, **kwargs)
    assert message in str(exc.value)
