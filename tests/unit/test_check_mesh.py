"""Unit tests of the check script with direct routing and encryption both on (issue 13 with
issue 12): kohaku-wg holds the Host and every peer of the table (a full mesh), vxdirect0's FDB
points at the peers' tunnel addresses, and a relayed peer names the WireGuard port. The node is
test_check's healthy runner, encrypted (encrypt) and with direct routing (direct_on).
"""

import json
import time

from test_check import (PEER2, RUNNER_STATE, WG_HOST_PUB, WG_PUB, check_run, direct_on, encrypt,
                        fake, healthy_runner, wg_dump_text)

assert fake     # test_check's fixture, used here


def mesh_runner(relayed=False):
    node = healthy_runner()
    encrypt(node)
    direct_on(node, relayed=relayed)
    table = node.http["http://198.51.100.1:8000/api/overlay/peers"][1]
    for p in table["peers"]:
        p.update(wg_public_key=WG_PUB[p["runner_id"]], wg_ip="172.16.0.%d" % (p["runner_id"] + 1))
    state = json.loads(node.files[RUNNER_STATE])
    state["peers"]["peers"] = [dict(PEER2, wg_public_key=WG_PUB[2], wg_ip="172.16.0.3")]
    node.files[RUNNER_STATE] = json.dumps(state)
    node.link("vxdirect0")["linkinfo"]["info_data"]["local"] = "172.16.0.2"
    node.direct_fdb[0]["dst"] = "172.16.0.3"
    now = int(time.time()) - 5
    node.wg_dump = wg_dump_text(WG_PUB[1], [
        (WG_HOST_PUB, "198.51.100.1:51820", "172.16.0.1/32", now, 900),
        (WG_PUB[2], "198.51.100.12:51820", "172.16.0.3/32", now, 900)])
    return node


def test_a_healthy_mesh_passes_the_wireguard_and_direct_checks(fake):
    _rc, results, _ = check_run(fake, mesh_runner())
    got = dict((i, (results[i]["status"], results[i]["detail"])) for i in (
        "runner.wg.peers", "runner.direct.peers", "runner.direct.paths"))
    assert got == {
        "runner.wg.peers": ("PASS", "2 peer(s), keys and allowed IPs as the host sees them"),
        "runner.direct.peers": ("PASS", "1 peer(s): routes, neighbours and FDB match the host's "
                                        "peer table (version 7)"),
        "runner.direct.paths": ("PASS", "all 1 peer(s) reached directly")}


def test_a_peer_missing_from_kohaku_wg_or_an_fdb_on_its_physical_address_fails(fake):
    node = mesh_runner()
    now = int(time.time()) - 5
    node.wg_dump = wg_dump_text(WG_PUB[1], [
        (WG_HOST_PUB, "198.51.100.1:51820", "172.16.0.1/32", now, 900)])
    node.direct_fdb[0]["dst"] = "198.51.100.12"
    _rc, results, _ = check_run(fake, node)
    assert results["runner.wg.peers"]["status"] == "FAIL"
    assert results["runner.wg.peers"]["detail"] == "runner2 (%s) is not a peer" % WG_PUB[2]
    assert results["runner.direct.peers"]["status"] == "FAIL"
    assert "the FDB entry 02:6b:64:00:00:02 dst 172.16.0.3" in \
        results["runner.direct.peers"]["detail"]


def test_a_relayed_peer_names_the_wireguard_port(fake):
    _rc, results, _ = check_run(fake, mesh_runner(relayed=True))
    row = results["runner.direct.paths"]
    assert row["status"] == "WARN"
    assert "UDP 51820 blocked between 198.51.100.11 and 198.51.100.12" in row["detail"]


def test_without_encryption_a_keyless_table_still_checks_the_physical_addresses(fake):
    node = healthy_runner()
    direct_on(node)
    _rc, results, _ = check_run(fake, node)
    assert results["runner.direct.peers"]["status"] == "PASS"
