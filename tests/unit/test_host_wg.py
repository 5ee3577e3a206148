"""Unit tests of the Host's WireGuard side (OVERLAY_ENCRYPTION = "wireguard"): the config rules,
the key pair, kohaku-wg and its peers, the tunnels on the tunnel addresses, the rules, the
answers and the MTU refusal of serve. The kernel is test_host's scripted FakeRun.
"""

import json
import logging
import os
import stat

import pytest

import test_host as base

host = base.host

PRIV = "sDdrII8zPN6ZL49PRBKIYakCt4hU3PgsznWVWRXPhWk="
PUB = "8j5HGeeO6kifm5bHVkUKUonREAc5cK9lJUY7ZUjZg38="
R1_PUB = "zoqzNnmdkTXXIjN6uNs62/r9rm60A93zFCS7n/Y+RUc="
R2_PUB = "H4iiBV58GYmvvRV1GkeenMfWx61/UQYsBd9Z23dX1TM="
WG = dict(OVERLAY_ENCRYPTION="wireguard", OVERLAY_MTU=1390)
ETH0 = {"ifname": "eth0", "mtu": 1500, "flags": ["UP"], "linkinfo": {"info_kind": "veth"},
        "addr_info": [{"family": "inet", "local": base.HOST_IP, "prefixlen": 24}]}


@pytest.fixture
def fake(mocker):
    f = base.FakeRun()
    f.answer(["wg", "genkey"], (0, PRIV + "\n", ""))
    f.answer(["wg", "pubkey"], (0, PUB + "\n", ""))
    mocker.patch.object(host, "run", f)
    mocker.patch.object(host, "wg_impl", return_value="wireguard-go")
    return f


def wg_hub(tmp_path, **over):
    cfg = dict(WG)
    cfg.update(over)
    hub = base.make_hub(tmp_path, chain=False, **cfg)
    hub.kernel.links = host.parse_links(json.dumps([ETH0]))
    return hub


def config(tmp_path, text):
    p = tmp_path / "host_config.py"
    p.write_text('HOST_REACHABLE_ADDRESS = "198.51.100.1"\n' + text)
    return str(p)


# ---- configuration ----------------------------------------------------------------------------

def test_encryption_keys_default_off_and_the_subnet_outside_the_overlay(tmp_path):
    cfg, layout = host.load_settings(config(tmp_path, ""), True)
    assert (cfg["OVERLAY_ENCRYPTION"], cfg["OVERLAY_WG_PORT"], cfg["OVERLAY_WG_SUBNET"]) == (
        "none", 51820, "172.16.0.0/23")
    cfg, layout = host.load_settings(config(tmp_path, 'OVERLAY_ENCRYPTION = "wireguard"\n'), True)
    assert (host.wg_ip(cfg, 0), host.wg_ip(cfg, 1), host.wg_ip(cfg, 255)) == (
        "172.16.0.1", "172.16.0.2", "172.16.1.0")


@pytest.mark.parametrize("text,error", [
    ('OVERLAY_ENCRYPTION = "ipsec"\n', 'OVERLAY_ENCRYPTION = \'ipsec\' is not "none" or '
     '"wireguard"'),
    ('OVERLAY_ENCRYPTION = "wireguard"\nOVERLAY_WG_SUBNET = "10.200.0.0/23"\n',
     "OVERLAY_WG_SUBNET 10.200.0.0/23 overlaps the overlay network 10.0.0.0/8: the tunnel "
     "addresses must lie outside it"),
    ('OVERLAY_ENCRYPTION = "wireguard"\nOVERLAY_WG_SUBNET = "172.16.0.0/24"\n',
     "OVERLAY_WG_SUBNET 172.16.0.0/24 has 256 addresses but the host and 255 runners need 258: "
     "use a /23 or larger"),
    ('OVERLAY_ENCRYPTION = "wireguard"\nOVERLAY_WG_SUBNET = "172.16.0.1/23"\n',
     "OVERLAY_WG_SUBNET '172.16.0.1/23' is not an IPv4 network (172.16.0.1/23 has host bits "
     'set): use e.g. "172.16.0.0/23"'),
    ('OVERLAY_ENCRYPTION = "wireguard"\nOVERLAY_WG_PORT = 4789\n',
     "OVERLAY_WG_PORT = 4789 is also OVERLAY_VXLAN_PORT: give WireGuard its own port (51820)"),
])
def test_bad_encryption_settings_are_one_sentence(tmp_path, text, error):
    with pytest.raises(host.ConfigError) as e:
        host.load_settings(config(tmp_path, text), True)
    assert str(e.value) == error


