"""Unit tests of kohaku_overlay_runner.py: no root, no network namespaces.

The node is a scripted fake of `run()` (FakeNode): probes answer from its state in the JSON/-S
formats of iproute2, iptables, firewall-cmd and docker; mutating commands are recorded (and can be
made to fail). Registration goes once through a real HTTP server on 127.0.0.1 port 0.
"""

import importlib.util
import json
import logging
import os
import socket
import stat
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("kohaku_overlay_runner",
                                               str(ROOT / "kohaku_overlay_runner.py"))
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)
runner.RESOLV_CONF = os.devnull      # never the machine's (its nameserver may lie in 10.0.0.0/8)

BR = "kohaku-overlay"
ME = "198.51.100.11"
HOST = "198.51.100.1"
CIDR = "10.0.0.0/8"

ALLOC = {"runner_name": "runner1", "runner_id": 1, "subnet": "10.1.0.0/16",
         "gateway": "10.1.0.1", "host_overlay_ip": "10.0.0.1", "host_vxlan_ip": "10.1.0.254",
         "host_physical_ip": HOST, "vni": 101, "vxlan_port": 4789, "mtu": 1450,
         "overlay_cidr": CIDR}

FWD = ["-A FORWARD -s 10.0.0.0/8 -d 10.0.0.0/8 -i kohaku-overlay -o kohaku-overlay "
       "-m comment --comment kohaku-overlay -j ACCEPT"]
BROAD_FWD = ["-A FORWARD -s 10.0.0.0/8 -m comment --comment kohaku-overlay -j ACCEPT",
             "-A FORWARD -d 10.0.0.0/8 -m comment --comment kohaku-overlay -j ACCEPT"]
NAT = ("-A POSTROUTING -s 10.0.0.0/8 ! -d 10.0.0.0/8 -m comment --comment kohaku-overlay "
       "-j MASQUERADE")
DOCKER_FWD = ["-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-ISOLATION-STAGE-1"]
JUMP = "-A INPUT -p udp -m udp --dport 4789 -m comment --comment kohaku-overlay -j KOHAKU-VXLAN"
U32 = '-m u32 --u32 "0x0>>0x16&0x3c@0xc>>0x8='
VXCHAIN = ["-A KOHAKU-VXLAN -s 198.51.100.1/32 " + U32 + '0x65" -j ACCEPT',
           "-A KOHAKU-VXLAN " + U32 + '0x64:0x163" -j DROP']

REDIRECTS_OFF = ["sysctl", "-w", "net/ipv4/conf/all/send_redirects=0",
                 "net/ipv4/conf/kohaku-overlay/send_redirects=0"]
CREATE_NET = ["docker", "network", "create", "--driver", "bridge", "--subnet", "10.1.0.0/16",
              "--gateway", "10.1.0.1", "--aux-address", "host=10.1.0.254",
              "-o", "com.docker.network.bridge.name=kohaku-overlay",
              "-o", "com.docker.network.driver.mtu=1450", "kohakuriver-overlay"]

CLEAN_BATCH = [
    "link add kohaku-overlay address 02:6b:62:00:00:01 mtu 1450 type bridge",
    "addr add 10.1.0.1/16 dev kohaku-overlay",
    "link add vxlan0 mtu 1450 type vxlan id 101 local 198.51.100.11 remote 198.51.100.1 "
    "dstport 4789 nolearning",
    "link set dev vxlan0 master kohaku-overlay up",
    "link set dev kohaku-overlay up",
    "route replace 10.0.0.0/8 via 10.1.0.254 dev kohaku-overlay",
]
CLEAN_RESTORE = ("*filter\n-I FORWARD 1" + FWD[0][len("-A FORWARD"):] + "\n"
                 "-N KOHAKU-VXLAN\n" + "".join(r + "\n" for r in VXCHAIN) +
                 "-I INPUT 1" + JUMP[len("-A INPUT"):] + "\n"
                 "COMMIT\n*nat\n" + NAT + "\nCOMMIT\n")


# ---- the fake node ----------------------------------------------------------------------------


def vxlan_link(vni=101, local=ME, remote=HOST, port=4789, mtu=1450, master=BR, up=True,
               learning=False):
    link = {"ifname": "vxlan0", "mtu": mtu, "flags": ["BROADCAST", "MULTICAST"] +
            (["UP", "LOWER_UP"] if up else []),
            "linkinfo": {"info_kind": "vxlan", "info_data": {
                "id": vni, "remote": remote, "local": local, "port": port,
                "learning": learning, "ttl": 0}},
            "addr_info": [{"family": "inet6", "local": "fe80::1", "prefixlen": 64}]}
    if master:
        link["master"] = master
        link["linkinfo"]["info_slave_kind"] = "bridge"
    return link


def bridge_link(name=BR, addrs=("10.1.0.1/16",), mtu=1450, up=True, kind="bridge"):
    return {"ifname": name, "mtu": mtu,
            "flags": ["BROADCAST", "MULTICAST"] + (["UP", "LOWER_UP"] if up else []),
            "linkinfo": {"info_kind": kind, "info_data": {"stp_state": 0}},
            "addr_info": [{"family": "inet", "local": a.split("/")[0],
                           "prefixlen": int(a.split("/")[1]), "scope": "global"}
                          for a in addrs]}


def docker_net(subnet="10.1.0.0/16", gateway="10.1.0.1", aux="10.1.0.254", bridge=BR,
               mtu="1450", containers=()):
    return {"Name": "kohakuriver-overlay", "Driver": "bridge",
            "IPAM": {"Driver": "default", "Config": [
                {"Subnet": subnet, "Gateway": gateway, "AuxiliaryAddresses": {"host": aux}}]},
            "Containers": {"%064x" % i: {"Name": c, "IPv4Address": "10.1.0.%d/16" % (i + 2)}
                           for i, c in enumerate(containers)},
            "Options": {"com.docker.network.bridge.name": bridge,
                        "com.docker.network.driver.mtu": mtu}}


class Call(object):
    def __init__(self, argv, mutates, input):
        self.argv, self.mutates, self.input = argv, mutates, input

    def __repr__(self):
        return "Call(%r, mutates=%r)" % (self.argv, self.mutates)


