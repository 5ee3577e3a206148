#!/usr/bin/env python3
"""kohaku_overlay_runner.py: the Runner agent of the kohaku-overlay VXLAN hub-and-spoke overlay.

It registers this Docker node with the Host's overlay API, builds the runner end of the tunnel
(vxlan0 enslaved to the bridge that carries the gateway 10.N.0.1/16, the overlay route via the
Host's 10.N.0.254, FORWARD/NAT rules, firewalld trusted zone, the Docker network
kohakuriver-overlay), then heartbeats and repairs drift.

Usage:
    kohaku_overlay_runner.py serve   [--config F]               # register, build, heartbeat forever
    kohaku_overlay_runner.py up      [--config F] [--dry-run]   # register and build once
    kohaku_overlay_runner.py down    [--config F] [--force] [--dry-run]
    kohaku_overlay_runner.py status  [--config F] [--json]
    kohaku_overlay_runner.py network [--config F]               # the Docker network to join

Exit codes: 0 success, 1 failure, 2 bad usage or bad config (or a host that refuses our settings).

Touches: links vxlan0 and OVERLAY_BRIDGE_NAME, the route of the overlay CIDR, iptables rules
marked `-m comment --comment kohaku-overlay` (filter FORWARD and INPUT, nat POSTROUTING) and
the chain KOHAKU-VXLAN (the VXLAN filter INPUT jumps to), firewalld's runtime trusted zone,
net.ipv4.ip_forward, net.ipv6.conf.DEV.disable_ipv6 of its devices, the Docker networks
OVERLAY_NETWORK_NAME and DOCKER_NETWORK_NAME, the local state file OVERLAY_STATE_FILE and, when
set, OVERLAY_METRICS_FILE (node_exporter textfile-collector figures, rewritten every heartbeat).
Docker is reached with the plain `docker` CLI (DOCKER_HOST is honoured). Reads /etc/resolv.conf:
a nameserver, route or address of this node inside the overlay CIDR that is not the overlay's
makes the build refuse.
"""

__version__ = "0.1.0"

# ---- imports ----------------------------------------------------------------------------------

import argparse
import ast
import contextlib
import difflib
import errno
import fcntl
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import namedtuple

# ---- constants and defaults -------------------------------------------------------------------

DEFAULT_CONFIG = "~/.kohakuriver/runner_config.py"
VXLAN_DEV = "vxlan0"
WG_DEV = "kohaku-wg"                # the WireGuard interface that carries VXLAN when encrypted
WG_KEEPALIVE = 25                   # seconds: keeps a NAT mapping towards the Host open
VXLAN_OVERHEAD = 50                 # outer IPv4 + UDP + VXLAN + inner Ethernet
WG_OVERHEAD = 60                    # IPv4 + UDP + WireGuard header and tag
WG_KEY_RE = re.compile(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")
MARKER = "kohaku-overlay"           # iptables comment on every rule we add
TRUSTED_ZONE = "trusted"
VXLAN_CHAIN = "KOHAKU-VXLAN"        # our chain of the VXLAN filter (INPUT jumps to it)
# u32: the IHL jump to the UDP header, then the 4 bytes at UDP offset 12 shifted right by 8,
# which is the VNI (as `iptables -S` prints the expression "0>>22&0x3C@12>>8")
U32_VNI = "0x0>>0x16&0x3c@0xc>>0x8"
BACKOFF_START = 0.5                 # seconds before the first registration retry
BACKOFF_MAX = 30.0                  # cap of the exponential backoff
REPAIR_EVERY = 3                    # serve re-checks the local build every N heartbeats
HTTP_TIMEOUT = 10.0
STATE_VERSION = 1
HEARTBEAT_RECORD_EVERY = 30.0       # seconds between writes of last_heartbeat to the state file
RESOLV_CONF = "/etc/resolv.conf"    # its nameservers must lie outside the overlay CIDR
DIRECT_DEV = "vxdirect0"            # direct routing: VXLAN to every peer, VNI OVERLAY_VXLAN_ID
PROBE_EVERY = 1.0                   # seconds between probe rounds of the direct paths
PROBE_WAIT = 0.5                    # how long a round waits for the echo replies
FALL_AFTER = 3                      # rounds without a reply before a peer goes through the Host
RISE_AFTER = 2                      # rounds with a reply before a relayed peer goes direct again

# key -> (accepted types, default). A default of None is computed at load time.
RUNNER_KEYS = [
    ("HOST_ADDRESS", (str,), ""),
    ("HOST_PORT", (int,), 8000),
    ("RUNNER_NAME", (str,), ""),
    ("RUNNER_ADDRESS", (str,), ""),
    ("OVERLAY_ENABLED", (bool,), False),
    ("OVERLAY_NETWORK_NAME", (str,), "kohakuriver-overlay"),
    ("OVERLAY_BRIDGE_NAME", (str,), "kohaku-overlay"),
    ("OVERLAY_VXLAN_ID", (int,), 100),
    ("OVERLAY_VXLAN_PORT", (int,), 4789),
    ("OVERLAY_MTU", (int,), 1450),
    ("OVERLAY_TOKEN", (str,), ""),
    ("HEARTBEAT_INTERVAL", (int, float), 5),
    ("DOCKER_NETWORK_NAME", (str,), "kohakuriver-net"),
    ("DOCKER_NETWORK_SUBNET", (str,), "172.30.0.0/16"),
    ("DOCKER_NETWORK_GATEWAY", (str,), "172.30.0.1"),
    ("OVERLAY_STATE_FILE", (str,), "/var/lib/kohakuriver/overlay-runner.json"),
    ("OVERLAY_METRICS_FILE", (str,), ""),
]
KEY_TYPES = {k: t for k, t, _ in RUNNER_KEYS}
# key -> (lowest, highest) accepted, checked as the file is read; the Host and the check script
# hold the same bounds (tests/unit/test_config_files.py). OVERLAY_VXLAN_ID: VNI base + runner id
# must stay below 2**24 (the Host also knows how many runners its layout has).
RANGES = {"HOST_PORT": (1, 65535), "OVERLAY_VXLAN_PORT": (1, 65535), "OVERLAY_MTU": (576, 9000),
          "OVERLAY_VXLAN_ID": (1, 2 ** 24 - 2), "HEARTBEAT_INTERVAL": (0.001, 3600)}
KEY_DEFAULTS = {k: d for k, _, d in RUNNER_KEYS}

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,14}$")
PACKAGES = {"ip": "iproute2", "iptables": "iptables", "iptables-restore": "iptables",
            "docker": "docker.io (or docker-ce)", "firewall-cmd": "firewalld", "sysctl": "procps",
            "wg": "wireguard-tools", "wireguard-go": "wireguard-go"}
ALLOCATION_KEYS = ("runner_name", "runner_id", "subnet", "gateway", "host_overlay_ip",
                   "host_vxlan_ip", "host_physical_ip", "vni", "vxlan_port", "mtu", "overlay_cidr")
# the encryption settings learnt from the Host (registration and heartbeat answers)
WG_KEYS = ("encryption", "wg_port", "host_wg_public_key", "host_wg_ip", "wg_ip", "wg_subnet")

log = logging.getLogger("kohaku-overlay-runner")

# ---- errors -----------------------------------------------------------------------------------


class OverlayError(Exception):
    """A failure the user can fix; the message is one sentence. exit_code is what main() returns."""
    exit_code = 1


class ConfigError(OverlayError):
    """Bad config or settings the host refuses: exit 2."""
    exit_code = 2


class CommandError(OverlayError):
    """An external command failed; carries argv, exit code and stderr."""

    def __init__(self, message, argv=None, rc=None, stderr=""):
        OverlayError.__init__(self, message)
        self.argv = argv or []
        self.rc = rc
        self.stderr = stderr


class HostUnreachable(OverlayError):
    """The host's API did not answer (connection refused, timeout, 5xx): retried."""


class NotRegistered(OverlayError):
    """The host answered 404 to a heartbeat: it no longer knows this runner."""


class ContainersAttached(OverlayError):
    """A Docker network that must be removed still has containers."""

    def __init__(self, message, containers):
        OverlayError.__init__(self, message)
        self.containers = containers


# ---- the command wrapper ----------------------------------------------------------------------

Result = namedtuple("Result", "rc out err")
DRY_RUN = False


def quote(argv):
    return " ".join(shlex.quote(str(a)) for a in argv)


def run(argv, check=True, mutates=True, input=None, timeout=30, echo=None):
    """Run argv (a list, never a shell string): the only door to subprocess.

    A mutating command is logged as `[#] ip link add ...` (echo: the lines to show instead of
    argv, for batches fed on stdin); under --dry-run it is printed to stdout and not run.
    """
    argv = [str(a) for a in argv]
    if mutates:
        lines = echo if echo is not None else [quote(argv)]
        for line in lines:
            if DRY_RUN:
                print("[#] " + line)
            else:
                log.info("[#] %s", line)
        if DRY_RUN:
            return Result(0, "", "")
    try:
        proc = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=timeout)
    except FileNotFoundError:
        raise CommandError("%s is not installed: install %s" % (
            argv[0], PACKAGES.get(argv[0], "the package that provides it")), argv, 127)
    except subprocess.TimeoutExpired:
        raise CommandError("`%s` did not finish within %s s: check that the service it talks to "
                           "is responsive" % (quote(argv), timeout), argv, None)
    res = Result(proc.returncode, proc.stdout, proc.stderr)
    if check and res.rc != 0:
        raise CommandError("`%s` failed (exit %d): %s" % (
            quote(argv[:6]) + (" ..." if len(argv) > 6 else ""), res.rc, first_line(res.err)),
            argv, res.rc, res.err)
    return res


def first_line(text):
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return "no error message"


# ---- config reader ----------------------------------------------------------------------------


def shown(value, limit=60):
    """repr() for messages: bounded, and safe for ints too long to print."""
    try:
        text = repr(value)
    except ValueError:
        return "a number of %d bits" % value.bit_length()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_config_text(text, filename="runner_config.py"):
    """Our keys of a runner config (see the KohakuRiver block below): (values, warnings)."""
    spec = dict((k, (t, False)) for k, t in KEY_TYPES.items())
    values, warnings, _ignored = parse_config_source(text, filename, spec, RANGES)
    return values, warnings


# >>> KohakuRiver config files: this block is the same, word for word, in kohaku_overlay_host.py,
# kohaku_overlay_runner.py and kohaku_overlay_check.py (tests/unit/test_config_files.py holds it).
# The file `kohakuriver init config --generate` writes (a docstring, imports, annotations,
# LogLevel.INFO, def config_gen) is read with ast and never executed: a key we own comes from a
# plain top-level `NAME = literal` or `NAME: annotation = literal` line, everything else is
# KohakuRiver's and passed over without a word.

# KohakuRiver's own keys in host_config.py and runner_config.py: never warned about by a script
# that does not own them (an unknown OVERLAY_* name, or a near miss of a key of ours, is)
KOHAKURIVER_KEYS = frozenset((
    "ADDITIONAL_MOUNTS", "ADMIN_SECRET", "AUTH_ENABLED", "AUTO_RESTORE_ON_CREATE",
    "AUTO_SNAPSHOT_ON_STOP", "CLEANUP_CHECK_INTERVAL_SECONDS", "CONTAINER_DIR",
    "CONTAINER_TAR_DIR", "DB_FILE", "DEFAULT_CONTAINER_NAME", "DEFAULT_WORKING_DIR",
    "DOCKER_IMAGE_SYNC_TIMEOUT", "DOCKER_NETWORK_GATEWAY", "DOCKER_NETWORK_NAME",
    "DOCKER_NETWORK_SUBNET", "HEARTBEAT_INTERVAL_SECONDS", "HEARTBEAT_TIMEOUT_FACTOR",
    "HOST_ADDRESS", "HOST_BIND_IP", "HOST_LOG_FILE", "HOST_PORT", "HOST_REACHABLE_ADDRESS",
    "HOST_SSH_PROXY_PORT", "INITIAL_BASE_IMAGE", "LOCAL_TEMP_DIR", "LOG_LEVEL",
    "MAX_SNAPSHOTS_PER_VPS", "NUMACTL_PATH", "OVERLAY_ENABLED", "OVERLAY_MTU",
    "OVERLAY_NETWORK_NAME", "OVERLAY_SUBNET", "OVERLAY_VXLAN_ID", "OVERLAY_VXLAN_PORT",
    "RESOURCE_CHECK_INTERVAL_SECONDS", "RUNNER_BIND_IP", "RUNNER_LOG_FILE", "RUNNER_PORT",
    "RUNNER_USER", "SESSION_EXPIRE_HOURS", "SHARED_DIR", "TASKS_PRIVILEGED",
    "TUNNEL_CLIENT_PATH", "TUNNEL_ENABLED", "VM_ACS_OVERRIDE", "VM_DEFAULT_DISK_SIZE",
    "VM_DEFAULT_MEMORY_MB", "VM_IMAGES_DIR", "VM_INSTANCES_DIR"))
# KohakuRiver's name -> ours: honoured where our own key is not set in the same file
CONFIG_ALIASES = {"HEARTBEAT_INTERVAL_SECONDS": "HEARTBEAT_INTERVAL"}
CONFIG_TYPE_WORDS = ((bool, "True or False"), (int, "an integer"), (float, "a number"),
                     (str, "a string"), (bytes, "bytes"), (list, "a list"), (tuple, "a tuple"),
                     (dict, "a dict"), (set, "a set"), (complex, "a complex number"),
                     (type(None), "None"))
CONFIG_KINDS = {"Import": "an import", "ImportFrom": "an import", "FunctionDef": "a def",
                "AsyncFunctionDef": "a def", "ClassDef": "a class", "Call": "a call",
                "Attribute": "an attribute", "Name": "a name", "JoinedStr": "an f-string",
                "BinOp": "an expression", "UnaryOp": "an expression", "Subscript": "a subscript",
                "Assign": "an assignment to more than one name", "AugAssign": "an augmented "
                "assignment", "If": "an if", "For": "a loop", "While": "a loop", "With": "a with",
                "Try": "a try", "Global": "a global statement"}


def parse_config_source(source, filename, keys, ranges):
    """KohakuRiver-style config text (or bytes) -> (values, warnings, ignored names).

    keys: {NAME: (accepted types, None allowed)} for the keys this script owns; ranges:
    {NAME: (lowest, highest)}. Raises ConfigError, one sentence naming the line and the key,
    for a key we own that is set other than by a plain literal, of the wrong type or out of range.
    """
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as exc:
        raise ConfigError("%s line %s: not valid Python (%s); fix that line" % (
            filename, exc.lineno or "?", exc.msg))
    except (ValueError, MemoryError, RecursionError) as exc:
        raise ConfigError("%s cannot be parsed as Python (%s); fix the file" % (
            filename, type(exc).__name__))
    values, aliased, warnings, ignored = {}, {}, [], []
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and node.value is not None:
            name, value = node.target.id, node.value
        else:
            owned = [n for n in config_bound_names(node)
                     if n in keys or CONFIG_ALIASES.get(n) in keys]
            if owned:
                raise ConfigError("%s line %d: %s is set by %s, which this script does not run; "
                                  "set it on a plain `%s = value` line" % (
                                      filename, node.lineno, owned[0], config_kind(node),
                                      owned[0]))
            continue
        key = name if name in keys else CONFIG_ALIASES.get(name)
        if key not in keys:
            close = difflib.get_close_matches(name, sorted(keys), n=1, cutoff=0.85)
            if name not in KOHAKURIVER_KEYS and (close or name.startswith("OVERLAY_")):
                warnings.append("%s line %d: unknown key %s%s, ignored" % (
                    filename, node.lineno, name, " (did you mean %s?)" % close[0] if close else ""))
            else:
                ignored.append(name)
            continue
        (values if key == name else aliased)[key] = config_value(
            value, name, keys[key], ranges.get(key), "%s line %d" % (filename, node.lineno))
    for key, literal in aliased.items():
        values.setdefault(key, literal)
    return values, warnings, ignored


def config_value(node, name, spec, bounds, where):
    """The literal of a key we own, checked against its types and range."""
    try:
        literal = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ConfigError("%s: %s must be a plain literal, not %s; write the value itself" % (
            where, name, config_kind(node)))
    types, nullable = spec
    if not (type(literal) in types or (literal is None and nullable)):
        number = float in types  # then an integer is a number too
        wanted = [w for t, w in CONFIG_TYPE_WORDS if t in types and not (number and t is int)]
        raise ConfigError("%s: %s must be %s, not %s; fix the value" % (
            where, name, " or ".join(wanted + (["None"] if nullable else [])),
            dict(CONFIG_TYPE_WORDS).get(type(literal), "a " + type(literal).__name__)))
    if bounds and literal is not None and not bounds[0] <= literal <= bounds[1]:
        shown = repr(literal) if type(literal) is float or abs(literal) < 10 ** 15 else \
            "a %d-bit number" % literal.bit_length()
        raise ConfigError("%s: %s = %s is out of range: use %s..%s" % (
            where, name, shown, bounds[0], bounds[1]))
    return literal


