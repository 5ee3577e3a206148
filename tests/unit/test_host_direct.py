"""Unit tests of the Host's side of direct routing (issue 12): OVERLAY_DIRECT_ROUTING, the peer
table's version, GET /api/overlay/peers and the fields of registration and heartbeat answers,
all through Api.dispatch() on a Hub whose kernel is test_host's FakeRun.
"""

import pytest

from test_host import AUTH, FakeRun, alloc, host, isolated, make_hub, register, writer_running

assert isolated  # test_host's autouse fixture (no dry-run, no firewalld), used here too


@pytest.fixture
def fake(mocker):
    f = FakeRun()
    mocker.patch.object(host, "run", f)
    return f


@pytest.fixture
def direct(tmp_path, fake):
    hub = make_hub(tmp_path, chain=False, OVERLAY_DIRECT_ROUTING=True)
    with writer_running(hub):
        yield host.Api(hub), hub


def peers(api, headers=AUTH):
    return api.dispatch("GET", "/api/overlay/peers", headers, None, "198.51.100.11")


def beat(api, name="runner1", ip="198.51.100.11"):
    return api.dispatch("PUT", "/api/overlay/heartbeat/" + name, AUTH, None, ip)


def entry(n, ip=None):
    return {"runner_name": "runner%d" % n, "runner_id": n, "subnet": "10.%d.0.0/16" % n,
            "physical_ip": ip or "198.51.100.1%d" % n, "vtep_mac": "02:6b:64:00:00:%02x" % n}


def test_the_switch_is_off_by_default_and_answers_say_so(tmp_path, fake):
    assert host.CONFIG_KEYS["OVERLAY_DIRECT_ROUTING"] == (bool, False)
    hub = make_hub(tmp_path, chain=False)
    api = host.Api(hub)
    with writer_running(hub):
        status, answer = register(api, "runner1", "198.51.100.11")
        assert (answer["direct_routing"], answer["peers_version"]) == (False, 0)
        assert beat(api) == (200, {"ok": True, "direct_routing": False, "peers_version": 0,
                                   "encryption": "none"})
        assert peers(api) == (200, {"version": 0, "peers": []})


def test_the_table_and_its_version_follow_registrations(direct):
    api, hub = direct
    v1 = register(api, "runner1", "198.51.100.11")[1]["peers_version"]
    status, answer = register(api, "runner2", "198.51.100.12")
    assert status == 200 and answer["direct_routing"] is True
    v2 = answer["peers_version"]
    assert 0 < v1 != v2 > 0
    assert peers(api) == (200, {"version": v2, "peers": [entry(1), entry(2)]})
    assert beat(api) == (200, {"ok": True, "direct_routing": True, "peers_version": v2,
                               "encryption": "none"})
    # the same registration again changes nothing, so the version stays
    assert register(api, "runner2", "198.51.100.12")[1]["peers_version"] == v2
    # a changed physical IP (of a runner that went quiet: an active one is a 409) is a new table
    hub.beats["runner2"] -= 3600
    v3 = register(api, "runner2", "198.51.100.99")[1]["peers_version"]
    assert v3 not in (v1, v2)
    assert peers(api)[1]["peers"] == [entry(1), entry(2, ip="198.51.100.99")]


def test_a_release_takes_the_runner_out_and_changes_the_version(direct):
    api, hub = direct
    for i in (1, 2, 3):
        register(api, "runner%d" % i, "198.51.100.1%d" % i)
    before = peers(api)[1]["version"]
    assert api.dispatch("POST", "/api/overlay/release/runner2", AUTH, b"", "127.0.0.1") == (
        200, {"released": True})
    got = peers(api)[1]
    assert got["peers"] == [entry(1), entry(3)]
    assert got["version"] != before
    assert beat(api)[1]["peers_version"] == got["version"]