class FakeNode(object):
    """Answers probes from state; records every call; fail(pred) makes a mutation fail."""

    def __init__(self, built=False, firewalld=False, ip_forward="1"):
        self.links = {"lo": {"ifname": "lo", "flags": ["LOOPBACK", "UP"], "mtu": 65536,
                             "addr_info": [{"family": "inet", "local": "127.0.0.1",
                                            "prefixlen": 8}]}}
        self.route = None
        self.main_routes = [{"dst": "198.51.100.0/24", "dev": "eth0", "protocol": "kernel",
                             "scope": "link", "prefsrc": ME}]     # the rest of the main table
        self.forward = list(DOCKER_FWD)
        self.input = []
        self.chains = {}                  # user chains of the filter table: {name: rules}
        self.nat = ["-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE"]
        self.networks = {}
        self.firewalld = firewalld
        self.trusted = set()
        self.ip_forward = ip_forward
        self.ipv6 = {}                    # device -> disable_ipv6 ("1", the default: off)
        self.redirects = "0" if built else "1"   # send_redirects of `all` and the bridge
        self.docker_up = True
        self.calls = []
        self.fail_on = None
        if built:
            self.links[BR] = bridge_link()
            self.links["vxlan0"] = vxlan_link()
            self.route = {"dst": CIDR, "gateway": "10.1.0.254", "dev": BR, "flags": []}
            self.forward = FWD + DOCKER_FWD
            self.input = [JUMP]
            self.chains = {"KOHAKU-VXLAN": list(VXCHAIN)}
            self.nat.append(NAT)
            self.networks["kohakuriver-overlay"] = docker_net()
            self.trusted = {BR, "vxlan0"} if firewalld else set()

    def __call__(self, argv, check=True, mutates=True, input=None, timeout=30, echo=None):
        argv = [str(a) for a in argv]
        self.calls.append(Call(argv, mutates, input))
        if mutates:
            if runner.DRY_RUN:
                return runner.Result(0, "", "")
            if self.fail_on and self.fail_on(argv, input):
                if check:
                    raise runner.CommandError("`%s` failed (exit 1): boom" % " ".join(argv),
                                              argv, 1, "boom")
                return runner.Result(1, "", "boom")
            return runner.Result(0, "", "")
        rc, out, err = self.probe(argv)
        if check and rc != 0:
            raise runner.CommandError("probe failed: %s" % err, argv, rc, err)
        return runner.Result(rc, out, err)

    def probe(self, argv):
        if argv == ["ip", "-j", "-d", "addr", "show"]:
            return 0, json.dumps(list(self.links.values())), ""
        if argv[:5] == ["ip", "-j", "route", "show", "exact"]:
            ok = self.route and self.route["dst"] == argv[5]
            return 0, json.dumps([self.route] if ok else []), ""
        if argv == ["ip", "-j", "route", "show"]:
            return 0, json.dumps(([self.route] if self.route else []) + self.main_routes), ""
        if argv[:4] == ["ip", "-j", "route", "get"]:
            return 0, json.dumps([{"dst": argv[4], "dev": "eth0", "prefsrc": ME}]), ""
        if argv == ["iptables", "-S", "FORWARD"]:
            return 0, "-P FORWARD DROP\n" + "".join(r + "\n" for r in self.forward), ""
        if argv == ["iptables", "-S"]:
            return 0, "".join(line + "\n" for line in self.filter_table()), ""
        if argv in (["iptables", "-t", "nat", "-S", "POSTROUTING"],
                    ["iptables", "-t", "nat", "-S"]):
            return 0, "-P POSTROUTING ACCEPT\n" + "".join(r + "\n" for r in self.nat), ""
        if argv == ["firewall-cmd", "--state"]:
            return (0, "running\n", "") if self.firewalld else (252, "", "not running\n")
        if argv == ["firewall-cmd", "--zone=trusted", "--list-interfaces"]:
            return 0, " ".join(sorted(self.trusted)) + "\n", ""
        if argv[:3] == ["docker", "network", "inspect"]:
            if not self.docker_up:
                return 1, "", "Cannot connect to the Docker daemon at unix:///x.sock.\n"
            if argv[3] in self.networks:
                return 0, json.dumps([self.networks[argv[3]]]), ""
            return 1, "[]\n", "Error response from daemon: network %s not found\n" % argv[3]
        raise AssertionError("unexpected probe %r" % (argv,))

    def sysctl(self, name):
        if name.endswith("/disable_ipv6"):
            return self.ipv6.get(name.split("/")[3], "1")
        if name.endswith("/send_redirects"):
            return self.redirects
        return self.ip_forward

    def filter_table(self):
        """`iptables -S` of the filter table, in the order iptables prints it."""
        return (["-P INPUT ACCEPT", "-P FORWARD DROP", "-P OUTPUT ACCEPT"] +
                ["-N " + c for c in self.chains] + self.input + self.forward +
                [r for rules in self.chains.values() for r in rules])

    def mutations(self):
        return [c for c in self.calls if c.mutates]

    def argvs(self):
        return [c.argv for c in self.mutations()]


@pytest.fixture
def cfg(tmp_path):
    c = dict(runner.KEY_DEFAULTS)
    c.update(HOST_ADDRESS=HOST, RUNNER_NAME="runner1", OVERLAY_ENABLED=True,
             OVERLAY_STATE_FILE=str(tmp_path / "state" / "runner.json"),
             _path=str(tmp_path / "runner_config.py"))
    return c


@pytest.fixture(autouse=True)
def as_root(mocker):
    """The commands that change the node check for root; the tests run anywhere."""
    return mocker.patch.object(runner.os, "geteuid", return_value=0)


@pytest.fixture(autouse=True)
def system_bus(tmp_path, monkeypatch):
    """A system bus socket path that exists, so firewall-cmd is asked (FakeNode answers it)."""
    bus = tmp_path / "system_bus_socket"
    bus.write_text("")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=%s" % bus)
    return bus


REAL_FIREWALLD_CANDIDATE = runner.firewalld_candidate


@pytest.fixture(autouse=True)
def firewalld_process(mocker):
    """A process that looks like firewalld exists, so firewall-cmd is asked (FakeNode answers)."""
    return mocker.patch.object(runner, "firewalld_candidate", return_value=True)


@pytest.fixture
def node(mocker):
    def make(**kw):
        n = FakeNode(**kw)
        mocker.patch.object(runner, "run", side_effect=n)
        mocker.patch.object(runner, "read_sysctl", side_effect=n.sysctl)
        return n
    return make


def alloc(**over):
    a = dict(ALLOC)
    a.update(over)
    return runner.parse_allocation(a)


# ---- config reader ----------------------------------------------------------------------------


def test_config_reads_annotated_and_plain_lines_and_keeps_defaults(tmp_path):
    p = tmp_path / "runner_config.py"
    p.write_text('"""docstring"""\n# comment\nHOST_ADDRESS: str = "198.51.100.1"\n'
                 "OVERLAY_ENABLED = True\nOVERLAY_MTU: int = 1400\nHEARTBEAT_INTERVAL = 2.5\n")
    cfg = runner.load_config(str(p))
    assert cfg["HOST_ADDRESS"] == "198.51.100.1"
    assert cfg["OVERLAY_ENABLED"] is True
    assert cfg["OVERLAY_MTU"] == 1400
    assert cfg["HEARTBEAT_INTERVAL"] == 2.5
    assert cfg["OVERLAY_VXLAN_ID"] == 100
    assert cfg["OVERLAY_NETWORK_NAME"] == "kohakuriver-overlay"


def test_config_unknown_key_is_a_warning_with_a_suggestion(tmp_path, caplog):
    p = tmp_path / "runner_config.py"
    p.write_text("OVERLAY_ENABLE = True\nRUNNER_PORT = 8001\n")
    with caplog.at_level(logging.WARNING):
        cfg = runner.load_config(str(p))
    assert cfg["OVERLAY_ENABLED"] is False
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == ("runner_config.py line 1: unknown key OVERLAY_ENABLE "
                       "(did you mean OVERLAY_ENABLED?), ignored")
    assert len(msgs) == 1  # RUNNER_PORT is KohakuRiver's own key: passed over (issue 11.13)


@pytest.mark.parametrize("line,key", [
    ('OVERLAY_MTU = "1450"', "OVERLAY_MTU"),
    ("OVERLAY_ENABLED = 1", "OVERLAY_ENABLED"),
    ("HOST_PORT = True", "HOST_PORT"),
    ("HOST_ADDRESS = 198", "HOST_ADDRESS"),
])
def test_config_wrong_type_is_an_error_naming_the_key(tmp_path, line, key):
    p = tmp_path / "runner_config.py"
    p.write_text("# x\n" + line + "\n")
    with pytest.raises(runner.ConfigError) as e:
        runner.load_config(str(p))
    assert str(e.value).startswith("runner_config.py line 2: %s must be " % key)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("code,found", [
    ("import os as HOST_ADDRESS\nos.system('touch {marker}')\n", "an import"),
    ("HOST_ADDRESS = str(open('{marker}', 'w'))\n", "a call"),
    ("HOST_ADDRESS = open('{marker}', 'w').name\n", "an attribute"),
    ("for HOST_PORT in __import__('os').system('touch {marker}'):\n    pass\n", "a loop"),
    ("def RUNNER_NAME():\n    pass\n", "a def"),
])
def test_config_code_is_refused_without_running(tmp_path, code, found):
    marker = tmp_path / "pwned"
    p = tmp_path / "runner_config.py"
    p.write_text(code.format(marker=marker))
    with pytest.raises(runner.ConfigError) as e:
        runner.load_config(str(p))
    assert "line 1" in str(e.value)
    assert found in str(e.value)
    assert not marker.exists()


def test_config_missing_explicit_file_is_exit_2_and_default_missing_is_defaults(tmp_path,
                                                                                monkeypatch,
                                                                                capsys):
    assert runner.main(["status", "--config", str(tmp_path / "nope.py")]) == 2
    assert capsys.readouterr().err == ("error: config file %s does not exist: pass an existing "
                                       "file to --config\n" % (tmp_path / "nope.py"))
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = runner.load_config(None)
    assert cfg["OVERLAY_ENABLED"] is False
    assert cfg["_path"] == str(tmp_path / ".kohakuriver" / "runner_config.py")


def test_config_range_errors(tmp_path):
    p = tmp_path / "runner_config.py"
    p.write_text("OVERLAY_BRIDGE_NAME = 'a-very-long-bridge-name'\n")
    with pytest.raises(runner.ConfigError) as e:
        runner.load_config(str(p))
    assert str(e.value).startswith("OVERLAY_BRIDGE_NAME in runner_config.py is ")
    p.write_text("OVERLAY_TOKEN = 'tok en'\n")
    with pytest.raises(runner.ConfigError) as e:
        runner.load_config(str(p))
    assert "OVERLAY_TOKEN" in str(e.value)


# ---- build: clean node, built node, drift -----------------------------------------------------