def config_bound_names(node):
    """The module-level names a statement binds (not those inside defs, classes or lambdas)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [(alias.asname or alias.name).split(".")[0] for alias in node.names]
    if isinstance(node, ast.Global):
        return list(node.names)
    if isinstance(node, ast.Name):
        return [node.id] if isinstance(node.ctx, ast.Store) else []
    if isinstance(node, ast.Lambda):
        return []
    return [name for child in ast.iter_child_nodes(node) for name in config_bound_names(child)]


def config_kind(node):
    """'an import', 'a call', ...: what a statement or an expression is, for messages."""
    name = type(node).__name__
    return CONFIG_KINDS.get(name, "a " + name.lower())
# <<< KohakuRiver config files


def load_config(path=None):
    """Defaults overlaid with the file at path (default ~/.kohakuriver/runner_config.py).

    A missing default file means defaults; a missing explicit --config is an error.
    """
    explicit = path is not None
    path = os.path.expanduser(path or DEFAULT_CONFIG)
    cfg = dict(KEY_DEFAULTS)
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError("config file %s does not exist: pass an existing file to --config"
                              % path)
        text = None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("cannot read config file %s (%s): fix its permissions or encoding"
                          % (path, e))
    if text is not None:
        values, warnings = parse_config_text(text, os.path.basename(path))
        for w in warnings:
            log.warning("%s", w)
        cfg.update(values)
    cfg["_path"] = path
    if not cfg["RUNNER_NAME"]:
        cfg["RUNNER_NAME"] = socket.gethostname().split(".")[0]
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    """Range and format checks that do not depend on the command."""
    f = os.path.basename(cfg.get("_path", "runner_config.py"))

    def bad(key, why, fix):
        raise ConfigError("%s in %s %s: %s" % (key, f, why, fix))

    if not NAME_RE.match(cfg["RUNNER_NAME"]):
        bad("RUNNER_NAME", "is %s, not 1-63 of A-Za-z0-9._- starting alphanumeric"
            % shown(cfg["RUNNER_NAME"]), "set a valid name")
    for key in ("OVERLAY_BRIDGE_NAME",):
        if not IFNAME_RE.match(cfg[key]) or cfg[key] == VXLAN_DEV:
            bad(key, "is %s, not a valid interface name" % shown(cfg[key]),
                "use up to 15 of A-Za-z0-9._- (default kohaku-overlay)")
    for key in ("OVERLAY_NETWORK_NAME", "DOCKER_NETWORK_NAME"):
        if not NAME_RE.match(cfg[key]):
            bad(key, "is %s, not a valid Docker network name" % shown(cfg[key]), "fix the value")
    if cfg["RUNNER_ADDRESS"]:
        ip = parse_ipv4(cfg["RUNNER_ADDRESS"])
        if ip is None or ip.is_loopback or ip.is_unspecified or ip.is_multicast:
            bad("RUNNER_ADDRESS", "is %s, not a usable IPv4 address" % shown(cfg["RUNNER_ADDRESS"]),
                "set this runner's underlay address or remove the line")
    try:
        net = ipaddress.IPv4Network(cfg["DOCKER_NETWORK_SUBNET"])
    except ValueError:
        bad("DOCKER_NETWORK_SUBNET",
            "is %s, not an IPv4 network" % shown(cfg["DOCKER_NETWORK_SUBNET"]),
            "use a form like 172.30.0.0/16")
    gw = parse_ipv4(cfg["DOCKER_NETWORK_GATEWAY"])
    if gw is None or gw not in net:
        bad("DOCKER_NETWORK_GATEWAY", "is %s, not an address inside %s" % (
            shown(cfg["DOCKER_NETWORK_GATEWAY"]), net), "use an address of DOCKER_NETWORK_SUBNET")
    token = cfg["OVERLAY_TOKEN"]
    if any(not 33 <= ord(c) <= 126 for c in token):
        bad("OVERLAY_TOKEN", "holds spaces or characters outside printable ASCII",
            "use the host's token exactly")
    if not cfg["OVERLAY_STATE_FILE"]:
        bad("OVERLAY_STATE_FILE", "is empty", "give a file path")
    metrics = cfg["OVERLAY_METRICS_FILE"]
    if metrics and (not os.path.isabs(metrics) or not metrics.endswith(".prom")):
        bad("OVERLAY_METRICS_FILE", "is %s, not an absolute path ending in .prom (the only "
            "files node_exporter's textfile collector reads)" % shown(metrics),
            "give the full path of a NAME.prom file in the collector's folder, or \"\" for none")


def require_root(command):
    if os.geteuid() != 0:
        raise OverlayError("%s changes links, routes and iptables, which needs root: run it as "
                           "root (sudo)" % command)


def require_host(cfg):
    if not cfg["HOST_ADDRESS"]:
        raise ConfigError("HOST_ADDRESS is not set in %s: set it to the host's address" %
                          os.path.basename(cfg["_path"]))


def parse_ipv4(text):
    try:
        return ipaddress.IPv4Address(text)
    except (ValueError, TypeError):
        return None


# ---- parsers (pure functions over tool output) ------------------------------------------------


def parse_json(text, what):
    try:
        return json.loads(text or "[]")
    except ValueError:
        raise CommandError("could not parse the JSON output of %s: update iproute2 / docker" % what)


def parse_links(text):
    """`ip -j -d addr show` -> {ifname: link dict with addr_info}."""
    return {link["ifname"]: link for link in parse_json(text, "ip -j -d addr show")
            if "ifname" in link}


def link_kind(link):
    return (link.get("linkinfo") or {}).get("info_kind")


def link_up(link):
    return "UP" in (link.get("flags") or [])


def ipv4_addrs(link):
    return ["%s/%s" % (a["local"], a["prefixlen"]) for a in link.get("addr_info") or []
            if a.get("family") == "inet"]


def vxlan_data(link):
    """The kind-specific attributes of a link (`ip -d`): VNI, addresses, port, learning."""
    return (link.get("linkinfo") or {}).get("info_data") or {}


def vxlan_mismatch(link, want):
    """What differs between a vxlan link and want (dict id/local/remote/port): list of words."""
    data = vxlan_data(link)
    diff = []
    for key in ("id", "local", "remote", "port"):
        if data.get(key) != want[key]:
            diff.append("%s %s (want %s)" % (key, data.get(key), want[key]))
    if data.get("learning", False):
        diff.append("learning on")
    return diff


def parse_rules(text):
    """`iptables -S CHAIN` -> list of rule lines ("-A CHAIN ...")."""
    return [line.strip() for line in (text or "").splitlines() if line.startswith("-A ")]


def parse_chains(text):
    """`iptables -S` of a table -> {chain: [rule lines]}, with every chain that exists."""
    chains = {}
    for line in (text or "").splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("-P", "-N"):
            chains.setdefault(words[1], [])
        elif len(words) >= 2 and words[0] == "-A":
            chains.setdefault(words[1], []).append(line.strip())
    return chains


def is_marked(rule):
    try:
        words = shlex.split(rule)
    except ValueError:
        return False
    return any(w == "--comment" and i + 1 < len(words) and words[i + 1] == MARKER
               for i, w in enumerate(words))


def forward_accept(cidr, iif, oif):
    """A FORWARD accept of overlay-to-overlay traffic from iif to oif, as `iptables -S` prints."""
    return "-A FORWARD -s %s -d %s -i %s -o %s -m comment --comment %s -j ACCEPT" % (
        cidr, cidr, iif, oif, MARKER)


def forward_rules(cidr, bridge):
    """FORWARD's first rule: overlay to overlay through the bridge (vxlan0 is a port of it, so
    hub traffic is bridge in, bridge out). Nothing else is accepted by us: other Docker networks,
    the LAN and DOCKER-USER keep Docker's and the operator's rules, and containers reach the
    internet through Docker's own rules and our MASQUERADE."""
    return [forward_accept(cidr, bridge, bridge)]


def vxlan_jump(port):
    """INPUT's first rule: UDP to the VXLAN port goes through our filter chain."""
    return "-A INPUT -p udp -m udp --dport %d -m comment --comment %s -j %s" % (
        port, MARKER, VXLAN_CHAIN)


def vni_range(alloc):
    """(lo, hi): our VNIs, OVERLAY_VXLAN_ID (node 0) to OVERLAY_VXLAN_ID + the largest runner
    id of the layout (the subnet prefix minus the overlay prefix gives the node bits)."""
    base = alloc["vni"] - alloc["runner_id"]
    node_bits = alloc["prefixlen"] - ipaddress.IPv4Network(alloc["overlay_cidr"]).prefixlen
    return base, base + (1 << node_bits) - 1


def vxlan_accepts(alloc):
    """The (source IP, VNI) pairs whose VXLAN frames this runner takes: the Host (the remote of
    vxlan0: its physical address, or its tunnel address when encrypted), for this runner's own
    VNI. Every other frame of our VNI range is dropped."""
    return [(vxlan_endpoints(alloc, None)[1], alloc["vni"])]


def vxlan_chain_rules(accepts, vnis):
    """The content of KOHAKU-VXLAN: one ACCEPT per (IP, VNI), then one DROP of our VNI range
    only, so that other VXLAN users of the port (Docker Swarm, EVPN) fall through untouched."""
    return ["-A %s -s %s/32 -m u32 --u32 \"%s=0x%x\" -j ACCEPT" % (VXLAN_CHAIN, ip, U32_VNI, vni)
            for ip, vni in accepts] + \
        ["-A %s -m u32 --u32 \"%s=0x%x:0x%x\" -j DROP" % (VXLAN_CHAIN, U32_VNI, vnis[0], vnis[1])]


# (table, chain, kind, rules, what, others): "head" rules are the first of their chain, in
# order, and no other rule there is marked; "chain" rules are the whole content of our own
# chain; "anywhere" rules are each present once. Rules holding the text `others` belong to
# another step (WireGuard's guard above the INPUT jump) and are not looked at.
RuleSet = namedtuple("RuleSet", "table chain kind rules what others")
RuleSet.__new__.__defaults__ = (None,)


def wanted_rules(cfg, alloc, extra_forward=(), extra_accepts=()):
    """Every iptables rule of the runner, as `iptables -S` prints it. extra_forward: more marked
    FORWARD rules right after ours (direct routing's pair); extra_accepts: more (IP, VNI) pairs
    the VXLAN filter accepts (direct routing's peers)."""
    cidr = alloc["overlay_cidr"]
    return [RuleSet("filter", "FORWARD", "head",
                    forward_rules(cidr, cfg["OVERLAY_BRIDGE_NAME"]) + list(extra_forward),
                    "FORWARD accept rules for %s" % cidr),
            RuleSet("filter", VXLAN_CHAIN, "chain",
                    vxlan_chain_rules(vxlan_accepts(alloc) + list(extra_accepts),
                                      vni_range(alloc)),
                    "VXLAN filter %s" % VXLAN_CHAIN),
            RuleSet("filter", "INPUT", "head", [vxlan_jump(alloc["vxlan_port"])],
                    "INPUT jump to %s for UDP %d" % (VXLAN_CHAIN, alloc["vxlan_port"]),
                    "-i %s " % WG_DEV),
            RuleSet("nat", "POSTROUTING", "anywhere", [nat_rule(cidr)],
                    "NAT masquerade for %s" % cidr)]


def delete_rule(rule):
    """The `-D CHAIN ...` line that deletes the `-A CHAIN ...` rule (iptables-restore input)."""
    return "-D" + rule[2:]


def nat_rule(cidr):
    return "-A POSTROUTING -s %s ! -d %s -m comment --comment %s -j MASQUERADE" % (
        cidr, cidr, MARKER)


def docker_network_mismatch(net, want):
    """Differences between `docker network inspect` output and want: list of words."""
    diff = []
    if net.get("Driver") != "bridge":
        diff.append("driver %s" % net.get("Driver"))
    cfgs = ((net.get("IPAM") or {}).get("Config") or [{}])
    ipam = cfgs[0] if cfgs else {}
    if ipam.get("Subnet") != want["subnet"]:
        diff.append("subnet %s (want %s)" % (ipam.get("Subnet"), want["subnet"]))
    if ipam.get("Gateway") != want["gateway"]:
        diff.append("gateway %s (want %s)" % (ipam.get("Gateway"), want["gateway"]))
    if want["host_vxlan_ip"] not in (ipam.get("AuxiliaryAddresses") or {}).values():
        diff.append("%s not reserved" % want["host_vxlan_ip"])
    opts = net.get("Options") or {}
    if opts.get("com.docker.network.bridge.name") != want["bridge"]:
        diff.append("bridge %s (want %s)" % (opts.get("com.docker.network.bridge.name"),
                                             want["bridge"]))
    if opts.get("com.docker.network.driver.mtu") != str(want["mtu"]):
        diff.append("mtu %s (want %s)" % (opts.get("com.docker.network.driver.mtu"), want["mtu"]))
    return diff


def container_names(net):
    return sorted((c.get("Name") or cid[:12]) for cid, c in (net.get("Containers") or {}).items())


def parse_allocation(obj):
    """Validate the host's registration answer; derive prefixlen. Raises OverlayError."""
    if not isinstance(obj, dict) or any(k not in obj for k in ALLOCATION_KEYS):
        missing = [k for k in ALLOCATION_KEYS if not isinstance(obj, dict) or k not in obj]
        raise OverlayError("the host's registration answer lacks %s: update the host script"
                           % ", ".join(missing))
    try:
        subnet = ipaddress.IPv4Network(obj["subnet"])
        cidr = ipaddress.IPv4Network(obj["overlay_cidr"])
        for key in ("gateway", "host_vxlan_ip", "host_physical_ip", "host_overlay_ip"):
            ipaddress.IPv4Address(obj[key])
        if ipaddress.IPv4Address(obj["gateway"]) not in subnet or \
                ipaddress.IPv4Address(obj["host_vxlan_ip"]) not in subnet:
            raise ValueError("gateway outside subnet")
        if any(isinstance(obj[k], bool) or not isinstance(obj[k], int)
               for k in ("runner_id", "vni", "vxlan_port", "mtu")):
            raise ValueError("not an int")
        wg = parse_wg_settings(obj)
    except (ValueError, TypeError, KeyError) as e:
        raise OverlayError("the host's registration answer is malformed (%s): update the host "
                           "script" % e)
    alloc = {k: obj[k] for k in ALLOCATION_KEYS}
    alloc["prefixlen"] = subnet.prefixlen
    alloc["overlay_cidr"] = str(cidr)
    alloc["settings"] = parse_settings(obj)
    alloc.update(wg)
    return alloc


