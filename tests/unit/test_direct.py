"""Unit tests of the runner's direct routing (issue 12): the peer table, its plan and batch text,
the probe round and the per-peer fallback state machine, the build and teardown of vxdirect0,
the serve loop's learning from heartbeat answers, and status. No root, no namespaces: the node is
test_runner's FakeNode, extended with vxdirect0's routes, neighbours and FDB.
"""

import json
import socket
import struct
import time

import pytest

from test_runner import ALLOC, FWD, HOST, ME, U32, VXCHAIN, FakeNode, alloc, runner

PEER_KEYS = ("runner_name", "runner_id", "subnet", "physical_ip", "vtep_mac")


def peer(i, **over):
    p = {"runner_name": "runner%d" % i, "runner_id": i, "subnet": "10.%d.0.0/16" % i,
         "physical_ip": "198.51.100.%d" % (10 + i), "vtep_mac": runner.vtep_mac(i)}
    p.update(over)
    return p


def direct_alloc():
    return alloc(direct_routing=True, peers_version=7)


def table(*ids, version=7):
    return {"version": version, "peers": [peer(i) for i in ids]}


def hexip(ip):
    return "%08X" % int.from_bytes(socket.inet_aton(ip), "little")


class DirectNode(FakeNode):
    """FakeNode plus vxdirect0: its routes and neighbours as /proc shows them, its FDB as
    `bridge -j fdb show` does. Mutations are recorded, not applied."""

    def __init__(self, direct=False, peers=(), relayed=(), **kw):
        FakeNode.__init__(self, **kw)
        self.routes, self.neigh, self.fdb = {}, {}, {}
        if direct:
            self.links[runner.DIRECT_DEV] = direct_link()
            w = runner.peers_wanted(peers, relayed)
            self.routes, self.neigh, self.fdb = w["routes"], w["neigh"], w["fdb"]

    def __call__(self, argv, check=True, mutates=True, input=None, timeout=30, echo=None):
        res = FakeNode.__call__(self, argv, check, mutates, input, timeout, echo)
        if mutates and not runner.DRY_RUN and argv[:2] == ["ip", "-batch"] and \
                "link add vxdirect0 " in input:
            self.links[runner.DIRECT_DEV] = direct_link()
        return res

    def probe(self, argv):
        if argv == ["bridge", "-j", "fdb", "show", "dev", runner.DIRECT_DEV]:
            if runner.DIRECT_DEV not in self.links:
                return 1, "", 'Cannot find device "vxdirect0"\n'
            return 0, json.dumps([{"mac": m, "dst": d, "flags": ["self"], "state": "permanent"}
                                  for m, d in self.fdb.items()] +
                                 [{"mac": "33:33:00:00:00:01", "flags": ["self"],
                                   "state": "permanent"}]), ""
        return FakeNode.probe(self, argv)

    def proc(self, name):
        if name == "route":
            lines = ["Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU"
                     "\tWindow\tIRTT", "eth0\t00000000\t016433C6\t0003\t0\t0\t0\t00000000\t0\t0\t0"]
            for dst, gw in self.routes.items():
                net = runner.ipaddress.IPv4Network(dst)
                lines.append("%s\t%s\t%s\t%04X\t0\t0\t0\t%s\t0\t0\t0" % (
                    runner.DIRECT_DEV, hexip(str(net.network_address)), hexip(gw or "0.0.0.0"),
                    3 if gw else 1, hexip(str(net.netmask))))
            return "\n".join(lines) + "\n"
        lines = ["IP address       HW type     Flags       HW address            Mask     Device",
                 "198.51.100.1     0x1         0x2         02:00:00:00:00:01     *        eth0"]
        for ip, mac in self.neigh.items():
            lines.append("%s 0x1 %s %s * %s" % (
                ip, "0x6" if mac else "0x0", mac or "00:00:00:00:00:00", runner.DIRECT_DEV))
        return "\n".join(lines) + "\n"

    def batch(self, tool):
        return [c.input.splitlines() for c in self.mutations() if c.argv == [tool, "-batch", "-"]]


def direct_link(mac=None, vni=100, mtu=1450, addrs=("10.1.0.0/32",), up=True):
    return {"ifname": runner.DIRECT_DEV, "mtu": mtu, "address": mac or runner.vtep_mac(1),
            "flags": ["BROADCAST", "MULTICAST"] + (["UP", "LOWER_UP"] if up else []),
            "linkinfo": {"info_kind": "vxlan", "info_data": {
                "id": vni, "local": ME, "port": 4789, "learning": False, "ttl": 0}},
            "addr_info": [{"family": "inet", "local": a.split("/")[0],
                           "prefixlen": int(a.split("/")[1])} for a in addrs]}


