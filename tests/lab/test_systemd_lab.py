"""The shipped systemd units under a real systemd (issue 15): one systemd-nspawn container per
node, booted over an overlay of this machine's own root (tests/nspawn.py), in the namespaces of
a labkit lab (the underlay switch, 198.51.100.1 the Host, .11 runner1, .12 runner2).

The Host container is laid out like RHEL: firewalld runs as the service with RHEL's command line
(`/usr/bin/python3 -s /usr/sbin/firewalld --nofork --nopid`), the unit's interpreter is put to
`/usr/libexec/platform-python` with the README's RHEL 8 line, and there is no Docker. runner1 is
Debian as .ci/install leaves it: firewalld and dockerd as the services Debian enables; runner2
has Docker but no firewalld (masked). All follow the README's install steps as written, on a
fresh boot (/run empty, so no /run/xtables.lock). `docker run` cannot start containers inside
nspawn here, so traffic is pinged from each runner's overlay gateway address; dockerd itself
runs, so the runners' Docker networks are real.
"""

import os
import re
import time
from pathlib import Path

import pytest

import labkit
import nspawn

REPO = Path(__file__).resolve().parent.parent.parent
BEFORE = Path(__file__).resolve().parent / "data" / "units-before-issue15"
SRC = "/root/kohaku-overlay"            # the checkout inside each container
UNITS = {"host": "kohakuriver-overlay-host.service",
         "runner": "kohakuriver-overlay-runner.service"}
CAPS = 1 << 12 | 1 << 13                # CAP_NET_ADMIN, CAP_NET_RAW
RHEL_FIREWALLD = "/usr/bin/python3 -s /usr/sbin/firewalld --nofork --nopid"
PLATFORM_PYTHON = "/usr/libexec/platform-python"
RUNNER_GW = "10.1.0.1"


def readme_blocks():
    """{"host": [lines], "runner": [lines]}: the install and start commands of the README's
    "Real cluster" section, exactly as written, each role's own."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Real cluster: quick start"):]
    section = section[:section.index("\n## ", 5)]
    out = {"host": [], "runner": [], "rhel8": []}
    for m in re.finditer(r"(?P<before>[^\n]*)\n\n\s*```bash\n(?P<body>.*?)```", section, re.S):
        lines = [ln.strip() for ln in m.group("body").splitlines() if ln.strip()]
        before = m.group("before")
        if "On the Host" in before:
            out["host"] += lines
        elif "On each Runner" in before:
            out["runner"] += lines
        elif "platform-python" in m.group("body"):
            out["rhel8"] += lines
        else:                           # the start block: "# on the Host" / "# on each Runner"
            for ln in lines:
                if ln.endswith("# on the Host"):
                    out["host"].append(ln)
                elif ln.endswith("# on each Runner"):
                    out["runner"].append(ln)
                else:
                    out["host"].append(ln)
                    out["runner"].append(ln)
    return out


def edit_config(m, path, **values):
    """What the operator does in an editor: the README's keys set on their own lines."""
    f = m.root / path.lstrip("/")
    text = f.read_text()
    for key, value in values.items():
        text, n = re.subn(r"(?m)^%s(\s*:\s*\w+)?\s*=.*$" % key, "%s = %r" % (key, value), text)
        assert n == 1, "%s has no line for %s" % (path, key)
    f.write_text(text)


def wait(pred, timeout, what, m=None, unit=None):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:     # not yet; quoted if it stays so
            last = exc
        time.sleep(0.5)
    detail = "\nlast error: %s" % last if last else ""
    if m is not None:
        detail += "\n--- journal of %s in %s ---\n%s" % (unit or "all", m.name, m.journal(unit))
    raise AssertionError("timed out after %ss waiting for %s%s" % (timeout, what, detail))


def state(m, unit):
    return m.show(unit, "ActiveState", "SubState", "Result", "NRestarts", "MainPID",
                  "ExecMainStatus", "Type")


def active(m, unit):
    return state(m, unit)["ActiveState"] == "active"


def trusted(m):
    res = m.sh("firewall-cmd", "--zone=trusted", "--list-interfaces", check=False, timeout=30)
    return set(res.stdout.split())


def ping_from_gateway(r, count=3, gw=RUNNER_GW):
    res = r.sh("ping", "-n", "-c", str(count), "-i", "0.3", "-W", "2", "-I", gw,
               "10.0.0.1", check=False, timeout=30)
    return res.returncode == 0, res.stdout + res.stderr