def test_clean_node_issues_exactly_the_build_commands(cfg, node):
    n = node(firewalld=True, ip_forward="0")
    changes = runner.build(cfg, alloc(), ME)
    m = n.mutations()
    assert [c.argv for c in m] == [
        ["sysctl", "-w", "net.ipv4.ip_forward=1"],
        ["ip", "-batch", "-"],
        REDIRECTS_OFF,                # no ICMP redirect a container would cache (issue 12)
        CREATE_NET,
        ["iptables-restore", "--noflush"],
        ["firewall-cmd", "--zone=trusted", "--change-interface=kohaku-overlay"],
        ["firewall-cmd", "--zone=trusted", "--change-interface=vxlan0"],
    ]
    assert m[1].input.splitlines() == CLEAN_BATCH
    assert m[4].input == CLEAN_RESTORE
    assert changes == [
        "net.ipv4.ip_forward set to 1", "bridge kohaku-overlay created",
        "gateway 10.1.0.1/16 added to kohaku-overlay",
        "vxlan0 created (vni 101, remote 198.51.100.1)", "route 10.0.0.0/8 via 10.1.0.254 added",
        "ICMP redirects off on all, kohaku-overlay",
        "Docker network kohakuriver-overlay created on kohaku-overlay",
        "FORWARD accept rules for 10.0.0.0/8 added", "VXLAN filter KOHAKU-VXLAN added",
        "INPUT jump to KOHAKU-VXLAN for UDP 4789 added", "NAT masquerade for 10.0.0.0/8 added",
        "kohaku-overlay added to the firewalld trusted zone",
        "vxlan0 added to the firewalld trusted zone"]


def test_fully_built_node_issues_no_mutating_command(cfg, node):
    n = node(built=True, firewalld=True)
    assert runner.build(cfg, alloc(), ME) == []
    assert n.mutations() == []
    assert [c.argv[:3] for c in n.calls] == [
        ["ip", "-j", "route"], ["ip", "-j", "-d"],         # what the overlay CIDR overlaps (11.4)
        ["docker", "network", "inspect"], ["ip", "-j", "-d"], ["ip", "-j", "route"],
        ["iptables", "-S"], ["iptables", "-t", "nat"], ["firewall-cmd", "--state"],
        ["firewall-cmd", "--zone=trusted", "--list-interfaces"]]


def test_firewalld_not_running_is_not_touched(cfg, node):
    n = node(built=True, firewalld=False)
    assert runner.build(cfg, alloc(), ME) == []
    assert ([c.argv for c in n.calls if c.argv[0] == "firewall-cmd"]
            == [["firewall-cmd", "--state"]])


def test_firewall_cmd_is_not_started_when_the_system_bus_is_absent(cfg, node, system_bus):
    n = node(built=True, firewalld=True)
    system_bus.unlink()
    assert runner.build(cfg, alloc(), ME) == []
    assert [c.argv for c in n.calls if c.argv[0] == "firewall-cmd"] == []


def test_firewall_cmd_is_not_started_without_a_firewalld_process(cfg, node,
                                                                 firewalld_process):
    n = node(built=True, firewalld=True)
    firewalld_process.return_value = False
    assert runner.build(cfg, alloc(), ME) == []
    assert [c.argv for c in n.calls if c.argv[0] == "firewall-cmd"] == []


DEBIAN_FIREWALLD = b"/usr/bin/python3\0/usr/sbin/firewalld\0--nofork\0--nopid\0"
RHEL_FIREWALLD = b"/usr/bin/python3\0-s\0/usr/sbin/firewalld\0--nofork\0--nopid\0"


@pytest.mark.parametrize("cmdline, found", [
    (DEBIAN_FIREWALLD, True),
    (RHEL_FIREWALLD, True),
    (b"/usr/libexec/platform-python\0-s\0/usr/sbin/firewalld\0--nofork\0", True),
    (b"/usr/sbin/firewalld\0--nofork\0", True),
    (b"python3.11\0-E\0-s\0/usr/sbin/firewalld\0", True),
    (b"/usr/bin/python3\0-s\0-E\0-I\0/usr/sbin/firewalld\0", False),    # 4th argument
    (b"/usr/bin/python3\0/tmp/firewalld-notes.txt\0", False),
    (b"/usr/bin/vim\0/usr/sbin/firewalld\0", False),
    (b"/usr/bin/firewall-cmd\0--state\0", False),
    (b"", False),                                                       # a kernel thread
])
def test_firewalld_is_found_by_its_command_line(tmp_path, cmdline, found):
    proc = tmp_path / "proc"
    for pid, text in (("1", b"/sbin/init\0splash\0"), ("42", cmdline)):
        (proc / pid).mkdir(parents=True)
        (proc / pid / "cmdline").write_bytes(text)
    (proc / "self").mkdir()
    (proc / "77").mkdir()       # a process that ended between listdir and open: no cmdline
    assert runner.is_firewalld_cmdline(cmdline.split(b"\0")) is found
    assert REAL_FIREWALLD_CANDIDATE(str(proc)) is found


def test_forward_rules_below_dockers_are_moved_to_the_top_in_one_transaction(cfg, node):
    n = node(built=True)
    n.forward = DOCKER_FWD + FWD
    changes = runner.build(cfg, alloc(), ME)
    assert n.argvs() == [["iptables-restore", "--noflush"]]
    assert n.mutations()[0].input == (
        "*filter\n-D" + FWD[0][2:] + "\n-I FORWARD 1" + FWD[0][len("-A FORWARD"):] + "\nCOMMIT\n")
    assert changes == ["FORWARD accept rules for 10.0.0.0/8 moved to the top"]


def test_the_broad_forward_pair_of_an_older_version_is_replaced_by_the_scoped_rule(cfg, node):
    """Issue 11.1: `-s CIDR -j ACCEPT` / `-d CIDR -j ACCEPT` let other Docker networks and the LAN
    into the overlay; one rule scoped to the bridge (in and out) replaces them, first."""
    assert runner.forward_rules(CIDR, BR) == [
        "-A FORWARD -s 10.0.0.0/8 -d 10.0.0.0/8 -i kohaku-overlay -o kohaku-overlay "
        "-m comment --comment kohaku-overlay -j ACCEPT"]
    n = node(built=True)
    n.forward = BROAD_FWD + DOCKER_FWD
    runner.build(cfg, alloc(), ME)
    assert n.mutations()[0].input == (
        "*filter\n" + "".join("-D" + r[2:] + "\n" for r in BROAD_FWD) +
        "-I FORWARD 1" + FWD[0][len("-A FORWARD"):] + "\nCOMMIT\n")


def test_vxlan_filter_accepts_the_host_for_our_vni_and_drops_only_our_vni_range():
    a = alloc()
    assert runner.vni_range(a) == (100, 355)          # node 0 (direct) .. runner 255
    assert runner.vxlan_accepts(a) == [(HOST, 101)]
    assert runner.vxlan_chain_rules(runner.vxlan_accepts(a), runner.vni_range(a)) == VXCHAIN
    # another layout: /20 subnets of 10.0.0.0/8 give 4095 runner ids
    b = alloc(runner_id=3, subnet="10.0.48.0/20", gateway="10.0.48.1",
              host_vxlan_ip="10.0.48.254", vni=1003)
    assert runner.vni_range(b) == (1000, 1000 + 4095)


def test_vxlan_filter_drift_is_repaired_in_one_transaction(cfg, node):
    n = node(built=True)
    n.chains["KOHAKU-VXLAN"] = ["-A KOHAKU-VXLAN -s 198.51.100.66/32 -j ACCEPT"] + VXCHAIN
    n.input = ["-A INPUT -j ACCEPT_ALL_FROM_LAN", JUMP]
    changes = runner.build(cfg, alloc(), ME)
    assert n.argvs() == [["iptables-restore", "--noflush"]]
    assert n.mutations()[0].input == (
        "*filter\n-F KOHAKU-VXLAN\n" + "".join(r + "\n" for r in VXCHAIN) +
        "-D" + JUMP[2:] + "\n-I INPUT 1" + JUMP[len("-A INPUT"):] + "\nCOMMIT\n")
    assert changes == ["VXLAN filter KOHAKU-VXLAN fixed",
                       "INPUT jump to KOHAKU-VXLAN for UDP 4789 moved to the top"]