@pytest.fixture
def cfg(tmp_path):
    """test_runner's cfg (a fixture cannot be imported under its name without shadowing)."""
    c = dict(runner.KEY_DEFAULTS)
    c.update(HOST_ADDRESS=HOST, RUNNER_NAME="runner1", OVERLAY_ENABLED=True,
             OVERLAY_STATE_FILE=str(tmp_path / "state" / "runner.json"),
             _path=str(tmp_path / "runner_config.py"))
    return c


@pytest.fixture(autouse=True)
def no_system_bus(monkeypatch, tmp_path):
    """firewall-cmd is never asked: firewalld cannot run without its bus."""
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=%s" % (tmp_path / "no-bus"))


@pytest.fixture
def dnode(mocker):
    def make(**kw):
        n = DirectNode(**kw)
        mocker.patch.object(runner, "run", side_effect=n)
        mocker.patch.object(runner, "read_sysctl", side_effect=lambda name: n.sysctls.get(
            name, n.sysctl(name)))
        mocker.patch.object(runner, "read_proc_net", side_effect=n.proc)
        n.sysctls = {}
        return n
    return make


# ---- settings and the peer table --------------------------------------------------------------


def test_settings_default_off_and_take_the_version_only_when_on():
    assert runner.parse_settings({}) == {"direct_routing": False, "peers_version": 0}
    assert runner.parse_settings({"direct_routing": False, "peers_version": 5}) == \
        {"direct_routing": False, "peers_version": 0}
    assert runner.parse_settings({"direct_routing": True, "peers_version": 5}) == \
        {"direct_routing": True, "peers_version": 5}
    assert runner.parse_settings({"direct_routing": 1, "peers_version": True}) == \
        {"direct_routing": False, "peers_version": 0}
    assert runner.parse_settings({"direct_routing": True, "peers_version": "5"}) == \
        {"direct_routing": True, "peers_version": 0}
    assert runner.parse_allocation(dict(ALLOC, direct_routing=True, peers_version=3))[
        "settings"] == {"direct_routing": True, "peers_version": 3}


def test_vtep_mac_is_fixed_by_the_runner_id_and_locally_administered():
    assert runner.vtep_mac(1) == "02:6b:64:00:00:01"
    assert runner.vtep_mac(255) == "02:6b:64:00:00:ff"
    assert runner.vtep_mac(0x10203) == "02:6b:64:01:02:03"


def test_peer_table_drops_this_runner_sorts_by_id_and_keeps_extra_keys():
    obj = {"version": 9, "peers": [peer(3, wg_public_key="K3", wg_ip="10.255.0.3"), peer(1),
                                   peer(2)]}
    got = runner.parse_peers(obj, "runner1")
    assert got["version"] == 9
    assert [p["runner_id"] for p in got["peers"]] == [2, 3]
    assert got["peers"][1]["wg_public_key"] == "K3"
    assert got["peers"][1]["wg_ip"] == "10.255.0.3"


@pytest.mark.parametrize("obj,words", [
    ([], "no list of peers"),
    ({"version": "1", "peers": []}, "version '1'"),
    ({"version": 1, "peers": [{"runner_name": "r2"}]}, "a peer lacks one of runner_name"),
    ({"version": 1, "peers": [peer(2, runner_id=True)]}, "runner_id True"),
    ({"version": 1, "peers": [peer(2, vtep_mac="02:6B:6F:00:00:02 x")]}, "vtep_mac"),
    ({"version": 1, "peers": [peer(2, subnet="10.2.0.1/16")]}, "has host bits set"),
    ({"version": 1, "peers": [peer(2, physical_ip="198.51.100")]}, "198.51.100"),
    ({"version": 1, "peers": [peer(2, runner_name="-x")]}, "runner_name '-x'"),
])
def test_a_malformed_peer_table_is_refused_whole_in_one_sentence(obj, words):
    with pytest.raises(runner.OverlayError) as e:
        runner.parse_peers(obj, "runner1")
    msg = str(e.value)
    assert msg.startswith("the host's peer table is malformed (")
    assert words in msg
    assert msg.endswith("update the host script")


# ---- the plan: wanted vs have, rendered as batch text -----------------------------------------