def exposure(m, unit):
    res = m.sh("systemd-analyze", "security", "--no-pager", unit, check=False, timeout=60)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    assert found, res.stdout[-500:] + res.stderr
    return float(found.group(1))


def platform_python():
    """What /usr/libexec/platform-python is in the Host container: KOHAKU_LAB_PYTHON's real
    interpreter when set (python3.6 makes it RHEL 8's Python), else /usr/bin/python3."""
    want = os.environ.get("KOHAKU_LAB_PYTHON")
    if not want:
        return "/usr/bin/python3"
    res = nspawn._run([want, "-c", "import sys; print(sys.executable)"], env=dict(os.environ))
    return res.stdout.strip()


def install_source(m):
    dest = m.root / SRC.lstrip("/")
    for rel in ("kohaku_overlay_host.py", "kohaku_overlay_runner.py", "kohaku_overlay_check.py",
                "README.md", "contrib/config/host_config.py", "contrib/config/runner_config.py",
                "contrib/systemd/" + UNITS["host"], "contrib/systemd/" + UNITS["runner"]):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / rel).read_bytes())
    # today's unit before issue 15 beside the new one, for the figures and the 226 it had;
    # ExecStart can never run (the namespace step comes first, and /bin/false if it did)
    for role, name in UNITS.items():
        text = (BEFORE / name).read_text()
        text = re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/false", text)
        text = re.sub(r"(?m)^Restart=.*$", "Restart=no", text)
        (m.root / "etc/systemd/system" / ("kohaku-before-%s.service" % role)).write_text(text)


def booted_cluster(encryption=False, runner2=True):
    """Generator for a module fixture: yields (host, runner1, info) installed and started as the
    README says; info["r2"] is runner2 (Docker, no firewalld) or None. Removes everything."""
    labkit.require(docker=False, firewalld=True)
    reason = nspawn.cannot_run_reason()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but systemd-nspawn cannot run: %s" % reason, pytrace=False)
        pytest.skip(reason)
    lab = labkit.Lab(runners=2 if runner2 else 1, docker=False)
    fleet = None
    try:
        lab.up()
        fleet = nspawn.Fleet()
        h = fleet.machine("host", lab.host.netns_path,
                          masks=("docker.service", "docker.socket", "containerd.service"))
        r = fleet.machine("runner1", lab.runners[0].netns_path)
        # runner2: Docker as the service, firewalld absent (masked)
        r2 = fleet.machine("runner2", lab.runners[1].netns_path, masks=("firewalld.service",)) \
            if runner2 else None
        machines = [m for m in (h, r, r2) if m is not None]
        # RHEL's layout on the Host: firewalld's own command line, and the RHEL 8 interpreter
        h.dropin("firewalld.service", "rhel.conf",
                 "[Service]\nExecStart=\nExecStart=%s\n" % RHEL_FIREWALLD)
        pp = h.root / PLATFORM_PYTHON.lstrip("/")
        if not pp.exists():
            pp.parent.mkdir(parents=True, exist_ok=True)
            pp.symlink_to(platform_python())
        # the services as Debian enables them (whatever this machine's own /etc says)
        h.enable("firewalld.service")
        r.enable("firewalld.service", "docker.service", "containerd.service")
        if r2:
            r2.enable("docker.service", "containerd.service")
        for m in machines:
            install_source(m)
        fleet.boot_all()
        info = {"r2": r2, "lock_at_boot": {m.name: m.sh("test", "-e", "/run/xtables.lock",
                                                        check=False).returncode == 0
                                           for m in machines}}
        # the unit as it was: a fresh boot ends it at status=226/NAMESPACE
        info["before"] = {}
        for m, role in ((h, "host"), (r, "runner")):
            unit = "kohaku-before-%s.service" % role
            m.sh("systemctl", "start", unit, check=False, timeout=30)
            info["before"][role] = m.show(unit, "Result", "ActiveState", "ExecStartPre")
            m.sh("systemctl", "stop", unit, check=False)
            m.sh("systemctl", "reset-failed", unit, check=False)
        # the README, step 1: open the ports (firewalld runs in both)
        # (and the WireGuard port with encryption)
        wgport = " --add-port=51820/udp" if encryption else ""
        h.sh("sh", "-c", "firewall-cmd --permanent --add-port=4789/udp --add-port=8000/tcp%s && "
             "firewall-cmd --reload" % wgport, timeout=60)
        r.sh("sh", "-c", "firewall-cmd --permanent --add-port=4789/udp%s && firewall-cmd --reload"
             % wgport, timeout=60)
        blocks = readme_blocks()
        steps = {}
        # WireGuard: the MTU of a 1500 underlay minus 110, on both sides (README)
        wg = dict(OVERLAY_ENCRYPTION="wireguard", OVERLAY_MTU=1390) if encryption else {}
        rwg = dict(OVERLAY_MTU=1390) if wg else {}
        configs = (
            (h, "host", dict(HOST_REACHABLE_ADDRESS=labkit.HOST_IP, OVERLAY_ENABLED=True,
                             OVERLAY_TOKEN=labkit.TOKEN, OVERLAY_REPAIR_INTERVAL=2, **wg)),
            (r, "runner", dict(HOST_ADDRESS=labkit.HOST_IP, RUNNER_NAME="runner1",
                               OVERLAY_ENABLED=True, OVERLAY_TOKEN=labkit.TOKEN,
                               HEARTBEAT_INTERVAL=2, **rwg)),
            (r2, "runner", dict(HOST_ADDRESS=labkit.HOST_IP, RUNNER_NAME="runner2",
                                OVERLAY_ENABLED=True, OVERLAY_TOKEN=labkit.TOKEN,
                                HEARTBEAT_INTERVAL=2, **rwg)))
        for m, role, cfg in [c for c in configs if c[0] is not None]:
            install = [ln for ln in blocks[role] if not ln.startswith("systemctl")]
            start = [ln for ln in blocks[role] if ln.startswith("systemctl")]
            steps.setdefault(role, install + start)
            for ln in install:
                m.sh("sh", "-c", "cd %s && %s" % (SRC, ln))
            edit_config(m, "/etc/kohakuriver/%s_config.py" % role, **cfg)
            if role == "host":
                for ln in blocks["rhel8"]:
                    m.sh("sh", "-c", ln)
            for ln in start:
                res = m.sh("sh", "-c", ln, check=False, timeout=120)
                assert res.returncode == 0, "%s in %s: %s\n%s" % (
                    ln, m.name, res.stdout + res.stderr, m.journal(UNITS[role]))
        info["steps"] = steps
        yield h, r, info
    finally:
        try:
            if fleet is not None:
                fleet.close()
        finally:
            lab.teardown()


