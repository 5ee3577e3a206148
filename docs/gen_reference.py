#!/usr/bin/env python3
"""Writes docs/reference.md from the scripts' own tables, so that the reference cannot drift.

    python3 docs/gen_reference.py           # rewrite docs/reference.md
    python3 docs/gen_reference.py --check   # exit 1 when docs/reference.md is out of date

Sources: each script's config key table (kohaku_overlay_host.CONFIG_KEYS,
kohaku_overlay_runner.RUNNER_KEYS, the check's HOST_KEYS/RUNNER_KEYS), the check's RANGES (held
equal to the daemons' bounds by tests/unit/test_check.py), the comments next to each key in
contrib/config/*_config.py (the meaning column), each script's build_parser() (command lines),
and, written here by hand, ENDPOINTS and FILES: tests/unit/test_reference.py holds ENDPOINTS
equal to the paths the Host's router accepts. tests/unit/test_reference.py fails when
docs/reference.md differs from what this prints.

Adding a config key: add it to the script's table and to contrib/config/, then run this script.
Adding an endpoint or a file a script touches: add a row to ENDPOINTS or FILES below, then run it.
"""

import argparse
import importlib
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "reference.md"
COMMAND = "python3 docs/gen_reference.py"
SCRIPTS = ("kohaku_overlay_host", "kohaku_overlay_runner", "kohaku_overlay_check")

# (method, path, auth, request body, answer, status codes besides 200)
ENDPOINTS = [
    ("GET", "/healthz", False, "", '`{"ok": true}`', ""),
    ("POST", "/api/overlay/register", True,
     '`{"runner_name", "physical_ip", "vxlan_id", "vxlan_port", "mtu"}`, optional '
     '`"previous_runner_id"`, `"wg_public_key"` (the runner\'s, once it has one)',
     'the allocation: `{"runner_name", "runner_id", "subnet", "gateway", "host_overlay_ip", '
     '"host_vxlan_ip", "host_physical_ip", "vni", "vxlan_port", "mtu", "overlay_cidr", '
     '"direct_routing", "peers_version", "encryption"}`; with `"encryption": "wireguard"` '
     'also `"wg_port", "host_wg_public_key", "host_wg_ip", "wg_ip", "wg_subnet"`',
     "400 bad field or a physical_ip that is not the TCP peer, 409 vxlan_id/vxlan_port/mtu differ "
     "from the host's (names the key and both values) or another runner registered that "
     "wg_public_key, 411 no Content-Length, 413 body over "
     "64 KiB, 500 the tunnel could not be built, 503 no free runner id or overlay disabled"),
    ("PUT", "/api/overlay/heartbeat/<name>", True, "",
     '`{"ok": true, "direct_routing", "peers_version", "encryption"}` (a runner fetches the '
     'peer table when the version differs from its own; with WireGuard also the tunnel fields '
     'of the registration answer)',
     "400 bad name, 404 the host does not know the runner or has it from another address (the "
     "runner registers again), 503 overlay disabled"),
    ("GET", "/api/overlay/status", True, "",
     '`{"enabled", "host_ip", "host_prefix", "bridge", "overlay_cidr", "total", "active", '
     '"inactive", "available_ids", "max_ids", "allocations": [{"runner_name", "runner_id", '
     '"subnet", "gateway", "host_vxlan_ip", "physical_ip", "vxlan_device", "vni", "active", '
     '"last_seen"}]}`, plus `"encryption"` and, with WireGuard, each allocation\'s `"wg_ip", '
     '"wg_public_key"`', ""),
    ("GET", "/api/overlay/peers", True, "",
     '`{"version", "peers": [{"runner_name", "runner_id", "subnet", "physical_ip", '
     '"vtep_mac"}]}` (direct routing; version 0 and no peers while OVERLAY_DIRECT_ROUTING is '
     'False; with encryption each peer also has `"wg_public_key"` and `"wg_ip"`), served from '
     'memory', "503 overlay disabled"),
    ("POST", "/api/overlay/release/<name>", True, "", '`{"released": true}`',
     "400 bad name, 404 no such runner, 503 overlay disabled"),
    ("POST", "/api/overlay/cleanup", True, "", '`{"released": <count>}`',
     "503 overlay disabled"),
    ("GET", "/metrics", True, "",
     "Prometheus text exposition format (`text/plain; version=0.0.4`), `kohaku_overlay_` "
     "prefix: runners by state, free ids, per-runner heartbeat age, event counters, "
     "per-tunnel kernel counters, build info (README: Monitoring with Prometheus)", ""),
]
ENDPOINT_NOTES = """\
Every endpoint answers 405 to another method and 404 to an unknown path; every endpoint but
`/healthz` answers 401 without `Authorization: Bearer <OVERLAY_TOKEN>` when a token is set.
Errors are `{"error": "<one sentence>"}`. The server bounds what a client can hold: a
request-wide deadline (408), headers up to 16 KiB (431), a cap on handler threads and on queued
requests (503 "the host is busy"), `Content-Length` required and at most 64 KiB (413), chunked
bodies refused (400)."""

