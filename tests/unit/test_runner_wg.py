"""Unit tests of the runner's WireGuard side (encryption on): keys, kohaku-wg, peers, MTU rule.

The node is test_runner's scripted FakeNode, extended with a `wg show` dump, `wg genkey`,
`wg pubkey`, the INPUT chain and an underlay eth0 (MTU 1500).
"""

import json
import logging
import os
import stat
from pathlib import Path

import pytest

import test_runner as base

runner = base.runner

PRIV = "sDdrII8zPN6ZL49PRBKIYakCt4hU3PgsznWVWRXPhWk="
PUB = "8j5HGeeO6kifm5bHVkUKUonREAc5cK9lJUY7ZUjZg38="
HOST_PUB = "zoqzNnmdkTXXIjN6uNs62/r9rm60A93zFCS7n/Y+RUc="
OTHER_PUB = "H4iiBV58GYmvvRV1GkeenMfWx61/UQYsBd9Z23dX1TM="
ME, HOST = base.ME, base.HOST
WG = {"encryption": "wireguard", "wg_port": 51820, "host_wg_public_key": HOST_PUB,
      "host_wg_ip": "172.16.0.1", "wg_ip": "172.16.0.2", "wg_subnet": "172.16.0.0/23"}
GUARD = ('-A INPUT ! -i kohaku-wg -p udp -m udp --dport 4789 -m u32 --u32 '
         '"0x0>>0x16&0x3c@0xc>>0x8=0x64:0x163" -m comment --comment kohaku-overlay -j DROP')


def wg_alloc(**over):
    a = dict(base.ALLOC, mtu=1390, **WG)
    a.update(over)
    return runner.parse_allocation(a)


def wg_link(mtu=1440, addrs=("172.16.0.2/23",), up=True, kind="tun"):
    return {"ifname": "kohaku-wg", "mtu": mtu,
            "flags": ["POINTOPOINT", "MULTICAST", "NOARP"] + (["UP", "LOWER_UP"] if up else []),
            "linkinfo": {"info_kind": kind},
            "addr_info": [{"family": "inet", "local": a.split("/")[0],
                           "prefixlen": int(a.split("/")[1])} for a in addrs]}


def eth0(mtu=1500):
    return {"ifname": "eth0", "mtu": mtu, "flags": ["BROADCAST", "UP", "LOWER_UP"],
            "linkinfo": {"info_kind": "veth"},
            "addr_info": [{"family": "inet", "local": ME, "prefixlen": 24}]}


def dump(public=PUB, port=51820, peers=((HOST_PUB, HOST + ":51820", "172.16.0.1/32", 25),)):
    lines = ["%s\t%s\t%d\toff" % (PRIV, public, port)]
    for key, endpoint, allowed, keepalive in peers:
        lines.append("%s\t(none)\t%s\t%s\t1700000000\t100\t200\t%s" % (
            key, endpoint, allowed, keepalive or "off"))
    return "\n".join(lines) + "\n"


class WgNode(base.FakeNode):
    def __init__(self, encrypted_built=False, **kw):
        base.FakeNode.__init__(self, **kw)
        self.links["eth0"] = eth0()
        self.wg_dump = None
        if encrypted_built:
            self.links["kohaku-overlay"] = base.bridge_link(mtu=1390)
            self.links["vxlan0"] = base.vxlan_link(local="172.16.0.2", remote="172.16.0.1",
                                                   mtu=1390)
            self.links["kohaku-wg"] = wg_link()
            self.networks["kohakuriver-overlay"] = base.docker_net(mtu="1390")
            self.input = [GUARD] + self.input        # the guard above the VXLAN filter's jump
            # the VXLAN filter takes the Host's tunnel address, vxlan0's remote (issue 11.3)
            self.chains["KOHAKU-VXLAN"] = [base.VXCHAIN[0].replace(HOST + "/32", "172.16.0.1/32"),
                                           base.VXCHAIN[1]]
            self.wg_dump = dump()

    def __call__(self, argv, check=True, mutates=True, input=None, timeout=30, echo=None):
        argv = [str(a) for a in argv]
        if argv == ["wg", "genkey"] and not runner.DRY_RUN:
            self.calls.append(base.Call(argv, mutates, input))
            return runner.Result(0, PRIV + "\n", "")
        return base.FakeNode.__call__(self, argv, check, mutates, input, timeout, echo)

    def probe(self, argv):
        if argv == ["wg", "show", "kohaku-wg", "dump"]:
            if self.wg_dump is None:
                return 1, "", "Unable to access interface: No such device\n"
            return 0, self.wg_dump, ""
        if argv == ["wg", "pubkey"]:
            return 0, PUB + "\n", ""
        if argv == ["iptables", "-S", "INPUT"]:
            return 0, "-P INPUT ACCEPT\n" + "".join(r + "\n" for r in self.input), ""
        return base.FakeNode.probe(self, argv)