@pytest.fixture(scope="module")
def nodes():
    yield from booted_cluster()


def test_the_readme_steps_are_what_ran(nodes):
    _h, _r, info = nodes
    assert [s.split()[0] for s in info["steps"]["host"]] == ["install"] * 5 + ["systemctl"] * 2
    assert [s.split()[0] for s in info["steps"]["runner"]] == ["install"] * 5 + ["systemctl"] * 2
    assert info["steps"]["host"][-1].split("#")[0].strip() == \
        "systemctl enable --now kohakuriver-overlay-host"
    assert info["steps"]["runner"][-1].split("#")[0].strip() == \
        "systemctl enable --now kohakuriver-overlay-runner"


def test_the_unit_before_failed_on_a_fresh_boot_with_226_namespace(nodes):
    _h, _r, info = nodes
    # nothing had created iptables-legacy's lock file: the old ReadWritePaths= could not bind it
    assert info["lock_at_boot"] == {"host": False, "runner1": False, "runner2": False}
    for role in ("host", "runner"):
        before = info["before"][role]
        assert (before["Result"], before["ActiveState"]) == ("exit-code", "failed")
        # the ExecStartPre= touch never ran: its namespace step failed first
        assert "code=exited ; status=226 }" in before["ExecStartPre"]     # 226/NAMESPACE


def test_both_units_start_on_the_fresh_boot_and_report_ready(nodes):
    h, r, info = nodes
    for m, role in ((h, "host"), (r, "runner"), (info["r2"], "runner")):
        st = state(m, UNITS[role])
        # Type=notify: active (not activating) means READY=1 came; enable --now returned
        assert (st["Type"], st["ActiveState"], st["SubState"], st["Result"], st["NRestarts"]) \
            == ("notify", "active", "running", "success", "0")
        assert m.sh("systemctl", "is-enabled", UNITS[role]).stdout.strip() == "enabled"