def test_wanted_state_per_peer_and_a_relayed_peer_keeps_all_but_its_subnet_route():
    w = runner.peers_wanted([peer(2), peer(3)], relayed={"runner3"})
    assert w == {"routes": {"10.2.0.0/32": None, "10.2.0.0/16": "10.2.0.0", "10.3.0.0/32": None},
                 "neigh": {"10.2.0.0": "02:6b:64:00:00:02", "10.3.0.0": "02:6b:64:00:00:03"},
                 "fdb": {"02:6b:64:00:00:02": "198.51.100.12",
                         "02:6b:64:00:00:03": "198.51.100.13"}}


def test_wanted_addresses_follow_the_subnet_layout_not_a_fixed_10_x():
    p = peer(5, subnet="172.16.5.0/24")
    w = runner.peers_wanted([p])
    assert w["routes"] == {"172.16.5.0/32": None, "172.16.5.0/24": "172.16.5.0"}
    assert w["neigh"] == {"172.16.5.0": runner.vtep_mac(5)}


EMPTY = {"routes": {}, "neigh": {}, "fdb": {}}


def test_plan_from_nothing_sets_everything_and_renders_the_batch_text():
    actions = runner.plan_peers(runner.peers_wanted([peer(2)]), EMPTY)
    ip_lines, bridge_lines = runner.render_peer_actions(actions)
    assert ip_lines == [
        "neigh replace 10.2.0.0 lladdr 02:6b:64:00:00:02 dev vxdirect0 nud permanent",
        "route replace 10.2.0.0/16 via 10.2.0.0 dev vxdirect0 onlink",
        "route replace 10.2.0.0/32 dev vxdirect0 scope link"]
    assert bridge_lines == ["fdb replace 02:6b:64:00:00:02 dev vxdirect0 dst 198.51.100.12 "
                            "self permanent"]
    assert runner.describe_peer_actions(actions) == [
        "vxdirect0: 1 FDB entr(ies) set", "vxdirect0: 1 neighbour(s) set",
        "vxdirect0: 2 route(s) set"]


def test_plan_of_what_is_there_is_empty():
    w = runner.peers_wanted([peer(2), peer(3)], relayed={"runner2"})
    assert runner.plan_peers(w, json.loads(json.dumps(w))) == []


def test_plan_of_a_peer_falling_back_removes_only_its_subnet_route():
    have = runner.peers_wanted([peer(2), peer(3)])
    actions = runner.plan_peers(runner.peers_wanted([peer(2), peer(3)], {"runner3"}), have)
    assert runner.render_peer_actions(actions) == (["route del 10.3.0.0/16 dev vxdirect0"], [])
    back = runner.plan_peers(have, runner.peers_wanted([peer(2), peer(3)], {"runner3"}))
    assert runner.render_peer_actions(back) == (
        ["route replace 10.3.0.0/16 via 10.3.0.0 dev vxdirect0 onlink"], [])


def test_plan_of_a_peer_gone_deletes_its_entries_and_a_moved_peer_only_its_fdb():
    have = runner.peers_wanted([peer(2), peer(3)])
    gone = runner.render_peer_actions(runner.plan_peers(runner.peers_wanted([peer(2)]), have))
    assert gone == (["route del 10.3.0.0/16 dev vxdirect0", "route del 10.3.0.0/32 dev vxdirect0",
                     "neigh del 10.3.0.0 dev vxdirect0"],
                    ["fdb del 02:6b:64:00:00:03 dev vxdirect0 dst 198.51.100.13 self"])
    moved = runner.peers_wanted([peer(2), peer(3, physical_ip="198.51.100.99")])
    assert runner.render_peer_actions(runner.plan_peers(moved, have)) == (
        [], ["fdb replace 02:6b:64:00:00:03 dev vxdirect0 dst 198.51.100.99 self permanent"])


def test_a_neighbour_that_is_not_permanent_is_replaced():
    have = runner.peers_wanted([peer(2)])
    have["neigh"]["10.2.0.0"] = None
    assert runner.render_peer_actions(runner.plan_peers(runner.peers_wanted([peer(2)]), have)) == (
        ["neigh replace 10.2.0.0 lladdr 02:6b:64:00:00:02 dev vxdirect0 nud permanent"], [])


def test_proc_parsers_read_only_vxdirect0_and_mark_non_permanent_neighbours():
    n = DirectNode(direct=True, peers=[peer(2), peer(3)], relayed={"runner3"})
    n.neigh["10.9.0.0"] = None
    assert runner.parse_proc_routes(n.proc("route"), "vxdirect0") == {
        "10.2.0.0/32": None, "10.2.0.0/16": "10.2.0.0", "10.3.0.0/32": None}
    assert runner.parse_proc_arp(n.proc("arp"), "vxdirect0") == {
        "10.2.0.0": "02:6b:64:00:00:02", "10.3.0.0": "02:6b:64:00:00:03", "10.9.0.0": None}
    assert runner.parse_fdb(n.probe(["bridge", "-j", "fdb", "show", "dev", "vxdirect0"])[1]) == {
        "02:6b:64:00:00:02": "198.51.100.12", "02:6b:64:00:00:03": "198.51.100.13"}


