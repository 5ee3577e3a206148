"""The harness, the packaging and the documents agree with each other (no root needed).

The lab itself is exercised by tests/lab/; here: the parts of tests/labkit.py that are plain logic,
the README's commands against .ci/run, setup.cfg against the scripts, the example configs against
the scripts' own config readers, and the systemd units against what the README promises.
"""

import configparser
import importlib
import logging
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

import labkit

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPTS = ["kohaku_overlay_host.py", "kohaku_overlay_runner.py", "kohaku_overlay_check.py"]


def readme():
    return (ROOT / "README.md").read_text()


def ci_run():
    return (ROOT / ".ci" / "run").read_text()


def ci_install():
    return (ROOT / ".ci" / "install").read_text()


# ---- README and .ci/run ----

def test_ci_runs_exactly_the_readmes_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", readme(), re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines() if "-m pytest" in line]
    assert commands == ["python3 -m pytest -ra"]
    last = [line for line in ci_run().splitlines()
            if line.strip() and not line.startswith("#")][-1]
    assert last == "python3 -m pytest -ra"


def test_readme_two_commands_name_files_that_exist():
    first = re.search(r"```bash\n(.*?)```", readme(), re.S).group(1)
    cmds = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert cmds == ["bash .ci/install && python3 tests/labkit.py demo", "bash .ci/run"]
    assert (ROOT / ".ci" / "install").is_file()
    assert (ROOT / ".ci" / "run").is_file()
    assert (ROOT / "tests" / "labkit.py").is_file()


def test_ci_script_is_strict_bash_with_the_static_checks():
    text = ci_run()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert 'vermin --target=3.6- --no-tips --violations "${scripts[@]}"' in text
    assert "sys.stdlib_module_names" in text
    assert "\nbash .ci/install\n" in text
    assert "policy-rc.d" in ci_install()
    for name in ("run", "install"):
        res = subprocess.run(["bash", "-n", str(ROOT / ".ci" / name)], stderr=subprocess.PIPE,
                             universal_newlines=True)
        assert (res.returncode, res.stderr) == (0, "")


def test_ci_apt_line_installs_every_tool_the_lab_needs():
    text = ci_install().replace("\\\n", " ")
    line = [x for x in text.splitlines() if "apt-get install -y iproute2" in x][0]
    packages = set(line.split("install -y", 1)[1].split())
    assert {"iproute2", "iptables", "iputils-ping", "docker.io", "busybox-static", "iperf3",
            "firewalld", "dbus", "tcpdump", "nftables"} <= packages


# ---- packaging ----

def setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(str(ROOT / "setup.cfg"))
    return cfg