def parse_wg_settings(obj):
    """The encryption settings of a host answer (or a saved state); a host that sends none (an
    older one) means no encryption. Raises ValueError/KeyError on a malformed answer."""
    mode = obj.get("encryption", "none")
    if mode == "none":
        return {"encryption": "none"}
    if mode != "wireguard":
        raise ValueError("encryption %r" % (mode,))
    port = obj["wg_port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError("wg_port %r" % (port,))
    if not WG_KEY_RE.match(str(obj["host_wg_public_key"])):
        raise ValueError("host_wg_public_key is not a WireGuard key")
    net = ipaddress.IPv4Network(obj["wg_subnet"])
    for key in ("host_wg_ip", "wg_ip"):
        if ipaddress.IPv4Address(obj[key]) not in net:
            raise ValueError("%s outside wg_subnet" % key)
    return {k: obj[k] for k in WG_KEYS}


def wg_settings(obj):
    """The encryption part of an answer or allocation, for comparison (malformed: None)."""
    try:
        return parse_wg_settings(obj)
    except (ValueError, TypeError, KeyError):
        return None


def encrypted(alloc):
    return alloc.get("encryption") == "wireguard"


def vxlan_endpoints(alloc, address):
    """(local, remote) of vxlan0: the WireGuard addresses when encrypted, else the physical ones."""
    if encrypted(alloc):
        return alloc["wg_ip"], alloc["host_wg_ip"]
    return address, alloc["host_physical_ip"]


def wg_mtu_error(overlay_mtu, underlay_mtu, dev):
    """None when OVERLAY_MTU fits VXLAN over WireGuard on the underlay, else the sentence."""
    fit = underlay_mtu - VXLAN_OVERHEAD - WG_OVERHEAD
    if overlay_mtu <= fit:
        return None
    return ("OVERLAY_MTU %d does not fit VXLAN over WireGuard on %s (MTU %d - %d - %d): set "
            "OVERLAY_MTU = %d on the Host and on every runner" % (
                overlay_mtu, dev, underlay_mtu, VXLAN_OVERHEAD, WG_OVERHEAD, fit))


def parse_wg_dump(text):
    """`wg show IF dump` -> {"public_key", "listen_port", "peers": {key: {...}}}.

    The first line also carries the private key: it is dropped here, never kept or logged.
    """
    lines = [line.split("\t") for line in (text or "").splitlines() if line.strip()]
    if not lines or len(lines[0]) < 3:
        return {"public_key": None, "listen_port": None, "peers": {}}
    have = {"public_key": lines[0][1] if lines[0][1] != "(none)" else None,
            "listen_port": int(lines[0][2]) if lines[0][2].isdigit() else None, "peers": {}}
    for f in lines[1:]:
        if len(f) < 8:
            continue
        have["peers"][f[0]] = {
            "endpoint": None if f[2] == "(none)" else f[2],
            "allowed_ips": sorted(x for x in f[3].split(",") if x and x != "(none)"),
            "handshake": int(f[4]) if f[4].isdigit() else 0,
            "rx": int(f[5]) if f[5].isdigit() else 0, "tx": int(f[6]) if f[6].isdigit() else 0,
            "keepalive": int(f[7]) if f[7].isdigit() else 0}
    return have


def wg_impl(module_loaded, modules_text):
    """"kernel" when this kernel has WireGuard (loaded, built in, or a module to load), else
    "wireguard-go" (userspace), as wg-quick decides."""
    if module_loaded or re.search(r"(^|/)wireguard\.ko", modules_text or "", re.M):
        return "kernel"
    return "wireguard-go"


# ---- local state file -------------------------------------------------------------------------


def write_json_atomic(path, obj):
    """tmp file, fsync, os.replace, fsync of the folder; mode 0600."""
    write_file_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_file_atomic(path, text, mode=0o600, sync=True):
    """Write `path.tmp` in the same folder, then os.replace: a reader sees the old or the new
    file, never half of one. sync: fsync the file and the folder (state must survive a crash;
    a metrics file is rewritten every heartbeat anyway)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o755, exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            fd = None
            f.write(text)
            f.flush()
            if sync:
                os.fsync(f.fileno())
    finally:
        if fd is not None:
            os.close(fd)
    os.replace(tmp, path)
    if not sync:
        return
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_state(path):
    """The saved state dict, or {} when missing or unreadable (a bad file is only a warning)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable state file %s (%s)", path, e)
        return {}
    return state if isinstance(state, dict) else {}


def save_state(path, alloc, **extra):
    if DRY_RUN:
        return
    state = {k: alloc[k] for k in ALLOCATION_KEYS + WG_KEYS if k in alloc}
    state.update(version=STATE_VERSION, saved_at=time.time())
    state.update(alloc.get("settings") or {})
    state.update(extra)
    try:
        write_json_atomic(path, state)
    except OSError as e:
        raise OverlayError("cannot write the state file %s (%s): fix the folder or set "
                           "OVERLAY_STATE_FILE" % (path, e))


def saved_allocation(state):
    try:
        return parse_allocation(state)
    except OverlayError:
        return None


# WireGuard keys live in their own files beside the state file (mode 0600), never in the JSON,
# never in a log line or argv: `wg set` reads the private key from its file.

def wg_key_paths(cfg):
    """(private key file, public key file) in the state folder."""
    base = os.path.splitext(cfg["OVERLAY_STATE_FILE"])[0]
    return base + "-wg.key", base + "-wg.pub"


def read_wg_key(path):
    """The key held in path, None when the file does not exist."""
    try:
        with open(path) as f:
            key = f.read().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OverlayError("cannot read %s (%s): fix its permissions" % (path, e))
    if not WG_KEY_RE.match(key):
        raise OverlayError("%s does not hold a WireGuard key: remove it (a new key pair is then "
                           "made and registered)" % path)
    return key


def wg_public_key(cfg):
    """This runner's public key, None before its key pair is made (encryption never seen)."""
    priv, pub = wg_key_paths(cfg)
    if not os.path.exists(priv):
        return None
    mode = os.stat(priv).st_mode & 0o777
    if mode & 0o077 and not DRY_RUN:
        os.chmod(priv, 0o600)
        log.warning("%s was readable by others (mode %04o): set to 0600", priv, mode)
    key = read_wg_key(pub)
    if key is None:                     # the public half is derived again, on stdin
        key = run(["wg", "pubkey"], input=read_wg_key(priv) + "\n", mutates=False).out.strip()
        if not DRY_RUN:
            write_file_atomic(pub, key + "\n")
    return key


def ensure_wg_key(cfg):
    """The public key, making the key pair on first use: `wg genkey` into a 0600 file, then
    `wg pubkey` with the private key on stdin. Under --dry-run nothing is made (None)."""
    public = wg_public_key(cfg)
    if public is not None:
        return public
    priv, pub = wg_key_paths(cfg)
    res = run(["wg", "genkey"], echo=["wg genkey > %s  # mode 0600" % priv])
    if DRY_RUN:
        return None
    private = res.out.strip()
    if not WG_KEY_RE.match(private):
        raise OverlayError("`wg genkey` printed no key: reinstall wireguard-tools")
    write_file_atomic(priv, private + "\n")
    public = run(["wg", "pubkey"], input=private + "\n", mutates=False).out.strip()
    write_file_atomic(pub, public + "\n")
    log.info("WireGuard key pair made in %s (public key %s)", priv, public)
    return public


def serve_lock_path(cfg):
    return cfg["OVERLAY_STATE_FILE"] + ".serve.lock"


def hold_serve_lock(cfg):
    """Held by `serve` for its life (one serve per state file); returns the open file."""
    path = serve_lock_path(cfg)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise OverlayError("cannot open the lock file %s (%s): fix the folder or set "
                           "OVERLAY_STATE_FILE" % (path, e))
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise OverlayError("another serve (pid %s) already runs with the state file %s: stop it "
                           "first" % (pid, cfg["OVERLAY_STATE_FILE"]))
    f.seek(0)
    f.truncate()
    f.write("%d\n" % os.getpid())
    f.flush()
    return f


def serve_running(cfg):
    """The pid (a string) of a serve holding the lock of this state file, else None."""
    try:
        f = open(serve_lock_path(cfg), "r")
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "?"
    return None


# ---- idempotent primitives: probes ------------------------------------------------------------


def probe_links():
    return parse_links(run(["ip", "-j", "-d", "addr", "show"], mutates=False).out)


ADDR_SET = 3     # /sys/class/net/DEV/addr_assign_type: NET_ADDR_SET, the MAC was set


def read_addr_assign_type(dev):
    """How dev's MAC came to be (in-process, no command), or None when it cannot be read."""
    try:
        with open("/sys/class/net/%s/addr_assign_type" % dev) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def probe_routes():
    """The main routing table (`ip -j route show`)."""
    return parse_json(run(["ip", "-j", "route", "show"], mutates=False).out, "ip -j route show")


def read_nameservers(path=None):
    """The IPv4 nameservers of resolv.conf, in order ([] when it cannot be read)."""
    try:
        with open(path or RESOLV_CONF, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and parse_ipv4(words[1]):
            found.append(words[1])
    return found


def probe_route(cidr):
    routes = parse_json(run(["ip", "-j", "route", "show", "exact", cidr], mutates=False).out,
                        "ip -j route show")
    return routes[0] if routes else None


def probe_rules(table, chain):
    argv = ["iptables", "-S", chain] if table == "filter" else \
        ["iptables", "-t", table, "-S", chain]
    return parse_rules(run(argv, mutates=False).out)


def probe_wg_impl():
    """kernel or wireguard-go: is the WireGuard module loaded, built in or installed here?"""
    release = os.uname().release
    text = ""
    for name in ("modules.builtin", "modules.dep"):
        try:
            with open("/lib/modules/%s/%s" % (release, name)) as f:
                text += f.read()
        except OSError:
            pass
    return wg_impl(os.path.isdir("/sys/module/wireguard"), text)


def probe_wg():
    return parse_wg_dump(run(["wg", "show", WG_DEV, "dump"], mutates=False).out)


def underlay_of(links, address):
    """(device, MTU) of the link that holds address, the runner's physical address."""
    for name, link in links.items():
        if any(a.split("/")[0] == address for a in ipv4_addrs(link)):
            return name, link.get("mtu") or 1500
    return None, None


def probe_chains(table):
    """Every chain of table with its rules (one `iptables -S`)."""
    argv = ["iptables", "-S"] if table == "filter" else ["iptables", "-t", table, "-S"]
    return parse_chains(run(argv, mutates=False).out)


def read_sysctl(name):
    """A sysctl's value, or None when it does not exist. name: dotted, or slashed (a device
    name may hold dots)."""
    try:
        with open("/proc/sys/" + (name if "/" in name else name.replace(".", "/"))) as f:
            return f.read().strip()
    except OSError:
        return None


def system_bus_path():
    """The system D-Bus socket path firewall-cmd would use, or None when it is not a path."""
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")
    for part in address.split(";")[0].split(":", 1)[-1].split(","):
        if part.startswith("path="):
            return part[len("path="):]
    return None


def is_firewalld_cmdline(argv):
    """Is this /proc/PID/cmdline (its NUL-separated fields, bytes) a firewalld?

    argv[0] is firewalld itself, or a python interpreter with firewalld among its first three
    arguments: Debian runs `/usr/bin/python3 /usr/sbin/firewalld --nofork --nopid`, RHEL 9
    `/usr/bin/python3 -s /usr/sbin/firewalld --nofork --nopid`, RHEL 8 the same with
    `/usr/libexec/platform-python`.
    """
    if not argv or not argv[0]:
        return False
    name = os.path.basename(argv[0])
    if name == b"firewalld":
        return True
    return name.startswith((b"python", b"platform-python")) and any(
        os.path.basename(a) == b"firewalld" for a in argv[1:4])


def firewalld_candidate(proc="/proc"):
    """Does some process look like firewalld? Reads only /proc/PID/cmdline, which needs no
    capability (the unit keeps CAP_NET_ADMIN/CAP_NET_RAW only: /proc/PID/ns/net is closed to it).
    A firewalld of another network namespace is a candidate too: `firewall-cmd --state` decides.
    """
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            with open(os.path.join(proc, pid, "cmdline"), "rb") as f:
                argv = f.read().split(b"\0")
        except (IOError, OSError):
            continue        # the process just ended
        if is_firewalld_cmdline(argv):
            return True
    return False


def firewalld_running():
    """True when a firewalld process exists and `firewall-cmd --state` (over D-Bus, so the
    firewalld of this node) says running.

    firewall-cmd is a Python program (a process start costs ~0.3 s), so it is not asked when the
    system bus socket it would talk through does not exist or no process looks like firewalld.
    """
    bus = system_bus_path()
    if bus is not None and not os.path.exists(bus):
        return False
    if not firewalld_candidate():
        return False
    try:
        res = run(["firewall-cmd", "--state"], check=False, mutates=False, timeout=15)
    except CommandError as e:
        if e.rc == 127:
            return False
        raise
    return res.rc == 0 and res.out.strip() == "running"


def trusted_interfaces():
    res = run(["firewall-cmd", "--zone=" + TRUSTED_ZONE, "--list-interfaces"], mutates=False,
              timeout=15)
    return set(res.out.split())


def docker_inspect(name):
    """The network's inspect dict, or None when Docker has no such network."""
    res = run(["docker", "network", "inspect", name], check=False, mutates=False)
    if res.rc == 0:
        data = parse_json(res.out, "docker network inspect")
        return data[0] if data else None
    err = res.err.lower()
    if "no such network" in err or "not found" in err:
        return None
    raise CommandError("docker is not reachable (%s): start dockerd or fix DOCKER_HOST"
                       % first_line(res.err), ["docker", "network", "inspect", name], res.rc,
                       res.err)


def route_source(host):
    """The source address of the route to host (`ip -j route get`), the default RUNNER_ADDRESS."""
    routes = parse_json(run(["ip", "-j", "route", "get", host], mutates=False).out,
                        "ip -j route get")
    route = routes[0] if routes else {}
    if route.get("type") == "local" or route.get("dev") == "lo":
        raise ConfigError("HOST_ADDRESS %s is an address of this machine: set it to the host's "
                          "address" % host)
    if not route.get("prefsrc"):
        raise ConfigError("no source address on the route to %s: set RUNNER_ADDRESS" % host)
    return route["prefsrc"]


def resolve_host(cfg):
    host = cfg["HOST_ADDRESS"]
    if parse_ipv4(host):
        return host
    try:
        return socket.gethostbyname(host)
    except (socket.gaierror, UnicodeError) as e:
        raise HostUnreachable("cannot resolve HOST_ADDRESS %s (%s)" % (host, e))


def runner_address(cfg):
    return cfg["RUNNER_ADDRESS"] or route_source(resolve_host(cfg))


# ---- idempotent primitives: ensure / remove ---------------------------------------------------


def undo(stack, description, argv, input=None, echo=None):
    """Register an undo callback that never raises (rollback must go on)."""
    def callback():
        log.warning("rolling back: %s", description)
        try:
            run(argv, check=False, input=input, echo=echo)
        except OverlayError as e:
            log.warning("rollback step failed: %s", e)
    stack.callback(callback)


def own_devices(cfg):
    """The devices the overlay makes: their routes and addresses in the overlay CIDR are ours."""
    return (cfg["OVERLAY_BRIDGE_NAME"], VXLAN_DEV, DIRECT_DEV, WG_DEV)


def overlay_conflicts(cidr, own, routes, links, nameservers):
    """What of this node lies in the overlay CIDR without being the overlay's: routes (but the
    default route), addresses and nameservers, as words for the refusal. Pure."""
    net = ipaddress.IPv4Network(cidr)
    found = []
    for r in routes:
        try:
            dst = ipaddress.IPv4Network(r.get("dst", ""), strict=False)
        except ValueError:              # "default", IPv6, a type we do not route
            continue
        if dst.prefixlen and dst.overlaps(net) and r.get("dev") not in own:
            found.append("route %s" % " ".join([r["dst"]] + ["%s %s" % (w, r[k]) for w, k in (
                ("via", "gateway"), ("dev", "dev")) if r.get(k)]))
    for name, link in sorted(links.items()):
        if name not in own:
            found += ["address %s on %s" % (a, name) for a in ipv4_addrs(link)
                      if ipaddress.IPv4Interface(a).ip in net]
    found += ["nameserver %s in %s" % (ip, RESOLV_CONF) for ip in nameservers
              if ipaddress.IPv4Address(ip) in net]
    return found


def refuse_conflicts(cfg, alloc):
    """Raise a ConfigError naming what of this node the overlay CIDR would take over: we never
    replace a route we did not create, nor capture a LAN address or the nameserver."""
    cidr = alloc["overlay_cidr"]
    found = overlay_conflicts(cidr, own_devices(cfg), probe_routes(), probe_links(),
                              read_nameservers())
    if found:
        raise ConfigError(
            "the overlay CIDR %s overlaps %s of this runner, which the overlay does not own and "
            "would take its traffic: set OVERLAY_SUBNET on the Host to a range clear of it, then "
            "restart the Host and its runners" % (cidr, ", ".join(found[:3]) + (
                " and %d more" % (len(found) - 3) if len(found) > 3 else "")))


def ensure_ipv6_off(devices):
    """IPv6 off on every overlay device that exists (disable_ipv6=1): a container's router
    advertisement through the bridge configures nothing here, and nothing of ours speaks IPv6
    into vxlan0. One sysctl process for all; slashed names, since a device name may hold dots."""
    names = ["net/ipv6/conf/%s/disable_ipv6" % d for d in devices]
    on = [n for n in names if read_sysctl(n) not in ("1", None)]     # None: no device, no IPv6
    if not on:
        return []
    run(["sysctl", "-w"] + ["%s=1" % n for n in on])
    return ["IPv6 off on %s" % ", ".join(n.split("/")[3] for n in on)]


def ensure_ip_forward():
    if read_sysctl("net.ipv4.ip_forward") == "1":
        return []
    run(["sysctl", "-w", "net.ipv4.ip_forward=1"])
    return ["net.ipv4.ip_forward set to 1"]


def plan_address(dev, want, have, added, keep=lambda a: False):
    """`ip -batch` lines (and their change words) that leave `want` on dev and remove every
    other address of `have` that `keep` does not keep. `added` words the addition (a format
    of the address and the device), None when the device is new and its creation says it."""
    lines, changes = [], []
    for a in have:
        if a != want and not keep(a):
            lines.append("addr del %s dev %s" % (a, dev))
            changes.append("stale address %s removed from %s" % (a, dev))
    if want not in have:
        lines.append("addr add %s dev %s" % (want, dev))
        if added:
            changes.append(added % (want, dev))
    return lines, changes


def plan_links(cfg, alloc, address, links, route):
    """The `ip -batch` lines that bring vxlan0, the bridge and the route to the wanted state.

    Pure: returns (lines, changes, created) where created names the links this plan adds.
    """
    br, mtu = cfg["OVERLAY_BRIDGE_NAME"], alloc["mtu"]
    gw_addr = "%s/%d" % (alloc["gateway"], alloc["prefixlen"])
    cidr = ipaddress.IPv4Network(alloc["overlay_cidr"])
    lines, changes, created = [], [], []

    bridge = links.get(br)
    if bridge is not None and link_kind(bridge) != "bridge":
        raise ConfigError("%s exists and is a %s, not a bridge: remove it (ip link del %s) or set "
                          "OVERLAY_BRIDGE_NAME" % (br, link_kind(bridge) or "device", br, ))
    if bridge is None:
        lines.append("link add %s address %s mtu %d type bridge"
                     % (br, bridge_mac(alloc["runner_id"]), mtu))
        changes.append("bridge %s created" % br)
        created.append(br)
        addrs = []
    else:
        addrs = ipv4_addrs(bridge)
        if bridge.get("addr_assign_type") not in (None, ADDR_SET) and bridge.get("address"):
            # A bridge whose MAC was never set takes the lowest port MAC: a re-created vxlan0
            # would change the gateway's MAC under every container's ARP cache. Pin the
            # current one (same value, so nothing changes for the containers).
            lines.append("link set dev %s address %s" % (br, bridge["address"]))
            changes.append("%s MAC %s pinned" % (br, bridge["address"]))
        if bridge.get("mtu") != mtu:
            lines.append("link set dev %s mtu %d" % (br, mtu))
            changes.append("%s mtu %s -> %d" % (br, bridge.get("mtu"), mtu))
    # a stale gateway of an older allocation, inside the overlay, goes; others stay
    more = plan_address(br, gw_addr, addrs, "gateway %s added to %s",
                        keep=lambda a: ipaddress.IPv4Interface(a).ip not in cidr)
    lines, changes = lines + more[0], changes + more[1]

    local, remote = vxlan_endpoints(alloc, address)
    lines, changes = plan_wg_links(alloc, links, address, lines, changes)
    want = {"id": alloc["vni"], "local": local, "remote": remote, "port": alloc["vxlan_port"]}
    vx = links.get(VXLAN_DEV)
    if vx is not None and link_kind(vx) != "vxlan":
        raise ConfigError("%s exists and is a %s, not a VXLAN device: remove it (ip link del %s)"
                          % (VXLAN_DEV, link_kind(vx) or "device", VXLAN_DEV))
    diff = vxlan_mismatch(vx, want) if vx is not None else []
    if diff:                      # VNI, addresses, port and learning cannot be changed in place
        lines.append("link del %s" % VXLAN_DEV)
        vx = None
    if vx is None:
        lines.append("link add %s mtu %d type vxlan id %d local %s remote %s dstport %d "
                     "nolearning" % (VXLAN_DEV, mtu, want["id"], want["local"], want["remote"],
                                     want["port"]))
        changes.append("%s recreated (%s)" % (VXLAN_DEV, ", ".join(diff)) if diff else
                       "%s created (vni %d, remote %s)" % (VXLAN_DEV, want["id"], want["remote"]))
        created.append(VXLAN_DEV)
        lines.append("link set dev %s master %s up" % (VXLAN_DEV, br))
    else:
        attrs, words = [], []
        if vx.get("mtu") != mtu:
            attrs.append("mtu %d" % mtu)
            words.append("mtu %s -> %d" % (vx.get("mtu"), mtu))
        if vx.get("master") != br:
            attrs.append("master %s" % br)
            words.append("attached to %s" % br)
        if not link_up(vx):
            attrs.append("up")
            words.append("set up")
        if attrs:
            lines.append("link set dev %s %s" % (VXLAN_DEV, " ".join(attrs)))
            changes.append("%s %s" % (VXLAN_DEV, ", ".join(words)))
    if bridge is None or not link_up(bridge):
        lines.append("link set dev %s up" % br)
        if bridge is not None:
            changes.append("%s set up" % br)

    if not route or route.get("gateway") != alloc["host_vxlan_ip"] or route.get("dev") != br:
        lines.append("route replace %s via %s dev %s" % (cidr, alloc["host_vxlan_ip"], br))
        changes.append("route %s via %s %s" % (cidr, alloc["host_vxlan_ip"],
                                               "fixed" if route else "added"))
    return lines, changes, created


def plan_wg_links(alloc, links, address, lines, changes):
    """Adds to (lines, changes) the `ip -batch` lines for kohaku-wg: MTU underlay - 60, its
    tunnel address, up; its removal when encryption is off. Pure; refuses an OVERLAY_MTU that
    does not fit VXLAN over WireGuard before anything is made."""
    link = links.get(WG_DEV)
    if not encrypted(alloc):
        if link is not None and link_kind(link) in ("wireguard", "tun"):
            lines.append("link del %s" % WG_DEV)
            changes.append("%s removed (encryption off)" % WG_DEV)
        return lines, changes
    dev, under = underlay_of(links, address)
    if under is None:               # address not found here: at least what VXLAN needs
        dev, under = "the underlay", alloc["mtu"] + VXLAN_OVERHEAD + WG_OVERHEAD
    error = wg_mtu_error(alloc["mtu"], under, dev)
    if error:
        raise ConfigError(error)
    mtu = under - WG_OVERHEAD
    link = link or {}               # made just before this batch: no MTU, address or UP yet
    if link.get("mtu") != mtu:
        lines.append("link set dev %s mtu %d" % (WG_DEV, mtu))
        changes.append("%s mtu %d (%s %d - %d)" % (WG_DEV, mtu, dev, under, WG_OVERHEAD))
    want = "%s/%d" % (alloc["wg_ip"], ipaddress.IPv4Network(alloc["wg_subnet"]).prefixlen)
    more = plan_address(WG_DEV, want, ipv4_addrs(link), "tunnel address %s added to %s")
    lines, changes = lines + more[0], changes + more[1]
    if not link_up(link):
        lines.append("link set dev %s up" % WG_DEV)
    return lines, changes


def wg_peer(wg_ip, physical_ip, port):
    """One kohaku-wg peer of a runner: its tunnel address, its underlay endpoint, keepalive."""
    return {"allowed_ips": ["%s/32" % wg_ip], "endpoint": "%s:%d" % (physical_ip, port),
            "keepalive": WG_KEEPALIVE}


def wg_want(alloc, public_key, mesh=()):
    """What kohaku-wg holds on a runner: its key and port, the Host as peer (keepalive: NAT)
    and, with direct routing, every direct peer of the table (mesh_peers): a full mesh."""
    peers = {p["wg_public_key"]: wg_peer(p["wg_ip"], p["physical_ip"], alloc["wg_port"])
             for p in mesh}
    peers[alloc["host_wg_public_key"]] = wg_peer(alloc["host_wg_ip"], alloc["host_physical_ip"],
                                                 alloc["wg_port"])
    return {"public_key": public_key, "listen_port": alloc["wg_port"], "peers": peers}


def plan_wg(want, have, key_file):
    """(argv of one `wg set`, or None when kohaku-wg already matches; changes). Pure.

    The private key is passed as its file name, so it is in no argv, log line or --dry-run.
    A peer without a wanted endpoint keeps the one WireGuard learnt (NAT, roaming).
    """
    args, changes = [], []
    if want["public_key"] is None or have.get("public_key") != want["public_key"]:
        args += ["private-key", key_file]
        changes.append("%s key pair %s" % (WG_DEV, want["public_key"] or "(new)"))
    if have.get("listen_port") != want["listen_port"]:
        args += ["listen-port", str(want["listen_port"])]
        changes.append("%s listens on UDP %d" % (WG_DEV, want["listen_port"]))
    peers = have.get("peers") or {}
    for key in sorted(want["peers"]):
        w, h = want["peers"][key], peers.get(key)
        if h is not None and h["allowed_ips"] == sorted(w["allowed_ips"]) and \
                h["keepalive"] == w["keepalive"] and w["endpoint"] in (None, h["endpoint"]):
            continue
        args += ["peer", key, "allowed-ips", ",".join(w["allowed_ips"])]
        if w["endpoint"]:
            args += ["endpoint", w["endpoint"]]
        args += ["persistent-keepalive", str(w["keepalive"] or "off")]
        changes.append("%s peer %s %s (%s)" % (WG_DEV, key, "fixed" if h else "added",
                                               ", ".join(w["allowed_ips"])))
    for key in sorted(set(peers) - set(want["peers"])):
        args += ["peer", key, "remove"]
        changes.append("%s stale peer %s removed" % (WG_DEV, key))
    return (["wg", "set", WG_DEV] + args if args else None), changes


def create_wg_link(stack):
    """kohaku-wg: `ip link add ... type wireguard` where the kernel has it, else wireguard-go
    (as wg-quick does); one log line says which."""
    impl = probe_wg_impl()
    if impl == "kernel":
        try:
            run(["ip", "link", "add", WG_DEV, "type", "wireguard"])
        except CommandError as e:       # the module may be missing after all: as wg-quick
            log.info("ip link add %s type wireguard failed (%s): trying wireguard-go", WG_DEV,
                     first_line(e.stderr))
            impl = "wireguard-go"
    if impl == "wireguard-go":
        run(["wireguard-go", WG_DEV])
    undo(stack, "delete %s" % WG_DEV, ["ip", "link", "del", WG_DEV])
    log.info("%s: %s", WG_DEV, "kernel WireGuard" if impl == "kernel" else
             "userspace wireguard-go (this kernel has no WireGuard module)")
    return impl


def ensure_wg(cfg, alloc, links, stack, mesh=()):
    """Encryption on: the key pair, kohaku-wg, and its key, port and peers (the Host, and the
    direct peers in mesh) in one `wg set`."""
    public = ensure_wg_key(cfg)
    link = links.get(WG_DEV)
    if link is not None and link_kind(link) not in ("wireguard", "tun"):
        raise ConfigError("%s exists and is a %s, not a WireGuard interface: remove it (ip link "
                          "del %s)" % (WG_DEV, link_kind(link) or "device", WG_DEV))
    changes = []
    if link is None:
        changes.append("%s created (%s)" % (WG_DEV, create_wg_link(stack)))
        have = {}
    else:
        have = probe_wg()
    argv, more = plan_wg(wg_want(alloc, public, mesh), have, wg_key_paths(cfg)[0])
    if argv:
        run(argv)
    return changes + more


def wg_guard_rule(alloc, vxlan_id):
    """Encryption on: VXLAN of our VNI range is dropped unless it came out of kohaku-wg, so a
    frame sent on the underlay with a forged source never reaches vxlan0. Written as
    `iptables -S` prints it (u32 in hex), so that a probe compares equal."""
    cidr = ipaddress.IPv4Network(alloc["overlay_cidr"])
    hi = vxlan_id + (1 << (alloc["prefixlen"] - cidr.prefixlen)) - 1
    u32 = "0x0>>0x16&0x3c@0xc>>0x8=0x%x:0x%x" % (vxlan_id, hi)
    return ('-A INPUT ! -i %s -p udp -m udp --dport %d -m u32 --u32 "%s" -m comment --comment %s '
            '-j DROP' % (WG_DEV, alloc["vxlan_port"], u32, MARKER))


def plan_wg_guard(want, rules):
    """(iptables-restore lines, changes): the guard once, first when added; none when off."""
    marked = [r for r in rules if is_marked(r) and WG_DEV in r]
    if marked == ([want] if want else []):
        return [], []
    lines = [delete_rule(r) for r in marked if r != want]
    if want is not None and want not in marked:
        lines.append("-I INPUT 1" + want[len("-A INPUT"):])
    return lines, ["VXLAN accepted only through %s" % WG_DEV if want else
                   "the %s-only VXLAN rule removed (encryption off)" % WG_DEV]


def ensure_wg_guard(cfg, alloc, stack):
    want = wg_guard_rule(alloc, cfg["OVERLAY_VXLAN_ID"]) if encrypted(alloc) else None
    if want is None and not os.path.exists(wg_key_paths(cfg)[0]):
        return []                   # never encrypted on this runner: nothing to look for
    lines, changes = plan_wg_guard(want, probe_rules("filter", "INPUT"))
    if lines:
        run(["iptables-restore", "--noflush"], input=restore_text(lines, []),
            echo=restore_echo(lines, []))
        if want is not None:
            undo(stack, "delete the %s-only VXLAN rule" % WG_DEV,
                 ["iptables-restore", "--noflush"], input=restore_text([delete_rule(want)], []),
                 echo=["iptables-restore --noflush  # undo"])
    return changes


def ensure_links(cfg, alloc, address, stack, direct=None):
    """direct: build()'s (None: direct routing off)."""
    links = probe_links()
    bridge = links.get(cfg["OVERLAY_BRIDGE_NAME"])
    if bridge is not None:
        bridge["addr_assign_type"] = read_addr_assign_type(cfg["OVERLAY_BRIDGE_NAME"])
    route = probe_route(alloc["overlay_cidr"])
    lines, changes, created = plan_links(cfg, alloc, address, links, route)
    more = plan_direct_link(cfg, alloc, address, links, direct is not None)
    lines, changes, created = lines + more[0], changes + more[1], created + more[2]
    if encrypted(alloc):            # planned (and the MTU checked) first, then made
        mesh = direct["peers"] if direct is not None else ()
        changes = ensure_wg(cfg, alloc, links, stack, mesh) + changes
    if not lines:
        return changes
    for name in created:
        undo(stack, "delete %s" % name, ["ip", "link", "del", name])
    ip_batch(lines)
    return changes


def ip_batch(lines):
    """All ip work of a pass in one process; a failure names the line that failed."""
    tool_batch("ip", lines)


def tool_batch(tool, lines):
    """`ip -batch -` or `bridge -batch -`: many changes in one process, echoed line by line."""
    try:
        run([tool, "-batch", "-"], input="\n".join(lines) + "\n",
            echo=[tool + " " + line for line in lines])
    except CommandError as e:
        m = re.search(r"Command failed -:(\d+)", e.stderr or "")
        if not m or not 0 < int(m.group(1)) <= len(lines):
            raise
        raise CommandError("`%s %s` failed: %s" % (tool, lines[int(m.group(1)) - 1],
                                                   first_line(e.stderr)), e.argv, e.rc, e.stderr)


def plan_rules(wanted, have):
    """iptables-restore input that brings every RuleSet of wanted to its place.

    have: {table: {chain: [rules]}} as probed (a chain missing there does not exist). Pure:
    returns (restore_text, echo_lines, changes, undo_text). Stale or misplaced marked rules are
    deleted in the same transaction (no window without them); the undo removes only what this
    plan adds.
    """
    lines, undo_lines, changes = {"filter": [], "nat": []}, {"filter": [], "nat": []}, []
    for ws in wanted:
        cur = have.get(ws.table, {}).get(ws.chain)
        if cur is not None and ws.others:
            cur = [r for r in cur if ws.others not in r]
        marked = [r for r in cur or [] if is_marked(r)]
        out, undo_first = lines[ws.table], []
        if ws.kind == "chain":
            if cur == ws.rules:
                continue
            out.append(("-F " if cur is not None else "-N ") + ws.chain)
            out += ws.rules
            if cur is None:
                undo_first = ["-F " + ws.chain, "-X " + ws.chain]
            word = "fixed" if cur is not None else "added"
        elif ws.kind == "head":
            if (cur or [])[:len(ws.rules)] == ws.rules and len(marked) == len(ws.rules):
                continue
            out += [delete_rule(r) for r in marked]
            out += ["-I %s %d%s" % (ws.chain, i + 1, r[len("-A " + ws.chain):])
                    for i, r in enumerate(ws.rules)]
            if not marked:
                undo_first = [delete_rule(r) for r in ws.rules]
            word = "moved to the top" if marked else "added"
        else:
            if marked == ws.rules:
                continue
            out += [delete_rule(r) for r in marked if r not in ws.rules]
            added = [r for r in ws.rules if r not in marked]
            out += added
            undo_first = [delete_rule(r) for r in added]
            word = "fixed" if marked else "added"
        undo_lines[ws.table][:0] = undo_first      # undone in reverse: jumps before chains
        changes.append("%s %s" % (ws.what, word))
    return (restore_text(lines["filter"], lines["nat"]),
            restore_echo(lines["filter"], lines["nat"]), changes,
            restore_text(undo_lines["filter"], undo_lines["nat"]))


def restore_text(filt, nat):
    text = ""
    if filt:
        text += "*filter\n" + "".join(r + "\n" for r in filt) + "COMMIT\n"
    if nat:
        text += "*nat\n" + "".join(r + "\n" for r in nat) + "COMMIT\n"
    return text


def restore_echo(filt, nat):
    """The `[#]` lines of an iptables-restore batch: one iptables command per rule line."""
    return ["iptables -t filter " + r for r in filt] + ["iptables -t nat " + r for r in nat]


def ensure_rules(cfg, alloc, stack, extra_forward=(), extra_accepts=()):
    have = {"filter": probe_chains("filter"),
            "nat": {"POSTROUTING": probe_rules("nat", "POSTROUTING")}}
    text, echo, changes, undo_text = plan_rules(
        wanted_rules(cfg, alloc, extra_forward, extra_accepts), have)
    if not text:
        return []
    run(["iptables-restore", "--noflush"], input=text, echo=echo)    # atomic: all or nothing
    if undo_text:
        undo(stack, "delete the rules added for %s" % alloc["overlay_cidr"],
             ["iptables-restore", "--noflush"], input=undo_text,
             echo=["iptables-restore --noflush  # undo"])
    return changes


def untrust_argv(iface):
    """The firewall-cmd argv that takes iface out of the trusted zone (runtime)."""
    return ["firewall-cmd", "--zone=" + TRUSTED_ZONE, "--remove-interface=" + iface]


def ensure_firewalld(ifaces, stack):
    if not firewalld_running():
        return []
    have = trusted_interfaces()
    changes = []
    for iface in ifaces:
        if iface in have:
            continue
        run(["firewall-cmd", "--zone=" + TRUSTED_ZONE, "--change-interface=" + iface],
            timeout=15)
        undo(stack, "take %s out of the trusted zone" % iface, untrust_argv(iface))
        changes.append("%s added to the firewalld trusted zone" % iface)
    return changes


def network_create_argv(name, subnet, gateway, extra=()):
    """`docker network create` of a bridge network; extra: options before the name."""
    return ["docker", "network", "create", "--driver", "bridge", "--subnet", subnet,
            "--gateway", gateway] + list(extra) + [name]


def docker_create_argv(cfg, alloc):
    return network_create_argv(
        cfg["OVERLAY_NETWORK_NAME"], alloc["subnet"], alloc["gateway"],
        ["--aux-address", "host=" + alloc["host_vxlan_ip"],
         "-o", "com.docker.network.bridge.name=" + cfg["OVERLAY_BRIDGE_NAME"],
         "-o", "com.docker.network.driver.mtu=%d" % alloc["mtu"]])


def docker_want(cfg, alloc):
    return {"subnet": alloc["subnet"], "gateway": alloc["gateway"],
            "host_vxlan_ip": alloc["host_vxlan_ip"], "bridge": cfg["OVERLAY_BRIDGE_NAME"],
            "mtu": alloc["mtu"]}


def attached_error(name, containers, why):
    return ContainersAttached(
        "the Docker network %s %s but containers are still attached (%s): remove them "
        "(docker rm -f %s) or run `kohaku_overlay_runner.py down --force`" % (
            name, why, ", ".join(containers), " ".join(containers)), containers)


def check_docker_network(cfg, alloc):
    """Probe the overlay network first: (net or None, diff). Refuses to plan a removal of a
    network that has containers."""
    name = cfg["OVERLAY_NETWORK_NAME"]
    net = docker_inspect(name)
    if net is None:
        return None, []
    diff = docker_network_mismatch(net, docker_want(cfg, alloc))
    if diff and container_names(net):
        raise attached_error(name, container_names(net), "must be recreated (%s)"
                             % ", ".join(diff))
    return net, diff


def remove_mismatched_network(cfg, diff):
    name = cfg["OVERLAY_NETWORK_NAME"]
    run(["docker", "network", "rm", name])
    return ["Docker network %s removed (%s)" % (name, ", ".join(diff))]


def create_docker_network(cfg, alloc, stack):
    name = cfg["OVERLAY_NETWORK_NAME"]
    run(docker_create_argv(cfg, alloc))
    undo(stack, "remove the Docker network %s" % name, ["docker", "network", "rm", name])
    return ["Docker network %s created on %s" % (name, cfg["OVERLAY_BRIDGE_NAME"])]


def ensure_default_network(cfg):
    name = cfg["DOCKER_NETWORK_NAME"]
    if docker_inspect(name) is not None:
        return False
    run(network_create_argv(name, cfg["DOCKER_NETWORK_SUBNET"], cfg["DOCKER_NETWORK_GATEWAY"]))
    return True


# ---- direct routing: the peer table, its plan, the path probes --------------------------------
#
# With OVERLAY_DIRECT_ROUTING on the Host, a runner also has vxdirect0 (VNI OVERLAY_VXLAN_ID, no
# remote: one FDB entry per peer) holding its subnet's network address (10.N.0.0/32), and reaches
# peer M's subnet by `10.M.0.0/16 via 10.M.0.0 dev vxdirect0 onlink` beside a permanent neighbour
# entry. A /32 route to 10.M.0.0 stays while M is relayed, so the probe (an ICMP echo to
# 10.M.0.0) always tests the direct path; taking away only the /16 hands M's traffic to the
# overlay route via the Host. The peer table is data: a plain dict per peer as the Host served it,
# so keys added by other capabilities (WireGuard's) pass through.

PEER_KEYS = ("runner_name", "runner_id", "subnet", "physical_ip", "vtep_mac")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
NO_PEERS = {"version": 0, "peers": []}
ATF_PERM = 0x4                      # /proc/net/arp: a permanent neighbour entry
RTF_GATEWAY = 0x2                   # /proc/net/route: the route has a gateway


def parse_settings(obj):
    """What the Host decides for every runner, from a registration or heartbeat answer (or the
    state file that keeps them): absent keys mean off."""
    direct = isinstance(obj, dict) and obj.get("direct_routing") is True
    version = obj.get("peers_version") if direct else 0
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        version = 0
    return {"direct_routing": direct, "peers_version": version}


def bridge_mac(runner_id):
    """The overlay bridge's MAC (the containers' gateway), fixed by the runner id, so that no
    port coming or going changes it (locally administered; 6b:62 is "kb")."""
    return "02:6b:62:%02x:%02x:%02x" % ((runner_id >> 16) & 0xff, (runner_id >> 8) & 0xff,
                                        runner_id & 0xff)


def vtep_mac(runner_id):
    """vxdirect0's MAC, fixed by the runner id (locally administered; 6b:64 is "kd", apart
    from the Host's 6b:6f tunnel MACs)."""
    return "02:6b:64:%02x:%02x:%02x" % ((runner_id >> 16) & 0xff, (runner_id >> 8) & 0xff,
                                        runner_id & 0xff)


def net_address(subnet):
    """A runner's address on vxdirect0: its subnet's network address (10.N.0.0)."""
    return str(ipaddress.IPv4Network(subnet).network_address)


def parse_peers(obj, own_name):
    """`GET /api/overlay/peers` -> {"version", "peers"} without this runner, sorted by id.

    A malformed table is refused whole (the caller keeps its last good one).
    """
    def bad(why):
        return OverlayError("the host's peer table is malformed (%s): update the host script"
                            % why)
    if not isinstance(obj, dict) or not isinstance(obj.get("peers"), list):
        raise bad("no list of peers")
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise bad("version %s" % shown(version))
    peers = []
    for p in obj["peers"]:
        if not isinstance(p, dict) or any(k not in p for k in PEER_KEYS):
            raise bad("a peer lacks one of %s" % ", ".join(PEER_KEYS))
        rid = p["runner_id"]
        if isinstance(rid, bool) or not isinstance(rid, int) or rid < 1:
            raise bad("runner_id %s" % shown(rid))
        if not isinstance(p["runner_name"], str) or not NAME_RE.match(p["runner_name"]):
            raise bad("runner_name %s" % shown(p["runner_name"]))
        if not isinstance(p["vtep_mac"], str) or not MAC_RE.match(p["vtep_mac"]):
            raise bad("vtep_mac %s" % shown(p["vtep_mac"]))
        try:
            ipaddress.IPv4Network(p["subnet"])
            ipaddress.IPv4Address(p["physical_ip"])
        except (ValueError, TypeError) as e:
            raise bad(str(e))
        if p["runner_name"] != own_name:
            peers.append(dict(p))
    peers.sort(key=lambda p: p["runner_id"])
    return {"version": version, "peers": peers}


def mesh_peers(peers, encrypted):
    """The peers reached directly: all of the table, or with encryption those whose key and
    tunnel address it carries (a peer without a key yet goes through the Host)."""
    if not encrypted:
        return list(peers)
    out = []
    for p in peers:
        try:
            if WG_KEY_RE.match(str(p.get("wg_public_key"))) and \
                    ipaddress.IPv4Address(p.get("wg_ip")):
                out.append(p)
        except (ValueError, TypeError):
            continue
    return out


def direct_arg(alloc, peers, paths):
    """build()'s direct argument for a peer table and the paths tracked: the mesh_peers, the
    relayed names, and "encrypted": True with encryption."""
    direct = {"peers": mesh_peers(peers, encrypted(alloc)),
              "relayed": {n for n, p in paths.items() if p["path"] == "relayed"}}
    if encrypted(alloc):
        direct["encrypted"] = True
    return direct


def peer_vtep(peer, encrypted):
    """Where vxdirect0 sends a peer's frames: its tunnel address when encrypted, else its
    physical one."""
    return peer["wg_ip"] if encrypted else peer["physical_ip"]


def peers_wanted(peers, relayed=(), encrypted=False):
    """What vxdirect0 must hold for this table: {"routes": {dst: gateway or None}, "neigh":
    {ip: mac}, "fdb": {mac: peer_vtep}}. A relayed peer keeps all but its subnet route."""
    wanted = {"routes": {}, "neigh": {}, "fdb": {}}
    for p in peers:
        addr = net_address(p["subnet"])
        wanted["routes"][addr + "/32"] = None
        if p["runner_name"] not in relayed:
            wanted["routes"][str(ipaddress.IPv4Network(p["subnet"]))] = addr
        wanted["neigh"][addr] = p["vtep_mac"]
        wanted["fdb"][p["vtep_mac"]] = peer_vtep(p, encrypted)
    return wanted


def proc_hex_ip(text):
    return str(ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(text), "little")))