# ---- applying the table: process count, time --------------------------------------------------


def test_254_peers_apply_in_three_processes_under_a_second(dnode):
    n = dnode()
    n.links[runner.DIRECT_DEV] = direct_link()
    peers = [peer(i) for i in range(2, 256)]
    t0 = time.monotonic()
    changes = runner.ensure_peers({"peers": peers, "relayed": set()})
    elapsed = time.monotonic() - t0
    assert [c.argv for c in n.calls] == [["bridge", "-j", "fdb", "show", "dev", "vxdirect0"],
                                         ["bridge", "-batch", "-"], ["ip", "-batch", "-"]]
    assert len(n.batch("bridge")[0]) == 254
    assert len(n.batch("ip")[0]) == 254 * 3
    assert changes == ["vxdirect0: 254 FDB entr(ies) set", "vxdirect0: 254 neighbour(s) set",
                       "vxdirect0: 508 route(s) set"]
    assert elapsed < 1.0


def test_a_change_of_one_peer_is_one_probe_and_at_most_two_batches(dnode):
    peers = [peer(i) for i in range(2, 256)]
    n = dnode(direct=True, peers=peers)
    runner.ensure_peers({"peers": peers[:-1], "relayed": set()})
    assert len(n.calls) == 3
    assert n.batch("ip") == [["route del 10.255.0.0/16 dev vxdirect0",
                              "route del 10.255.0.0/32 dev vxdirect0",
                              "neigh del 10.255.0.0 dev vxdirect0"]]
    n.calls = []
    runner.ensure_peers({"peers": peers, "relayed": {"runner9"}})
    assert [c.argv for c in n.calls] == [["bridge", "-j", "fdb", "show", "dev", "vxdirect0"],
                                         ["ip", "-batch", "-"]]
    assert n.batch("ip") == [["route del 10.9.0.0/16 dev vxdirect0"]]


def test_an_applied_table_is_a_probe_and_nothing_else(dnode):
    peers = [peer(2), peer(3)]
    n = dnode(direct=True, peers=peers)
    assert runner.ensure_peers({"peers": peers, "relayed": set()}) == []
    assert n.mutations() == []


def test_peers_without_vxdirect0_is_one_sentence_and_planned_under_dry_run(dnode, monkeypatch):
    n = dnode()
    with pytest.raises(runner.OverlayError) as e:
        runner.ensure_peers({"peers": [peer(2)], "relayed": set()})
    assert str(e.value) == ("vxdirect0 does not exist, so the direct routes cannot be set: the "
                            "next repair rebuilds it")
    monkeypatch.setattr(runner, "DRY_RUN", True)
    assert runner.ensure_peers({"peers": [peer(2)], "relayed": set()})[0] == \
        "vxdirect0: 1 FDB entr(ies) set"
    assert n.mutations()[0].argv == ["bridge", "-batch", "-"]


# ---- the device -------------------------------------------------------------------------------


def test_vxdirect0_is_created_with_the_node0_vni_its_mac_mtu_and_network_address(cfg):
    lines, changes, created = runner.plan_direct_link(cfg, direct_alloc(), ME, {}, True)
    assert lines == ["link add vxdirect0 address 02:6b:64:00:00:01 mtu 1450 type vxlan id 100 "
                     "local 198.51.100.11 dstport 4789 nolearning",
                     "addr add 10.1.0.0/32 dev vxdirect0", "link set dev vxdirect0 up"]
    assert changes == ["vxdirect0 created (vni 100)"]
    assert created == ["vxdirect0"]
    assert runner.plan_direct_link(cfg, direct_alloc(), ME,
                                   {"vxdirect0": direct_link()}, True) == ([], [], [])


def test_vxdirect0_drift_is_fixed_and_off_removes_it(cfg):
    a = direct_alloc()
    lines, changes, _ = runner.plan_direct_link(cfg, a, ME, {"vxdirect0": direct_link(
        mac="02:00:00:00:00:09")}, True)
    assert lines[0] == "link del vxdirect0"
    assert changes == ["vxdirect0 recreated (mac 02:00:00:00:00:09 (want 02:6b:64:00:00:01))"]
    lines, changes, _ = runner.plan_direct_link(cfg, a, ME, {"vxdirect0": direct_link(
        mtu=1500, addrs=("10.7.0.0/32",), up=False)}, True)
    assert lines == ["link set dev vxdirect0 mtu 1450", "addr del 10.7.0.0/32 dev vxdirect0",
                     "addr add 10.1.0.0/32 dev vxdirect0", "link set dev vxdirect0 up"]
    assert runner.plan_direct_link(cfg, a, ME, {"vxdirect0": direct_link()}, False) == (
        ["link del vxdirect0"], ["vxdirect0 removed (direct routing off)"], [])
    assert runner.plan_direct_link(cfg, a, ME, {}, False) == ([], [], [])