@pytest.mark.parametrize("what,words", [
    ("route", "route 10.0.0.0/8 via 192.168.1.1 dev eth1"),
    ("inner route", "route 10.20.0.0/16 via 192.168.1.1 dev eth1"),
    ("address", "address 10.20.0.7/16 on eth1"),
    ("nameserver", "nameserver 10.255.255.53 in /etc/resolv.conf"),
])
def test_a_route_address_or_nameserver_of_the_node_in_the_overlay_is_refused_untouched(
        cfg, node, tmp_path, monkeypatch, what, words):
    """Issue 11.4: a corporate 10.0.0.0/8 route via the LAN was replaced (and `down` deleted
    it); now nothing is changed and one sentence names the conflict and OVERLAY_SUBNET."""
    n = node(built=(what == "route"))
    if what == "route":
        n.route = {"dst": CIDR, "gateway": "192.168.1.1", "dev": "eth1", "flags": []}
    elif what == "inner route":
        n.main_routes.append({"dst": "10.20.0.0/16", "gateway": "192.168.1.1", "dev": "eth1"})
    elif what == "address":
        n.links["eth1"] = bridge_link(name="eth1", addrs=("10.20.0.7/16",), kind="veth")
    else:
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("# x\nnameserver 127.0.0.53\nnameserver 10.255.255.53\n")
        monkeypatch.setattr(runner, "RESOLV_CONF", str(resolv))
    with pytest.raises(runner.ConfigError) as e:
        runner.build(cfg, alloc(), ME, [] if what == "route" else None)
    assert str(e.value) == (
        "the overlay CIDR 10.0.0.0/8 overlaps %s of this runner, which the overlay does not own "
        "and would take its traffic: set OVERLAY_SUBNET on the Host to a range clear of it, then "
        "restart the Host and its runners" % words.replace("/etc/resolv.conf", runner.RESOLV_CONF))
    assert n.mutations() == []


def test_our_own_routes_and_addresses_and_a_wider_route_are_no_conflict(cfg, node):
    n = node(built=True)
    n.main_routes += [{"dst": "10.1.0.0/16", "dev": BR, "protocol": "kernel"},
                      {"dst": "default", "gateway": "198.51.100.254", "dev": "eth0"},
                      {"dst": "10.2.0.0/32", "dev": "vxdirect0", "scope": "link"}]
    assert runner.build(cfg, alloc(), ME) == []


def test_down_deletes_only_our_route(cfg, node):
    n = node(built=True)
    n.route = {"dst": CIDR, "gateway": "192.168.1.1", "dev": "eth1", "flags": []}
    runner.save_state(cfg["OVERLAY_STATE_FILE"], ALLOC)
    runner.teardown(cfg)
    batch = [c.input for c in n.mutations() if c.argv == ["ip", "-batch", "-"]][0]
    assert "route del" not in batch


def test_ipv6_goes_off_on_every_overlay_device_there_in_one_sysctl(cfg, node):
    """Issue 11.9: a container's router advertisement into the bridge must configure nothing
    on the runner, and nothing of ours speaks IPv6 into vxlan0."""
    n = node(built=True)
    n.ipv6 = {BR: "0", "vxlan0": "0", "vxdirect0": None, "kohaku-wg": None}   # None: absent
    assert runner.build(cfg, alloc(), ME) == ["IPv6 off on kohaku-overlay, vxlan0"]
    assert n.argvs() == [["sysctl", "-w", "net/ipv6/conf/kohaku-overlay/disable_ipv6=1",
                          "net/ipv6/conf/vxlan0/disable_ipv6=1"]]
    n.calls = []
    n.ipv6 = {}
    assert runner.build(cfg, alloc(), ME) == [] and n.mutations() == []


def test_link_drift_is_repaired_with_minimal_commands(cfg, node):
    n = node(built=True)
    n.links["vxlan0"] = vxlan_link(master=None, up=False)
    n.links[BR] = bridge_link(up=False)
    n.route = None
    changes = runner.build(cfg, alloc(), ME)
    assert n.argvs() == [["ip", "-batch", "-"]]
    assert n.mutations()[0].input.splitlines() == [
        "link set dev vxlan0 master kohaku-overlay up",
        "link set dev kohaku-overlay up",
        "route replace 10.0.0.0/8 via 10.1.0.254 dev kohaku-overlay"]
    assert changes == ["vxlan0 attached to kohaku-overlay, set up", "kohaku-overlay set up",
                       "route 10.0.0.0/8 via 10.1.0.254 added"]


def test_vxlan_with_wrong_remote_is_recreated(cfg, node):
    n = node(built=True)
    n.links["vxlan0"] = vxlan_link(remote="127.0.0.1")
    runner.build(cfg, alloc(), ME)
    assert n.mutations()[0].input.splitlines() == [
        "link del vxlan0",
        "link add vxlan0 mtu 1450 type vxlan id 101 local 198.51.100.11 remote 198.51.100.1 "
        "dstport 4789 nolearning",
        "link set dev vxlan0 master kohaku-overlay up"]


@pytest.mark.parametrize("assign,pinned", [(1, True), (2, True), (3, False), (None, False)])
def test_a_bridge_mac_never_set_is_pinned_to_its_current_value(cfg, node, mocker, assign,
                                                               pinned):
    """Unset, a bridge takes its lowest port MAC: vxlan0 re-created (encryption switched, the
    runner re-addressed) would change every container's gateway MAC under its ARP cache."""
    n = node(built=True)
    n.links[BR]["address"] = "0e:bf:79:09:9c:91"
    reads = mocker.patch.object(runner, "read_addr_assign_type", return_value=assign)
    changes = runner.build(cfg, alloc(), ME)
    assert reads.call_args_list == [mocker.call(BR)]
    if pinned:
        assert n.mutations()[0].input.splitlines() == [
            "link set dev kohaku-overlay address 0e:bf:79:09:9c:91"]
        assert changes == ["kohaku-overlay MAC 0e:bf:79:09:9c:91 pinned"]
    else:
        assert n.mutations() == []


def test_the_bridge_mac_is_fixed_by_the_runner_id():
    assert runner.bridge_mac(1) == "02:6b:62:00:00:01"
    assert runner.bridge_mac(255) == "02:6b:62:00:00:ff"
    assert runner.bridge_mac(0x12345) == "02:6b:62:01:23:45"


def test_addr_assign_type_is_read_from_sysfs_and_none_when_absent():
    assert runner.read_addr_assign_type("no-such-device-kohaku") is None
    assert runner.read_addr_assign_type("lo") in (0, 1, 2, 3)


def test_a_foreign_device_named_like_the_bridge_is_an_error(cfg, node):
    n = node()
    n.links[BR] = bridge_link(kind="veth")
    with pytest.raises(runner.ConfigError) as e:
        runner.build(cfg, alloc(), ME)
    assert str(e.value).startswith("kohaku-overlay exists and is a veth, not a bridge")
    assert n.mutations() == []


def test_vxlan_recreation_names_what_was_wrong_and_a_foreign_vxlan0_is_refused(cfg, node):
    n = node(built=True)
    n.links["vxlan0"] = vxlan_link(vni=7, learning=True)
    assert runner.build(cfg, alloc(), ME) == [
        "vxlan0 recreated (id 7 (want 101), learning on)"]
    n.links["vxlan0"] = dict(vxlan_link(), linkinfo={"info_kind": "veth"})
    with pytest.raises(runner.ConfigError) as e:
        runner.build(cfg, alloc(), ME)
    assert str(e.value) == ("vxlan0 exists and is a veth, not a VXLAN device: remove it "
                            "(ip link del vxlan0)")


def test_changed_allocation_rebuilds_when_no_container_is_attached(cfg, node):
    n = node(built=True)
    new = alloc(runner_id=2, subnet="10.2.0.0/16", gateway="10.2.0.1",
                host_vxlan_ip="10.2.0.254", vni=102)
    runner.build(cfg, new, ME)
    argvs = n.argvs()
    assert argvs[0] == ["docker", "network", "rm", "kohakuriver-overlay"]
    assert argvs[1] == ["ip", "-batch", "-"]
    assert n.mutations()[1].input.splitlines() == [
        "addr del 10.1.0.1/16 dev kohaku-overlay",
        "addr add 10.2.0.1/16 dev kohaku-overlay",
        "link del vxlan0",
        "link add vxlan0 mtu 1450 type vxlan id 102 local 198.51.100.11 remote 198.51.100.1 "
        "dstport 4789 nolearning",
        "link set dev vxlan0 master kohaku-overlay up",
        "route replace 10.0.0.0/8 via 10.2.0.254 dev kohaku-overlay"]
    assert argvs[2][:8] == ["docker", "network", "create", "--driver", "bridge", "--subnet",
                            "10.2.0.0/16", "--gateway"]
    # the VXLAN filter is bound to the VNI: the new one (102) replaces 101 in KOHAKU-VXLAN
    assert argvs[3:] == [["iptables-restore", "--noflush"]]
    assert n.mutations()[3].input == (
        "*filter\n-F KOHAKU-VXLAN\n-A KOHAKU-VXLAN -s 198.51.100.1/32 " + U32 +
        '0x66" -j ACCEPT\n' + VXCHAIN[1] + "\nCOMMIT\n")