def test_an_eviction_changes_the_version(tmp_path, fake):
    hub = make_hub(tmp_path, chain=False, OVERLAY_DIRECT_ROUTING=True,
                   OVERLAY_SUBNET="10.0.0.0/8/2/22")                  # ids 1..3
    api = host.Api(hub)
    with writer_running(hub):
        for i in (1, 2, 3):
            register(api, "r%d" % i, "198.51.100.1%d" % i)
        before = peers(api)[1]
        hub.beats["r2"] -= 3600
        hub.seen.pop("r2", None)
        for a in hub.allocs.values():
            if a["runner_name"] == "r2":
                a["last_seen"] = 0.0
        assert register(api, "r4", "198.51.100.14")[1]["runner_id"] == 2
        after = peers(api)[1]
    assert [p["runner_name"] for p in after["peers"]] == ["r1", "r4", "r3"]
    assert after["version"] != before["version"]


def test_the_version_survives_a_restart_of_the_same_table(tmp_path, fake):
    allocs = {1: alloc(1, "runner1", "198.51.100.11"), 2: alloc(2, "runner2", "198.51.100.12")}
    a = make_hub(tmp_path / "a", allocs, OVERLAY_DIRECT_ROUTING=True)
    b = make_hub(tmp_path / "b", allocs, OVERLAY_DIRECT_ROUTING=True)
    assert a.peers() == b.peers()
    assert a.peers()[1] == [entry(1), entry(2)]


def test_recovered_allocations_without_a_name_are_not_peers(tmp_path, fake):
    hub = make_hub(tmp_path, {1: alloc(1, "runner1", "198.51.100.11"),
                              2: alloc(2, None, "198.51.100.12")}, OVERLAY_DIRECT_ROUTING=True)
    assert hub.peers()[1] == [entry(1)]


def test_the_table_is_served_from_memory_and_computed_once_per_change(tmp_path, fake, mocker):
    hub = make_hub(tmp_path, {1: alloc(1, "runner1", "198.51.100.11")},
                   OVERLAY_DIRECT_ROUTING=True)
    mocker.patch.object(hub.store, "read", side_effect=AssertionError("no file read"))
    digest = mocker.spy(host.hashlib, "sha256")
    api = host.Api(hub)
    for _ in range(5):
        assert peers(api)[0] == 200
    assert digest.call_count == 1
    assert fake.calls == []


def test_the_peers_endpoint_needs_the_token_get_and_an_enabled_overlay(tmp_path, fake):
    hub = make_hub(tmp_path, chain=False, OVERLAY_DIRECT_ROUTING=True)
    api = host.Api(hub)
    assert peers(api, headers={})[0] == 401
    assert api.dispatch("POST", "/api/overlay/peers", AUTH, b"", "198.51.100.11") == (
        405, {"error": "use GET for this endpoint"})
    assert api.dispatch("GET", "/api/overlay/peers/x", AUTH, None, "198.51.100.11")[0] == 404
    hub.cfg["OVERLAY_ENABLED"] = False
    assert peers(api)[0] == 503


def test_vtep_mac_matches_the_runners_formula():
    import kohaku_overlay_runner as runner
    for n in (1, 2, 255, 256, 4095):
        assert host.vtep_mac(n) == runner.vtep_mac(n)


def test_direct_routing_with_wireguard_is_a_valid_configuration(tmp_path):
    # issue 13: the peer table carries every runner's key, so the two switches go together
    path = tmp_path / "host_config.py"
    path.write_text('HOST_REACHABLE_ADDRESS = "198.51.100.1"\nOVERLAY_DIRECT_ROUTING = True\n'
                    'OVERLAY_ENCRYPTION = "wireguard"\nOVERLAY_MTU = 1390\n')
    cfg = host.load_settings(str(path), True)[0]
    assert (cfg["OVERLAY_DIRECT_ROUTING"], cfg["OVERLAY_ENCRYPTION"]) == (True, "wireguard")
    path.write_text('HOST_REACHABLE_ADDRESS = "198.51.100.1"\nOVERLAY_DIRECT_ROUTING = True\n')
    assert host.load_settings(str(path), True)[0]["OVERLAY_DIRECT_ROUTING"] is True