@pytest.fixture(autouse=True)
def as_root(mocker):
    return mocker.patch.object(runner.os, "geteuid", return_value=0)


@pytest.fixture(autouse=True)
def no_system_bus(tmp_path, monkeypatch):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=%s" % (tmp_path / "no-bus"))


@pytest.fixture(autouse=True)
def no_kernel_module(mocker):
    """This machine's kernel has no WireGuard: wireguard-go, unless a test says otherwise."""
    return mocker.patch.object(runner, "probe_wg_impl", return_value="wireguard-go")


@pytest.fixture
def cfg(tmp_path):
    c = dict(runner.KEY_DEFAULTS)
    c.update(HOST_ADDRESS=HOST, RUNNER_NAME="runner1", OVERLAY_ENABLED=True, OVERLAY_MTU=1390,
             OVERLAY_STATE_FILE=str(tmp_path / "state" / "runner.json"),
             _path=str(tmp_path / "runner_config.py"))
    return c


@pytest.fixture
def node(mocker):
    def make(**kw):
        n = WgNode(**kw)
        mocker.patch.object(runner, "run", side_effect=n)
        mocker.patch.object(runner, "read_sysctl", side_effect=n.sysctl)
        return n
    return make


def key_file(cfg):
    return str(Path(cfg["OVERLAY_STATE_FILE"]).parent / "runner-wg.key")


def make_keys(cfg, mode=0o600):
    folder = Path(cfg["OVERLAY_STATE_FILE"]).parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runner-wg.key").write_text(PRIV + "\n")
    os.chmod(str(folder / "runner-wg.key"), mode)
    (folder / "runner-wg.pub").write_text(PUB + "\n")


# ---- the answer, the MTU rule, kernel or userspace --------------------------------------------


def test_the_encryption_settings_of_the_answer_are_parsed_and_saved(cfg):
    a = wg_alloc()
    assert {k: a[k] for k in runner.WG_KEYS} == WG
    assert runner.parse_allocation(dict(base.ALLOC))["encryption"] == "none"
    runner.save_state(cfg["OVERLAY_STATE_FILE"], a)
    saved = json.loads(Path(cfg["OVERLAY_STATE_FILE"]).read_text())
    assert {k: saved[k] for k in runner.WG_KEYS} == WG
    assert runner.saved_allocation(saved) == a
    assert PRIV not in Path(cfg["OVERLAY_STATE_FILE"]).read_text()


@pytest.mark.parametrize("over,why", [
    ({"encryption": "ipsec"}, "encryption 'ipsec'"),
    ({"host_wg_public_key": "not-a-key"}, "host_wg_public_key is not a WireGuard key"),
    ({"wg_ip": "172.17.0.2"}, "wg_ip outside wg_subnet"),
    ({"wg_port": True}, "wg_port True"),
])
def test_a_malformed_encryption_answer_is_refused(over, why):
    with pytest.raises(runner.OverlayError) as e:
        wg_alloc(**over)
    assert str(e.value) == ("the host's registration answer is malformed (%s): update the host "
                            "script" % why)


def test_the_mtu_rule_names_the_value_to_set():
    assert runner.wg_mtu_error(1390, 1500, "eth0") is None
    assert runner.wg_mtu_error(1391, 1500, "eth0") == (
        "OVERLAY_MTU 1391 does not fit VXLAN over WireGuard on eth0 (MTU 1500 - 50 - 60): set "
        "OVERLAY_MTU = 1390 on the Host and on every runner")
    assert runner.wg_mtu_error(1450, 9000, "eth0") is None


