"""The three scripts read config files alike (issue 11.13) and bound their keys alike (11.12).

No script imports another, so each keeps its own copy of the config reader: the block between
`# >>> KohakuRiver config files` and `# <<< KohakuRiver config files`. Here that block must be
the same text in all three, every reader must give the same answer (values, warnings, the same
error sentence) for the same file, and the key tables (type, default, range) must agree for every
key two scripts share. The fixtures under tests/fixtures/kohakuriver/ have the shape of the files
`kohakuriver init config --generate` writes (docstring, imports, `list[str]`, `LogLevel.INFO`,
`def config_gen():`), with the overlay block an operator appends.
"""

import logging
import re
from pathlib import Path

import pytest

import kohaku_overlay_check as chk
import kohaku_overlay_host as host
import kohaku_overlay_runner as runner

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "kohakuriver"
SCRIPTS = {"host": ROOT / "kohaku_overlay_host.py", "runner": ROOT / "kohaku_overlay_runner.py",
           "check": ROOT / "kohaku_overlay_check.py"}
BLOCK = re.compile(r"^# >>> KohakuRiver config files.*?^# <<< KohakuRiver config files$",
                   re.S | re.M)
# keys two scripts share whose defaults differ on purpose: each daemon has its own state file
ROLE_DEFAULTS = {"OVERLAY_STATE_FILE"}


# ---- one reader, three copies --------------------------------------------------------------------


def test_the_reader_block_is_the_same_text_in_the_three_scripts():
    blocks = {}
    for name, path in SCRIPTS.items():
        found = BLOCK.findall(path.read_text())
        assert len(found) == 1, name
        blocks[name] = found[0]
    assert blocks["runner"] == blocks["host"]
    assert blocks["check"] == blocks["host"]
    assert "def parse_config_source(" in blocks["host"]


def host_tables():
    return {k: ((t,), d, d is None) for k, (t, d) in host.CONFIG_KEYS.items()}, host.RANGES


def runner_tables():
    return {k: (tuple(t), d, False) for k, t, d in runner.RUNNER_KEYS}, runner.RANGES


def check_tables(role):
    keys = chk.ROLE_KEYS[role]
    return ({k: (tuple(t), d, nullable) for k, (t, d, nullable) in keys.items()},
            dict((k, r) for k, r in chk.RANGES.items() if k in keys))


@pytest.mark.parametrize("left, right", [
    (host_tables, lambda: check_tables("host")),
    (runner_tables, lambda: check_tables("runner")),
    (host_tables, runner_tables),
], ids=["host-check", "runner-check", "host-runner"])
def test_shared_keys_have_the_same_type_default_and_range(left, right):
    (lkeys, lranges), (rkeys, rranges) = left(), right()
    shared = sorted(set(lkeys) & set(rkeys))
    assert len(shared) >= 8
    for key in shared:
        ltypes, ldefault, lnull = lkeys[key]
        rtypes, rdefault, rnull = rkeys[key]
        assert (key, ltypes, lnull, lranges.get(key)) == (key, rtypes, rnull, rranges.get(key))
        if key not in ROLE_DEFAULTS:
            assert (key, ldefault) == (key, rdefault)


@pytest.mark.parametrize("tables", [host_tables, runner_tables, lambda: check_tables("host"),
                                    lambda: check_tables("runner")],
                         ids=["host", "runner", "check-host", "check-runner"])
def test_every_range_is_of_a_numeric_key_and_holds_its_default(tables):
    keys, ranges = tables()
    for key, (low, high) in ranges.items():
        types, default, _nullable = keys[key]
        assert set(types) <= {int, float}, key
        assert default is None or low <= default <= high, key


def test_the_check_has_the_daemons_ranges():
    """issue 11.12: the check refused or passed other values than the daemons did."""
    assert chk.RANGES == dict(host.RANGES, **runner.RANGES)


# ---- the same file, the same answer --------------------------------------------------------------


def read_host(path, caplog):
    values = host.read_config(str(path), host.CONFIG_KEYS, explicit=True)
    return values, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def read_runner(path, caplog):
    values = runner.load_config(str(path))
    return values, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def read_check(role):
    def read(path, caplog):
        cfg, found, warnings, _ignored = chk.load_config(role, str(path), True)
        assert found is True
        return cfg, warnings
    return read


READERS = {"host": read_host, "runner": read_runner, "check-host": read_check("host"),
           "check-runner": read_check("runner")}


def answers(tmp_path, caplog, text, keys):
    """{reader: ("error", sentence) or (values of keys, warnings)} for one file."""
    path = tmp_path / "x_config.py"
    path.write_text(text)
    out = {}
    for name, read in READERS.items():
        caplog.clear()
        try:
            values, warnings = read(path, caplog)
        except (host.ConfigError, runner.ConfigError, chk.ConfigError) as exc:
            out[name] = ("error", str(exc))
        else:
            out[name] = (dict((k, values[k]) for k in keys if k in values), warnings)
    return out