def test_setup_cfg_declares_the_three_scripts_and_their_entry_points():
    cfg = setup_cfg()
    assert cfg["metadata"]["name"] == "kohaku-overlay"
    assert cfg["options"]["python_requires"] == ">=3.6"
    modules = cfg["options"]["py_modules"].split()
    assert modules == [s[:-3] for s in SCRIPTS]
    entries = dict(line.split(" = ") for line in
                   cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert entries == {
        "kohaku-overlay-host": "kohaku_overlay_host:main",
        "kohaku-overlay-runner": "kohaku_overlay_runner:main",
        "kohaku-overlay-check": "kohaku_overlay_check:main",
    }
    for target in entries.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_every_script_carries_the_package_version():
    version = setup_cfg()["metadata"]["version"]
    for script in SCRIPTS:
        assert importlib.import_module(script[:-3]).__version__ == version


def test_pytest_config_has_the_lab_marker_strict_markers_and_a_timeout():
    cfg = setup_cfg()["tool:pytest"]
    assert cfg["testpaths"].split() == ["tests", "bench"]
    assert "--strict-markers" in cfg["addopts"].split()
    assert cfg["markers"].strip().startswith("lab:")
    assert cfg["timeout"] == "300"
    assert setup_cfg()["flake8"]["max-line-length"] == "100"


def test_test_requirements_are_pinned():
    lines = [line for line in (ROOT / "requirements-test.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == ["pytest==9.0.3", "pytest-mock==3.17.0", "pytest-timeout==2.4.0",
                     "vermin==1.6.0", "flake8==7.5.0"]
    assert "\nflake8 .  " in ci_run()  # the whole repository stays lint-clean in CI (issue 10.8)


# ---- example configs ----

def test_example_host_config_is_read_without_warnings_and_lists_every_key(caplog):
    host = importlib.import_module("kohaku_overlay_host")
    path = ROOT / "contrib" / "config" / "host_config.py"
    with caplog.at_level(logging.WARNING):
        cfg, _layout = host.load_settings(str(path), True)
    assert [r.getMessage() for r in caplog.records] == []
    assert cfg["OVERLAY_ENABLED"] is True
    written = re.findall(r"^([A-Z_]+):", path.read_text(), re.M)
    assert sorted(written) == sorted(host.CONFIG_KEYS)
    for key, (_type, default) in host.CONFIG_KEYS.items():
        if key not in ("HOST_REACHABLE_ADDRESS", "OVERLAY_ENABLED", "OVERLAY_TOKEN") and \
                default is not None:
            assert cfg[key] == default


def test_example_runner_config_is_read_without_warnings_and_lists_every_key(caplog):
    runner = importlib.import_module("kohaku_overlay_runner")
    path = ROOT / "contrib" / "config" / "runner_config.py"
    with caplog.at_level(logging.WARNING):
        cfg = runner.load_config(str(path))
    assert [r.getMessage() for r in caplog.records] == []
    assert cfg["OVERLAY_ENABLED"] is True
    written = re.findall(r"^([A-Z_]+):", path.read_text(), re.M)
    assert sorted(written) == sorted(k[0] for k in runner.RUNNER_KEYS)
    for key, _types, default in runner.RUNNER_KEYS:
        if key not in ("HOST_ADDRESS", "OVERLAY_ENABLED", "OVERLAY_TOKEN", "RUNNER_NAME"):
            assert cfg[key] == default


# ---- systemd units ----

def unit(role):
    cfg = configparser.ConfigParser(strict=True, interpolation=None)
    cfg.optionxform = str
    cfg.read(str(ROOT / "contrib" / "systemd" / ("kohakuriver-overlay-%s.service" % role)))
    return cfg


@pytest.mark.parametrize("role", ["host", "runner"])
def test_units_are_notify_restart_on_failure_and_hardened(role):
    svc = unit(role)["Service"]
    assert svc["ExecStart"] == ("/usr/bin/python3 /usr/local/lib/kohaku-overlay/"
                                "kohaku_overlay_%s.py serve --config /etc/kohakuriver/%s_config.py"
                                % (role, role))
    assert (svc["Type"], svc["NotifyAccess"], svc["Restart"]) == ("notify", "main", "on-failure")
    assert svc["CapabilityBoundingSet"].split() == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert (svc["NoNewPrivileges"], svc["ProtectSystem"], svc["ProtectHome"],
            svc["PrivateTmp"]) == ("yes", "strict", "read-only", "yes")
    assert "/var/lib/kohakuriver" in svc["ReadWritePaths"].split()
    # process, not mixed (issue 15): wireguard-go lives in the unit's cgroup and must survive a
    # stop or restart of the daemon, or the encrypted overlay stops with it
    assert svc["KillMode"] == "process"


def test_runner_unit_starts_after_docker():
    u = unit("runner")["Unit"]
    assert "docker.service" in u["After"].split()
    assert "docker.service" in u["Wants"].split()


@pytest.mark.parametrize("role", ["host", "runner"])
def test_every_hardening_line_says_why(role):
    """Each group of settings after "# Hardening" follows a comment giving its reason."""
    text = (ROOT / "contrib" / "systemd" / ("kohakuriver-overlay-%s.service" % role)).read_text()
    lines = text[text.index("# Hardening"):text.index("[Install]")].splitlines()
    bare = [line for prev, line in zip(lines, lines[1:])
            if line and not line.startswith("#") and not prev.strip()]
    assert bare == []
    assert len([line for line in lines if line and not line.startswith("#")]) >= 20


@pytest.mark.parametrize("role", ["host", "runner"])
def test_units_start_on_a_fresh_boot_and_order_without_requiring(role):
    cfg = unit(role)
    svc, u = cfg["Service"], cfg["Unit"]
    # a missing /run/xtables.lock (iptables-nft never makes one) is no 226/NAMESPACE
    assert svc["ReadWritePaths"].split() == ["/var/lib/kohakuriver", "-/run/xtables.lock"]
    assert svc["ExecStartPre"] == "+/usr/bin/touch /run/xtables.lock"
    # wireguard-go's TUN device in the private /dev
    assert (svc["PrivateDevices"], svc["BindPaths"], svc["DeviceAllow"]) == \
        ("yes", "-/dev/net/tun", "/dev/net/tun rw")
    assert u["After"].split() == ["network-online.target", "firewalld.service", "docker.service"]
    assert "firewalld.service" not in u.get("Wants", "").split()
    assert "Requires" not in u and "BindsTo" not in u and "Requisite" not in u


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("role", ["host", "runner"])
def test_units_pass_systemd_analyze_verify(role):
    path = ROOT / "contrib" / "systemd" / ("kohakuriver-overlay-%s.service" % role)
    res = subprocess.run(["systemd-analyze", "verify", str(path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True)
    # verify names missing executables (the scripts are not installed here); nothing else
    problems = [line for line in (res.stdout + res.stderr).splitlines()
                if line.strip() and "/usr/local/lib/kohaku-overlay/" not in line]
    assert problems == []


# ---- tests/labkit.py logic ----

def test_default_prefix_is_recognised_and_fits_interface_names():
    c = labkit.Lab()
    assert labkit.PREFIX_RE.match(c.prefix).group(1) == c.prefix
    assert c.prefix.startswith("ko%dx" % os.getpid())
    longest = "ko%dx%02x-" % (4194304, 255)        # the kernel's largest pid
    assert len(longest + "sw") <= 15
    assert c.workdir == labkit.BASE_DIR / c.prefix.rstrip("-")


@pytest.mark.parametrize("prefix", ["Bad-", "ko_1-", "nodash", "kotoolongprefix-"])
def test_bad_prefixes_are_refused(prefix):
    with pytest.raises(labkit.LabError):
        labkit.Lab(prefix=prefix)


def test_cannot_run_reason_names_root_and_missing_tools(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in labkit.cannot_run_reason()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool, path=None: None)
    reason = labkit.cannot_run_reason(docker=True, firewalld=True)
    assert reason.startswith("missing tools: ip, nsenter, iptables, ping, busybox, dockerd, docker,"
                             " firewalld, firewall-cmd, dbus-daemon")


def test_require_skips_normally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(labkit, "cannot_run_reason", lambda docker=True, firewalld=False: "no root")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        labkit.require()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        labkit.require()


def test_lab_configs_are_read_by_the_scripts_as_written(tmp_path):
    host = importlib.import_module("kohaku_overlay_host")
    runner = importlib.import_module("kohaku_overlay_runner")
    values = {"HOST_REACHABLE_ADDRESS": "198.51.100.1", "HOST_PORT": 8000,
              "OVERLAY_ENABLED": True, "OVERLAY_TOKEN": "lab-token", "OVERLAY_INACTIVE_AFTER": 6,
              "OVERLAY_STATE_FILE": str(tmp_path / "state.json"), "OVERLAY_MTU": None}
    path = labkit._write_config(tmp_path / "host_config.py", values, "test")
    assert "OVERLAY_MTU" not in path.read_text()
    cfg, _layout = host.load_settings(str(path), True)
    assert {k: cfg[k] for k in values if values[k] is not None} == \
        {k: v for k, v in values.items() if v is not None}
    values = {"HOST_ADDRESS": "198.51.100.1", "RUNNER_NAME": "runner1", "HEARTBEAT_INTERVAL": 1,
              "OVERLAY_ENABLED": True, "OVERLAY_TOKEN": "lab-token"}
    path = labkit._write_config(tmp_path / "runner_config.py", values, "test")
    cfg = runner.load_config(str(path))
    assert {k: cfg[k] for k in values} == values


@pytest.mark.skipif(not os.path.exists(labkit.BUSYBOX), reason="busybox-static not installed")
def test_busybox_rootfs_has_every_applet_linked(tmp_path):
    c = labkit.Lab(prefix="kounit-")
    c.workdir = tmp_path
    path = c._busybox_tarball()
    with tarfile.open(str(path)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/busybox"].isfile()
    for applet in ("sh", "ping", "ip", "sleep"):
        assert members["bin/" + applet].issym()
        assert members["bin/" + applet].linkname == "busybox"
    assert members["tmp"].mode == 0o1777
    assert c._busybox_tarball() == path      # cached


def test_private_run_nodes_are_entered_through_their_mount_namespace():
    c = labkit.Lab(private_run=True, prefix="kotest-")
    plain = labkit.Node("runner1", "kotest-r1", "198.51.100.11", "/tmp/x")
    assert c.enter(plain) == ["ip", "netns", "exec", "kotest-r1"]
    private = labkit.Node("runner2", "kotest-r2", "198.51.100.12", "/tmp/x")
    private.mnt_ns = "/tmp/kolab/kotest/mnt/kotest-r2"
    assert c.enter(private) == ["nsenter", "--net=/run/netns/kotest-r2",
                                "--mount=/tmp/kolab/kotest/mnt/kotest-r2", "--"]
    c.host = private
    c._configs[private.name] = ("/tmp/x/host_config.py", {})
    argv = c._script_argv(private, "host", ["serve"])
    assert argv[:4] == c.enter(private)
    assert argv[-3:] == ["serve", "--config", "/tmp/x/host_config.py"]


def test_a_new_lab_prefix_is_one_no_namespace_or_workdir_uses(monkeypatch, tmp_path):
    pid = os.getpid()
    taken = ["ko%dx%02x-sw" % (pid, nn) for nn in range(256) if nn != 0x5a]
    monkeypatch.setattr(labkit, "list_netns", lambda: taken)
    monkeypatch.setattr(labkit, "BASE_DIR", tmp_path)
    assert labkit._free_prefix() == "ko%dx5a-" % pid
    (tmp_path / ("ko%dx5a" % pid)).mkdir()
    with pytest.raises(labkit.LabError):
        labkit._free_prefix()