def test_the_mtu_rule_names_the_value_to_set():
    assert host.wg_mtu_error(1390, 1500, "eth0") is None
    assert host.wg_mtu_error(1450, 1500, "eth0") == (
        "OVERLAY_MTU 1450 does not fit VXLAN over WireGuard on eth0 (MTU 1500 - 50 - 60): set "
        "OVERLAY_MTU = 1390 on the Host and on every runner")


def test_serve_refuses_an_overlay_mtu_that_does_not_fit_before_changing_anything(
        tmp_path, fake, mocker, capsys):
    path = config(tmp_path, 'OVERLAY_ENABLED = True\nOVERLAY_ENCRYPTION = "wireguard"\n'
                            'OVERLAY_STATE_FILE = "%s"\n' % (tmp_path / "state.json"))
    fake.answer(base.IP_SHOW, (0, json.dumps([ETH0]), ""))
    mocker.patch.object(host, "check_reachable_address")
    assert host.main(["serve", "--config", path]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "OVERLAY_MTU 1450 does not fit VXLAN over WireGuard on eth0 (MTU 1500 - 50 - 60): set "
        "OVERLAY_MTU = 1390 on the Host and on every runner")
    assert fake.calls == [base.IP_SHOW]
    assert not os.path.exists(str(tmp_path / "state-wg.key"))


# ---- keys -------------------------------------------------------------------------------------

def test_the_host_key_pair_is_made_once_0600_and_never_logged(tmp_path, fake, caplog):
    state = str(tmp_path / "state" / "overlay-state.json")
    with caplog.at_level(logging.DEBUG):
        assert host.ensure_wg_key(state) == PUB
        assert host.ensure_wg_key(state) == PUB
    priv, pub = host.wg_key_paths(state)
    assert open(priv).read() == PRIV + "\n"
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert open(pub).read() == PUB + "\n"
    assert fake.calls == [["wg", "genkey"], ["wg", "pubkey"]]
    assert fake.inputs[1] == PRIV + "\n"
    assert PRIV not in caplog.text


def test_dry_run_makes_no_key_and_shows_none(tmp_path, fake, mocker):
    mocker.patch.object(host, "DRY_RUN", True)
    mocker.patch.object(host, "run", side_effect=lambda argv, **kw: host.SKIPPED)
    state = str(tmp_path / "overlay-state.json")
    assert host.ensure_wg_key(state) is None
    assert not os.path.exists(host.wg_key_paths(state)[0])


def test_dry_run_changes_no_key_file(tmp_path, fake):
    """--dry-run reaches ensure_wg_key as read_only (run() alone reads DRY_RUN): a key readable
    by others is not chmodded and a missing public key file is not written."""
    state = str(tmp_path / "overlay-state.json")
    priv, pub = host.wg_key_paths(state)
    with open(priv, "w") as fh:
        fh.write(PRIV + "\n")
    os.chmod(priv, 0o644)
    fake.answer(["wg", "pubkey"], (0, PUB + "\n", ""))
    assert host.ensure_wg_key(state, read_only=True) == PUB
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o644 and not os.path.exists(pub)


# ---- kohaku-wg and the tunnels ----------------------------------------------------------------

def test_kohaku_wg_is_made_with_key_port_address_and_mtu(tmp_path, fake):
    hub = wg_hub(tmp_path)
    hub.kernel.wg_public = PUB
    assert hub.kernel.ensure_wg({R1_PUB: "172.16.0.2"}) is True
    key_file = host.wg_key_paths(hub.cfg["OVERLAY_STATE_FILE"])[0]
    assert fake.calls[:2] == [
        ["wireguard-go", "kohaku-wg"],
        ["wg", "set", "kohaku-wg", "private-key", key_file, "listen-port", "51820",
         "peer", R1_PUB, "allowed-ips", "172.16.0.2/32"]]
    assert fake.batches() == [["link set kohaku-wg mtu 1440",
                               "addr replace 172.16.0.1/23 dev kohaku-wg",
                               "link set kohaku-wg up"]]
    assert PRIV not in json.dumps(fake.calls)