def test_a_foreign_vxdirect0_is_refused(cfg):
    with pytest.raises(runner.ConfigError) as e:
        runner.plan_direct_link(cfg, direct_alloc(), ME, {"vxdirect0": {
            "ifname": "vxdirect0", "linkinfo": {"info_kind": "bridge"}}}, True)
    assert str(e.value).startswith("vxdirect0 exists and is a bridge, not a VXLAN device")


# ---- build, rules, teardown -------------------------------------------------------------------

DIRECT_FWD = [
    "-A FORWARD -s 10.0.0.0/8 -d 10.0.0.0/8 -i kohaku-overlay -o vxdirect0 -m comment "
    "--comment kohaku-overlay -j ACCEPT",
    "-A FORWARD -s 10.0.0.0/8 -d 10.0.0.0/8 -i vxdirect0 -o kohaku-overlay -m comment "
    "--comment kohaku-overlay -j ACCEPT"]


def peer_accepts(*ids):
    return ["-A KOHAKU-VXLAN -s 198.51.100.%d/32 %s0x64\" -j ACCEPT" % (10 + i, U32) for i in ids]


def test_build_with_direct_routing_on_a_built_node(cfg, dnode):
    n = dnode(built=True)
    changes = runner.build(cfg, direct_alloc(), ME,
                           direct={"peers": [peer(2), peer(3)], "relayed": {"runner3"}})
    assert n.argvs() == [["ip", "-batch", "-"], ["bridge", "-batch", "-"],
                         ["ip", "-batch", "-"], ["iptables-restore", "--noflush"]]
    m = n.mutations()
    assert m[0].input.splitlines()[0].startswith("link add vxdirect0 address 02:6b:64:00:00:01")
    assert m[1].input.splitlines() == [
        "fdb replace 02:6b:64:00:00:02 dev vxdirect0 dst 198.51.100.12 self permanent",
        "fdb replace 02:6b:64:00:00:03 dev vxdirect0 dst 198.51.100.13 self permanent"]
    assert m[2].input.splitlines() == [
        "neigh replace 10.2.0.0 lladdr 02:6b:64:00:00:02 dev vxdirect0 nud permanent",
        "neigh replace 10.3.0.0 lladdr 02:6b:64:00:00:03 dev vxdirect0 nud permanent",
        "route replace 10.2.0.0/16 via 10.2.0.0 dev vxdirect0 onlink",
        "route replace 10.2.0.0/32 dev vxdirect0 scope link",
        "route replace 10.3.0.0/32 dev vxdirect0 scope link"]
    # the FORWARD pair of vxdirect0 right after ours and each peer accepted on VNI 100 (0x64)
    # by the VXLAN filter, in the same transaction
    assert m[3].input.splitlines()[1:] == \
        ["-D" + r[2:] for r in FWD] + \
        ["-I FORWARD %d%s" % (i + 1, r[len("-A FORWARD"):]) for i, r in
         enumerate(FWD + DIRECT_FWD)] + \
        ["-F KOHAKU-VXLAN", VXCHAIN[0]] + peer_accepts(2, 3) + [VXCHAIN[1], "COMMIT"]
    assert "vxdirect0 created (vni 100)" in changes


def test_switch_off_removes_vxdirect0_and_its_forward_pair(cfg, dnode):
    n = dnode(built=True, direct=True, peers=[peer(2)])
    n.forward = FWD + DIRECT_FWD + n.forward[len(FWD):]
    changes = runner.build(cfg, alloc(), ME)
    assert n.argvs() == [["ip", "-batch", "-"], ["iptables-restore", "--noflush"]]
    assert n.mutations()[0].input.splitlines() == ["link del vxdirect0"]
    assert n.mutations()[1].input.splitlines()[1:] == \
        ["-D" + r[2:] for r in FWD + DIRECT_FWD] + \
        ["-I FORWARD %d%s" % (i + 1, r[len("-A FORWARD"):]) for i, r in enumerate(FWD)] + \
        ["COMMIT"]
    assert changes[0] == "vxdirect0 removed (direct routing off)"