def test_changed_allocation_with_containers_attached_is_refused_untouched(cfg, node):
    n = node(built=True)
    n.networks["kohakuriver-overlay"] = docker_net(containers=["web", "db"])
    new = alloc(runner_id=2, subnet="10.2.0.0/16", gateway="10.2.0.1",
                host_vxlan_ip="10.2.0.254", vni=102)
    with pytest.raises(runner.ContainersAttached) as e:
        runner.build(cfg, new, ME)
    assert e.value.containers == ["db", "web"]
    assert "(db, web)" in str(e.value)
    assert "docker rm -f db web" in str(e.value)
    assert "down --force" in str(e.value)
    assert n.mutations() == []


# ---- rollback ---------------------------------------------------------------------------------


def test_failure_half_way_rolls_back_what_this_run_created(cfg, node):
    n = node()
    n.fail_on = lambda argv, inp: argv[:1] == ["iptables-restore"] and "*filter" in (inp or "")
    with pytest.raises(runner.CommandError):
        runner.build(cfg, alloc(), ME)
    argvs = n.argvs()
    assert argvs[:4] == [["ip", "-batch", "-"], REDIRECTS_OFF, CREATE_NET,
                         ["iptables-restore", "--noflush"]]
    # undone in reverse order: the Docker network, then vxlan0, then the bridge
    assert argvs[4:] == [["docker", "network", "rm", "kohakuriver-overlay"],
                         ["ip", "link", "del", "vxlan0"], ["ip", "link", "del", BR]]


def test_failure_in_the_ip_batch_deletes_the_links_it_may_have_created(cfg, node):
    n = node()
    n.links[BR] = bridge_link()            # existed before: must survive the rollback
    n.fail_on = lambda argv, inp: argv == ["ip", "-batch", "-"] and "type vxlan" in inp
    with pytest.raises(runner.CommandError):
        runner.build(cfg, alloc(), ME)
    assert n.argvs() == [["ip", "-batch", "-"], ["ip", "link", "del", "vxlan0"]]


def test_repair_mode_keeps_going_and_keeps_what_it_fixed(cfg, node):
    n = node(built=True)
    n.docker_up = False
    n.route = None
    n.forward = DOCKER_FWD + FWD
    errors = []
    changes = runner.build(cfg, alloc(), ME, errors)
    assert [str(e).split(" (")[0] for e in errors] == ["docker is not reachable"]
    assert n.argvs() == [["ip", "-batch", "-"], ["iptables-restore", "--noflush"]]
    assert changes == ["route 10.0.0.0/8 via 10.1.0.254 added",
                       "FORWARD accept rules for 10.0.0.0/8 moved to the top"]


# ---- down -------------------------------------------------------------------------------------


def test_down_removes_everything_by_name_and_marker(cfg, node, tmp_path):
    n = node(built=True, firewalld=True)
    runner.save_state(cfg["OVERLAY_STATE_FILE"], ALLOC)
    changes = runner.teardown(cfg)
    m = n.mutations()
    assert [c.argv for c in m] == [
        ["docker", "network", "rm", "kohakuriver-overlay"],
        ["firewall-cmd", "--zone=trusted", "--remove-interface=kohaku-overlay"],
        ["firewall-cmd", "--zone=trusted", "--remove-interface=vxlan0"],
        ["iptables-restore", "--noflush"],
        ["ip", "-batch", "-"]]
    assert m[3].input == ("*filter\n" + "".join("-D" + r[2:] + "\n" for r in [JUMP] + FWD) +
                          "-F KOHAKU-VXLAN\n-X KOHAKU-VXLAN\n"
                          "COMMIT\n*nat\n-D" + NAT[2:] + "\nCOMMIT\n")
    assert m[4].input.splitlines() == ["route del 10.0.0.0/8 dev kohaku-overlay",
                                       "link del vxlan0", "link del kohaku-overlay"]
    assert len(changes) == 7


def test_down_refuses_while_containers_are_attached(cfg, node):
    n = node(built=True)
    n.networks["kohakuriver-overlay"] = docker_net(containers=["c1"])
    with pytest.raises(runner.ContainersAttached) as e:
        runner.teardown(cfg)
    assert str(e.value) == (
        "the Docker network kohakuriver-overlay is to be removed but containers are still "
        "attached (c1): remove them (docker rm -f c1) or run "
        "`kohaku_overlay_runner.py down --force`")
    assert n.mutations() == []


def test_down_force_disconnects_the_containers_first(cfg, node):
    n = node(built=True)
    n.networks["kohakuriver-overlay"] = docker_net(containers=["c1", "c2"])
    runner.teardown(cfg, force=True)
    assert n.argvs()[:3] == [
        ["docker", "network", "disconnect", "-f", "kohakuriver-overlay", "c1"],
        ["docker", "network", "disconnect", "-f", "kohakuriver-overlay", "c2"],
        ["docker", "network", "rm", "kohakuriver-overlay"]]


def test_down_on_a_clean_node_changes_nothing(cfg, node, capsys):
    n = node()
    assert runner.teardown(cfg) == []
    assert n.mutations() == []


def test_down_leaves_foreign_rules_alone(cfg, node):
    n = node(built=True)
    n.forward.append("-A FORWARD -s 10.0.0.0/8 -j ACCEPT")
    runner.teardown(cfg)
    restore = [c.input for c in n.mutations() if c.argv[0] == "iptables-restore"][0]
    assert "-D FORWARD -s 10.0.0.0/8 -j ACCEPT" not in restore


# ---- network ----------------------------------------------------------------------------------


def test_network_prints_the_overlay_when_enabled_and_built(cfg, node, mocker, capsys):
    n = node(built=True)
    mocker.patch.object(runner, "load_config", return_value=cfg)
    assert runner.main(["network"]) == 0
    assert capsys.readouterr().out == "kohakuriver-overlay\n"
    assert n.mutations() == []


def test_network_creates_and_prints_the_default_when_the_overlay_is_not_built(cfg, node, mocker,
                                                                              capsys, caplog):
    n = node()
    mocker.patch.object(runner, "load_config", return_value=cfg)
    with caplog.at_level(logging.WARNING):
        assert runner.main(["network"]) == 0
    assert capsys.readouterr().out == "kohakuriver-net\n"
    assert "enabled but not built" in caplog.records[0].getMessage()
    assert n.argvs() == [["docker", "network", "create", "--driver", "bridge", "--subnet",
                          "172.30.0.0/16", "--gateway", "172.30.0.1", "kohakuriver-net"]]


def test_network_when_disabled_uses_the_existing_default(cfg, node, mocker, capsys):
    n = node(built=True)
    n.networks["kohakuriver-net"] = {"Name": "kohakuriver-net", "Driver": "bridge"}
    cfg["OVERLAY_ENABLED"] = False
    mocker.patch.object(runner, "load_config", return_value=cfg)
    assert runner.main(["network"]) == 0
    assert capsys.readouterr().out == "kohakuriver-net\n"
    assert n.mutations() == []


# ---- dry-run ----------------------------------------------------------------------------------


class Proc(object):
    def __init__(self, rc, out, err):
        self.returncode, self.stdout, self.stderr = rc, out, err


@pytest.fixture
def probes_only(mocker):
    """The real run() over a fake subprocess that answers probes and refuses anything else."""
    def make(n):
        def fake_subprocess(argv, **kw):
            rc, out, err = n.probe(argv)       # AssertionError on anything but a known probe
            n.calls.append(Call(argv, False, None))
            return Proc(rc, out, err)
        mocker.patch.object(runner.subprocess, "run", side_effect=fake_subprocess)
        mocker.patch.object(runner, "read_sysctl", side_effect=n.sysctl)
        return n
    return make