def test_kohaku_wg_peers_follow_the_allocations_in_one_wg_set(tmp_path, fake):
    hub = wg_hub(tmp_path)
    hub.kernel.wg_public = PUB
    have = {"public_key": PUB, "listen_port": 51820,
            "peers": {R1_PUB: {"allowed_ips": ["172.16.0.2/32"]},
                      R2_PUB: {"allowed_ips": ["172.16.0.3/32"]}}}
    assert hub.kernel.wg_plan({R1_PUB: "172.16.0.2", R2_PUB: "172.16.0.3"}, have) is None
    assert hub.kernel.wg_plan({R1_PUB: "172.16.0.2"}, have) == [
        "wg", "set", "kohaku-wg", "peer", R2_PUB, "remove"]
    assert hub.kernel.wg_plan({R1_PUB: "172.16.0.9"}, have) == [
        "wg", "set", "kohaku-wg", "peer", R1_PUB, "allowed-ips", "172.16.0.9/32",
        "peer", R2_PUB, "remove"]


def test_the_dump_parser_drops_the_private_key():
    dump = ("%s\t%s\t51820\toff\n%s\t(none)\t198.51.100.11:51820\t172.16.0.2/32\t1700000000\t1\t2"
            "\toff\n" % (PRIV, PUB, R1_PUB))
    have = host.parse_wg_dump(dump)
    assert PRIV not in json.dumps(have)
    assert have == {"public_key": PUB, "listen_port": 51820, "peers": {R1_PUB: {
        "endpoint": "198.51.100.11:51820", "allowed_ips": ["172.16.0.2/32"],
        "handshake": 1700000000}}}


def test_tunnels_and_the_source_filter_use_the_tunnel_addresses(tmp_path, fake):
    hub = wg_hub(tmp_path)
    allocs = {1: base.alloc(1, "runner1", "198.51.100.11"),
              2: base.alloc(2, "runner2", "198.51.100.12")}
    assert hub.remotes(allocs) == {1: "172.16.0.2", 2: "172.16.0.3"}
    assert hub.filter_pairs(allocs) == [("172.16.0.2", 101), ("172.16.0.3", 102)]  # 11.3
    lines, spec = hub.kernel.tunnel_plan(1, "172.16.0.2")
    assert lines[0] == ("link add vxkr1 address 02:6b:6f:00:00:65 type vxlan id 101 local "
                        "172.16.0.1 remote 172.16.0.2 dstport 4789 nolearning")


def test_input_rules_open_the_wireguard_port_and_take_vxlan_only_from_kohaku_wg(tmp_path, fake):
    hub = wg_hub(tmp_path)
    assert hub.kernel.input_rules() == [
        "-p udp -m udp --dport 51820 -m comment --comment kohaku-overlay -j ACCEPT",
        "! -i kohaku-wg -p udp -m udp --dport 4789 -m comment --comment kohaku-overlay -j DROP",
        "-p udp -m udp --dport 4789 -m comment --comment kohaku-overlay -j KOHAKU-VXLAN"]
    lines = hub.kernel.rules_plan("-P INPUT ACCEPT\n-P FORWARD ACCEPT\n", [("172.16.0.2", 101)])
    assert lines[-3:] == ["-I INPUT %d %s" % (i + 1, r)
                          for i, r in enumerate(hub.kernel.input_rules())]
    assert ('-A KOHAKU-VXLAN -s 172.16.0.2/32 -m u32 --u32 "0x0>>0x16&0x3c@0xc>>0x8=0x65" '
            '-j ACCEPT') in lines             # issue 11.3: its tunnel address for its own VNI
    assert base.make_hub(tmp_path).kernel.input_rules() == [hub.kernel.input_rules()[2]]


# ---- registration and heartbeat ---------------------------------------------------------------