def test_an_overlay_mtu_that_does_not_fit_is_refused_before_anything_changes(cfg, node):
    n = node()
    with pytest.raises(runner.ConfigError) as e:
        runner.build(cfg, wg_alloc(mtu=1450), ME)
    assert str(e.value) == (
        "OVERLAY_MTU 1450 does not fit VXLAN over WireGuard on eth0 (MTU 1500 - 50 - 60): set "
        "OVERLAY_MTU = 1390 on the Host and on every runner")
    assert n.mutations() == []


@pytest.mark.parametrize("loaded,text,impl", [
    (True, "", "kernel"),
    (False, "kernel/drivers/net/wireguard/wireguard.ko: kernel/net/ipv6/ip6_udp_tunnel.ko\n",
     "kernel"),
    (False, "kernel/drivers/net/wireguard/wireguard.ko\n", "kernel"),
    (False, "kernel/drivers/net/vxlan/vxlan.ko:\n", "wireguard-go"),
    (False, "", "wireguard-go"),
])
def test_kernel_wireguard_is_used_where_the_kernel_has_it(loaded, text, impl):
    assert runner.wg_impl(loaded, text) == impl


def test_kohaku_wg_is_a_kernel_device_where_possible_else_wireguard_go(mocker, caplog):
    caplog.set_level(logging.INFO)
    stack = runner.contextlib.ExitStack()
    run = mocker.patch.object(runner, "run")
    mocker.patch.object(runner, "probe_wg_impl", return_value="kernel")
    assert runner.create_wg_link(stack) == "kernel"
    assert [c.args[0] for c in run.call_args_list] == [
        ["ip", "link", "add", "kohaku-wg", "type", "wireguard"]]
    assert caplog.messages[-1] == "kohaku-wg: kernel WireGuard"

    run.reset_mock()
    run.side_effect = [runner.CommandError("x", [], 2, "Error: Unknown device type."),
                       runner.Result(0, "", "")]
    assert runner.create_wg_link(stack) == "wireguard-go"
    assert [c.args[0] for c in run.call_args_list] == [
        ["ip", "link", "add", "kohaku-wg", "type", "wireguard"], ["wireguard-go", "kohaku-wg"]]
    assert caplog.messages[-1] == ("kohaku-wg: userspace wireguard-go (this kernel has no "
                                   "WireGuard module)")

    run.reset_mock()
    run.side_effect = None
    mocker.patch.object(runner, "probe_wg_impl", return_value="wireguard-go")
    assert runner.create_wg_link(stack) == "wireguard-go"
    assert [c.args[0] for c in run.call_args_list] == [["wireguard-go", "kohaku-wg"]]
    stack.pop_all()


# ---- keys -------------------------------------------------------------------------------------


def test_the_key_pair_is_made_once_mode_0600_and_never_logged(cfg, node, caplog):
    n = node()
    with caplog.at_level(logging.DEBUG):
        assert runner.ensure_wg_key(cfg) == PUB
        assert runner.ensure_wg_key(cfg) == PUB          # reused: no second genkey
    priv = Path(key_file(cfg))
    assert priv.read_text() == PRIV + "\n"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE(priv.with_suffix(".pub").stat().st_mode) == 0o600
    assert [c.argv for c in n.calls] == [["wg", "genkey"], ["wg", "pubkey"]]
    assert n.calls[1].input == PRIV + "\n"              # on stdin, never in argv
    assert PRIV not in caplog.text
    assert PUB in caplog.text


def test_a_key_file_readable_by_others_is_tightened(cfg, node, caplog):
    node()
    make_keys(cfg, mode=0o644)
    with caplog.at_level(logging.WARNING):
        assert runner.wg_public_key(cfg) == PUB
    assert stat.S_IMODE(os.stat(key_file(cfg)).st_mode) == 0o600
    assert caplog.messages == ["%s was readable by others (mode 0644): set to 0600"
                               % key_file(cfg)]