def proc_rows(text, dev, column, width):
    """The fields of each row of a /proc/net table (header skipped) whose column is dev."""
    for line in (text or "").splitlines()[1:]:
        f = line.split()
        if len(f) >= width and f[column] == dev:
            yield f


def parse_proc_routes(text, dev):
    """/proc/net/route (the main table) -> {dst/prefix: gateway or None} of dev's routes."""
    routes = {}
    for f in proc_rows(text, dev, 0, 8):
        try:
            mask = bin(int(f[7], 16)).count("1")
            gateway = proc_hex_ip(f[2]) if int(f[3], 16) & RTF_GATEWAY else None
            routes["%s/%d" % (proc_hex_ip(f[1]), mask)] = gateway
        except ValueError:
            continue
    return routes


def parse_proc_arp(text, dev):
    """/proc/net/arp -> {ip: mac} of dev's neighbours (mac None when not permanent)."""
    neigh = {}
    for f in proc_rows(text, dev, 5, 6):
        try:
            neigh[f[0]] = f[3].lower() if int(f[2], 16) & ATF_PERM else None
        except ValueError:
            continue
    return neigh


def parse_fdb(text):
    """`bridge -j fdb show dev vxdirect0` -> {mac: dst} of the entries that have a remote."""
    return {e["mac"].lower(): e["dst"] for e in parse_json(text, "bridge -j fdb show")
            if isinstance(e, dict) and e.get("mac") and e.get("dst")}


