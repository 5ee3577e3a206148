"""Unit tests of direct routing with encryption (issue 13 with issue 12): the peer table's keys
make kohaku-wg a full mesh. The plan from a peer table: the one `wg set` (the Host and every
direct peer), vxdirect0 and its FDB on the tunnel addresses, the VXLAN filter's accepts from the
peers' tunnel addresses, and the switches back. The node is test_runner_wg's WgNode with
test_direct's vxdirect0 tables.
"""

import pytest

import test_direct as direct
import test_runner_wg as wg
from test_runner_wg import HOST, HOST_PUB, ME, OTHER_PUB, PUB, runner
from test_runner_wg import as_root, cfg, no_kernel_module, no_system_bus

PEER2_PUB = OTHER_PUB
PEER3_PUB = "kA9p2LSHm6SQ0ScxTUCqd7yiVJm/LXf1Vt9lmG5zU0Q="
KEYS = {2: PEER2_PUB, 3: PEER3_PUB}

assert as_root and no_system_bus and no_kernel_module   # test_runner_wg's autouse fixtures
assert cfg                                               # and its cfg (OVERLAY_MTU 1390)


def peer(i, **over):
    """A peer as the Host serves it with encryption: its key and tunnel address (172.16.0.N+1)."""
    return direct.peer(i, wg_public_key=KEYS[i], wg_ip="172.16.0.%d" % (i + 1), **over)


def mesh_alloc(**over):
    return wg.wg_alloc(direct_routing=True, peers_version=7, **over)


def host_peer():
    return ["peer", HOST_PUB, "allowed-ips", "172.16.0.1/32", "endpoint", HOST + ":51820",
            "persistent-keepalive", "25"]


def peer_args(i):
    return ["peer", KEYS[i], "allowed-ips", "172.16.0.%d/32" % (i + 1),
            "endpoint", "198.51.100.%d:51820" % (10 + i), "persistent-keepalive", "25"]


class MeshNode(wg.WgNode):
    """An encrypted, built runner (WgNode) that also shows vxdirect0's routes, neighbours (/proc)
    and FDB (`bridge -j fdb show`), as test_direct's DirectNode does."""

    def __init__(self, peers=(), relayed=(), **kw):
        wg.WgNode.__init__(self, encrypted_built=True, built=True, **kw)
        self.links["kohaku-overlay"] = wg.base.bridge_link(mtu=1390)
        self.links["vxlan0"] = wg.base.vxlan_link(local="172.16.0.2", remote="172.16.0.1",
                                                  mtu=1390)
        self.routes, self.neigh, self.fdb = {}, {}, {}
        if peers:
            self.links[runner.DIRECT_DEV] = mesh_link()
            w = runner.peers_wanted(peers, relayed, True)
            self.routes, self.neigh, self.fdb = w["routes"], w["neigh"], w["fdb"]
            self.wg_dump = wg.dump(peers=[(HOST_PUB, HOST + ":51820", "172.16.0.1/32", 25)] + [
                (p["wg_public_key"], "%s:51820" % p["physical_ip"], p["wg_ip"] + "/32", 25)
                for p in peers])

    def __call__(self, argv, check=True, mutates=True, input=None, timeout=30, echo=None):
        res = wg.WgNode.__call__(self, argv, check, mutates, input, timeout, echo)
        if mutates and argv[:2] == ["ip", "-batch"] and "link add vxdirect0 " in input:
            self.links[runner.DIRECT_DEV] = mesh_link()
        return res

    def probe(self, argv):
        if argv[:2] == ["bridge", "-j"]:
            return direct.DirectNode.probe(self, argv)
        return wg.WgNode.probe(self, argv)

    proc = direct.DirectNode.proc


def mesh_link(local="172.16.0.2"):
    link = direct.direct_link(mtu=1390)
    link["linkinfo"]["info_data"]["local"] = local
    return link