def test_a_lost_public_key_is_derived_again_on_stdin(cfg, node):
    n = node()
    make_keys(cfg)
    os.unlink(key_file(cfg)[:-4] + ".pub")
    assert runner.wg_public_key(cfg) == PUB
    assert [(c.argv, c.input) for c in n.calls] == [(["wg", "pubkey"], PRIV + "\n")]


def test_a_garbled_key_file_is_one_sentence(cfg, node):
    node()
    make_keys(cfg)
    Path(key_file(cfg)).write_text("garbage\n")
    os.unlink(key_file(cfg)[:-4] + ".pub")
    with pytest.raises(runner.OverlayError) as e:
        runner.wg_public_key(cfg)
    assert str(e.value) == ("%s does not hold a WireGuard key: remove it (a new key pair is then "
                            "made and registered)" % key_file(cfg))


# ---- peers ------------------------------------------------------------------------------------


def test_plan_wg_sets_key_port_and_the_host_peer_in_one_command():
    want = runner.wg_want(wg_alloc(), PUB)
    argv, changes = runner.plan_wg(want, {}, "/state/runner-wg.key")
    assert argv == ["wg", "set", "kohaku-wg", "private-key", "/state/runner-wg.key",
                    "listen-port", "51820", "peer", HOST_PUB, "allowed-ips", "172.16.0.1/32",
                    "endpoint", HOST + ":51820", "persistent-keepalive", "25"]
    assert changes == ["kohaku-wg key pair %s" % PUB, "kohaku-wg listens on UDP 51820",
                       "kohaku-wg peer %s added (172.16.0.1/32)" % HOST_PUB]
    assert PRIV not in " ".join(argv)


def test_plan_wg_changes_nothing_when_it_matches_and_removes_stale_peers():
    want = runner.wg_want(wg_alloc(), PUB)
    assert runner.plan_wg(want, runner.parse_wg_dump(dump()), "/k") == (None, [])
    have = runner.parse_wg_dump(dump(peers=[(HOST_PUB, HOST + ":51820", "172.16.0.1/32", 25),
                                            (OTHER_PUB, "(none)", "172.16.0.9/32", 0)]))
    assert runner.plan_wg(want, have, "/k") == (
        ["wg", "set", "kohaku-wg", "peer", OTHER_PUB, "remove"],
        ["kohaku-wg stale peer %s removed" % OTHER_PUB])
    # a new host key (the host's key files were lost): the old peer goes, the new one comes
    have = runner.parse_wg_dump(dump(peers=[(OTHER_PUB, HOST + ":51820", "172.16.0.1/32", 25)]))
    argv, _ = runner.plan_wg(want, have, "/k")
    assert argv == ["wg", "set", "kohaku-wg", "peer", HOST_PUB, "allowed-ips", "172.16.0.1/32",
                    "endpoint", HOST + ":51820", "persistent-keepalive", "25",
                    "peer", OTHER_PUB, "remove"]


def test_the_dump_parser_drops_the_private_key():
    have = runner.parse_wg_dump(dump())
    assert PRIV not in json.dumps(have)
    assert have == {"public_key": PUB, "listen_port": 51820, "peers": {HOST_PUB: {
        "endpoint": HOST + ":51820", "allowed_ips": ["172.16.0.1/32"], "handshake": 1700000000,
        "rx": 100, "tx": 200, "keepalive": 25}}}


# ---- build ------------------------------------------------------------------------------------

WG_BATCH = [
    "link add kohaku-overlay address 02:6b:62:00:00:01 mtu 1390 type bridge",
    "addr add 10.1.0.1/16 dev kohaku-overlay",
    "link set dev kohaku-wg mtu 1440",
    "addr add 172.16.0.2/23 dev kohaku-wg",
    "link set dev kohaku-wg up",
    "link add vxlan0 mtu 1390 type vxlan id 101 local 172.16.0.2 remote 172.16.0.1 "
    "dstport 4789 nolearning",
    "link set dev vxlan0 master kohaku-overlay up",
    "link set dev kohaku-overlay up",
    "route replace 10.0.0.0/8 via 10.1.0.254 dev kohaku-overlay",
]