def plan_peers(wanted, have):
    """Pure: the actions that turn have into wanted, as (verb, table, key, value) tuples,
    deletions first (same layout as peers_wanted)."""
    actions = []
    for table in ("routes", "neigh", "fdb"):
        for key in sorted(have[table]):
            if key not in wanted[table]:
                actions.append(("del", table, key, have[table][key]))
    for table in ("neigh", "fdb", "routes"):
        for key in sorted(wanted[table]):
            if key not in have[table] or have[table][key] != wanted[table][key]:
                actions.append(("replace", table, key, wanted[table][key]))
    return actions


def render_peer_actions(actions, dev=DIRECT_DEV):
    """Pure: actions -> (ip batch lines, bridge batch lines)."""
    ip_lines, bridge_lines = [], []
    for verb, table, key, value in actions:
        if table == "routes":
            ip_lines.append("route del %s dev %s" % (key, dev) if verb == "del" else
                            "route replace %s dev %s scope link" % (key, dev) if value is None
                            else "route replace %s via %s dev %s onlink" % (key, value, dev))
        elif table == "neigh":
            ip_lines.append("neigh del %s dev %s" % (key, dev) if verb == "del" else
                            "neigh replace %s lladdr %s dev %s nud permanent" % (key, value, dev))
        else:
            bridge_lines.append("fdb del %s dev %s dst %s self" % (key, dev, value)
                                if verb == "del" else
                                "fdb replace %s dev %s dst %s self permanent" % (key, dev, value))
    return ip_lines, bridge_lines


def describe_peer_actions(actions):
    counts = {}
    for verb, table, _, _ in actions:
        counts[(verb, table)] = counts.get((verb, table), 0) + 1
    words = {"routes": "route(s)", "neigh": "neighbour(s)", "fdb": "FDB entr(ies)"}
    return ["%s: %d %s %s" % (DIRECT_DEV, n, words[table], "set" if verb == "replace" else
                              "removed") for (verb, table), n in sorted(counts.items())]


def plan_direct_link(cfg, alloc, address, links, want):
    """The `ip -batch` lines that bring vxdirect0 to the wanted state (want False: gone).

    Pure: returns (lines, changes, created) like plan_links.
    """
    dev = links.get(DIRECT_DEV)
    if dev is not None and link_kind(dev) != "vxlan":
        raise ConfigError("%s exists and is a %s, not a VXLAN device: remove it (ip link del %s)"
                          % (DIRECT_DEV, link_kind(dev) or "device", DIRECT_DEV))
    if not want:
        if dev is None:
            return [], [], []
        return ["link del %s" % DIRECT_DEV], ["%s removed (direct routing off)" % DIRECT_DEV], []
    mtu, mac = alloc["mtu"], vtep_mac(alloc["runner_id"])
    addr = net_address(alloc["subnet"]) + "/32"
    local = vxlan_endpoints(alloc, address)[0]      # the tunnel address when encrypted
    spec = {"id": cfg["OVERLAY_VXLAN_ID"], "local": local, "remote": None,
            "port": alloc["vxlan_port"]}
    diff = vxlan_mismatch(dev, spec) if dev is not None else []
    if dev is not None and (dev.get("address") or "").lower() != mac:
        diff.append("mac %s (want %s)" % (dev.get("address"), mac))
    lines, changes, created = [], [], []
    if diff:
        lines.append("link del %s" % DIRECT_DEV)
        dev = None
    if dev is None:
        lines.append("link add %s address %s mtu %d type vxlan id %d local %s dstport %d "
                     "nolearning" % (DIRECT_DEV, mac, mtu, spec["id"], local, spec["port"]))
        changes.append("%s recreated (%s)" % (DIRECT_DEV, ", ".join(diff)) if diff else
                       "%s created (vni %d)" % (DIRECT_DEV, spec["id"]))
        created.append(DIRECT_DEV)
        addrs = []
    else:
        addrs = ipv4_addrs(dev)
        if dev.get("mtu") != mtu:
            lines.append("link set dev %s mtu %d" % (DIRECT_DEV, mtu))
            changes.append("%s mtu %s -> %d" % (DIRECT_DEV, dev.get("mtu"), mtu))
    more = plan_address(DIRECT_DEV, addr, addrs,
                        "address %s added to %s" if dev is not None else None)
    lines, changes = lines + more[0], changes + more[1]
    if dev is None or not link_up(dev):
        lines.append("link set dev %s up" % DIRECT_DEV)
        if dev is not None:
            changes.append("%s set up" % DIRECT_DEV)
    return lines, changes, created


def direct_forward_rules(cidr, bridge):
    """The FORWARD pair direct routing adds after the bridge's own accept rule."""
    return [forward_accept(cidr, i, o) for i, o in ((bridge, DIRECT_DEV), (DIRECT_DEV, bridge))]