def test_the_daemons_run_with_exactly_net_admin_and_net_raw(nodes):
    h, r, info = nodes
    for m, role in ((h, "host"), (r, "runner"), (info["r2"], "runner")):
        pid = m.host_pid(m.main_pid(UNITS[role]))
        status = dict(line.split(":\t", 1) for line in
                      Path("/proc/%d/status" % pid).read_text().splitlines() if ":\t" in line)
        caps = {k: int(status[k], 16) for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh")}
        assert caps == {"CapEff": CAPS, "CapPrm": CAPS, "CapBnd": CAPS, "CapAmb": 0, "CapInh": 0}
        assert status["NoNewPrivs"].strip() == "1"


def test_the_rhel_layout_is_what_runs_on_the_host(nodes):
    h, _r, _info = nodes
    fw = h.host_pid(h.main_pid("firewalld.service"))
    argv = Path("/proc/%d/cmdline" % fw).read_bytes().split(b"\0")[:-1]
    assert b" ".join(argv).decode() == RHEL_FIREWALLD
    pid = h.host_pid(h.main_pid(UNITS["host"]))
    argv = Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")
    assert argv[0].decode() == PLATFORM_PYTHON
    # the interpreter behind it (KOHAKU_LAB_PYTHON=python3.6: RHEL 8's Python, the floor)
    assert os.readlink("/proc/%d/exe" % pid) == os.path.realpath(platform_python())


def test_the_overlay_devices_exist(nodes):
    h, r, _info = nodes
    links = set(re.findall(r"^\d+: ([^:@]+)", h.sh("ip", "-o", "link").stdout, re.M))
    assert {"kohaku-host", "vxkr1", "vxkr2"} <= links
    links = set(re.findall(r"^\d+: ([^:@]+)", r.sh("ip", "-o", "link").stdout, re.M))
    assert {"vxlan0", "kohaku-overlay"} <= links
    net = r.sh("docker", "network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}}{{end}}",
               "kohakuriver-overlay").stdout.strip()
    assert net == "10.1.0.0/16"


def test_the_units_see_tun_and_the_xtables_lock_and_a_read_only_system(nodes):
    h, r, _info = nodes
    for m, role in ((h, "host"), (r, "runner")):
        pid = m.host_pid(m.main_pid(UNITS[role]))
        probe = ("import os\n"
                 "open('/run/xtables.lock', 'r+').close()\n"      # iptables-legacy's lock
                 "st = os.stat('/dev/net/tun')\n"
                 "print(os.major(st.st_rdev), os.minor(st.st_rdev))\n"
                 "try:\n    open('/etc/kohaku-probe', 'w')\nexcept OSError as e:\n"
                 "    print(e.errno)\n"
                 "print(sorted(os.listdir('/dev'))[:40])\n")
        res = nspawn._run(["nsenter", "-t", str(pid), "-m", "python3", "-c", probe])
        lines = res.stdout.splitlines()
        assert lines[0] == "10 200"                 # the TUN device wireguard-go opens
        # EROFS: ProtectSystem=strict. (/run itself stays writable in this container: with
        # ProtectControlGroups= or ProtectClock= systemd 252 under nspawn does not remount it)
        assert lines[1] == "30"
        assert "sda" not in lines[2] and "vda" not in lines[2]    # PrivateDevices


def test_the_host_trusts_its_interfaces_with_firewalld_as_a_service(nodes):
    h, _r, _info = nodes
    wait(lambda: {"kohaku-host", "vxkr1"} <= trusted(h), 20,
         "kohaku-host and vxkr1 in the Host's trusted zone", h, UNITS["host"])


def test_the_runner_trusts_its_interfaces_with_firewalld_as_a_service(nodes):
    _h, r, _info = nodes
    wait(lambda: {"kohaku-overlay", "vxlan0"} <= trusted(r), 20,
         "kohaku-overlay and vxlan0 in the runner's trusted zone", r, UNITS["runner"])


def test_traffic_from_the_runner_gateway_to_the_host(nodes):
    _h, r, info = nodes
    for m, gw in ((r, RUNNER_GW), (info["r2"], "10.2.0.1")):
        ok, out = wait(lambda: (lambda res: res if res[0] else None)(ping_from_gateway(m, gw=gw)),
                       20, "ping %s -> 10.0.0.1" % gw, m, UNITS["runner"])
        assert ok, out


def test_a_runner_without_firewalld_starts_and_trusts_nothing(nodes):
    _h, _r, info = nodes
    r2 = info["r2"]
    assert r2.show("firewalld.service", "LoadState")["LoadState"] == "masked"
    assert active(r2, UNITS["runner"])
    journal = r2.journal(UNITS["runner"], lines=300)
    assert [ln for ln in journal.splitlines() if " ERROR " in ln or "firewalld" in ln] == []
    links = set(re.findall(r"^\d+: ([^:@]+)", r2.sh("ip", "-o", "link").stdout, re.M))
    assert {"vxlan0", "kohaku-overlay"} <= links


def test_exposure_of_each_unit_is_not_worse_than_before(nodes, capsys):
    h, r, _info = nodes
    figures = {}
    for m, role in ((h, "host"), (r, "runner")):
        figures[role] = (exposure(m, UNITS[role]), exposure(m, "kohaku-before-%s.service" % role))
    with capsys.disabled():
        for role, (now, before) in sorted(figures.items()):
            print("\nsystemd-analyze security exposure of %s: %.1f (the unit before issue 15: "
                  "%.1f; lower is better)" % (UNITS[role], now, before))
    for role, (now, before) in figures.items():
        assert now <= before


def test_restart_and_stop_of_the_host_unit_keep_the_overlay(nodes):
    h, r, _info = nodes
    unit = UNITS["host"]
    pid = h.main_pid(unit)
    h.sh("systemctl", "restart", unit, timeout=60)
    st = state(h, unit)
    assert (st["ActiveState"], st["Result"]) == ("active", "success")
    assert int(st["MainPID"]) != pid
    assert ping_from_gateway(r)[0]
    h.sh("systemctl", "stop", unit, timeout=60)
    assert state(h, unit)["ActiveState"] == "inactive"
    # stopped: the tunnel, the address and the rules stay, so the overlay still answers
    ok, out = ping_from_gateway(r)
    assert ok, out
    assert "vxkr1" in h.sh("ip", "-o", "link").stdout


def test_a_runner_started_while_the_host_is_down_reports_ready(nodes):
    h, r, _info = nodes
    assert state(h, UNITS["host"])["ActiveState"] == "inactive"
    r.sh("systemctl", "restart", "--no-block", UNITS["runner"])
    try:
        # built from the saved allocation, READY=1, registering in the background (11.8)
        wait(lambda: active(r, UNITS["runner"]), 30, "the runner to report ready while the Host "
             "is down", r, UNITS["runner"])
        ok, out = ping_from_gateway(r)      # the Host's tunnel stayed: the overlay answers
        assert ok, out
    finally:
        h.sh("systemctl", "start", UNITS["host"], timeout=60)
    wait(lambda: active(r, UNITS["runner"]), 60, "the runner to be ready once the Host is back",
         r, UNITS["runner"])
    assert ping_from_gateway(r)[0]


def test_firewalld_restart_leaves_both_units_running_and_the_overlay_repaired(nodes):
    h, r, _info = nodes
    for m in (h, r):
        m.sh("systemctl", "restart", "firewalld", timeout=90)
    for m, role in ((h, "host"), (r, "runner")):
        assert active(m, UNITS[role])
    wait(lambda: {"kohaku-host", "vxkr1"} <= trusted(h), 30,
         "the Host's interfaces back in the trusted zone", h, UNITS["host"])
    wait(lambda: {"kohaku-overlay", "vxlan0"} <= trusted(r), 30,
         "the runner's interfaces back in the trusted zone", r, UNITS["runner"])
    wait(lambda: ping_from_gateway(r)[0], 30, "the overlay to answer again", r, UNITS["runner"])


def test_docker_restart_and_the_runner_reapplies_its_rules(nodes):
    _h, r, _info = nodes
    unit = UNITS["runner"]
    r.sh("systemctl", "restart", "docker", timeout=120)
    assert active(r, unit)
    wait(lambda: "--comment kohaku-overlay" in r.sh("iptables", "-S", "FORWARD").stdout
         .splitlines()[1], 30, "the runner's FORWARD rule first again after Docker's restart",
         r, unit)
    assert "kohakuriver-overlay" in r.sh("docker", "network", "ls", "--format",
                                         "{{.Name}}").stdout.split()
    wait(lambda: ping_from_gateway(r)[0], 30, "the overlay to answer", r, unit)


def test_a_second_boot_brings_both_units_up_by_themselves(nodes):
    h, r, info = nodes
    machines = (h, r, info["r2"])
    for m in machines:
        m.poweroff()
    for m in machines:
        m.boot()
    for m in machines:
        m.wait_booted()
    for m, role in ((h, "host"), (r, "runner"), (info["r2"], "runner")):
        wait(lambda: active(m, UNITS[role]), 60, "%s to start at boot" % UNITS[role], m,
             UNITS[role])
        st = state(m, UNITS[role])
        assert (st["Result"], st["NRestarts"]) == ("success", "0")
    wait(lambda: ping_from_gateway(r)[0], 60, "the overlay to answer after the reboot", r,
         UNITS["runner"])