def test_a_fully_built_direct_node_issues_no_mutating_command(cfg, dnode):
    n = dnode(built=True, direct=True, peers=[peer(2)])
    n.forward = FWD + DIRECT_FWD + n.forward[len(FWD):]
    n.chains["KOHAKU-VXLAN"] = VXCHAIN[:1] + peer_accepts(2) + VXCHAIN[1:]
    assert runner.build(cfg, direct_alloc(), ME,
                        direct={"peers": [peer(2)], "relayed": set()}) == []
    assert n.mutations() == []


def test_down_removes_vxdirect0_and_every_marked_rule(cfg, dnode):
    n = dnode(built=True, direct=True, peers=[peer(2)])
    n.forward = FWD + DIRECT_FWD + n.forward[len(FWD):]
    runner.save_state(cfg["OVERLAY_STATE_FILE"], ALLOC)
    changes = runner.teardown(cfg)
    assert n.batch("ip") == [["route del 10.0.0.0/8 dev kohaku-overlay", "link del vxdirect0",
                              "link del vxlan0", "link del kohaku-overlay"]]
    assert "vxdirect0 removed" in changes
    assert "5 marked iptables rule(s) and the chain KOHAKU-VXLAN removed" in changes


def test_vxlan_accepts_for_peers_are_the_node0_vni():
    assert runner.direct_vxlan_accepts([peer(2), peer(3)], 100) == [
        ("198.51.100.12", 100), ("198.51.100.13", 100)]


# ---- the probe round --------------------------------------------------------------------------


class FakeSocket(object):
    """A raw ICMP socket: answers the targets in `answer` (optionally with a wrong id first)."""

    def __init__(self, answer=(), noise=False, unreachable=()):
        self.answer, self.noise, self.unreachable = set(answer), noise, set(unreachable)
        self.sent, self.inbox, self.closed = [], [], False

    def sendto(self, packet, addr):
        if addr[0] in self.unreachable:
            raise OSError(101, "Network is unreachable")
        self.sent.append((packet, addr))
        kind, code, _, ident, seq = struct.unpack("!BBHHH", packet[:8])
        assert (kind, code) == (8, 0)
        assert runner.icmp_checksum(packet) == 0
        if addr[0] in self.answer:
            if self.noise:
                self.inbox.append(reply(addr[0], ident ^ 1, seq))
            self.inbox.append(reply(addr[0], ident, seq))

    def fileno(self):
        return -1

    def recv(self, n):
        return self.inbox.pop(0)

    def close(self):
        self.closed = True


def reply(src, ident, seq):
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 48, 0, 0, 64, 1, 0, socket.inet_aton(src),
                     socket.inet_aton("10.1.0.0"))
    return ip + struct.pack("!BBHHH", 0, 0, 0, ident, seq) + b"x" * 20


@pytest.fixture
def fake_select(mocker):
    def select(r, w, x, timeout):
        return ([r[0]] if r[0].inbox else []), [], []
    return mocker.patch.object(runner.select, "select", side_effect=select)


def test_a_probe_round_sends_one_echo_per_peer_from_one_socket(fake_select):
    sock = FakeSocket(answer={"10.2.0.0", "10.4.0.0"}, noise=True, unreachable={"10.5.0.0"})
    got = runner.probe_paths(["10.2.0.0", "10.3.0.0", "10.4.0.0", "10.5.0.0"], wait=0.05,
                             sock=sock, seq=77)
    assert got == {"10.2.0.0", "10.4.0.0"}
    assert [a for _, a in sock.sent] == [("10.2.0.0", 0), ("10.3.0.0", 0), ("10.4.0.0", 0)]


def test_a_probe_round_without_a_raw_socket_is_one_sentence(mocker):
    denied = PermissionError(1, "Operation not permitted")
    mocker.patch.object(runner.socket, "socket", side_effect=denied)
    with pytest.raises(runner.OverlayError) as e:
        runner.probe_paths(["10.2.0.0"])
    assert str(e.value) == ("cannot open a raw ICMP socket to probe the direct paths (Operation "
                            "not permitted): run the runner as root or with CAP_NET_RAW")
    assert runner.probe_paths([]) == set()


def test_echo_reply_parser_takes_only_our_replies():
    assert runner.parse_echo_reply(reply("10.2.0.0", 5, 6), 5, 6) == "10.2.0.0"
    assert runner.parse_echo_reply(reply("10.2.0.0", 5, 7), 5, 6) is None
    assert runner.parse_echo_reply(reply("10.2.0.0", 5, 6)[:24], 5, 6) is None
    echo = runner.echo_request(5, 6)
    assert runner.parse_echo_reply(reply("10.2.0.0", 5, 6)[:20] + echo, 5, 6) is None