def direct_vxlan_accepts(peers, vxlan_id, encrypted=False):
    """(source IP, VNI) pairs the VXLAN filter accepts for direct routing: each peer (from its
    tunnel address when encrypted), on the node-0 VNI that vxdirect0 uses."""
    return [(peer_vtep(p, encrypted), vxlan_id) for p in peers]


def read_proc_net(name):
    """/proc/net/NAME of this process's network namespace ("" when unreadable)."""
    try:
        with open("/proc/net/" + name) as f:
            return f.read()
    except OSError:
        return ""


def probe_fdb():
    """vxdirect0's FDB, or None when the device does not exist."""
    res = run(["bridge", "-j", "fdb", "show", "dev", DIRECT_DEV], check=False, mutates=False)
    if res.rc != 0:
        if "does not exist" in res.err or "Cannot find device" in res.err:
            return None
        raise CommandError("`bridge fdb show dev %s` failed: %s" % (DIRECT_DEV,
                                                                    first_line(res.err)),
                           ["bridge", "fdb", "show"], res.rc, res.err)
    return parse_fdb(res.out)


def ensure_peers(direct):
    """vxdirect0's routes, neighbours and FDB to the table: routes and neighbours are read from
    /proc, so a pass costs one probe and at most one bridge and one ip batch."""
    fdb = probe_fdb()
    if fdb is None and not DRY_RUN:
        raise OverlayError("%s does not exist, so the direct routes cannot be set: the next "
                           "repair rebuilds it" % DIRECT_DEV)
    have = {"routes": parse_proc_routes(read_proc_net("route"), DIRECT_DEV),
            "neigh": parse_proc_arp(read_proc_net("arp"), DIRECT_DEV), "fdb": fdb or {}}
    actions = plan_peers(peers_wanted(direct["peers"], direct.get("relayed", ()),
                                      direct.get("encrypted", False)), have)
    ip_lines, bridge_lines = render_peer_actions(actions)
    if bridge_lines:
        tool_batch("bridge", bridge_lines)
    if ip_lines:
        ip_batch(ip_lines)
    return describe_peer_actions(actions)


def ensure_no_redirects(bridge):
    """Containers must not cache an ICMP redirect to the Host (their traffic to other runners
    enters and leaves the bridge), or they would not follow a path change (direct routing
    switched on, a peer falling back or healing) for minutes: send_redirects 0 on `all` and the
    bridge, in hub mode too, since a redirect cached then outlives the switch."""
    names = ["net/ipv4/conf/%s/send_redirects" % d for d in ("all", bridge)]   # slashed: dots
    on = [n for n in names if read_sysctl(n) not in ("0", None)]
    if not on:
        return []
    run(["sysctl", "-w"] + ["%s=0" % n for n in on])
    return ["ICMP redirects off on %s" % ", ".join(n.split("/")[3] for n in on)]


def icmp_checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xffff)
    total += total >> 16
    return ~total & 0xffff


def echo_request(ident, seq):
    body = b"kohaku-overlay direct probe"
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, icmp_checksum(head + body), ident, seq) + body


def parse_echo_reply(packet, ident, seq):
    """A raw IPv4 packet -> the source address when it is our echo reply, else None."""
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0f) * 4
    if len(packet) < ihl + 8:
        return None
    kind, code, _, rid, rseq = struct.unpack("!BBHHH", packet[ihl:ihl + 8])
    if kind != 0 or code != 0 or rid != ident or rseq != seq:
        return None
    return socket.inet_ntoa(packet[12:16])


def probe_paths(targets, wait=PROBE_WAIT, sock=None, seq=None):
    """One probe round of the direct paths: an ICMP echo to every target from this process (a raw
    socket, CAP_NET_RAW; no process per peer) -> the set of targets that answered within wait."""
    targets = set(targets)
    if not targets:
        return set()
    own = sock is None
    if own:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        except OSError as e:
            raise OverlayError("cannot open a raw ICMP socket to probe the direct paths (%s): "
                               "run the runner as root or with CAP_NET_RAW" % describe_oserror(e))
    ident = os.getpid() & 0xffff
    seq = random.randint(0, 0xffff) if seq is None else seq
    answered = set()
    try:
        packet = echo_request(ident, seq)
        for t in sorted(targets):
            try:
                sock.sendto(packet, (t, 0))
            except OSError:
                pass                      # no route or no buffer: that path did not answer
        deadline = time.monotonic() + wait
        while answered != targets:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                break
            src = parse_echo_reply(sock.recv(2048), ident, seq)
            if src in targets:
                answered.add(src)
    finally:
        if own:
            sock.close()
    return answered


def track_paths(paths, names, answered, now, fall_after=FALL_AFTER, rise_after=RISE_AFTER):
    """Pure: the per-peer fallback state machine, one probe round.

    paths: {name: {"path": "direct"|"relayed", "since", "fails", "oks"}}; names: the peers in the
    table now (a new peer starts direct); answered: the names whose probe came back.
    Returns (new paths, [(name, old path, new path)]) for the peers that changed path.
    """
    new, changed = {}, []
    for name in names:
        old = paths.get(name) or {"path": "direct", "since": now, "fails": 0, "oks": 0}
        ok = name in answered
        p = {"path": old["path"], "since": old["since"],
             "fails": 0 if ok else old["fails"] + 1, "oks": old["oks"] + 1 if ok else 0}
        flip = (p["path"] == "direct" and p["fails"] >= fall_after) or \
            (p["path"] == "relayed" and p["oks"] >= rise_after)
        if flip:
            p["path"] = "relayed" if p["path"] == "direct" else "direct"
            p["since"] = now
            changed.append((name, old["path"], p["path"]))
        new[name] = p
    return new, changed


def saved_direct(state):
    """The peer table and paths kept in the state file: (table, paths)."""
    peers = state.get("peers")
    try:
        table = parse_peers(peers, state.get("runner_name"))
    except OverlayError:
        table = dict(NO_PEERS)
    paths = {}
    for name, p in (state.get("paths") or {}).items():
        if isinstance(p, dict) and p.get("path") in ("direct", "relayed"):
            paths[name] = {"path": p["path"], "since": p.get("since") or 0.0, "fails": 0,
                           "oks": 0}
    return table, paths


# ---- the domain: runner build and teardown ----------------------------------------------------


def build(cfg, alloc, address, errors=None, direct=None):
    """Bring the runner end to the allocation: probe, compare, act. Returns the changes made.

    Without errors (up): a failing step raises, and everything this call created is undone.
    With an errors list (serve's repairs): every step runs, what got fixed stays, failures are
    appended to errors. Either way a Docker network with containers is never removed.
    direct: None (direct routing off: vxdirect0 and its rules go) or {"peers": [...] (the
    mesh_peers), "relayed": names of the peers reached through the Host, and "encrypted": True with
    encryption}.
    """
    br = cfg["OVERLAY_BRIDGE_NAME"]
    refuse_conflicts(cfg, alloc)            # before anything changes, in up and in repairs
    try:
        net, diff = check_docker_network(cfg, alloc)
    except CommandError as e:
        if errors is None:
            raise
        errors.append(e)                    # Docker unreachable: repair the rest meanwhile
        net, diff = None, None
    with contextlib.ExitStack() as stack:
        # Order: a mismatched network goes before the bridge changes under it; the network is
        # created before the rules because `docker network create` puts Docker's own FORWARD
        # jumps back on top, and ours must end up first.
        steps = [ensure_ip_forward,
                 lambda: ensure_links(cfg, alloc, address, stack, direct),
                 lambda: ensure_ipv6_off(own_devices(cfg))]
        steps.append(lambda: ensure_no_redirects(br))     # before any path can change
        if direct is not None:
            steps.append(lambda: ensure_peers(direct))
        if diff:
            steps.insert(0, lambda: remove_mismatched_network(cfg, diff))
        if diff or (net is None and diff is not None):
            steps.append(lambda: create_docker_network(cfg, alloc, stack))
        extra = direct_forward_rules(alloc["overlay_cidr"], br) if direct is not None else []
        accepts = direct_vxlan_accepts(direct["peers"], cfg["OVERLAY_VXLAN_ID"],
                                       encrypted(alloc)) if direct is not None else []
        zone = [br, VXLAN_DEV] + ([DIRECT_DEV] if direct is not None else []) + \
            ([WG_DEV] if encrypted(alloc) else [])
        steps += [lambda: ensure_rules(cfg, alloc, stack, extra, accepts),
                  lambda: ensure_wg_guard(cfg, alloc, stack),
                  lambda: ensure_firewalld(zone, stack)]
        changes = []
        for step in steps:
            try:
                changes += step()
            except OverlayError as e:
                if errors is None:
                    raise
                errors.append(e)
        stack.pop_all()
    return changes


def plan_teardown(cfg, links, route, filter_chains, nat_all):
    """What `down` removes, found by name and marker (not recomputed from config)."""
    br = cfg["OVERLAY_BRIDGE_NAME"]
    lines, changes = [], []
    if route is not None and route.get("dev") == br:
        lines.append("route del %s dev %s" % (route["dst"], br))
        changes.append("route %s removed" % route["dst"])
    for dev in (DIRECT_DEV, VXLAN_DEV):     # vxdirect0 takes its routes, neighbours, FDB along
        if link_kind(links.get(dev) or {}) == "vxlan":
            lines.append("link del %s" % dev)
            changes.append("%s removed" % dev)
    if link_kind(links.get(br) or {}) == "bridge":
        lines.append("link del %s" % br)
        changes.append("bridge %s removed" % br)
    if link_kind(links.get(WG_DEV) or {}) in ("wireguard", "tun"):
        lines.append("link del %s" % WG_DEV)        # wireguard-go exits with its interface
        changes.append("%s removed" % WG_DEV)
    filt = [delete_rule(r) for rules in filter_chains.values() for r in rules if is_marked(r)]
    nat = [delete_rule(r) for r in nat_all if is_marked(r)]
    chain = VXLAN_CHAIN in filter_chains
    if filt or nat or chain:
        changes.append("%d marked iptables rule(s)%s removed" % (
            len(filt) + len(nat), " and the chain " + VXLAN_CHAIN if chain else ""))
    if chain:                           # after the jumps to it are deleted
        filt += ["-F " + VXLAN_CHAIN, "-X " + VXLAN_CHAIN]
    return lines, restore_text(filt, nat), restore_echo(filt, nat), changes


def teardown(cfg, force=False):
    """`down`: Docker network, zone entries, rules (by marker), route, vxlan0, bridge."""
    changes = []
    name, br = cfg["OVERLAY_NETWORK_NAME"], cfg["OVERLAY_BRIDGE_NAME"]
    docker_error = None
    try:
        net = docker_inspect(name)
    except CommandError as e:          # remove the rest anyway, then say what is left
        net, docker_error = None, (None if e.rc == 127 else e)   # 127: no Docker, no network
    if net is not None:
        containers = container_names(net)
        if containers and not force:
            raise attached_error(name, containers, "is to be removed")
        for c in containers:
            run(["docker", "network", "disconnect", "-f", name, c])
            changes.append("container %s disconnected from %s" % (c, name))
        run(["docker", "network", "rm", name])
        changes.append("Docker network %s removed" % name)
    if firewalld_running():
        have = trusted_interfaces()
        for iface in (br, VXLAN_DEV, DIRECT_DEV, WG_DEV):
            if iface in have:
                run(untrust_argv(iface), timeout=15)
                changes.append("%s taken out of the trusted zone" % iface)
    state = load_state(cfg["OVERLAY_STATE_FILE"])
    route = probe_route(state["overlay_cidr"]) if state.get("overlay_cidr") else None
    lines, text, echo, more = plan_teardown(
        cfg, probe_links(), route, probe_chains("filter"),
        parse_rules(run(["iptables", "-t", "nat", "-S"], mutates=False).out))
    if text:
        run(["iptables-restore", "--noflush"], input=text, echo=echo)
    if lines:
        ip_batch(lines)
    if docker_error is not None:
        raise OverlayError("the rest is removed but not the Docker network %s, since %s; run "
                           "down again once dockerd runs" % (name, docker_error))
    return changes + more


# ---- the domain: metrics for node_exporter's textfile collector -------------------------------

# One family: name, type ("counter" or "gauge"), help text, samples [(labels, value)]; labels is
# a dict or (name, value) pairs.
Family = namedtuple("Family", "name type help samples")
METRIC_PREFIX = "kohaku_overlay_runner_"
REPAIR_KINDS = ("device", "rules", "zone", "network", "sysctl")
HEARTBEAT_RESULTS = ("ok", "unreachable", "not_registered", "error")
REGISTRATION_KINDS = ("first", "again")
LINK_STATS = (("bytes", "bytes", "bytes"), ("packets", "packets", "packets"),
              ("drops", "dropped", "packets dropped"), ("errors", "errors", "errors"))


def escape_label_value(value):
    """A label value in the text exposition format: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def sample_value(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render_metrics(families):
    """Families -> Prometheus text exposition format: HELP and TYPE once, then the samples."""
    lines = []
    for fam in families:
        lines.append("# HELP %s %s" % (fam.name, fam.help.replace("\\", "\\\\").replace(
            "\n", "\\n")))
        lines.append("# TYPE %s %s" % (fam.name, fam.type))
        for labels, value in fam.samples:
            pairs = sorted(labels.items()) if isinstance(labels, dict) else list(labels)
            text = ",".join('%s="%s"' % (k, escape_label_value(v)) for k, v in pairs)
            lines.append("%s%s %s" % (fam.name, "{%s}" % text if text else "", sample_value(value)))
    return "".join(line + "\n" for line in lines)


def parse_link_stats(text):
    """`ip -s -j link show` -> {ifname: {"rx": {...}, "tx": {...}}} (stats64, else stats)."""
    out = {}
    for link in parse_json(text, "ip -s -j link show"):
        stats = link.get("stats64") or link.get("stats") or {}
        if "ifname" in link and stats:
            out[link["ifname"]] = stats
    return out


def link_stat_families(prefix, what, stats, labels_of):
    """rx/tx bytes, packets, drops and errors counters of the links in stats, one family each.

    labels_of(ifname) -> the labels of that link's samples, or None to leave it out.
    """
    families = []
    for direction, word, verb in (("rx", "receive", "Received"), ("tx", "transmit", "Sent")):
        for suffix, key, noun in LINK_STATS:
            samples = []
            for ifname in sorted(stats):
                labels = labels_of(ifname)
                if labels is not None:
                    samples.append((labels, int((stats[ifname].get(direction) or {}).get(key, 0))))
            families.append(Family("%s%s_%s_total" % (prefix, word, suffix), "counter",
                                   "%s %s of %s (kernel counter)." % (verb, noun, what), samples))
    return families


def repair_kind(change):
    """The kind (REPAIR_KINDS) a repair's change line counts under, read from its words."""
    text = change.lower()
    if "firewalld" in text or "trusted zone" in text:
        return "zone"
    if text.startswith(("forward", "nat ", "iptables", "vxlan filter", "kohaku-vxlan")) or \
            " rule" in text:
        return "rules"
    if text.startswith("docker network"):
        return "network"
    if text.startswith(("net.", "sysctl")):
        return "sysctl"
    return "device"