# (script, path or pattern, what it is, when it is written)
FILES = [
    ("host", "the config file (`--config`, default `~/.kohakuriver/host_config.py`)",
     "read with `ast`, never executed", "never"),
    ("host", "`OVERLAY_STATE_FILE`", "the allocations (JSON, mode 0600)",
     "atomically (temp file, fsync, rename) before a registration, release or cleanup is "
     "answered"),
    ("host", "`OVERLAY_STATE_FILE` + `.lock`", "the `flock` every read-modify-write holds",
     "created once, never replaced"),
    ("host", "`OVERLAY_STATE_FILE` + `.serve.lock`", "held while serve runs: a second serve on "
     "the same state refuses to start", "created once, never replaced"),
    ("host", "`OVERLAY_STATE_FILE` + `.corrupt-<time>`", "an unreadable state file kept aside",
     "at start-up, when the state file cannot be read"),
    ("host", "`OVERLAY_STATE_FILE` without `.json`, + `-wg.key` / `-wg.pub`", "the host's "
     "WireGuard key pair (mode 0600, the private key never logged or in argv)",
     "once, at the first serve with `OVERLAY_ENCRYPTION = \"wireguard\"`; kept by `down`"),
    ("host", "`/proc/sys/net/ipv4/ip_forward`", "set to 1 (sysctl)", "serve"),
    ("host", "`/proc/sys/net/ipv6/conf/<dev>/{accept_ra,forwarding,disable_ipv6}` of "
     "`kohaku-host` and each `vxkrN`", "IPv6 off: 0, 0, 1 (written in-process, logged as "
     "`sysctl -w`)", "when serve creates the device, and by each repair pass when it drifted"),
    ("runner", "the config file (`--config`, default `~/.kohakuriver/runner_config.py`)",
     "read with `ast`, never executed", "never"),
    ("runner", "`OVERLAY_STATE_FILE`", "the last allocation (JSON, mode 0600), asked back at "
     "registration", "atomically (`.tmp`, fsync, rename) after each registration"),
    ("runner", "`OVERLAY_STATE_FILE` + `.serve.lock`", "held while serve runs: one serve per "
     "state file", "created once, never replaced"),
    ("runner", "`/etc/resolv.conf`", "read: a nameserver inside the overlay CIDR makes the build "
     "refuse", "never"),
    ("runner", "`OVERLAY_METRICS_FILE`", "node_exporter textfile figures (when set)",
     "atomically every heartbeat"),
    ("runner", "`OVERLAY_STATE_FILE` without `.json`, + `-wg.key` / `-wg.pub`", "the runner's "
     "WireGuard key pair (mode 0600, the private key never logged or in argv)",
     "once, at the first registration the Host answers with encryption; kept by `down`"),
    ("runner", "`/proc/sys/net/ipv4/ip_forward`", "set to 1 (sysctl)", "up, serve"),
    ("runner", "`/proc/sys/net/ipv6/conf/DEV/disable_ipv6`", "set to 1 on the bridge, "
     "`vxlan0`, `vxdirect0`, `kohaku-wg` where they exist (sysctl)", "up, serve"),
    ("check", "the role's config file", "read, never executed", "never"),
    ("check", "`OVERLAY_STATE_FILE`", "read: the host's allocations, a runner's last allocation",
     "never"),
    ("check", "`/etc/resolv.conf`", "read: a nameserver inside the overlay CIDR is a conflict",
     "never"),
    ("check", "`--bundle FILE.tar.gz`", "a diagnostics archive (config with the token "
     "redacted, the report, logs)", "only with --bundle"),
]


def load_scripts():
    sys.path.insert(0, str(ROOT))
    try:
        return dict((name, importlib.import_module(name)) for name in SCRIPTS)
    finally:
        sys.path.remove(str(ROOT))