# ---- the fallback state machine ---------------------------------------------------------------


def rounds(answers, names=("runner2",), start=None):
    """Run track_paths over rounds of answered names; -> list of (path, changes) per round."""
    paths, out = start or {}, []
    for i, ans in enumerate(answers):
        paths, changed = runner.track_paths(paths, names, set(ans), 100.0 + i)
        out.append((paths["runner2"]["path"], changed))
    return paths, out


def test_a_new_peer_starts_direct_and_falls_back_after_three_silent_rounds():
    paths, out = rounds([["runner2"], [], [], []])
    assert [p for p, _ in out] == ["direct", "direct", "direct", "relayed"]
    assert out[3][1] == [("runner2", "direct", "relayed")]
    assert paths["runner2"]["since"] == 103.0


def test_one_lost_probe_does_not_flip_and_two_answers_bring_it_back():
    _, out = rounds([[], [], ["runner2"], [], [], [], ["runner2"], ["runner2"], ["runner2"]])
    assert [p for p, _ in out] == ["direct", "direct", "direct", "direct", "direct", "relayed",
                                   "relayed", "direct", "direct"]
    assert [c for _, c in out if c] == [[("runner2", "direct", "relayed")],
                                        [("runner2", "relayed", "direct")]]


def test_the_fallback_and_the_recovery_fit_in_five_seconds_of_probe_rounds():
    worst_fall = runner.FALL_AFTER * runner.PROBE_EVERY + runner.PROBE_WAIT
    worst_rise = runner.RISE_AFTER * runner.PROBE_EVERY + runner.PROBE_WAIT
    assert worst_fall < 5.0 and worst_rise < 5.0


def test_peers_gone_from_the_table_are_dropped_and_others_are_independent():
    paths, changed = runner.track_paths({}, ["runner2", "runner3"], {"runner2"}, 1.0)
    paths, changed = runner.track_paths(paths, ["runner3"], set(), 2.0)
    assert list(paths) == ["runner3"]
    assert paths["runner3"]["fails"] == 2 and changed == []


# ---- the serve loop: learning from the Host, probing, the state file --------------------------


@pytest.fixture
def dagent(cfg, mocker):
    a = runner.Agent(cfg, notify=lambda m: None)
    a.alloc, a.address, a.built = alloc(), ME, True
    a.builds = []

    def fake_build(cfg, alloc, address, errors=None, direct=None):
        a.builds.append(direct)
        return []
    mocker.patch.object(runner, "build", side_effect=fake_build)
    return a


def test_switching_on_fetches_the_table_once_and_builds_direct(dagent, mocker):
    fetch = mocker.patch.object(runner, "fetch_peers", return_value=table(2, 3))
    dagent.learn({"direct_routing": True, "peers_version": 7})
    dagent.learn({"direct_routing": True, "peers_version": 7})
    assert fetch.call_count == 1
    assert dagent.builds == [{"peers": [peer(2), peer(3)], "relayed": set()}]
    state = runner.load_state(dagent.cfg["OVERLAY_STATE_FILE"])
    assert state["direct_routing"] is True and state["peers"] == table(2, 3)


def test_a_new_version_refetches_and_a_failed_fetch_keeps_the_table_and_retries(dagent, mocker):
    fetch = mocker.patch.object(runner, "fetch_peers", side_effect=[
        table(2, 3), runner.HostUnreachable("timed out"), table(2, version=8)])
    dagent.learn({"direct_routing": True, "peers_version": 7})
    dagent.learn({"direct_routing": True, "peers_version": 8})
    assert dagent.peers == table(2, 3)
    dagent.learn({"direct_routing": True, "peers_version": 8})
    assert fetch.call_count == 3
    assert dagent.peers == table(2, version=8)
    assert dagent.builds[-1] == {"peers": [peer(2)], "relayed": set()}


def test_switching_off_drops_the_table_and_builds_without_direct(dagent, mocker):
    mocker.patch.object(runner, "fetch_peers", return_value=table(2))
    dagent.learn({"direct_routing": True, "peers_version": 7})
    dagent.learn({"direct_routing": False, "peers_version": 0})
    assert dagent.builds[-1] is None
    assert dagent.peers == {"version": 0, "peers": []}
    assert runner.load_state(dagent.cfg["OVERLAY_STATE_FILE"])["direct_routing"] is False


def test_an_answer_without_the_keys_is_direct_routing_off(dagent):
    dagent.learn({"ok": True})
    dagent.learn(None)
    assert dagent.builds == []