class RunnerMetrics(object):
    """The counters and gauges of one `serve` (counters start at 0 with each process)."""

    def __init__(self, clock=None):
        self.clock = clock or (lambda: time.time())
        self.started = self.clock()
        self.counts = {}
        self.heartbeat_rtt = None
        self.last_heartbeat = None
        self.overlay_up = False
        self.warned = None

    def inc(self, family, label=None, by=1):
        key = (family, label)
        self.counts[key] = self.counts.get(key, 0) + by

    def count(self, family, label=None):
        return self.counts.get((family, label), 0)

    def heartbeat(self, result, rtt=None):
        self.inc("heartbeats", result)
        if result == "ok":
            self.heartbeat_rtt, self.last_heartbeat = rtt, self.clock()

    def families(self, cfg, alloc, stats, peers=None):
        """Everything the textfile holds. stats: parse_link_stats() of this node.

        peers: [(labels, state)] of the direct-routing peers (state 1 direct, 0 via the Host),
        or None where direct routing is off.
        """
        p, name = METRIC_PREFIX, cfg["RUNNER_NAME"]
        me = {"runner_name": name}
        info = dict(me, version=__version__, runner_id=alloc["runner_id"] if alloc else "",
                    subnet=alloc["subnet"] if alloc else "")
        fams = [Family(p + "info", "gauge", "Runner agent version and allocation (always 1).",
                       [(info, 1)]),
                Family(p + "start_time_seconds", "gauge",
                       "Unix time this serve started (its counters start at 0 then).",
                       [(me, self.started)]),
                Family(p + "overlay_up", "gauge",
                       "1 when the last build or repair of the overlay succeeded.",
                       [(me, self.overlay_up)]),
                Family(p + "heartbeats_total", "counter", "Heartbeats sent, by result.",
                       [(dict(me, result=r), self.count("heartbeats", r))
                        for r in HEARTBEAT_RESULTS]),
                Family(p + "registrations_total", "counter",
                       "Registrations with the Host (first: at start; again: after the Host "
                       "forgot this runner).",
                       [(dict(me, kind=k), self.count("registrations", k))
                        for k in REGISTRATION_KINDS]),
                Family(p + "repairs_total", "counter", "Drift repaired, by kind.",
                       [(dict(me, kind=k), self.count("repairs", k)) for k in REPAIR_KINDS]),
                Family(p + "repair_failures_total", "counter",
                       "Builds or repairs that left something broken.",
                       [(me, self.count("repair_failures"))])]
        if self.heartbeat_rtt is not None:
            fams += [Family(p + "heartbeat_round_trip_seconds", "gauge",
                            "Round-trip time of the last answered heartbeat.",
                            [(me, round(self.heartbeat_rtt, 6))]),
                     Family(p + "last_heartbeat_timestamp_seconds", "gauge",
                            "Unix time of the last heartbeat the Host answered.",
                            [(me, self.last_heartbeat)])]
        devices = (VXLAN_DEV, cfg["OVERLAY_BRIDGE_NAME"])
        fams += link_stat_families(p + "interface_", "the overlay's interfaces", stats,
                                   lambda i: dict(me, device=i) if i in devices else None)
        if peers is not None:
            fams.append(Family(p + "peer_direct", "gauge",
                               "Path to each direct-routing peer: 1 direct, 0 via the Host.",
                               [(dict(me, **labels), state) for labels, state in peers]))
        return fams

    def write(self, cfg, alloc, peers=None):
        """One `ip -s -j link show`, then the file rewritten atomically. Errors are warnings."""
        path = cfg["OVERLAY_METRICS_FILE"]
        if not path or DRY_RUN:
            return False
        try:
            stats = parse_link_stats(run(["ip", "-s", "-j", "link", "show"], mutates=False).out)
            write_file_atomic(path, render_metrics(self.families(cfg, alloc, stats, peers)),
                              mode=0o644, sync=False)
        except (OSError, OverlayError) as e:
            message = "cannot write the metrics file %s (%s): fix the folder or set " \
                      "OVERLAY_METRICS_FILE" % (path, e)
            if message != self.warned:
                log.warning("%s", message)
            self.warned = message
            return False
        self.warned = None
        return True


# ---- the interface: host API client, registration, heartbeat loop ----------------------------


def api_call(cfg, method, path, body=None, timeout=HTTP_TIMEOUT):
    """One request to the host's API -> (status, obj). Connection trouble -> HostUnreachable."""
    host, port = cfg["HOST_ADDRESS"], cfg["HOST_PORT"]
    source = (cfg["RUNNER_ADDRESS"], 0) if cfg["RUNNER_ADDRESS"] else None
    data = json.dumps(body).encode("utf-8") if body is not None else b""
    headers = {"Accept": "application/json", "Content-Length": str(len(data)),
               "Connection": "close"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if cfg["OVERLAY_TOKEN"]:
        headers["Authorization"] = "Bearer " + cfg["OVERLAY_TOKEN"]
    conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=source)
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read(1 << 20)
        status = resp.status
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL and source:
            raise ConfigError("RUNNER_ADDRESS %s is not an address of this machine: set it to "
                              "one of its addresses or remove it" % cfg["RUNNER_ADDRESS"])
        raise HostUnreachable(describe_oserror(e))
    except http.client.HTTPException as e:
        raise HostUnreachable("bad HTTP answer (%s)" % (type(e).__name__,))
    finally:
        conn.close()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        obj = {"error": "a non-JSON answer (HTTP %d)" % status}
    if not isinstance(obj, dict):
        obj = {"error": "an unexpected JSON answer (HTTP %d)" % status}
    return status, obj


def describe_oserror(e):
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return e.strerror or str(e) or type(e).__name__


def host_where(cfg):
    """The host's API as `address:port`, for messages."""
    return "%s:%s" % (cfg["HOST_ADDRESS"], cfg["HOST_PORT"])


def host_error(cfg, status, obj):
    """Turn a non-200 API answer into the right error."""
    msg = str(obj.get("error") or "no reason given").rstrip(".")
    where = host_where(cfg)
    if status == 401:
        return ConfigError("the host refused the token: set OVERLAY_TOKEN to the host's")
    if status in (400, 409):       # the host's sentence names the key, both values and the fix
        return ConfigError("the host at %s refused the registration: %s" % (where, msg))
    if status == 404:
        return NotRegistered("the host at %s does not know %s" % (where, cfg["RUNNER_NAME"]))
    if status == 503:
        return OverlayError("the host at %s has no free runner id (%s): release an inactive "
                            "runner on the host (kohaku_overlay_host.py cleanup)" % (where, msg))
    return HostUnreachable("HTTP %d (%s)" % (status, msg))


def register(cfg, address, previous_id=None):
    body = {"runner_name": cfg["RUNNER_NAME"], "physical_ip": address,
            "vxlan_id": cfg["OVERLAY_VXLAN_ID"], "vxlan_port": cfg["OVERLAY_VXLAN_PORT"],
            "mtu": cfg["OVERLAY_MTU"]}
    if previous_id is not None:
        body["previous_runner_id"] = previous_id
    public = wg_public_key(cfg)
    if public is not None:
        body["wg_public_key"] = public
    status, obj = api_call(cfg, "POST", "/api/overlay/register", body)
    if status != 200:
        raise host_error(cfg, status, obj)
    alloc = parse_allocation(obj)
    if encrypted(alloc) and public is None:     # first time encrypted: make keys, register them
        ensure_wg_key(cfg)
        return register(cfg, address, alloc["runner_id"])
    return alloc


def heartbeat(cfg):
    status, obj = api_call(cfg, "PUT", "/api/overlay/heartbeat/" + cfg["RUNNER_NAME"],
                           timeout=min(HTTP_TIMEOUT, max(2.0, cfg["HEARTBEAT_INTERVAL"])))
    if status != 200:
        raise host_error(cfg, status, obj)
    return obj


def fetch_peers(cfg):
    """The Host's peer table (GET /api/overlay/peers), without this runner."""
    status, obj = api_call(cfg, "GET", "/api/overlay/peers")
    if status != 200:
        raise host_error(cfg, status, obj)
    return parse_peers(obj, cfg["RUNNER_NAME"])


def backoff_delays(start=BACKOFF_START, cap=BACKOFF_MAX, rng=None):
    """0.5, 1, 2, 4, ... capped at 30 s, each with up to 20% jitter taken off (never above cap),
    so that runners cut off together do not come back in lockstep."""
    rng = rng or random.random
    delay = start
    while True:
        yield delay * (1.0 - 0.2 * rng())
        delay = min(cap, delay * 2)


def with_backoff(attempt, stop, failed):
    """attempt() until it returns, waiting backoff_delays() between tries.

    An OverlayError e of attempt goes to failed(e, delay), which raises to give up (a
    ConfigError always gives up). Returns attempt's value, or None when stop is set meanwhile.
    """
    for delay in backoff_delays():
        try:
            return attempt()
        except ConfigError:
            raise
        except OverlayError as e:
            failed(e, delay)
        if stop.wait(delay):
            return None
    return None  # pragma: no cover


def register_with_retry(cfg, address, previous_id, stop, deadline=None, retry_full=False):
    """Register, retrying with capped exponential backoff while the host is unreachable.

    retry_full also retries a 503 (serve). Returns the allocation, or None when stop is set.
    """
    where = host_where(cfg)

    def failed(e, delay):
        if not retry_full and not isinstance(e, (HostUnreachable, NotRegistered)):
            raise e
        if deadline is not None and time.monotonic() + delay > deadline:
            raise HostUnreachable("the host at %s did not answer (%s): start it, or check "
                                  "HOST_ADDRESS/HOST_PORT and the firewall" % (where, e))
        log.warning("registering with %s failed: %s; retrying in %.1f s", where, e, delay)

    return with_backoff(lambda: register(cfg, address, previous_id), stop, failed)


class Agent(object):
    """The serve loop: heartbeat, re-register on 404, repair drift; logs on state changes."""

    def __init__(self, cfg, stop=None, notify=None):
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.notify = notify or sd_notify
        self.alloc = None
        self.address = None
        self.built = False
        self.ready = False
        self.beats = 0
        self.registered_at = None
        self.pending = False          # started from the saved allocation, not registered yet
        self.heartbeat_recorded = None  # time.monotonic() of the last last_heartbeat write
        self.last_heartbeat = None    # its wall-clock time, what the state file shows
        self.last = {}
        self.metrics = RunnerMetrics()
        self.peers = dict(NO_PEERS)   # direct routing: the Host's peer table, as last fetched
        self.paths = {}               # peer name -> its path (track_paths)
        self.next_probe = 0.0

    def say(self, key, level, message):
        """Log message unless it repeats the last one logged under key."""
        if self.last.get(key) != message:
            self.last[key] = message
            if message:
                log.log(level, "%s", message)

    def start(self):
        """Register (forever, with backoff) and build once. False when stopped first."""
        cfg = self.cfg

        def failed(e, delay):                # at boot the underlay route may not exist yet
            self.say("address", logging.WARNING, "cannot tell this runner's address yet "
                     "(%s); retrying" % e)

        self.address = with_backoff(lambda: runner_address(cfg), self.stop, failed)
        if self.address is None:
            return False
        state = load_state(cfg["OVERLAY_STATE_FILE"])
        if parse_settings(state)["direct_routing"]:
            self.peers, self.paths = saved_direct(state)
        saved = saved_allocation(state)
        if saved is not None:
            return self.start_from(saved, state)
        alloc = register_with_retry(cfg, self.address, state.get("runner_id"), self.stop,
                                    retry_full=True)
        if alloc is None:
            return False
        self.metrics.inc("registrations", "first")
        self.adopt(alloc)
        self.sync_peers()
        self.repair(first=True)
        self.metrics.write(cfg, self.alloc, self.metric_peers())
        return True

    def start_from(self, saved, state):
        """A saved allocation: build from it first (so systemd hears READY=1 while the Host is
        down), then register; until the Host answers, every beat registers again."""
        log.info("building from the saved allocation in %s (runner %d, subnet %s), then "
                 "registering with %s", self.cfg["OVERLAY_STATE_FILE"], saved["runner_id"],
                 saved["subnet"], host_where(self.cfg))
        self.alloc, self.registered_at, self.pending = saved, state.get("registered_at"), True
        self.repair(first=True)
        self.metrics.write(self.cfg, self.alloc, self.metric_peers())
        if not self.stop.is_set():
            self.reregister()
        return True

    def adopt(self, alloc):
        if self.alloc is None or self.alloc != alloc:
            log.info("registered as %s: runner %d, subnet %s, vni %d", alloc["runner_name"],
                     alloc["runner_id"], alloc["subnet"], alloc["vni"])
        self.alloc = alloc
        self.registered_at = time.time()
        if not alloc["settings"]["direct_routing"]:
            self.peers, self.paths = dict(NO_PEERS), {}
        save_state(self.cfg["OVERLAY_STATE_FILE"], alloc, registered_at=self.registered_at,
                   **self.direct_state())

    def repair(self, first=False):
        """Build (first: with rollback) or repair; log each change and each new failure."""
        errors = None if first else []
        try:
            changes = build(self.cfg, self.alloc, self.address, errors, self.direct())
        except OverlayError as e:
            self.say("build", logging.ERROR, "build failed: %s" % e)
            self.metrics.inc("repair_failures")
            self.metrics.overlay_up = False
            return False
        for c in changes:
            log.info("%s: %s", "repaired" if self.built else "built", c)
            if self.built:
                self.metrics.inc("repairs", repair_kind(c))
        self.metrics.overlay_up = not errors
        if errors:
            self.metrics.inc("repair_failures")
            self.say("build", logging.ERROR, "%s incomplete: %s" % (
                "repair" if self.built else "build", "; ".join(str(e) for e in errors)))
            return False
        self.say("build", logging.INFO, "overlay %s is up: runner %d, subnet %s" % (
            self.cfg["OVERLAY_NETWORK_NAME"], self.alloc["runner_id"], self.alloc["subnet"]))
        self.built = True
        if not self.ready:
            self.ready = True
            self.notify("READY=1")
        return True

    def beat(self):
        if self.pending:                  # started from the saved allocation: register first
            self.reregister()
        else:
            self.send_heartbeat()
        self.beats += 1
        if not self.built or self.beats % REPAIR_EVERY == 0:
            self.repair()
        self.metrics.write(self.cfg, self.alloc, self.metric_peers())

    def send_heartbeat(self):
        cfg = self.cfg
        sent = time.monotonic()
        try:
            answer = heartbeat(cfg)
            self.metrics.heartbeat("ok", time.monotonic() - sent)
            self.say("host", logging.INFO, "host %s answers heartbeats" % host_where(cfg))
            self.record_heartbeat()
            self.learn(answer)
            if isinstance(answer, dict) and wg_settings(answer) != wg_settings(self.alloc):
                log.info("the host's encryption settings changed (now %s): registering again",
                         answer.get("encryption", "none"))
                self.reregister()
        except NotRegistered:
            self.metrics.heartbeat("not_registered")
            self.say("host", logging.WARNING, "the host does not know %s (restarted without "
                     "its state?): registering again" % cfg["RUNNER_NAME"])
            self.reregister()
        except HostUnreachable as e:
            self.metrics.heartbeat("unreachable")
            self.say("host", logging.WARNING, "host %s unreachable (%s); keeping the overlay "
                     "up and retrying" % (host_where(cfg), e))
        except OverlayError as e:
            self.metrics.heartbeat("error")
            self.say("host", logging.ERROR, str(e))

    def reregister(self):
        """Register with the last runner id, from this runner's address as it is now (DHCP or
        a cloud re-address changes it): a new address rebuilds vxlan0 on it."""
        before = self.address
        self.address = self.current_address()
        try:
            alloc = register(self.cfg, self.address, self.alloc["runner_id"])
        except OverlayError as e:
            self.say("register", logging.ERROR, "registering %sfailed: %s%s" % (
                "" if self.pending else "again ", e, "; the overlay stays up on the saved "
                "allocation, retrying every heartbeat" if self.pending else ""))
            if self.address != before:
                self.built = False        # vxlan0 on the new address now, the Host follows
                self.repair()
            return
        first, self.pending = self.pending, False
        self.metrics.inc("registrations", "first" if first else "again")
        changed = alloc != self.alloc or self.address != before
        self.adopt(alloc)
        self.say("register", logging.INFO, "registered again as runner %d" % alloc["runner_id"])
        if changed:
            self.built = False
            self.sync_peers()
            self.repair()

    def current_address(self):
        """This runner's underlay address now (RUNNER_ADDRESS, else the source of the route to
        the Host); the last one known when it cannot be told."""
        try:
            address = runner_address(self.cfg)
        except OverlayError as e:
            self.say("address", logging.WARNING, "cannot tell this runner's address (%s); "
                     "keeping %s" % (e, self.address))
            return self.address
        self.say("address", logging.INFO, "")
        if self.address is not None and address != self.address:
            log.warning("this runner's underlay address changed from %s to %s: vxlan0 follows",
                        self.address, address)
        return address

    def record_heartbeat(self):
        """Keep last_heartbeat in the state file for `status`, written at most every 30 s. The
        schedule is monotonic: a wall clock set back does not stop the record."""
        if self.heartbeat_recorded is not None and \
                time.monotonic() - self.heartbeat_recorded < HEARTBEAT_RECORD_EVERY:
            return
        self.heartbeat_recorded, self.last_heartbeat = time.monotonic(), time.time()
        self.save()

    # -- direct routing: the peer table and the per-peer path, kept by the same loop

    def direct_on(self):
        return bool(self.alloc and self.alloc["settings"]["direct_routing"])

    def direct(self):
        """build()'s direct argument: None while direct routing is off."""
        if not self.direct_on():
            return None
        return direct_arg(self.alloc, self.peers["peers"], self.paths)

    def mesh(self):
        """The peers of the table this runner reaches directly (mesh_peers)."""
        return mesh_peers(self.peers["peers"], encrypted(self.alloc))

    def metric_peers(self):
        """The peer_direct series of the metrics file: None while direct routing is off."""
        if not self.direct_on():
            return None
        return [({"peer": p["runner_name"], "peer_id": p["runner_id"]},
                 0 if (self.paths.get(p["runner_name"]) or {}).get("path") == "relayed" else 1)
                for p in self.mesh()]

    def direct_state(self):
        """What the state file keeps of direct routing, so a start without the Host rebuilds it."""
        return {"peers": self.peers, "paths": {n: {"path": p["path"], "since": p["since"]}
                                               for n, p in self.paths.items()}}

    def save(self):
        try:
            save_state(self.cfg["OVERLAY_STATE_FILE"], self.alloc,
                       registered_at=self.registered_at,
                       last_heartbeat=self.last_heartbeat, **self.direct_state())
        except OverlayError as e:
            self.say("state", logging.WARNING, str(e))

    def learn(self, answer):
        """The Host's settings from a heartbeat answer: direct routing switched on or off, or a
        new peer table version to fetch."""
        if not isinstance(answer, dict) or self.alloc is None:
            return
        settings, was = parse_settings(answer), self.alloc["settings"]
        self.alloc["settings"] = settings
        if settings["direct_routing"] != was["direct_routing"]:
            log.info("the host turned direct routing %s",
                     "on" if settings["direct_routing"] else "off: peers go through the host")
            if not settings["direct_routing"]:
                self.peers, self.paths = dict(NO_PEERS), {}
            self.sync_peers()
            self.save()
            self.repair()
        elif self.sync_peers():             # a peer came, went or moved: its filter rule too
            self.repair()

    def sync_peers(self):
        """Fetch the peer table when the Host announces another version; True when it changed."""
        if not self.direct_on() or self.peers["version"] == \
                self.alloc["settings"]["peers_version"]:
            return False
        try:
            table = fetch_peers(self.cfg)
        except OverlayError as e:
            self.say("peers", logging.WARNING, "cannot fetch the peer table (%s); keeping the "
                     "last one" % e)
            return False
        self.say("peers", logging.INFO, "")
        old = {p["runner_name"] for p in self.peers["peers"]}
        new = {p["runner_name"] for p in table["peers"]}
        log.info("peer table version %d: %d peer(s)%s%s", table["version"], len(new),
                 ", new: " + " ".join(sorted(new - old)) if new - old else "",
                 ", gone: " + " ".join(sorted(old - new)) if old - new else "")
        self.peers = table
        self.paths = {n: p for n, p in self.paths.items() if n in new}
        self.save()
        return True

    def apply_peers(self):
        """Routes, neighbours and FDB after a path change: at most three processes."""
        try:
            changes = ensure_peers(self.direct())
        except OverlayError as e:
            self.say("direct", logging.ERROR, "direct routes not applied: %s" % e)
            return
        self.say("direct", logging.INFO, "")
        for c in changes:
            log.info("direct routing: %s", c)

    def probe_round(self):
        """Probe every peer's direct path once; move the peers that changed path."""
        if not self.direct_on() or not self.built or not self.mesh():
            return
        by_addr = {net_address(p["subnet"]): p["runner_name"] for p in self.mesh()}
        try:
            answered = probe_paths(by_addr)
        except OverlayError as e:
            self.say("probe", logging.ERROR, str(e))
            return
        self.paths, changed = track_paths(self.paths, sorted(by_addr.values()),
                                          {by_addr[a] for a in answered}, time.time())
        for name, _, path in changed:
            if path == "relayed":
                log.warning("peer %s: direct path lost (no answer over %s for %d probes): "
                            "through the host now", name, DIRECT_DEV, FALL_AFTER)
            else:
                log.info("peer %s: direct path answers again: direct now", name)
        if changed:
            self.save()
            self.apply_peers()

    def loop(self):
        """Heartbeat every HEARTBEAT_INTERVAL; with direct routing, a probe round every
        PROBE_EVERY seconds in between (the same loop, no second thread)."""
        interval = float(self.cfg["HEARTBEAT_INTERVAL"])
        next_beat = time.monotonic() + interval
        while True:
            wait = next_beat - time.monotonic()
            if self.direct_on():
                wait = min(wait, self.next_probe - time.monotonic())
            if self.stop.wait(max(0.0, wait)):
                return
            if self.direct_on() and time.monotonic() >= self.next_probe:
                self.next_probe = time.monotonic() + PROBE_EVERY
                self.probe_round()
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + interval
                self.beat()