def test_clean_node_builds_the_overlay_over_kohaku_wg(cfg, node):
    n = node()
    changes = runner.build(cfg, wg_alloc(), ME)
    m = n.mutations()
    assert [c.argv for c in m] == [
        ["wg", "genkey"],
        ["wireguard-go", "kohaku-wg"],
        ["wg", "set", "kohaku-wg", "private-key", key_file(cfg), "listen-port", "51820", "peer",
         HOST_PUB, "allowed-ips", "172.16.0.1/32", "endpoint", HOST + ":51820",
         "persistent-keepalive", "25"],
        ["ip", "-batch", "-"],
        base.REDIRECTS_OFF,
        base.CREATE_NET[:-2] + ["com.docker.network.driver.mtu=1390", "kohakuriver-overlay"],
        ["iptables-restore", "--noflush"],
        ["iptables-restore", "--noflush"],
    ]
    assert m[3].input.splitlines() == WG_BATCH
    assert m[7].input == "*filter\n-I INPUT 1" + GUARD[len("-A INPUT"):] + "\nCOMMIT\n"
    assert "kohaku-wg created (wireguard-go)" in changes
    assert "VXLAN accepted only through kohaku-wg" in changes
    assert PRIV not in json.dumps([c.argv for c in n.calls])


def test_fully_built_encrypted_node_issues_no_mutating_command(cfg, node):
    n = node(encrypted_built=True, built=True)
    n.links["kohaku-overlay"] = base.bridge_link(mtu=1390)
    n.links["vxlan0"] = base.vxlan_link(local="172.16.0.2", remote="172.16.0.1", mtu=1390)
    make_keys(cfg)
    assert runner.build(cfg, wg_alloc(), ME) == []
    assert n.mutations() == []


def test_switching_encryption_off_puts_vxlan0_back_on_the_underlay(cfg, node):
    n = node(encrypted_built=True, built=True)
    n.links["kohaku-overlay"] = base.bridge_link(mtu=1390)
    n.links["vxlan0"] = base.vxlan_link(local="172.16.0.2", remote="172.16.0.1", mtu=1390)
    make_keys(cfg)
    changes = runner.build(cfg, runner.parse_allocation(dict(base.ALLOC, mtu=1390)), ME)
    m = n.mutations()
    # the VXLAN filter goes back to the Host's physical address (11.3), then the guard goes
    assert [c.argv for c in m] == [["ip", "-batch", "-"], ["iptables-restore", "--noflush"],
                                   ["iptables-restore", "--noflush"]]
    assert m[1].input == ("*filter\n-F KOHAKU-VXLAN\n" + "".join(r + "\n" for r in base.VXCHAIN) +
                          "COMMIT\n")
    assert m[0].input.splitlines() == [
        "link del kohaku-wg", "link del vxlan0",
        "link add vxlan0 mtu 1390 type vxlan id 101 local 198.51.100.11 remote 198.51.100.1 "
        "dstport 4789 nolearning",
        "link set dev vxlan0 master kohaku-overlay up"]
    assert m[2].input == "*filter\n" + runner.delete_rule(GUARD) + "\nCOMMIT\n"
    assert "kohaku-wg removed (encryption off)" in changes


def test_switching_encryption_on_recreates_vxlan0_on_the_tunnel_addresses(cfg, node):
    n = node(built=True)
    n.links["kohaku-overlay"] = base.bridge_link(mtu=1390)
    n.links["vxlan0"] = base.vxlan_link(mtu=1390)
    n.networks["kohakuriver-overlay"] = base.docker_net(mtu="1390", containers=["c1"])
    runner.build(cfg, wg_alloc(), ME)
    argvs = [c.argv[:2] for c in n.mutations()]
    # two restores: the VXLAN filter now takes the Host's tunnel address (11.3), then the guard
    assert argvs == [["wg", "genkey"], ["wireguard-go", "kohaku-wg"], ["wg", "set"],
                     ["ip", "-batch"], ["iptables-restore", "--noflush"],
                     ["iptables-restore", "--noflush"]]
    assert "172.16.0.1/32" in n.mutations()[4].input
    batch = n.mutations()[3].input.splitlines()
    assert "link del vxlan0" in batch
    assert ("link add vxlan0 mtu 1390 type vxlan id 101 local 172.16.0.2 remote 172.16.0.1 "
            "dstport 4789 nolearning") in batch
    assert not any(c.argv[:2] == ["docker", "network"] for c in n.mutations())


