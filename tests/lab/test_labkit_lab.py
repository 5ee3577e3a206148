"""The harness's own hygiene with real parts (issue 10.8): the lab's dbus-daemon never creates
the machine's bus files, whatever the machine's D-Bus configuration holds, and drift goes in
with one iptables-restore. The logic behind both is unit-tested in tests/unit/test_lab_hygiene.py.
"""

import re
import shlex
from pathlib import Path

import pytest

import labkit

RULES = ["-A FORWARD -s 10.0.0.0/8 -m comment --comment kohaku-overlay -j ACCEPT",
         "-A FORWARD -d 10.0.0.0/8 -m comment --comment kohaku-overlay -j ACCEPT"]


@pytest.fixture(scope="module")
def c():
    labkit.require(docker=False, firewalld=True)
    with labkit.Lab(runners=0, docker=False) as lab:
        yield lab


def bus_files_while_running(c, conf_text, argv_of):
    """Start a dbus-daemon in the host namespace under a private mount namespace whose
    /etc/dbus-1 holds a legacy system.conf (as machines upgraded from older Debian keep it)
    and whose /run is a fresh tmpfs -> what appeared in /run/dbus while it ran."""
    w = c.host.workdir
    legacy = w / "legacy-etc-dbus-1"
    (legacy / "system.d").mkdir(parents=True, exist_ok=True)
    machine = Path("/usr/share/dbus-1/system.conf").read_text()
    (legacy / "system.conf").write_text(re.sub(r"<include\b.*?</include>", "", machine, flags=re.S))
    conf, sock = w / "probe-dbus.conf", w / "probe-dbus.sock"
    conf.write_text(conf_text(machine, sock))
    script = "\n".join([
        "set -e",
        "mount -t tmpfs kolab-run /run && mkdir /run/dbus",
        "mount --bind %s /etc/dbus-1" % shlex.quote(str(legacy)),
        "%s >%s 2>&1 &" % (" ".join(shlex.quote(str(a)) for a in argv_of(conf, sock)),
                           shlex.quote(str(w / "probe-dbus.log"))),
        "pid=$!",
        "for i in $(seq 100); do [ -S %s ] && break; sleep 0.1; done" % shlex.quote(str(sock)),
        "[ -S %s ] || { echo 'no bus socket'; cat %s; exit 3; }"
        % (shlex.quote(str(sock)), shlex.quote(str(w / "probe-dbus.log"))),
        "ls -A /run/dbus",
        "kill $pid; wait $pid || true",
    ])
    res = c.sh(c.host, "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
               timeout=60)
    return res.stdout.split()


def test_the_labs_dbus_daemon_never_creates_the_machines_bus_files(c):
    # what the lab runs: its config and its command line
    assert bus_files_while_running(
        c, lambda text, sock: labkit.bus_config(text, sock, "/usr/share/dbus-1"),
        labkit.dbus_argv) == []


def test_each_of_the_two_guards_alone_keeps_the_machines_bus_socket_free(c):
    def naive(text, sock):       # the machine's config with only its <listen> replaced
        return re.sub(r"<listen>.*?</listen>", "<listen>unix:path=%s</listen>" % sock,
                      text).replace("<includedir>system.d</includedir>",
                                    "<includedir>/usr/share/dbus-1/system.d</includedir>")

    def no_address(conf, sock):
        return [a for a in labkit.dbus_argv(conf, sock) if not a.startswith("--address=")]

    # the hazard is real: through the legacy file the daemon also takes the machine's socket
    assert bus_files_while_running(c, naive, no_address) == ["system_bus_socket"]
    # --address alone, and the lab's config alone, each prevent it
    assert bus_files_while_running(c, naive, labkit.dbus_argv) == []
    assert bus_files_while_running(
        c, lambda text, sock: labkit.bus_config(text, sock, "/usr/share/dbus-1"),
        no_address) == []


def forward(c):
    return [line for line in c.sh(c.host, "iptables", "-S", "FORWARD").stdout.splitlines()]


def test_iptables_drift_changes_rules_and_policy_in_one_restore(c):
    for rule in reversed(RULES):
        c.sh(c.host, "iptables", "-I", "FORWARD", "1", *rule.split()[2:])
    c.sh(c.host, "iptables", "-A", "FORWARD", "-i", "eth7", "-j", "ACCEPT")
    try:
        c.iptables_drift(c.host, delete=RULES, insert=["-A FORWARD -i eth9 -j DROP"],
                         policy={"FORWARD": "DROP"})
        assert forward(c) == ["-P FORWARD DROP", "-A FORWARD -i eth9 -j DROP",
                              "-A FORWARD -i eth7 -j ACCEPT"]
        c.iptables_drift(c.host, flush=("filter",), policy={"FORWARD": "ACCEPT"})
        assert forward(c) == ["-P FORWARD ACCEPT"]
        with pytest.raises(labkit.LabError) as exc:
            c.iptables_drift(c.host, delete=RULES[:1])
        assert "no such rule" in str(exc.value)
    finally:
        c.sh(c.host, "iptables", "-P", "FORWARD", "ACCEPT")
        c.sh(c.host, "iptables", "-F", "FORWARD")