def sd_notify(message):
    """systemd readiness: send message to $NOTIFY_SOCKET (abstract names start with @)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(address)
        sock.sendall(message.encode("ascii"))
        return True
    except OSError as e:
        log.warning("could not notify systemd at %s (%s)", os.environ.get("NOTIFY_SOCKET"), e)
        return False
    finally:
        sock.close()


# ---- CLI --------------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(prog="kohaku_overlay_runner.py",
                                description="kohaku-overlay runner agent")
    p.add_argument("--version", action="version", version="%(prog)s " + __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, help_text):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--config", metavar="F", help="runner config (default %s)"
                        % DEFAULT_CONFIG)
        return sp

    add("serve", "register, build, heartbeat and repair forever")
    sp = add("up", "register and build once, then exit")
    sp.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    sp.add_argument("--timeout", type=float, default=None, metavar="S",
                    help="give up registering after S seconds (default: keep trying)")
    sp = add("down", "remove everything the runner built")
    sp.add_argument("--force", action="store_true",
                    help="disconnect attached containers instead of refusing")
    sp.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    sp = add("status", "show the allocation, devices and network")
    sp.add_argument("--json", action="store_true")
    add("network", "print the Docker network containers should join")
    return p


def refuse_while_serving(cfg, why, then):
    """up and down do not act beside a serve of the same state file (--dry-run may)."""
    pid = serve_running(cfg)
    if pid and not DRY_RUN:
        raise OverlayError("kohaku_overlay_runner.py serve (pid %s) is running and %s: stop it "
                           "first (systemctl stop kohakuriver-overlay-runner), %s" % (
                               pid, why, then))


def cmd_up(args):
    cfg = load_config(args.config)
    require_root("up")
    refuse_while_serving(cfg, "keeps this overlay built (and its state file) itself",
                         "or leave the work to it")
    if not cfg["OVERLAY_ENABLED"]:
        created = ensure_default_network(cfg)
        print("overlay disabled (OVERLAY_ENABLED = False in %s): containers use %s%s" % (
            cfg["_path"], cfg["DOCKER_NETWORK_NAME"], " (created)" if created else ""))
        return 0
    require_host(cfg)
    address = runner_address(cfg)
    state = load_state(cfg["OVERLAY_STATE_FILE"])
    if DRY_RUN:
        alloc = saved_allocation(state)
        print("[#] register %s at http://%s/api/overlay/register" % (
            cfg["RUNNER_NAME"], host_where(cfg)))
        if alloc is None:
            print("dry-run: no saved allocation in %s, so the build cannot be planned before "
                  "the host answers; run without --dry-run" % cfg["OVERLAY_STATE_FILE"])
            return 0
        print("dry-run: planning against the saved allocation (runner %d, subnet %s)" % (
            alloc["runner_id"], alloc["subnet"]))
    else:
        deadline = time.monotonic() + args.timeout if args.timeout else None
        alloc = register_with_retry(cfg, address, state.get("runner_id"), threading.Event(),
                                    deadline)
    direct = up_direct(cfg, alloc, state)
    if not DRY_RUN:
        save_state(cfg["OVERLAY_STATE_FILE"], alloc, registered_at=time.time(),
                   **({"peers": direct["table"], "paths": direct["paths"]} if direct else {}))
    changes = build(cfg, alloc, address, direct=direct)
    verb = "would change" if DRY_RUN else "changed"
    print("%s: runner %d, subnet %s, network %s: %s" % (
        cfg["RUNNER_NAME"], alloc["runner_id"], alloc["subnet"], cfg["OVERLAY_NETWORK_NAME"],
        "%s %d thing(s)" % (verb, len(changes)) if changes else "already up, nothing to change"))
    return 0


def up_direct(cfg, alloc, state):
    """`up`'s direct argument to build(): the Host's peer table (the saved one when it cannot be
    fetched, or under --dry-run), with the saved paths (up does not probe)."""
    if not alloc["settings"]["direct_routing"]:
        return None
    table, paths = saved_direct(state)
    if not DRY_RUN and table["version"] != alloc["settings"]["peers_version"]:
        try:
            table = fetch_peers(cfg)
        except HostUnreachable as e:
            log.warning("cannot fetch the peer table (%s): using the saved one", e)
    paths = {n: p for n, p in paths.items()
             if n in {peer["runner_name"] for peer in table["peers"]}}
    return dict(direct_arg(alloc, table["peers"], paths), table=table, paths=paths)


def cmd_serve(args):
    cfg = load_config(args.config)
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: stopping (the overlay stays up)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if not cfg["OVERLAY_ENABLED"]:
        # stay up (a unit with Restart= must not loop); there is nothing to maintain
        ensure_default_network(cfg)
        log.info("overlay disabled in %s: containers use %s; idle until stopped", cfg["_path"],
                 cfg["DOCKER_NETWORK_NAME"])
        sd_notify("READY=1")
        while not stop.wait(3600):
            pass
        return 0
    require_host(cfg)
    require_root("serve")
    lock = hold_serve_lock(cfg)        # noqa: F841 (held until the process exits)
    agent = Agent(cfg, stop)
    if not agent.start():
        return 0
    agent.loop()
    return 0


def cmd_down(args):
    cfg = load_config(args.config)
    require_root("down")
    refuse_while_serving(cfg, "would build the overlay again", "then run down")
    changes = teardown(cfg, force=args.force)
    verb = "would remove" if DRY_RUN else "removed"
    print("overlay %s: %d thing(s)" % (verb, len(changes)) if changes
          else "overlay already down, nothing to remove")
    return 0


def overlay_built(cfg, links=None):
    """True when vxlan0, the bridge and the Docker network on it all exist."""
    links = probe_links() if links is None else links
    if link_kind(links.get(VXLAN_DEV) or {}) != "vxlan" or \
            link_kind(links.get(cfg["OVERLAY_BRIDGE_NAME"]) or {}) != "bridge":
        return False
    net = docker_inspect(cfg["OVERLAY_NETWORK_NAME"])
    return net is not None and (net.get("Options") or {}).get(
        "com.docker.network.bridge.name") == cfg["OVERLAY_BRIDGE_NAME"]


def cmd_network(args):
    cfg = load_config(args.config)
    if cfg["OVERLAY_ENABLED"]:
        if overlay_built(cfg):
            print(cfg["OVERLAY_NETWORK_NAME"])
            return 0
        log.warning("the overlay is enabled but not built: containers use %s until "
                    "`kohaku_overlay_runner.py up` succeeds", cfg["DOCKER_NETWORK_NAME"])
    ensure_default_network(cfg)
    print(cfg["DOCKER_NETWORK_NAME"])
    return 0


def gather_status(cfg):
    state = load_state(cfg["OVERLAY_STATE_FILE"])
    alloc = saved_allocation(state)
    links = probe_links()
    devices = {}
    direct = direct_status(state)
    for name in (VXLAN_DEV, cfg["OVERLAY_BRIDGE_NAME"]) + (
            (DIRECT_DEV,) if direct["enabled"] or DIRECT_DEV in links else ()):
        link = links.get(name)
        info = {"present": link is not None, "up": bool(link and link_up(link))}
        if link is not None:
            info.update(kind=link_kind(link), mtu=link.get("mtu"), addresses=ipv4_addrs(link),
                        master=link.get("master"))
            if link_kind(link) == "vxlan":
                data = vxlan_data(link)
                info.update(vni=data.get("id"), local=data.get("local"),
                            remote=data.get("remote"), port=data.get("port"))
        devices[name] = info
    route = probe_route(alloc["overlay_cidr"]) if alloc else None
    try:
        net = docker_inspect(cfg["OVERLAY_NETWORK_NAME"])
        network = {"name": cfg["OVERLAY_NETWORK_NAME"], "present": net is not None,
                   "containers": container_names(net) if net else []}
    except CommandError as e:
        network = {"name": cfg["OVERLAY_NETWORK_NAME"], "present": None, "error": str(e)}
    return {"enabled": cfg["OVERLAY_ENABLED"], "runner_name": cfg["RUNNER_NAME"],
            "config": cfg["_path"], "state_file": cfg["OVERLAY_STATE_FILE"],
            "allocation": {k: alloc[k] for k in ALLOCATION_KEYS} if alloc else None,
            "registered_at": state.get("registered_at"),
            "last_heartbeat": state.get("last_heartbeat"), "devices": devices,
            "route": {"present": route is not None, "via": (route or {}).get("gateway"),
                      "dev": (route or {}).get("dev")},
            "network": network, "direct": direct}


def direct_status(state):
    """Direct routing as the state file last saw it: each peer, its path and since when."""
    table, paths = saved_direct(state)
    settings = parse_settings(state)
    peers = []
    for p in table["peers"]:
        path = paths.get(p["runner_name"]) or {"path": "direct", "since": None}
        peers.append({"runner_name": p["runner_name"], "runner_id": p["runner_id"],
                      "subnet": p["subnet"], "physical_ip": p["physical_ip"],
                      "path": path["path"], "since": path["since"]})
    return {"enabled": settings["direct_routing"], "version": table["version"], "peers": peers}


def fmt_time(t):
    if not t:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def format_status(st):
    a = st["allocation"]
    rows = [("Overlay", "enabled" if st["enabled"] else "disabled"),
            ("Runner", "%s (id %d)" % (st["runner_name"], a["runner_id"]) if a
             else "%s (not registered)" % st["runner_name"])]
    if a:
        rows += [("Subnet", "%s, gateway %s" % (a["subnet"], a["gateway"])),
                 ("Host", "%s, overlay %s, on this segment %s" % (
                     a["host_physical_ip"], a["host_overlay_ip"], a["host_vxlan_ip"])),
                 ("VNI / port / MTU", "%s / %s / %s" % (a["vni"], a["vxlan_port"], a["mtu"]))]
    for name, d in st["devices"].items():
        if not d["present"]:
            rows.append((name, "absent"))
            continue
        words = ["present", "up" if d["up"] else "DOWN", "mtu %s" % d["mtu"]]
        if d.get("vni") is not None:
            remote = " remote %s" % d["remote"] if d["remote"] else ""
            words.append("vni %s local %s%s" % (d["vni"], d["local"], remote))
        words += d["addresses"]
        rows.append((name, ", ".join(words)))
    r = st["route"]
    if a:
        rows.append(("Route", "%s via %s dev %s" % (a["overlay_cidr"], r["via"], r["dev"])
                     if r["present"] else "%s absent" % a["overlay_cidr"]))
    n = st["network"]
    rows.append(("Docker network", "%s: %s" % (
        n["name"], "unknown (%s)" % n.get("error") if n["present"] is None else
        ("present, %d container(s)" % len(n["containers"])) if n["present"] else "absent")))
    d = st["direct"]
    if d["enabled"]:
        relayed = sum(1 for p in d["peers"] if p["path"] == "relayed")
        rows.append(("Direct routing", "on, peer table version %d, %d peer(s), %d relayed "
                     "through the host" % (d["version"], len(d["peers"]), relayed)))
        for p in d["peers"]:
            rows.append(("  " + p["runner_name"], "%s%s (id %d, %s at %s)" % (
                "direct" if p["path"] == "direct" else "RELAYED through the host",
                " since " + fmt_time(p["since"]) if p["since"] else ", not probed yet",
                p["runner_id"], p["subnet"], p["physical_ip"])))
    rows += [("Registered", fmt_time(st["registered_at"])),
             ("Last heartbeat", fmt_time(st["last_heartbeat"]))]
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join("%s%s" % ((k + ":").ljust(width), v) for k, v in rows)


def cmd_status(args):
    cfg = load_config(args.config)
    st = gather_status(cfg)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(format_status(st))
    return 0


COMMANDS = {"serve": cmd_serve, "up": cmd_up, "down": cmd_down, "status": cmd_status,
            "network": cmd_network}


def main(argv=None):
    global DRY_RUN
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_usage(sys.stderr)
        print("error: name a command (serve, up, down, status, network)", file=sys.stderr)
        return 2
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(message)s" if args.command == "serve" else "%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    DRY_RUN = bool(getattr(args, "dry_run", False))
    try:
        return COMMANDS[args.command](args)
    except OverlayError as e:
        print("error: %s" % e, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # the last line of defence: one line, no traceback
        log.error("internal error: %r", e)
        return 1
    finally:
        DRY_RUN = False


if __name__ == "__main__":
    sys.exit(main())