def test_up_dry_run_runs_probes_only_and_prints_the_plan(cfg, mocker, capsys, probes_only):
    n = probes_only(FakeNode())
    runner.save_state(cfg["OVERLAY_STATE_FILE"], ALLOC)
    before = Path(cfg["OVERLAY_STATE_FILE"]).read_text()
    mocker.patch.object(runner, "load_config", return_value=cfg)
    register = mocker.patch.object(runner, "register")
    assert runner.main(["up", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert register.call_count == 0
    assert out[0] == "[#] register runner1 at http://198.51.100.1:8000/api/overlay/register"
    assert out[2:8] == ["[#] ip " + line for line in CLEAN_BATCH]
    assert out[8] == "[#] " + " ".join(REDIRECTS_OFF)
    assert out[9] == "[#] " + " ".join(CREATE_NET)
    assert out[10:12] == [
        "[#] iptables -t filter -I FORWARD 1" + FWD[0][len("-A FORWARD"):],
        "[#] iptables -t filter -N KOHAKU-VXLAN"]
    assert out[12:16] == ["[#] iptables -t filter " + r for r in VXCHAIN] + [
        "[#] iptables -t filter -I INPUT 1" + JUMP[len("-A INPUT"):],
        "[#] iptables -t nat " + NAT]
    assert out[-1] == ("runner1: runner 1, subnet 10.1.0.0/16, network kohakuriver-overlay: "
                       "would change 10 thing(s)")
    assert len(n.calls) == 9                  # probes only, every one of them answered
    assert Path(cfg["OVERLAY_STATE_FILE"]).read_text() == before
    assert runner.DRY_RUN is False


def test_up_dry_run_without_a_saved_allocation_does_not_register(cfg, mocker, capsys,
                                                                 probes_only):
    probes_only(FakeNode())
    mocker.patch.object(runner, "load_config", return_value=cfg)
    register = mocker.patch.object(runner, "register")
    assert runner.main(["up", "--dry-run"]) == 0
    assert register.call_count == 0
    assert "no saved allocation" in capsys.readouterr().out
    assert not os.path.exists(cfg["OVERLAY_STATE_FILE"])


def test_down_dry_run_prints_and_changes_nothing(cfg, mocker, capsys, probes_only):
    n = probes_only(FakeNode(built=True))
    mocker.patch.object(runner, "load_config", return_value=cfg)
    assert runner.main(["down", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "[#] docker network rm kohakuriver-overlay",
        "[#] iptables -t filter -D" + JUMP[2:],
        "[#] iptables -t filter -D" + FWD[0][2:],
        "[#] iptables -t filter -F KOHAKU-VXLAN", "[#] iptables -t filter -X KOHAKU-VXLAN",
        "[#] iptables -t nat -D" + NAT[2:],
        "[#] ip link del vxlan0", "[#] ip link del kohaku-overlay",
        "overlay would remove: 4 thing(s)"]
    assert all(not c.mutates for c in n.calls)


# ---- registration, heartbeat loop, backoff ----------------------------------------------------


class ApiServer(object):
    """A real HTTP server on 127.0.0.1 port 0 that answers from a script of (status, obj)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                outer.requests.append((self.command, self.path, dict(self.headers.items()),
                                       json.loads(body.decode()) if body else None))
                status, obj = outer.answers.pop(0)
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_PUT = handle_one

            def log_message(self, *a):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_registration_through_a_real_http_server(cfg):
    cfg.update(HOST_ADDRESS="127.0.0.1", OVERLAY_TOKEN="s3cret")
    with ApiServer([(200, ALLOC)]) as srv:
        cfg["HOST_PORT"] = srv.port
        got = runner.register(cfg, ME, previous_id=7)
    method, path, headers, body = srv.requests[0]
    assert (method, path) == ("POST", "/api/overlay/register")
    assert headers["Authorization"] == "Bearer s3cret"
    assert body == {"runner_name": "runner1", "physical_ip": ME, "vxlan_id": 100,
                    "vxlan_port": 4789, "mtu": 1450, "previous_runner_id": 7}
    assert got["runner_id"] == 1
    assert got["prefixlen"] == 16


def test_registration_409_and_401_are_one_sentence_exit_2(cfg):
    cfg.update(HOST_ADDRESS="127.0.0.1")
    msg = "vxlan_id mismatch: the host uses 100, the runner sent 200"
    with ApiServer([(409, {"error": msg}), (401, {"error": "bad token"})]) as srv:
        cfg["HOST_PORT"] = srv.port
        with pytest.raises(runner.ConfigError) as e409:
            runner.register(cfg, ME)
        with pytest.raises(runner.ConfigError) as e401:
            runner.register(cfg, ME)
    assert str(e409.value) == ("the host at 127.0.0.1:%d refused the registration: %s"
                               % (srv.port, msg))
    assert str(e401.value) == "the host refused the token: set OVERLAY_TOKEN to the host's"
    assert e409.value.exit_code == e401.value.exit_code == 2


def test_up_exits_2_on_a_settings_mismatch(cfg, mocker, capsys):
    cfg.update(HOST_ADDRESS="127.0.0.1", RUNNER_ADDRESS="")
    mocker.patch.object(runner, "load_config", return_value=cfg)
    mocker.patch.object(runner, "route_source", return_value="127.0.0.1")
    with ApiServer([(409, {"error": "mtu mismatch: host 1450, runner 1400"})]) as srv:
        cfg["HOST_PORT"] = srv.port
        assert runner.main(["up"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "mtu mismatch: host 1450, runner 1400" in err


def test_connection_refused_is_host_unreachable(cfg):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                               # nothing listens there now
    cfg.update(HOST_ADDRESS="127.0.0.1", HOST_PORT=port)
    with pytest.raises(runner.HostUnreachable) as e:
        runner.heartbeat(cfg)
    assert str(e.value) == "connection refused"


def test_backoff_doubles_from_half_a_second_and_is_capped_at_30():
    d = runner.backoff_delays(rng=lambda: 0.0)
    assert [next(d) for _ in range(10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    d = runner.backoff_delays(rng=lambda: 0.999)
    got = [next(d) for _ in range(12)]
    assert all(0.4 <= x <= 30 for x in got)
    assert min(got) >= 0.5 * 0.8 and max(got) <= 30


class FakeStop(object):
    def __init__(self, stop_after=None):
        self.waits = []
        self.stop_after = stop_after

    def wait(self, t):
        self.waits.append(t)
        return self.stop_after is not None and len(self.waits) >= self.stop_after

    def is_set(self):
        return False


def test_register_retries_while_unreachable_with_a_log_line_per_try(cfg, mocker, caplog):
    reg = mocker.patch.object(runner, "register", side_effect=[
        runner.HostUnreachable("connection refused"), runner.HostUnreachable("timed out"),
        dict(ALLOC)])
    mocker.patch.object(runner.random, "random", return_value=0.0)
    stop = FakeStop()
    with caplog.at_level(logging.WARNING):
        got = runner.register_with_retry(cfg, ME, 3, stop)
    assert got == ALLOC
    assert stop.waits == [0.5, 1.0]
    assert [c.args for c in reg.call_args_list] == [(cfg, ME, 3)] * 3
    assert [r.getMessage() for r in caplog.records] == [
        "registering with 198.51.100.1:8000 failed: connection refused; retrying in 0.5 s",
        "registering with 198.51.100.1:8000 failed: timed out; retrying in 1.0 s"]


def test_register_gives_up_at_the_deadline_and_stops_on_signal(cfg, mocker):
    mocker.patch.object(runner, "register", side_effect=runner.HostUnreachable("refused"))
    with pytest.raises(runner.HostUnreachable) as e:
        runner.register_with_retry(cfg, ME, None, FakeStop(), deadline=0)
    assert str(e.value).startswith("the host at 198.51.100.1:8000 did not answer (refused)")
    assert runner.register_with_retry(cfg, ME, None, FakeStop(stop_after=2)) is None


def test_register_does_not_retry_a_409(cfg, mocker):
    reg = mocker.patch.object(runner, "register", side_effect=runner.ConfigError("409"))
    with pytest.raises(runner.ConfigError):
        runner.register_with_retry(cfg, ME, None, FakeStop(), retry_full=True)
    assert reg.call_count == 1


@pytest.fixture
def agent(cfg, mocker):
    a = runner.Agent(cfg, stop=FakeStop(), notify=mocker.Mock())
    a.alloc, a.address, a.built, a.ready = runner.parse_allocation(ALLOC), ME, True, True
    a.build = mocker.patch.object(runner, "build", return_value=[])
    # a registration looks the address up again (issue 11.7): the same one here
    mocker.patch.object(runner, "runner_address", return_value=ME)
    return a


def test_heartbeat_200_does_not_register_and_repairs_every_third_beat(agent, mocker, cfg):
    hb = mocker.patch.object(runner, "heartbeat")
    reg = mocker.patch.object(runner, "register")
    for _ in range(6):
        agent.beat()
    assert hb.call_count == 6
    assert reg.call_count == 0
    assert agent.build.call_count == 2
    assert runner.load_state(cfg["OVERLAY_STATE_FILE"])["last_heartbeat"] > 0


def test_heartbeat_404_reregisters_with_the_old_id_and_rebuilds_on_a_new_subnet(agent, mocker):
    mocker.patch.object(runner, "heartbeat", side_effect=runner.NotRegistered("gone"))
    new = dict(ALLOC, runner_id=2, subnet="10.2.0.0/16", gateway="10.2.0.1",
               host_vxlan_ip="10.2.0.254", vni=102)
    reg = mocker.patch.object(runner, "register", return_value=runner.parse_allocation(new))
    agent.beat()
    assert reg.call_args[0][1:] == (ME, 1)
    assert agent.alloc["runner_id"] == 2
    assert agent.build.call_args[0][1]["subnet"] == "10.2.0.0/16"


def test_heartbeat_404_same_allocation_does_not_rebuild_at_once(agent, mocker):
    mocker.patch.object(runner, "heartbeat", side_effect=runner.NotRegistered("gone"))
    mocker.patch.object(runner, "register", return_value=runner.parse_allocation(ALLOC))
    agent.beat()
    assert agent.build.call_count == 0


def test_host_unreachable_keeps_the_overlay_and_logs_once(agent, mocker, caplog):
    mocker.patch.object(runner, "heartbeat", side_effect=runner.HostUnreachable(
        "connection refused"))
    teardown = mocker.patch.object(runner, "teardown")
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            agent.beat()
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert msgs == ["host 198.51.100.1:8000 unreachable (connection refused); keeping the "
                    "overlay up and retrying"]
    assert teardown.call_count == 0
    mocker.patch.object(runner, "heartbeat")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        agent.beat()
        agent.beat()
    assert [r.getMessage() for r in caplog.records] == [
        "host 198.51.100.1:8000 answers heartbeats"]


def test_409_on_reregistration_is_logged_once_and_the_overlay_stays(agent, mocker, caplog):
    mocker.patch.object(runner, "heartbeat", side_effect=runner.NotRegistered("gone"))
    mocker.patch.object(runner, "register", side_effect=runner.ConfigError(
        "the host refused our settings (mtu)"))
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            agent.beat()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["registering again failed: the host refused our settings (mtu)"]
    assert agent.alloc["runner_id"] == 1
    assert agent.built is True


def test_repairs_are_logged_and_readiness_is_sent_after_the_first_build(agent, caplog):
    agent.built, agent.ready = False, False
    agent.build.return_value = ["route 10.0.0.0/8 via 10.1.0.254 added"]
    with caplog.at_level(logging.INFO):
        assert agent.repair(first=True) is True
        agent.repair()
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == "built: route 10.0.0.0/8 via 10.1.0.254 added"
    assert "repaired: route 10.0.0.0/8 via 10.1.0.254 added" in msgs
    agent.notify.assert_called_once_with("READY=1")
    assert agent.build.call_args_list[0][0][3] is None      # first build: rollback
    assert agent.build.call_args_list[1][0][3] == []         # repairs: keep going


def test_sd_notify_reaches_an_abstract_socket(monkeypatch):
    name = "kohaku-runner-test-%d" % os.getpid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert runner.sd_notify("READY=1") is True
        sock.settimeout(2)
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert runner.sd_notify("READY=1") is False


# ---- state file -------------------------------------------------------------------------------


def test_state_file_is_written_atomically_with_mode_0600(cfg):
    path = cfg["OVERLAY_STATE_FILE"]
    runner.save_state(path, runner.parse_allocation(ALLOC), registered_at=5.0)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    data = json.loads(Path(path).read_text())
    assert data["runner_id"] == 1 and data["version"] == 1 and data["registered_at"] == 5.0
    assert "prefixlen" not in data
    assert not os.path.exists(path + ".tmp")
    assert runner.saved_allocation(data)["subnet"] == "10.1.0.0/16"


def test_a_corrupt_state_file_is_ignored_with_a_warning(cfg, caplog):
    path = Path(cfg["OVERLAY_STATE_FILE"])
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert runner.load_state(str(path)) == {}
    assert "ignoring unreadable state file" in caplog.records[0].getMessage()


def test_a_malformed_allocation_is_refused(cfg):
    with pytest.raises(runner.OverlayError) as e:
        runner.parse_allocation(dict(ALLOC, gateway="10.9.0.1"))
    assert "malformed" in str(e.value)
    with pytest.raises(runner.OverlayError) as e:
        runner.parse_allocation({"runner_id": 1})
    assert "lacks runner_name" in str(e.value)


# ---- the command wrapper ----------------------------------------------------------------------


def test_run_turns_a_missing_binary_into_one_sentence():
    with pytest.raises(runner.CommandError) as e:
        runner.run(["kohaku-no-such-tool-xyz"], mutates=False)
    assert str(e.value) == ("kohaku-no-such-tool-xyz is not installed: install the package "
                            "that provides it")


def test_run_failure_carries_argv_rc_and_stderr():
    with pytest.raises(runner.CommandError) as e:
        runner.run(["sh", "-c", "echo nope >&2; exit 3"], mutates=False)
    assert e.value.rc == 3
    assert e.value.stderr == "nope\n"
    assert str(e.value) == "`sh -c 'echo nope >&2; exit 3'` failed (exit 3): nope"


def test_no_command_is_exit_2(capsys):
    assert runner.main([]) == 2


def test_serve_start_waits_for_the_underlay_route_then_registers_and_builds(cfg, mocker):
    mocker.patch.object(runner, "route_source", side_effect=[
        runner.CommandError("`ip -j route get` failed (exit 2): Network is unreachable"), ME])
    reg = mocker.patch.object(runner, "register", return_value=runner.parse_allocation(ALLOC))
    build = mocker.patch.object(runner, "build", return_value=["bridge kohaku-overlay created"])
    notify = mocker.Mock()
    a = runner.Agent(cfg, stop=FakeStop(), notify=notify)
    assert a.start() is True
    assert a.stop.waits and a.stop.waits[0] <= 0.5
    assert reg.call_args[0][1:] == (ME, None)
    assert build.call_args[0][3] is None
    notify.assert_called_once_with("READY=1")
    assert runner.load_state(cfg["OVERLAY_STATE_FILE"])["runner_id"] == 1


def test_serve_with_the_host_down_builds_the_saved_allocation_then_registers_in_the_loop(
        cfg, mocker, caplog):
    """Issue 11.8: the unit is Type=notify; READY=1 must not wait for the Host."""
    runner.save_state(cfg["OVERLAY_STATE_FILE"], ALLOC, registered_at=1000.0)
    mocker.patch.object(runner, "route_source", return_value=ME)
    reg = mocker.patch.object(runner, "register", side_effect=[
        runner.HostUnreachable("connection refused"), runner.HostUnreachable("connection refused"),
        runner.parse_allocation(ALLOC)])
    hb = mocker.patch.object(runner, "heartbeat")
    build = mocker.patch.object(runner, "build", return_value=["bridge kohaku-overlay created"])
    notify = mocker.Mock()
    a = runner.Agent(cfg, stop=FakeStop(), notify=notify)
    with caplog.at_level(logging.INFO):
        assert a.start() is True
    assert build.call_args[0][1]["subnet"] == "10.1.0.0/16"      # the saved one
    notify.assert_called_once_with("READY=1")
    assert reg.call_count == 1 and reg.call_args[0][1:] == (ME, 1)
    assert "the overlay stays up on the saved allocation" in caplog.text
    a.beat()                                   # still down: registers again, no heartbeat
    a.beat()                                   # the Host is back: registered
    assert (reg.call_count, hb.call_count) == (3, 0)
    a.beat()
    assert hb.call_count == 1
    assert runner.load_state(cfg["OVERLAY_STATE_FILE"])["registered_at"] > 1000.0


def test_serve_without_a_saved_allocation_still_waits_for_the_host(cfg, mocker):
    mocker.patch.object(runner, "route_source", return_value=ME)
    mocker.patch.object(runner, "register", side_effect=runner.HostUnreachable("refused"))
    build = mocker.patch.object(runner, "build")
    a = runner.Agent(cfg, stop=FakeStop(stop_after=2))
    assert a.start() is False
    assert build.call_count == 0


def test_a_new_underlay_address_is_taken_at_the_next_registration_and_rebuilds_vxlan0(
        agent, mocker):
    """Issue 11.7: the Host answers a heartbeat from another address with 404; the runner
    registers from its address as it is now and rebuilds vxlan0 on it."""
    mocker.patch.object(runner, "heartbeat", side_effect=runner.NotRegistered("gone"))
    mocker.patch.object(runner, "runner_address", return_value="198.51.100.99")
    reg = mocker.patch.object(runner, "register", return_value=runner.parse_allocation(ALLOC))
    agent.beat()
    assert reg.call_args[0][1:] == ("198.51.100.99", 1)
    assert agent.build.call_args[0][2] == "198.51.100.99"


def test_an_evicted_runner_keeps_repairing_and_keeps_registering(agent, mocker):
    """Issue 11.5: evicted (404) and the pool full (503): the devices and rules stay, repairs
    go on with the last allocation, every heartbeat tries again."""
    mocker.patch.object(runner, "heartbeat", side_effect=runner.NotRegistered("gone"))
    reg = mocker.patch.object(runner, "register", side_effect=runner.OverlayError(
        "the host at 198.51.100.1:8000 has no free runner id"))
    teardown = mocker.patch.object(runner, "teardown")
    for _ in range(3):
        agent.beat()
    assert reg.call_count == 3
    assert agent.build.call_count == 1 and agent.build.call_args[0][1]["runner_id"] == 1
    assert teardown.call_count == 0


def test_the_heartbeat_record_goes_on_after_the_clock_is_set_back(agent, mocker, cfg):
    """Issue 11.12: the 30 s schedule is monotonic; last_heartbeat is the wall clock."""
    mocker.patch.object(runner, "heartbeat")
    clock = {"wall": 2000000000.0, "mono": 100.0}
    mocker.patch.object(runner.time, "time", side_effect=lambda: clock["wall"])
    mocker.patch.object(runner.time, "monotonic", side_effect=lambda: clock["mono"])
    agent.beat()
    assert runner.load_state(cfg["OVERLAY_STATE_FILE"])["last_heartbeat"] == 2000000000.0
    clock["wall"], clock["mono"] = 1000000000.0, 131.0       # set back 31 years, 31 s later
    agent.beat()
    assert runner.load_state(cfg["OVERLAY_STATE_FILE"])["last_heartbeat"] == 1000000000.0
    clock["wall"], clock["mono"] = 1000000010.0, 141.0
    agent.beat()                                               # 10 s: not yet
    assert runner.load_state(cfg["OVERLAY_STATE_FILE"])["last_heartbeat"] == 1000000000.0


def test_one_serve_per_state_file_and_down_refuses_while_it_runs(cfg, mocker, capsys):
    held = runner.hold_serve_lock(cfg)
    try:
        assert runner.serve_running(cfg) == str(os.getpid())
        with pytest.raises(runner.OverlayError) as e:
            runner.hold_serve_lock(cfg)
        assert str(e.value) == ("another serve (pid %d) already runs with the state file %s: "
                                "stop it first" % (os.getpid(), cfg["OVERLAY_STATE_FILE"]))
        mocker.patch.object(runner, "load_config", return_value=cfg)
        teardown = mocker.patch.object(runner, "teardown")
        assert runner.main(["down"]) == 1
        assert "serve (pid %d) is running" % os.getpid() in capsys.readouterr().err
        assert teardown.call_count == 0
        # issue 11.12: up refuses too (it would register and write the state file beside it)
        register = mocker.patch.object(runner, "register_with_retry")
        assert runner.main(["up"]) == 1
        assert capsys.readouterr().err == (
            "error: kohaku_overlay_runner.py serve (pid %d) is running and keeps this overlay "
            "built (and its state file) itself: stop it first (systemctl stop "
            "kohakuriver-overlay-runner), or leave the work to it\n" % os.getpid())
        assert register.call_count == 0
    finally:
        held.close()
    assert runner.serve_running(cfg) is None


def test_a_failing_ip_batch_names_the_line_that_failed(mocker):
    err = 'Cannot find device "vxlan0"\nCommand failed -:2\n'
    mocker.patch.object(runner, "run", side_effect=runner.CommandError(
        "`ip -batch -` failed (exit 1)", ["ip", "-batch", "-"], 1, err))
    with pytest.raises(runner.CommandError) as e:
        runner.ip_batch(["link set dev kohaku-overlay up", "link set dev vxlan0 up"])
    assert str(e.value) == '`ip link set dev vxlan0 up` failed: Cannot find device "vxlan0"'


def test_wrong_type_message_names_the_expected_type(tmp_path):
    p = tmp_path / "runner_config.py"
    p.write_text("HEARTBEAT_INTERVAL = 'often'\n")
    with pytest.raises(runner.ConfigError) as e:
        runner.load_config(str(p))
    assert str(e.value) == ("runner_config.py line 1: HEARTBEAT_INTERVAL must be a number, not "
                            "a string; fix the value")


def test_up_without_root_is_one_sentence(cfg, mocker, capsys, as_root):
    as_root.return_value = 1000
    mocker.patch.object(runner, "load_config", return_value=cfg)
    assert runner.main(["up"]) == 1
    assert capsys.readouterr().err == ("error: up changes links, routes and iptables, which "
                                       "needs root: run it as root (sudo)\n")


def test_status_text_and_json_on_a_built_node(cfg, node, mocker, capsys):
    n = node(built=True)
    n.networks["kohakuriver-overlay"] = docker_net(containers=["web"])
    runner.save_state(cfg["OVERLAY_STATE_FILE"], ALLOC, registered_at=0.0 + 1790000000)
    mocker.patch.object(runner, "load_config", return_value=cfg)
    assert runner.main(["status"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Overlay:          enabled",
        "Runner:           runner1 (id 1)",
        "Subnet:           10.1.0.0/16, gateway 10.1.0.1",
        "Host:             198.51.100.1, overlay 10.0.0.1, on this segment 10.1.0.254",
        "VNI / port / MTU: 101 / 4789 / 1450",
        "vxlan0:           present, up, mtu 1450, vni 101 local 198.51.100.11 remote 198.51.100.1",
        "kohaku-overlay:   present, up, mtu 1450, 10.1.0.1/16",
        "Route:            10.0.0.0/8 via 10.1.0.254 dev kohaku-overlay",
        "Docker network:   kohakuriver-overlay: present, 1 container(s)",
        "Registered:       2026-09-21 14:13:20 UTC",
        "Last heartbeat:   never"]
    assert runner.main(["status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["network"] == {"name": "kohakuriver-overlay", "present": True,
                             "containers": ["web"]}
    assert st["devices"]["vxlan0"]["remote"] == HOST
    assert st["allocation"] == ALLOC
    assert n.mutations() == []


def test_status_before_any_registration(cfg, node, mocker, capsys):
    node()
    mocker.patch.object(runner, "load_config", return_value=cfg)
    assert runner.main(["status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "Runner:         runner1 (not registered)"
    assert out[2] == "vxlan0:         absent"


@pytest.mark.parametrize("text,words", [
    ("OVERLAY_MTU = 0x" + "f" * 5000 + "\n",
     "runner_config.py line 1: OVERLAY_MTU = a 20000-bit number is out of range"),
    ("HOST_ADDRESS = " + "not " * 40000 + "1\n", "runner_config.py "),
    ("RUNNER_NAME = '" + "x" * 500 + "'\n", "RUNNER_NAME in runner_config.py is 'xxx"),
])
def test_hostile_config_values_are_config_errors_with_bounded_messages(tmp_path, text, words):
    p = tmp_path / "runner_config.py"
    p.write_text(text)
    with pytest.raises(runner.ConfigError) as e:
        runner.load_config(str(p))
    assert str(e.value).startswith(words)
    assert len(str(e.value)) < 300


def test_down_with_docker_unreachable_removes_the_rest_and_says_what_is_left(cfg, node):
    n = node(built=True)
    n.docker_up = False
    with pytest.raises(runner.OverlayError) as e:
        runner.teardown(cfg)
    assert n.argvs() == [["iptables-restore", "--noflush"], ["ip", "-batch", "-"]]
    assert str(e.value).startswith("the rest is removed but not the Docker network "
                                   "kohakuriver-overlay, since docker is not reachable")


def test_down_without_docker_installed_is_a_success(cfg, node, mocker):
    n = node(built=True)
    probe = n.probe

    def no_docker(argv):
        if argv[0] == "docker":
            raise runner.CommandError("docker is not installed: install docker.io", argv, 127)
        return probe(argv)
    n.probe = no_docker
    changes = runner.teardown(cfg)
    assert n.argvs() == [["iptables-restore", "--noflush"], ["ip", "-batch", "-"]]
    assert changes[-1] == "3 marked iptables rule(s) and the chain KOHAKU-VXLAN removed"