# ---- config keys ---------------------------------------------------------------------------

def example_comments(path):
    """{KEY: meaning} from an example config: the comment block right above the key's line, or
    the comment at its end."""
    found, block = {}, []
    for line in Path(path).read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if text and not re.match(r"^[=\-]+$", text):
                block.append(text)
            continue
        m = re.match(r"^([A-Z][A-Z0-9_]*)\s*(?::[^=]*)?=", line)
        if m:
            tail = line.split("#", 1)[1].strip() if "#" in _code_tail(line) else ""
            found[m.group(1)] = " ".join(block) or tail
        block = []
    return found


def _code_tail(line):
    """The line with string literals blanked, so that a '#' inside quotes is not a comment."""
    return re.sub(r"(\"[^\"]*\"|'[^']*')", lambda m: " " * len(m.group(0)), line)


def type_words(types):
    if not isinstance(types, tuple):
        types = (types,)
    names = {str: "str", int: "int", float: "float", bool: "bool"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def show_default(value):
    if value is None:
        return "`None`"
    return "`%r`" % (value,)


def show_range(key, types, ranges):
    if not isinstance(types, tuple):
        types = (types,)
    if key in ranges:
        low, high = ranges[key]
        return "%s..%s" % (low, high)
    if bool in types:
        return "True, False"
    return ""


def key_table(rows, ranges, comments):
    """rows: [(key, types, default)] -> markdown table lines."""
    out = ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
    for key, types, default in rows:
        out.append("| `%s` | %s | %s | %s | %s |" % (
            key, type_words(types), show_default(default), show_range(key, types, ranges),
            comments.get(key, "").replace("|", "\\|")))
    return out


def config_section(mods):
    host, runner, check = (mods[n] for n in SCRIPTS)
    ranges = dict(check.RANGES)
    host_rows = [(k, t, d) for k, (t, d) in host.CONFIG_KEYS.items()]
    runner_rows = list(runner.RUNNER_KEYS)
    out = ["## Configuration", "",
           "Python files such as the ones KohakuRiver writes (`kohakuriver init config "
           "--generate`), read with `ast` and never executed. A key below comes from a plain "
           "top-level `NAME: type = value` or `NAME = value` line; everything else (the "
           "docstring, imports, `def config_gen()`, KohakuRiver's own keys whatever their value) "
           "is passed over in silence. An unknown `OVERLAY_*` name or a near miss of a key below "
           "is a warning naming the line; a key below set by code, of the wrong type or out of "
           "range is an error naming the line and the key (exit 2). Ranges are the ones the "
           "daemons enforce (each script's `RANGES`, held equal by "
           "tests/unit/test_config_files.py). The runner takes KohakuRiver's "
           "`HEARTBEAT_INTERVAL_SECONDS` where `HEARTBEAT_INTERVAL` is not set.", "",
           "### Host: `~/.kohakuriver/host_config.py` (kohaku_overlay_host.py)", ""]
    out += key_table(host_rows, ranges,
                     example_comments(ROOT / "contrib" / "config" / "host_config.py"))
    out += ["", "`OVERLAY_HOST_PREFIX` = None means the layout's NETWORK_PREFIX (the second field "
            "of `OVERLAY_SUBNET`).", "",
            "### Runner: `~/.kohakuriver/runner_config.py` (kohaku_overlay_runner.py)", ""]
    out += key_table(runner_rows, ranges,
                     example_comments(ROOT / "contrib" / "config" / "runner_config.py"))
    out += ["", "`RUNNER_NAME` = \"\" means the hostname; `RUNNER_ADDRESS` = \"\" means the source "
            "address of the route to `HOST_ADDRESS`.", "",
            "### Check (kohaku_overlay_check.py)", "",
            "The check has no file of its own: it reads the file of its role (`--config`, default "
            "the daemon's) with the keys above."]
    for role, mine, daemon in (("host", check.HOST_KEYS, [r[0] for r in host_rows]),
                               ("runner", check.RUNNER_KEYS, [r[0] for r in runner_rows])):
        unknown = [k for k in daemon if k not in mine]
        extra = [k for k in mine if k not in daemon]
        if unknown or extra:
            out.append("With `--role %s` it does not know %s%s." % (
                role, ", ".join("`%s`" % k for k in unknown) or "nothing",
                ("; it knows %s, which the daemon does not" % ", ".join("`%s`" % k for k in extra))
                if extra else ""))
    return out


# ---- command lines -------------------------------------------------------------------------

def _option_words(action):
    if not action.option_strings:
        return "`%s`" % (action.metavar or action.dest).upper()
    flags = ", ".join(action.option_strings)
    if action.nargs == 0:
        return "`%s`" % flags
    metavar = action.metavar or (action.dest.upper() if not action.choices else
                                 "{%s}" % ",".join(action.choices))
    return "`%s %s`" % (flags, metavar)


def _option_help(action):
    text = (action.help or "").replace("%(prog)s", "")
    if action.choices and action.option_strings:
        text = (text + "; " if text else "") + "one of " + ", ".join(action.choices)
    if action.default not in (None, False, "", argparse.SUPPRESS) and action.nargs != 0:
        text = (text + "; " if text else "") + "default %s" % (action.default,)
    return text.replace("|", "\\|")


def _options(parser):
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _synopsis(prog, parser):
    parts = [prog]
    for a in _options(parser):
        if isinstance(a, argparse._VersionAction):
            continue
        word = _option_words(a).strip("`")
        parts.append(word if not a.option_strings else "[%s]" % word)
    return " ".join(parts)


def commands_section(mods):
    out = ["## Command lines", "",
           "Exit codes everywhere: 0 success, 1 failure (a failed check, an API error), 2 bad "
           "usage or bad config. Every script also takes `--help` and `--version`."]
    for name in SCRIPTS:
        parser = mods[name].build_parser()
        prog = name + ".py"
        out += ["", "### %s" % prog, "", parser.description or "", ""]
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out += ["```", _synopsis(prog, parser), "```", ""]
            out += _option_rows(parser)
            continue
        helps = dict((c.dest, c.help) for c in subs[0]._choices_actions)
        out.append("```")
        for cmd, sp in subs[0].choices.items():
            out.append(_synopsis("%s %s" % (prog, cmd), sp))
        out.append("```")
        for cmd, sp in subs[0].choices.items():
            out += ["", "`%s`: %s" % (cmd, helps.get(cmd, "")), ""]
            out += _option_rows(sp)
    return out


def _option_rows(parser):
    rows = [a for a in _options(parser) if not isinstance(a, argparse._VersionAction)]
    if not rows:
        return ["(no options)"]
    out = ["| option | meaning |", "|---|---|"]
    for a in rows:
        out.append("| %s | %s |" % (_option_words(a), _option_help(a)))
    return out


# ---- endpoints and files -------------------------------------------------------------------

def endpoints_section():
    out = ["## Host HTTP API", "",
           "Served by `kohaku_overlay_host.py serve` on `HOST_BIND_IP:HOST_PORT`; JSON in and out.",
           "", "| method and path | token | body | answer (200) | other status codes |",
           "|---|---|---|---|---|"]
    for method, path, auth, body, answer, codes in ENDPOINTS:
        out.append("| `%s %s` | %s | %s | %s | %s |" % (
            method, path, "required" if auth else "no", body or "none", answer, codes or "none"))
    return out + ["", ENDPOINT_NOTES]


def files_section():
    out = ["## Files each script touches", "",
           "Besides the kernel state (devices, routes, iptables rules, Docker networks) that each "
           "daemon's `down` removes again.", "",
           "| script | file | what | written |", "|---|---|---|---|"]
    for script, path, what, when in FILES:
        out.append("| %s | %s | %s | %s |" % (script, path, what, when))
    return out


def render():
    mods = load_scripts()
    lines = ["# kohaku-overlay reference", "",
             "<!-- Generated by docs/gen_reference.py from the scripts' own tables: do not edit "
             "by hand. Change the tables (or docs/gen_reference.py) and run `%s`. -->" % COMMAND,
             "", "Every config key, command line, HTTP endpoint and file of the three scripts. "
             "How the pieces fit: [design.md](design.md); the figures: "
             "[benchmarks.md](benchmarks.md).", ""]
    for section in (config_section(mods), commands_section(mods), endpoints_section(),
                    files_section()):
        lines += section + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="docs/gen_reference.py", description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when docs/reference.md differs from what would be written")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            print("docs/reference.md is out of date: run %s" % COMMAND, file=sys.stderr)
            return 1
        return 0
    tmp = TARGET.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(str(tmp), str(TARGET))
    print("wrote %s" % os.path.relpath(str(TARGET), str(ROOT)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