@pytest.fixture
def mnode(mocker, cfg):
    wg.make_keys(cfg)

    def make(**kw):
        n = MeshNode(**kw)
        mocker.patch.object(runner, "run", side_effect=n)
        mocker.patch.object(runner, "read_sysctl", side_effect=n.sysctl)
        mocker.patch.object(runner, "read_proc_net", side_effect=n.proc)
        return n
    return make


def accepts(*ids):
    """The VXLAN filter's accept of each peer's tunnel address for VNI 100 (0x64)."""
    return ["-A KOHAKU-VXLAN -s 172.16.0.%d/32 %s0x64\" -j ACCEPT" % (i + 1, wg.base.U32)
            for i in ids]


# ---- the plan, pure ---------------------------------------------------------------------------

def test_with_encryption_only_peers_with_a_key_and_a_tunnel_address_go_direct():
    keyless = direct.peer(4, wg_public_key=None, wg_ip="172.16.0.5")
    bad = direct.peer(5, wg_public_key="nope", wg_ip="172.16.0.6")
    table = [peer(2), keyless, bad, peer(3)]
    assert runner.mesh_peers(table, True) == [peer(2), peer(3)]
    assert runner.mesh_peers(table, False) == table
    a = runner.direct_arg(mesh_alloc(), table, {"runner3": {"path": "relayed"}})
    assert a == {"peers": [peer(2), peer(3)], "relayed": {"runner3"}, "encrypted": True}
    plain = runner.direct_arg(direct.direct_alloc(), table, {})
    assert plain == {"peers": table, "relayed": set()}


def test_the_wg_set_holds_the_host_and_every_direct_peer_in_one_argv():
    want = runner.wg_want(mesh_alloc(), PUB, [peer(2), peer(3)])
    argv, changes = runner.plan_wg(want, {}, "/k")
    peers = sorted([host_peer(), peer_args(2), peer_args(3)], key=lambda a: a[1])
    assert argv == ["wg", "set", "kohaku-wg", "private-key", "/k", "listen-port", "51820"] + \
        [x for p in peers for x in p]
    assert "kohaku-wg peer %s added (172.16.0.3/32)" % PEER2_PUB in changes
    # peer 3 left the table: its WireGuard peer goes, the Host and peer 2 stay untouched
    have = runner.parse_wg_dump(wg.dump(peers=[
        (HOST_PUB, HOST + ":51820", "172.16.0.1/32", 25),
        (PEER2_PUB, "198.51.100.12:51820", "172.16.0.3/32", 25),
        (PEER3_PUB, "198.51.100.13:51820", "172.16.0.4/32", 25)]))
    want = runner.wg_want(mesh_alloc(), PUB, [peer(2)])
    assert runner.plan_wg(want, have, "/k") == (
        ["wg", "set", "kohaku-wg", "peer", PEER3_PUB, "remove"],
        ["kohaku-wg stale peer %s removed" % PEER3_PUB])


def test_fdb_and_vxlan_accepts_point_at_the_tunnel_addresses():
    w = runner.peers_wanted([peer(2), peer(3)], (), True)
    assert w["fdb"] == {runner.vtep_mac(2): "172.16.0.3", runner.vtep_mac(3): "172.16.0.4"}
    assert runner.peers_wanted([peer(2)])["fdb"] == {runner.vtep_mac(2): "198.51.100.12"}
    assert runner.direct_vxlan_accepts([peer(2), peer(3)], 100, True) == [
        ("172.16.0.3", 100), ("172.16.0.4", 100)]
    actions = runner.plan_peers(w, direct.EMPTY)
    assert runner.render_peer_actions(actions)[1] == [
        "fdb replace 02:6b:64:00:00:02 dev vxdirect0 dst 172.16.0.3 self permanent",
        "fdb replace 02:6b:64:00:00:03 dev vxdirect0 dst 172.16.0.4 self permanent"]