def test_registration_keeps_the_key_and_answers_the_tunnel_settings(tmp_path, fake):
    hub = wg_hub(tmp_path)
    hub.kernel.wg_public = PUB
    api = host.Api(hub)
    with base.writer_running(hub):
        status, answer = base.register(api, mtu=1390, wg_public_key=R1_PUB)
        beat = api.dispatch("PUT", "/api/overlay/heartbeat/runner1", base.AUTH, None,
                            "198.51.100.11")
    wg = {"encryption": "wireguard", "wg_port": 51820, "host_wg_public_key": PUB,
          "host_wg_ip": "172.16.0.1", "wg_ip": "172.16.0.2", "wg_subnet": "172.16.0.0/23"}
    assert status == 200
    assert dict((k, answer[k]) for k in wg) == wg
    assert beat == (200, dict({"ok": True, "direct_routing": False, "peers_version": 0}, **wg))
    saved = json.loads(open(hub.cfg["OVERLAY_STATE_FILE"]).read())["allocations"]
    assert saved[0]["wg_public_key"] == R1_PUB
    assert hub.store.read()[0][1]["wg_public_key"] == R1_PUB
    wg_sets = [c for c in fake.calls if c[:3] == ["wg", "set", "kohaku-wg"]]
    assert len(wg_sets) == 1                    # key, port and the new peer in one process
    assert wg_sets[0][-4:] == ["peer", R1_PUB, "allowed-ips", "172.16.0.2/32"]
    row = hub.status()["allocations"][0]
    assert (row["wg_ip"], row["wg_public_key"]) == ("172.16.0.2", R1_PUB)


def test_with_direct_routing_the_peer_table_carries_every_key_and_tunnel_address(
        tmp_path, fake):
    hub = wg_hub(tmp_path, OVERLAY_DIRECT_ROUTING=True)
    hub.kernel.wg_public = PUB
    api = host.Api(hub)

    def table():
        return api.dispatch("GET", "/api/overlay/peers", base.AUTH, None, "198.51.100.11")[1]
    with base.writer_running(hub):
        assert base.register(api, mtu=1390, wg_public_key=R1_PUB)[0] == 200
        assert base.register(api, "runner2", "198.51.100.12", mtu=1390,
                             wg_public_key=R2_PUB)[0] == 200
        first = table()
        assert [(p["runner_id"], p["physical_ip"], p["wg_public_key"], p["wg_ip"])
                for p in first["peers"]] == [(1, "198.51.100.11", R1_PUB, "172.16.0.2"),
                                             (2, "198.51.100.12", R2_PUB, "172.16.0.3")]
        # runner2 made a new key pair (its key file removed): a new table, a new version
        new = "b" * 42 + "E="
        assert base.register(api, "runner2", "198.51.100.12", mtu=1390,
                             wg_public_key=new)[0] == 200
        second = table()
        beat = api.dispatch("PUT", "/api/overlay/heartbeat/runner1", base.AUTH, None,
                            "198.51.100.11")[1]
    assert second["peers"][1]["wg_public_key"] == new
    assert second["version"] != first["version"] and beat["peers_version"] == second["version"]


def test_a_bad_or_copied_runner_key_is_refused(tmp_path, fake):
    hub = wg_hub(tmp_path)
    hub.kernel.wg_public = PUB
    api = host.Api(hub)
    with base.writer_running(hub):
        assert base.register(api, mtu=1390, wg_public_key="nope") == (400, {
            "error": "field wg_public_key must be a WireGuard public key (the output of wg "
                     "pubkey)"})
        assert base.register(api, mtu=1390, wg_public_key=R1_PUB)[0] == 200
        copied = base.register(api, "runner2", "198.51.100.12", mtu=1390, wg_public_key=R1_PUB)
    assert copied == (409, {"error": "wg_public_key is already runner runner1's: give every "
                                     "runner its own key pair (remove the copied *-wg.key)"})


def test_down_removes_kohaku_wg_with_the_rest(tmp_path, fake, mocker, capsys):
    path = config(tmp_path, 'OVERLAY_ENCRYPTION = "wireguard"\nOVERLAY_MTU = 1390\n'
                            'OVERLAY_STATE_FILE = "%s"\n' % (tmp_path / "state.json"))
    wg_link = {"ifname": "kohaku-wg", "mtu": 1440, "flags": ["UP"],
               "linkinfo": {"info_kind": "tun"}, "addr_info": []}
    fake.answer(base.IP_SHOW, (0, json.dumps([ETH0, wg_link]), ""))
    assert host.main(["down", "--config", path]) == 0
    assert fake.batches()[0] == ["link del kohaku-wg"]