def test_silent_peer_goes_through_the_host_and_the_state_file_says_since_when(dagent, mocker):
    mocker.patch.object(runner, "fetch_peers", return_value=table(2, 3))
    dagent.learn({"direct_routing": True, "peers_version": 7})
    mocker.patch.object(runner, "probe_paths", return_value={"10.2.0.0"})
    applied = mocker.patch.object(runner, "ensure_peers", return_value=[])
    for _ in range(runner.FALL_AFTER):
        dagent.probe_round()
    assert applied.call_args_list == [mocker.call({"peers": [peer(2), peer(3)],
                                                   "relayed": {"runner3"}})]
    runner.probe_paths.assert_called_with({"10.2.0.0": "runner2", "10.3.0.0": "runner3"})
    state = runner.load_state(dagent.cfg["OVERLAY_STATE_FILE"])
    assert state["paths"]["runner3"]["path"] == "relayed"
    assert state["paths"]["runner2"]["path"] == "direct"


def test_start_restores_the_saved_table_when_the_host_cannot_serve_it(cfg, mocker):
    runner.save_state(cfg["OVERLAY_STATE_FILE"], direct_alloc(), peers=table(2, 3),
                      paths={"runner3": {"path": "relayed", "since": 5.0}})
    a = runner.Agent(cfg, notify=lambda m: None)
    mocker.patch.object(runner, "runner_address", return_value=ME)
    mocker.patch.object(runner, "register", return_value=direct_alloc())
    mocker.patch.object(runner, "fetch_peers", side_effect=runner.HostUnreachable("refused"))
    build = mocker.patch.object(runner, "build", return_value=[])
    assert a.start() is True
    assert build.call_args[0][4] == {"peers": [peer(2), peer(3)], "relayed": {"runner3"}}


def test_loop_probes_between_heartbeats(dagent, mocker):
    dagent.cfg["HEARTBEAT_INTERVAL"] = 0.35
    dagent.alloc = direct_alloc()
    mocker.patch.object(runner, "PROBE_EVERY", 0.1)
    probes = mocker.patch.object(dagent, "probe_round")
    beats = mocker.patch.object(dagent, "beat")
    stopper = mocker.patch.object(dagent.stop, "wait", side_effect=lambda t: (
        time.sleep(t), probes.call_count >= 6)[1])
    dagent.loop()
    assert stopper.call_count >= 6
    assert probes.call_count >= 6 and 1 <= beats.call_count <= 3


# ---- up and status ----------------------------------------------------------------------------


def test_up_with_direct_routing_fetches_the_table_and_saves_it(cfg, mocker, dnode, capsys):
    dnode(built=True)
    mocker.patch.object(runner, "load_config", return_value=cfg)
    mocker.patch.object(runner, "register_with_retry", return_value=direct_alloc())
    mocker.patch.object(runner, "fetch_peers", return_value=table(2))
    build = mocker.patch.object(runner, "build", return_value=["x"])
    assert runner.main(["up"]) == 0
    assert build.call_args[1]["direct"]["peers"] == [peer(2)]
    assert runner.load_state(cfg["OVERLAY_STATE_FILE"])["peers"] == table(2)


def test_status_shows_each_peer_its_path_and_since_when(cfg, dnode, mocker, capsys):
    dnode(built=True, direct=True, peers=[peer(2), peer(3)])
    runner.save_state(cfg["OVERLAY_STATE_FILE"], direct_alloc(), peers=table(2, 3),
                      paths={"runner2": {"path": "direct", "since": 1790000000.0},
                             "runner3": {"path": "relayed", "since": 1790000060.0}})
    mocker.patch.object(runner, "load_config", return_value=cfg)
    assert runner.main(["status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "vxdirect0:        present, up, mtu 1450, vni 100 local 198.51.100.11, 10.1.0.0/32" \
        in out
    i = out.index("Direct routing:   on, peer table version 7, 2 peer(s), 1 relayed through "
                  "the host")
    assert out[i + 1:i + 3] == [
        "  runner2:        direct since 2026-09-21 14:13:20 UTC (id 2, 10.2.0.0/16 at "
        "198.51.100.12)",
        "  runner3:        RELAYED through the host since 2026-09-21 14:14:20 UTC (id 3, "
        "10.3.0.0/16 at 198.51.100.13)"]
    assert runner.main(["status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["direct"]["enabled"] is True
    assert [(p["runner_name"], p["path"], p["since"]) for p in st["direct"]["peers"]] == [
        ("runner2", "direct", 1790000000.0), ("runner3", "relayed", 1790000060.0)]