SAME = [
    ("OVERLAY_MTU = int('1450')\n",
     "x_config.py line 1: OVERLAY_MTU must be a plain literal, not a call; write the value "
     "itself"),
    ("OVERLAY_MTU: int = LogLevel.INFO\n",
     "x_config.py line 1: OVERLAY_MTU must be a plain literal, not an attribute; write the value "
     "itself"),
    ("HOST_PORT: int = '8000'\n",
     "x_config.py line 1: HOST_PORT must be an integer, not a string; fix the value"),
    ("OVERLAY_ENABLED = 1\n",
     "x_config.py line 1: OVERLAY_ENABLED must be True or False, not an integer; fix the value"),
    ("HOST_PORT = 0\n", "x_config.py line 1: HOST_PORT = 0 is out of range: use 1..65535"),
    ("OVERLAY_MTU = 9001\n", "x_config.py line 1: OVERLAY_MTU = 9001 is out of range: use "
                             "576..9000"),
    ("OVERLAY_VXLAN_ID = 0\n", "x_config.py line 1: OVERLAY_VXLAN_ID = 0 is out of range: use "
                               "1..16777214"),
    ("import os as OVERLAY_TOKEN\n",
     "x_config.py line 1: OVERLAY_TOKEN is set by an import, which this script does not run; set "
     "it on a plain `OVERLAY_TOKEN = value` line"),
    ("import os\nif os.environ:\n    OVERLAY_ENABLED = True\n",
     "x_config.py line 2: OVERLAY_ENABLED is set by an if, which this script does not run; set it "
     "on a plain `OVERLAY_ENABLED = value` line"),
    ("OVERLAY_MTU = = 1\n", "x_config.py line 1: not valid Python (invalid syntax); fix that line"),
]


@pytest.mark.parametrize("text, sentence", SAME)
def test_a_bad_key_of_ours_is_the_same_sentence_from_every_reader(tmp_path, caplog, text,
                                                                  sentence):
    got = answers(tmp_path, caplog, text, [])
    assert got == dict((name, ("error", sentence)) for name in READERS)


WARNED = [
    ("OVERLAY_MTUU = 1400\n",
     ["x_config.py line 1: unknown key OVERLAY_MTUU (did you mean OVERLAY_MTU?), ignored"]),
    ("OVERLAY_FROBNICATE: Mode = Mode.FAST\n",
     ["x_config.py line 1: unknown key OVERLAY_FROBNICATE, ignored"]),
    ("HOST_PROT = 8001\n",
     ["x_config.py line 1: unknown key HOST_PROT (did you mean HOST_PORT?), ignored"]),
    ('"""KohakuRiver\'s"""\nfrom kohakuriver.models.enums import LogLevel\n'
     "LOG_LEVEL: LogLevel = LogLevel.INFO\nADDITIONAL_MOUNTS: list[str] = []\n"
     "RUNNER_PORT: int = 8001\nHOST_SSH_PROXY_PORT: int = 8002\nSHARED_DIR = '/mnt/' + 'x'\n"
     "def config_gen():\n    return Config.from_globals()\n", []),
]


@pytest.mark.parametrize("text, warnings", WARNED)
def test_unknown_names_are_the_same_warnings_from_every_reader(tmp_path, caplog, text,
                                                               warnings):
    got = answers(tmp_path, caplog, text, ["HOST_PORT", "OVERLAY_MTU"])
    assert got == dict((name, ({"HOST_PORT": 8000, "OVERLAY_MTU": 1450}, warnings))
                       for name in READERS)


# ---- KohakuRiver's own files ---------------------------------------------------------------------


def generated_part(name):
    """The fixture as KohakuRiver writes it, without the operator's overlay block."""
    text = (FIXTURES / name).read_text()
    head, _overlay = re.split(r"^# Overlay Network.*$", text, maxsplit=1, flags=re.M)
    return head.rsplit("# ====", 1)[0] + "def config_gen():\n    return Config.from_globals()\n"


def test_the_generated_host_file_is_read_without_a_word(tmp_path, caplog):
    path = tmp_path / "host_config.py"
    path.write_text(generated_part("host_config.py"))
    assert "from kohakuengine import Config" in path.read_text()
    cfg, warnings = read_host(path, caplog)
    assert warnings == []
    assert (cfg["HOST_BIND_IP"], cfg["HOST_PORT"], cfg["HOST_REACHABLE_ADDRESS"]) == (
        "0.0.0.0", 8000, "127.0.0.1")
    assert cfg["OVERLAY_ENABLED"] is False
    values, warnings, ignored = chk.parse_config(path.read_text(), str(path), "host")
    assert (values["HOST_PORT"], warnings) == (8000, [])
    assert {"LOG_LEVEL", "ADDITIONAL_MOUNTS", "HEARTBEAT_INTERVAL_SECONDS", "DB_FILE"} <= set(
        ignored)