def test_vxdirect0_is_local_to_the_tunnel_address_and_recreated_when_encryption_flips(cfg):
    lines, _, _ = runner.plan_direct_link(cfg, mesh_alloc(), ME, {}, True)
    assert lines[0] == ("link add vxdirect0 address 02:6b:64:00:00:01 mtu 1390 type vxlan id 100 "
                        "local 172.16.0.2 dstport 4789 nolearning")
    assert runner.plan_direct_link(cfg, mesh_alloc(), ME, {"vxdirect0": mesh_link()},
                                   True) == ([], [], [])
    # encryption switched off: vxdirect0 goes back to the physical address
    plain = runner.parse_allocation(dict(wg.base.ALLOC, mtu=1390, direct_routing=True,
                                         peers_version=7))
    lines, changes, _ = runner.plan_direct_link(cfg, plain, ME, {"vxdirect0": mesh_link()}, True)
    assert lines[:2] == ["link del vxdirect0", "link add vxdirect0 address 02:6b:64:00:00:01 "
                         "mtu 1390 type vxlan id 100 local 198.51.100.11 dstport 4789 nolearning"]
    assert changes[0].startswith("vxdirect0 recreated (local 172.16.0.2")


# ---- build ------------------------------------------------------------------------------------

def test_build_turns_direct_routing_on_over_the_mesh_in_one_wg_set(cfg, mnode):
    n = mnode()
    d = runner.direct_arg(mesh_alloc(), [peer(2), peer(3)], {})
    changes = runner.build(cfg, mesh_alloc(), ME, direct=d)
    m = n.mutations()
    assert [c.argv[:2] for c in m] == [["wg", "set"], ["ip", "-batch"], ["bridge", "-batch"],
                                       ["ip", "-batch"], ["iptables-restore", "--noflush"]]
    assert m[0].argv == ["wg", "set", "kohaku-wg"] + peer_args(2) + peer_args(3)
    assert m[1].input.splitlines() == [
        "link add vxdirect0 address 02:6b:64:00:00:01 mtu 1390 type vxlan id 100 local "
        "172.16.0.2 dstport 4789 nolearning",
        "addr add 10.1.0.0/32 dev vxdirect0", "link set dev vxdirect0 up"]
    assert m[2].input.splitlines() == [
        "fdb replace 02:6b:64:00:00:02 dev vxdirect0 dst 172.16.0.3 self permanent",
        "fdb replace 02:6b:64:00:00:03 dev vxdirect0 dst 172.16.0.4 self permanent"]
    rules = m[4].input.splitlines()
    assert accepts(2, 3) == [r for r in rules if r.startswith("-A KOHAKU-VXLAN -s 172.16.0.")
                             and "0x64\"" in r]
    assert not any("198.51.100.1" in r for r in rules if r.startswith("-A KOHAKU-VXLAN"))
    assert "kohaku-wg peer %s added (172.16.0.4/32)" % PEER3_PUB in changes


def test_a_built_mesh_issues_no_mutating_command(cfg, mnode):
    n = mnode(peers=[peer(2), peer(3)])
    n.forward = wg.base.FWD + direct.DIRECT_FWD + n.forward[len(wg.base.FWD):]
    chain = n.chains["KOHAKU-VXLAN"]
    n.chains["KOHAKU-VXLAN"] = chain[:1] + accepts(2, 3) + chain[1:]
    d = runner.direct_arg(mesh_alloc(), [peer(2), peer(3)], {})
    assert runner.build(cfg, mesh_alloc(), ME, direct=d) == []
    assert n.mutations() == []


def test_direct_routing_off_removes_the_peers_from_kohaku_wg_and_vxdirect0(cfg, mnode):
    n = mnode(peers=[peer(2), peer(3)])
    n.forward = wg.base.FWD + direct.DIRECT_FWD + n.forward[len(wg.base.FWD):]
    runner.build(cfg, mesh_alloc(), ME)
    m = n.mutations()
    assert m[0].argv == ["wg", "set", "kohaku-wg", "peer", PEER2_PUB, "remove",
                         "peer", PEER3_PUB, "remove"]
    assert m[1].input.splitlines() == ["link del vxdirect0"]