def test_down_removes_kohaku_wg_and_the_guard_but_keeps_the_keys(cfg, node):
    n = node(encrypted_built=True, built=True)
    n.forward = base.FWD + [GUARD] + base.DOCKER_FWD      # `iptables -S`: every chain
    make_keys(cfg)
    runner.teardown(cfg)
    batch = [c for c in n.mutations() if c.argv == ["ip", "-batch", "-"]][0].input.splitlines()
    assert "link del kohaku-wg" in batch
    restore = [c for c in n.mutations() if c.argv[0] == "iptables-restore"][0].input
    assert runner.delete_rule(GUARD) in restore.splitlines()
    assert Path(key_file(cfg)).read_text() == PRIV + "\n"


def test_up_dry_run_shows_the_plan_without_any_key_and_makes_none(cfg, mocker, capsys):
    n = WgNode()

    def fake_subprocess(argv, **kw):
        rc, out, err = n.probe(argv)
        n.calls.append(base.Call(argv, False, None))
        return base.Proc(rc, out, err)
    mocker.patch.object(runner.subprocess, "run", side_effect=fake_subprocess)
    mocker.patch.object(runner, "read_sysctl", side_effect=n.sysctl)
    runner.save_state(cfg["OVERLAY_STATE_FILE"], wg_alloc())
    mocker.patch.object(runner, "load_config", return_value=cfg)
    assert runner.main(["up", "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "[#] wg genkey > %s  # mode 0600" % key_file(cfg) in lines
    assert "[#] wireguard-go kohaku-wg" in lines
    assert ("[#] wg set kohaku-wg private-key %s listen-port 51820 peer %s allowed-ips "
            "172.16.0.1/32 endpoint %s:51820 persistent-keepalive 25" % (key_file(cfg), HOST_PUB,
                                                                         HOST)) in lines
    assert PRIV not in out
    assert not os.path.exists(key_file(cfg))
    assert all(not c.mutates for c in n.calls)


# ---- registration and heartbeat ---------------------------------------------------------------


def test_registration_makes_the_keys_when_the_host_encrypts_and_sends_the_public_key(
        cfg, node, mocker):
    n = node()
    answers = [(200, dict(base.ALLOC, mtu=1390, **WG)), (200, dict(base.ALLOC, mtu=1390, **WG))]
    api = mocker.patch.object(runner, "api_call", side_effect=answers)
    alloc = runner.register(cfg, ME)
    assert alloc["encryption"] == "wireguard"
    bodies = [c.args[3] for c in api.call_args_list]
    assert "wg_public_key" not in bodies[0]
    assert bodies[1]["wg_public_key"] == PUB
    assert bodies[1]["previous_runner_id"] == 1
    assert PRIV not in json.dumps(bodies)
    assert [c.argv for c in n.calls] == [["wg", "genkey"], ["wg", "pubkey"]]


def test_registration_without_encryption_makes_no_keys(cfg, node, mocker):
    n = node()
    mocker.patch.object(runner, "api_call", return_value=(200, dict(base.ALLOC)))
    assert runner.register(cfg, ME)["encryption"] == "none"
    assert n.calls == []
    assert not os.path.exists(key_file(cfg))


def test_a_heartbeat_with_new_encryption_settings_registers_again(cfg, mocker):
    agent = runner.Agent(cfg, notify=lambda m: None)
    agent.alloc, agent.address, agent.built = runner.parse_allocation(dict(base.ALLOC)), ME, True
    mocker.patch.object(runner, "heartbeat", return_value=dict({"ok": True}, **WG))
    rereg = mocker.patch.object(agent, "reregister")
    mocker.patch.object(agent, "repair")
    agent.beat()
    assert rereg.call_count == 1
    mocker.patch.object(runner, "heartbeat", return_value={"ok": True, "encryption": "none"})
    agent.beat()
    assert rereg.call_count == 1