def test_the_generated_runner_file_is_read_without_a_word(tmp_path, caplog):
    path = tmp_path / "runner_config.py"
    path.write_text(generated_part("runner_config.py").replace(
        "HEARTBEAT_INTERVAL_SECONDS: int = 5", "HEARTBEAT_INTERVAL_SECONDS: int = 7"))
    cfg, warnings = read_runner(path, caplog)
    assert warnings == []
    assert (cfg["HOST_ADDRESS"], cfg["HOST_PORT"], cfg["OVERLAY_ENABLED"]) == (
        "127.0.0.1", 8000, False)
    assert cfg["HEARTBEAT_INTERVAL"] == 7           # KohakuRiver's key, ours unset
    values, warnings, _ignored = chk.parse_config(path.read_text(), str(path), "runner")
    assert (values["HEARTBEAT_INTERVAL"], warnings) == (7, [])


def test_the_host_fixture_with_the_overlay_block(caplog):
    path = FIXTURES / "host_config.py"
    cfg, warnings = read_host(path, caplog)
    assert warnings == []
    assert cfg["HOST_REACHABLE_ADDRESS"] == "192.168.88.53"     # the later line wins
    assert (cfg["OVERLAY_ENABLED"], cfg["OVERLAY_TOKEN"], cfg["OVERLAY_MTU"]) == (
        True, "fixture-token", 1450)
    cfg, layout = host.load_settings(str(path), explicit=True)
    assert (layout.cidr, str(layout.host_ip)) == ("10.0.0.0/8", "10.0.0.1")
    checked, _found, warnings, _ignored = chk.load_config("host", str(path), True)
    assert warnings == []
    assert dict((k, checked[k]) for k in host.CONFIG_KEYS) == cfg


def test_the_runner_fixture_with_the_overlay_block(caplog):
    path = FIXTURES / "runner_config.py"
    cfg, warnings = read_runner(path, caplog)
    assert warnings == []                           # OVERLAY_SUBNET is KohakuRiver's key here
    assert (cfg["HOST_ADDRESS"], cfg["OVERLAY_ENABLED"], cfg["OVERLAY_TOKEN"]) == (
        "192.168.88.53", True, "fixture-token")
    assert cfg["HEARTBEAT_INTERVAL"] == 5
    checked, _found, warnings, _ignored = chk.load_config("runner", str(path), True)
    assert warnings == []
    assert dict((k, checked[k]) for k, _t, _d in runner.RUNNER_KEYS
                if k != "RUNNER_NAME") == dict((k, cfg[k]) for k, _t, _d in runner.RUNNER_KEYS
                                               if k != "RUNNER_NAME")


@pytest.mark.parametrize("order", ["ours-first", "ours-last"])
def test_our_heartbeat_key_wins_over_kohakurivers(tmp_path, caplog, order):
    lines = ["HEARTBEAT_INTERVAL_SECONDS: int = 7", "HEARTBEAT_INTERVAL = 2.5"]
    if order == "ours-first":
        lines.reverse()
    got = answers(tmp_path, caplog, "\n".join(lines) + "\n", ["HEARTBEAT_INTERVAL"])
    assert got["runner"] == got["check-runner"] == ({"HEARTBEAT_INTERVAL": 2.5}, [])
    assert "HEARTBEAT_INTERVAL" not in host.CONFIG_KEYS   # the host has no such key: passed over
    assert got["host"] == got["check-host"] == ({}, [])


def test_kohakurivers_heartbeat_key_is_checked_as_ours(tmp_path, caplog):
    got = answers(tmp_path, caplog, "HEARTBEAT_INTERVAL_SECONDS = 0\n", [])
    sentence = ("x_config.py line 1: HEARTBEAT_INTERVAL_SECONDS = 0 is out of range: use "
                "0.001..3600")
    assert (got["runner"], got["check-runner"]) == (("error", sentence), ("error", sentence))
    assert got["host"] == got["check-host"] == ({}, [])


def test_the_fixtures_are_never_run(tmp_path, caplog):
    """A file that would write a marker when run: every reader reads it, none writes it."""
    marker = tmp_path / "ran"
    text = (FIXTURES / "runner_config.py").read_text() + (
        "\nimport pathlib\npathlib.Path(%r).write_text('x')\n"
        "SHARED_DIR = pathlib.Path(%r).write_text('x')\nconfig_gen()\n" % (
            str(marker), str(marker)))
    got = answers(tmp_path, caplog, text, ["OVERLAY_ENABLED"])
    assert got == dict((name, ({"OVERLAY_ENABLED": True}, [])) for name in READERS)
    assert not marker.exists()


@pytest.mark.parametrize("fixture, role", [("host_config.py", "host"),
                                           ("runner_config.py", "runner")])
def test_the_check_tells_the_role_of_kohakurivers_files(fixture, role):
    """Without --role the check goes by the keys: KohakuRiver's runner file also carries
    OVERLAY_SUBNET, which once made it a host config."""
    text = (FIXTURES / fixture).read_text()
    assert "OVERLAY_SUBNET" in text
    assert chk.guess_role(text, "/etc/kohakuriver/overlay.py") == role
