#!/usr/bin/env python3
"""kohaku_overlay_check.py: diagnostics for the kohaku-overlay VXLAN network.

Runs the user guide's Verify and Troubleshooting checks (and the failures real overlays hit that
the guide does not list) on the Host or on a Runner, and prints for every problem the command or
config line that fixes it. It only reads: nothing on the node is changed.

Usage:
    kohaku_overlay_check.py [--role host|runner] [--config F] [--json | --prometheus]
                            [--bundle FILE.tar.gz] [--only ID,...] [--ignore ID,...] [--list]

    --role      host or runner; default: the config file present (~/.kohakuriver/host_config.py
                or runner_config.py), else the devices present (kohaku-host/vxkr* or vxlan0)
    --config    the daemon's config file (read, never executed)
    --json      print the results as JSON
    --prometheus  print the results in the Prometheus text format (node_exporter's textfile
                collector): kohaku_overlay_check_status{role,check,status} 1, one series per
                check with its status (PASS, WARN, FAIL, SKIP) as a label, and per-status counts
    --only      run only these checks (ids or id prefixes, comma separated)
    --ignore    report a FAIL of these checks as WARN (kubeadm's --ignore-preflight-errors)
    --bundle    also write the "Getting Help" diagnostics into FILE.tar.gz (token redacted)
    --list      print the check ids of the role and exit

Exit codes: 0 nothing failed, 1 at least one check failed, 2 bad usage or unreadable config.

Reads the kernel with a constant number of commands whatever the cluster size: one
`ip -j -d -s addr show`, one `ip -j route`, one `iptables-save` per backend and one
`nft -j list ruleset` where nft exists (root only), `firewall-cmd --list-all-zones` and
`--get-default-zone` (only when a firewalld process and the system bus exist), one
`docker network inspect` and one `bridge -j fdb show` (runner), two pings (runner), one
`ip -j -s link show` (counters, >= 0.3 s after the first sample), two HTTP requests to the host
API, and files under /proc. 255 tunnels take about half a second.

Files read: the config (~/.kohakuriver/host_config.py or runner_config.py, or --config), the
state file named by OVERLAY_STATE_FILE, /etc/resolv.conf (nameservers inside the overlay CIDR).
Written: only the --bundle archive (mode 0600).
"""

__version__ = "0.1.0"

import argparse
import ast
import concurrent.futures
import difflib
import io
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request

# ---- constants and defaults ----------------------------------------------------------------

MARKER = "kohaku-overlay"           # comment on every iptables rule the daemons add
HOST_DEVICE = "kohaku-host"
HOST_VXLAN_PREFIX = "vxkr"
RUNNER_VXLAN = "vxlan0"
DIRECT_DEVICE = "vxdirect0"         # a runner's direct-routing VXLAN device
WG_DEVICE = "kohaku-wg"             # the WireGuard device under the tunnels
WG_KEY_RE = re.compile(r"\A[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=\Z")   # a public key
WG_HANDSHAKE_MAX = 180              # seconds: WireGuard re-keys every 120 s while traffic flows
RESOLV_CONF = "/etc/resolv.conf"
SOURCE_FILTER_CHAIN = "KOHAKU-VXLAN"
SERVICES = {"host": "kohakuriver-overlay-host", "runner": "kohakuriver-overlay-runner"}
CONFIG_DIR = os.path.join("~", ".kohakuriver")
CONFIG_FILES = {"host": "host_config.py", "runner": "runner_config.py"}
VXLAN_OVERHEAD = 50                 # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
SAMPLE_GAP = 0.3                    # seconds between the two counter samples
HTTP_TIMEOUT = 1.5
CMD_TIMEOUT = 10
UNREGISTERED_PROBE = "192.0.2.1"    # TEST-NET-1: a sender no runner can be
MAX_LISTED = 5                      # devices named in one line of detail
MAX_CONFIG = 1024 * 1024            # bytes: a config file is a few dozen lines

STR, INT, BOOL, NUM = (str,), (int,), (bool,), (int, float)

# key -> (accepted types, default, None allowed)
HOST_KEYS = {
    "HOST_REACHABLE_ADDRESS": (STR, "", False),
    "HOST_BIND_IP": (STR, "0.0.0.0", False),
    "HOST_PORT": (INT, 8000, False),
    "OVERLAY_ENABLED": (BOOL, False, False),
    "OVERLAY_BRIDGE_NAME": (STR, "kohaku-overlay", False),
    "OVERLAY_HOST_IP": (STR, "10.0.0.1", False),
    "OVERLAY_HOST_PREFIX": (INT, None, True),
    "OVERLAY_SUBNET": (STR, "10.0.0.0/8/8/16", False),
    "OVERLAY_VXLAN_ID": (INT, 100, False),
    "OVERLAY_VXLAN_PORT": (INT, 4789, False),
    "OVERLAY_MTU": (INT, 1450, False),
    "OVERLAY_STATE_FILE": (STR, "/var/lib/kohakuriver/overlay-state.json", False),
    "OVERLAY_TOKEN": (STR, "", False),
    "OVERLAY_INACTIVE_AFTER": (INT, 30, False),
    "OVERLAY_VXLAN_SOURCE_FILTER": (BOOL, True, False),
    "OVERLAY_DIRECT_ROUTING": (BOOL, False, False),
    "OVERLAY_REPAIR_INTERVAL": (INT, 10, False),
    "OVERLAY_ENCRYPTION": (STR, "none", False),
    "OVERLAY_WG_PORT": (INT, 51820, False),
    "OVERLAY_WG_SUBNET": (STR, "172.16.0.0/23", False),
}
RUNNER_KEYS = {
    "HOST_ADDRESS": (STR, "", False),
    "HOST_PORT": (INT, 8000, False),
    "RUNNER_NAME": (STR, "", False),
    "RUNNER_ADDRESS": (STR, "", False),
    "OVERLAY_ENABLED": (BOOL, False, False),
    "OVERLAY_NETWORK_NAME": (STR, "kohakuriver-overlay", False),
    "OVERLAY_BRIDGE_NAME": (STR, "kohaku-overlay", False),
    "OVERLAY_VXLAN_ID": (INT, 100, False),
    "OVERLAY_VXLAN_PORT": (INT, 4789, False),
    "OVERLAY_MTU": (INT, 1450, False),
    "OVERLAY_TOKEN": (STR, "", False),
    "OVERLAY_STATE_FILE": (STR, "/var/lib/kohakuriver/overlay-runner.json", False),
    "HEARTBEAT_INTERVAL": (NUM, 5, False),
    "DOCKER_NETWORK_NAME": (STR, "kohakuriver-net", False),
    "DOCKER_NETWORK_SUBNET": (STR, "172.30.0.0/16", False),
    "DOCKER_NETWORK_GATEWAY": (STR, "172.30.0.1", False),
    "OVERLAY_METRICS_FILE": (STR, "", False),
}
ROLE_KEYS = {"host": HOST_KEYS, "runner": RUNNER_KEYS}
# numeric keys -> (lowest, highest) accepted, the daemons' own bounds (tests/unit/
# test_config_files.py holds them equal); the Layout also wants OVERLAY_HOST_PREFIX at least
# NETWORK_PREFIX and room above OVERLAY_VXLAN_ID for the layout's runners, as the host does
RANGES = {"HOST_PORT": (1, 65535), "OVERLAY_VXLAN_PORT": (1, 65535), "OVERLAY_MTU": (576, 9000),
          "OVERLAY_VXLAN_ID": (1, 2 ** 24 - 2), "OVERLAY_HOST_PREFIX": (1, 32),
          "OVERLAY_INACTIVE_AFTER": (1, 86400), "OVERLAY_REPAIR_INTERVAL": (1, 3600),
          "HEARTBEAT_INTERVAL": (0.001, 3600), "OVERLAY_WG_PORT": (1, 65535)}

PACKAGES = {"ip": "iproute2", "bridge": "iproute2", "firewall-cmd": "firewalld",
            "docker": "docker.io (or docker-ce)", "ping": "iputils-ping",
            "journalctl": "systemd"}

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"


# ---- errors --------------------------------------------------------------------------------

class OverlayError(Exception):
    """A problem the user can fix; the message is one sentence naming it and the fix."""


class ConfigError(OverlayError):
    """Bad usage or an unreadable config: exit 2."""


class CommandError(OverlayError):
    def __init__(self, message, argv=None, rc=None, stderr=""):
        OverlayError.__init__(self, message)
        self.argv, self.rc, self.stderr = argv, rc, stderr


class Skip(Exception):
    """Raised inside a check when a fact it needs could not be read (no root, no tool)."""


# ---- the command wrapper (the only door to subprocess) ---------------------------------------

class Result(object):
    __slots__ = ("rc", "out", "err")

    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err


def run(argv, check=True, mutates=False, input=None, timeout=CMD_TIMEOUT):
    """Run argv (a list, never a shell string). This script never mutates anything; the
    signature matches the daemons' wrapper so the same mocking works in tests."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else
                                subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True)
    except FileNotFoundError:
        tool = argv[0]
        raise CommandError("%s is not installed: install %s" % (
            tool, PACKAGES.get(tool, tool.split("-")[0])), argv)
    except PermissionError:
        raise CommandError("%s cannot be run: permission denied" % argv[0], argv)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise CommandError("%s did not answer within %d s" % (" ".join(argv), timeout), argv)
    if check and proc.returncode != 0:
        raise CommandError("%s failed (exit %d): %s" % (
            " ".join(argv), proc.returncode, first_line(err)), argv, proc.returncode, err)
    return Result(proc.returncode, out, err)


def which(tool):
    return shutil.which(tool)


def is_root():
    return os.geteuid() == 0


def read_text(path):
    """A text file as UTF-8 (a leading byte-order mark dropped); UnicodeDecodeError otherwise."""
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG + 1) if not path.startswith("/proc/") else f.read()
    text = data.decode("utf-8")
    return text[1:] if text.startswith("\ufeff") else text


def file_mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def http_get(url, token, timeout=HTTP_TIMEOUT):
    """GET url -> (status, decoded JSON or None). Connection problems raise OSError."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
        status, body = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body.decode("utf-8"))
    except ValueError:
        return status, None


def first_line(text):
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def quote_argv(argv):
    return " ".join(shlex.quote(a) for a in argv)


# ---- parsers: pure functions over tool output ------------------------------------------------

def base36(n):
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def vxkr_name(n):
    return HOST_VXLAN_PREFIX + base36(n)


def vxkr_id(name):
    """'vxkra' -> 10; None for names that are not a canonical vxkr device."""
    if not name.startswith(HOST_VXLAN_PREFIX):
        return None
    try:
        n = int(name[len(HOST_VXLAN_PREFIX):], 36)
    except ValueError:
        return None
    return n if n > 0 and vxkr_name(n) == name else None


class Layout(object):
    """OVERLAY_SUBNET "BASE/NETWORK_PREFIX/NODE_BITS/SUBNET_BITS": where runner N lives."""

    def __init__(self, spec, host_ip="10.0.0.1", host_prefix=None):
        parts = spec.split("/")
        try:
            base = ipaddress.IPv4Address(parts[0])
            net_prefix, node_bits, subnet_bits = (int(p) for p in parts[1:])
        except (ValueError, TypeError):
            raise ConfigError('OVERLAY_SUBNET "%s" is not BASE/NETWORK_PREFIX/NODE_BITS/'
                              'SUBNET_BITS: write e.g. OVERLAY_SUBNET = "10.0.0.0/8/8/16"' % spec)
        if net_prefix + node_bits + subnet_bits != 32 or min(net_prefix, node_bits) < 1 \
                or subnet_bits < 2:
            raise ConfigError('OVERLAY_SUBNET "%s": the three numbers must be positive and sum '
                              'to 32 (e.g. "10.0.0.0/8/8/16")' % spec)
        try:
            self.network = ipaddress.IPv4Network("%s/%d" % (base, net_prefix))
        except ValueError:
            raise ConfigError('OVERLAY_SUBNET "%s": %s has bits set beyond /%d' % (
                spec, base, net_prefix))
        self.subnet_bits = subnet_bits
        self.subnet_prefix = net_prefix + node_bits
        self.max_id = 2 ** node_bits - 1
        self.cidr = str(self.network)
        self.host_prefix = net_prefix if host_prefix is None else host_prefix
        if not net_prefix <= self.host_prefix <= 32:
            raise ConfigError("OVERLAY_HOST_PREFIX %d must be between %d and 32" % (
                self.host_prefix, net_prefix))
        try:
            self.host_ip = ipaddress.IPv4Address(host_ip)
        except ValueError:
            raise ConfigError('OVERLAY_HOST_IP "%s" is not an IPv4 address' % host_ip)
        if self.host_ip not in self.network or \
                (int(self.host_ip) - int(self.network.network_address)) >> subnet_bits != 0:
            raise ConfigError('OVERLAY_HOST_IP %s must lie inside %s and outside every runner '
                              'subnet (node 0): e.g. OVERLAY_HOST_IP = "%s"' % (
                                  host_ip, self.cidr, self.network.network_address + 1))

    def subnet(self, n):
        addr = int(self.network.network_address) + (n << self.subnet_bits)
        return ipaddress.IPv4Network((addr, self.subnet_prefix))

    def gateway(self, n):
        return str(self.subnet(n).network_address + 1)

    def host_addr(self, n):
        size = 2 ** self.subnet_bits
        return str(self.subnet(n).network_address + (254 if size >= 256 else size - 2))


def short_repr(value, limit=60):
    """repr() bounded in length (and safe for ints too long to print)."""
    try:
        text = repr(value)
    except ValueError:
        return "an int of %d bits" % value.bit_length()
    return text if len(text) <= limit else text[:limit] + "..."


def parse_config(text, path, role):
    """Our keys of a config file (see the KohakuRiver block below): (values, warnings, ignored)."""
    fname = os.path.basename(path)
    if len(text) > MAX_CONFIG:
        raise ConfigError("%s is larger than %d bytes: it is not a config file; pass the right "
                          "--config" % (fname, MAX_CONFIG))
    spec = dict((k, (types, nullable)) for k, (types, _d, nullable) in ROLE_KEYS[role].items())
    return parse_config_source(text, fname, spec, RANGES)


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


def config_with_defaults(values, role):
    cfg = dict((k, v[1]) for k, v in ROLE_KEYS[role].items())
    cfg.update(values)
    return cfg


def parse_links(text):
    """ip -j [-d] [-s] addr|link show -> {ifname: link dict}."""
    return dict((link["ifname"], link) for link in json.loads(text or "[]"))


def link_kind(link):
    return (link.get("linkinfo") or {}).get("info_kind")


def vxlan_info(link):
    return (link.get("linkinfo") or {}).get("info_data") or {}


def ipv4_addrs(link):
    """['10.1.0.1/16', ...]"""
    return ["%s/%s" % (a["local"], a["prefixlen"]) for a in link.get("addr_info", [])
            if a.get("family") == "inet"]


def counters(link):
    s = link.get("stats64") or link.get("stats") or {}
    return (s.get("rx") or {}).get("packets", 0), (s.get("tx") or {}).get("packets", 0)


def parse_wg_dump(text):
    """`wg show IF dump` -> {"public_key", "listen_port", "peers": {key: {...}}}; the first
    line's private key is dropped here, never kept, printed or bundled."""
    lines = [line.split("\t") for line in (text or "").splitlines() if line.strip()]
    have = {"public_key": None, "listen_port": None, "peers": {}}
    if lines and len(lines[0]) >= 3:
        have["public_key"] = None if lines[0][1] == "(none)" else lines[0][1]
        have["listen_port"] = int(lines[0][2]) if lines[0][2].isdigit() else None
    for f in lines[1:]:
        if len(f) >= 8:
            have["peers"][f[0]] = {
                "endpoint": None if f[2] == "(none)" else f[2],
                "allowed_ips": sorted(x for x in f[3].split(",") if x and x != "(none)"),
                "handshake": int(f[4]) if f[4].isdigit() else 0,
                "rx": int(f[5]) if f[5].isdigit() else 0, "tx": int(f[6]) if f[6].isdigit() else 0}
    return have


def parse_snmp(text):
    """/proc/net/snmp -> {"Udp": {"InCsumErrors": 0, ...}, ...}."""
    out, lines = {}, (text or "").splitlines()
    for head, vals in zip(lines[0::2], lines[1::2]):
        name, keys = head.split(":", 1)
        out[name] = dict(zip(keys.split(), (int(v) for v in vals.split(":", 1)[1].split())))
    return out


def ip_int_net(text):
    """'10.0.0.0/8' or '1.2.3.4' -> (network int, mask int)."""
    net = ipaddress.IPv4Network(text, strict=False)
    return int(net.network_address), int(net.netmask)


def ip_int(ip):
    return ip if isinstance(ip, int) else int(ipaddress.IPv4Address(ip))


def in_net(ip, net):
    """ip (text or int) inside net ((network int, mask int))."""
    return ip is not None and (ip_int(ip) & net[1]) == net[0]


RULE_OPTS = {"-s": "src", "--source": "src", "-d": "dst", "--destination": "dst",
             "-p": "proto", "--protocol": "proto", "-i": "in", "--in-interface": "in",
             "-o": "out", "--out-interface": "out", "--dport": "dport",
             "--destination-port": "dport", "--dports": "dports", "--ctstate": "states",
             "--state": "states", "--comment": "comment", "-j": "target", "--jump": "target",
             "-g": "target", "--goto": "target"}
KNOWN_MATCHES = ("udp", "tcp", "comment", "conntrack", "state", "multiport", "u32")
# the u32 expression of the VXLAN filter (issue 11.3): the VNI, the top 24 bits of the 4 bytes at
# UDP offset 12 (after the IHL jump), as written ("0>>22&0x3C@12>>8=101") or as iptables-save
# prints it ("0x0>>0x16&0x3c@0xc>>0x8=0x65"); =LO:HI is a range
U32_VNI = re.compile(r"^(0x0|0)>>(0x16|22)&0x3c@(0xc|12)>>(0x8|8)=(\w+)(?::(\w+))?$", re.I)
U32_WRITTEN = "0>>22&0x3C@12>>8"


def parse_rule(line):
    """'-A FORWARD -s 10.0.0.0/8 -j ACCEPT' -> dict of the parts the checks reason about."""
    toks = shlex.split(line)
    rule = {"raw": line, "chain": toks[1], "neg": set(), "complex": False}
    i, neg = 2, False
    while i < len(toks):
        tok = toks[i]
        val = toks[i + 1] if i + 1 < len(toks) else None
        if tok == "!":
            neg, i = True, i + 1
            continue
        if tok == "-m":
            if val not in KNOWN_MATCHES:
                rule["complex"] = True
            i += 2
        elif tok == "--u32":
            m = U32_VNI.match(val or "")
            if m:
                rule["vni"] = (int(m.group(5), 0), int(m.group(6) or m.group(5), 0))
                if neg:
                    rule["neg"].add("vni")
            else:
                rule["complex"] = True      # a u32 expression other than the VNI's
            i += 2
        elif tok in RULE_OPTS:
            rule[RULE_OPTS[tok]] = val
            if neg:
                rule["neg"].add(RULE_OPTS[tok])
            i += 2
        else:
            # an option this parser does not reason about (-m set --match-set, --limit, ...)
            rule["complex"] = True
            i += 2 if val is not None and not val.startswith("-") else 1
        neg = False
    for key in ("src", "dst"):
        if key in rule:
            rule[key + "_net"] = ip_int_net(rule[key])
    return rule


class Table(object):
    """One iptables table from iptables-save: policies and rules per chain."""

    def __init__(self):
        self.policies, self.chains = {}, {}

    def rules(self, chain):
        return self.chains.get(chain, [])


def parse_iptables_save(text):
    """iptables-save output -> {table name: Table}."""
    tables, cur = {}, None
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], Table())
        elif line.startswith(":") and cur is not None:
            name, policy = line[1:].split()[:2]
            cur.chains.setdefault(name, [])
            if policy != "-":
                cur.policies[name] = policy
        elif line.startswith("-A ") and cur is not None:
            rule = parse_rule(line)
            cur.chains.setdefault(rule["chain"], []).append(rule)
    return tables


def holds_rules(tables):
    """True when a backend holds anything beyond empty chains with policy ACCEPT."""
    for table in tables.values():
        if any(table.chains.values()) or any(p != "ACCEPT" for p in table.policies.values()):
            return True
    return False


def port_in(spec, port):
    for part in spec.split(","):
        lo, _, hi = part.partition(":")
        if int(lo or 0) <= port <= int(hi or lo or 65535):
            return True
    return False


def iface_match(pattern, name):
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return name == pattern


def rule_matches(rule, pkt):
    """True, False, or None (cannot tell) for a UDP packet {src, dst, dport, in, out}."""
    if rule["complex"]:
        return None
    verdicts = []

    def test(key, result):
        verdicts.append(None if result is None else (result != (key in rule["neg"])))

    if "proto" in rule:
        test("proto", rule["proto"].lower() in ("udp", "17", "all", "0"))
    if "dport" in rule:
        test("dport", port_in(rule["dport"], pkt["dport"]))
    if "dports" in rule:
        test("dports", port_in(rule["dports"], pkt["dport"]))
    for key in ("src", "dst"):
        if key in rule:
            test(key, None if pkt.get(key) is None else in_net(pkt[key], rule[key + "_net"]))
    for key in ("in", "out"):
        if key in rule:
            test(key, None if pkt.get(key) is None else iface_match(rule[key], pkt[key]))
    if "states" in rule:
        test("states", "NEW" in rule["states"].split(","))
    if "vni" in rule:
        test("vni", None if pkt.get("vni") is None else
             rule["vni"][0] <= pkt["vni"] <= rule["vni"][1])
    if False in verdicts:
        return False
    return None if None in verdicts else True


def verdict(table, chain, pkt, depth=0):
    """Walk chain for pkt -> (target, rule or None). target None: fell off a user chain."""
    if depth > 16:
        return None, None
    for rule in table.rules(chain):
        if rule_matches(rule, pkt) is not True:
            continue
        target = rule.get("target")
        if target in ("ACCEPT", "DROP", "REJECT"):
            return target, rule
        if target == "RETURN":
            return None, None
        if target in table.chains:
            result = verdict(table, target, pkt, depth + 1)
            if result[0] is not None:
                return result
    if chain in table.policies:
        return table.policies[chain], None
    return None, None


def can_drop(table, chain, seen=None):
    """True when chain (or a chain it jumps to) holds a DROP or REJECT rule."""
    seen = set() if seen is None else seen
    seen.add(chain)
    for rule in table.rules(chain):
        target = rule.get("target")
        if target in ("DROP", "REJECT"):
            return True
        if target in table.chains and target not in seen and can_drop(table, target, seen):
            return True
    return False


# ---- nftables (nft -j list ruleset) ----
# iptables-nft's own tables (read through iptables-save already): family ip, these names
NFT_COMPAT = ("filter", "nat", "mangle", "raw", "security")
NFT_FAMILIES = ("ip", "inet", "bridge")      # the families that see IPv4 overlay traffic


def parse_nft(text):
    """nft -j list ruleset -> {(family, table, chain): {"hook", "policy", "rules": [expr]}}."""
    chains = {}
    for item in json.loads(text or "{}").get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            chains[(c["family"], c["table"], c["name"])] = {
                "hook": c.get("hook"), "policy": c.get("policy"), "rules": []}
        elif "rule" in item:
            r = item["rule"]
            key = (r["family"], r["table"], r["chain"])
            chains.setdefault(key, {"hook": None, "policy": None, "rules": []})
            chains[key]["rules"].append(r.get("expr") or [])
    return chains


def nft_compat(family, table):
    return family == "ip" and table in NFT_COMPAT


NFT_FIELDS = {("payload", "ip", "saddr"): "src", ("payload", "ip", "daddr"): "dst",
              ("payload", "udp", "dport"): "dport", ("payload", "th", "dport"): "dport",
              ("meta", None, "iifname"): "in", ("meta", None, "oifname"): "out",
              ("meta", None, "l4proto"): "proto", ("payload", "ip", "protocol"): "proto",
              ("ct", None, "state"): "state"}


def nft_field(left):
    """A match's left side -> the packet key it reads, or None (not one we reason about)."""
    if not isinstance(left, dict) or len(left) != 1:
        return None
    kind, spec = list(left.items())[0]
    if not isinstance(spec, dict):
        return None
    return NFT_FIELDS.get((kind, spec.get("protocol"), spec.get("field") or spec.get("key")))


def nft_value(right, value, key):
    """Does packet value match the right side (an address, prefix, range, set, name)? True,
    False, None (cannot tell)."""
    if isinstance(right, dict) and "set" in right:
        right = right["set"]
    if isinstance(right, list):
        results = [nft_value(r, value, key) for r in right]
        return True if True in results else None if None in results else False
    if key in ("src", "dst"):
        if isinstance(right, dict) and "prefix" in right:
            return in_net(value, ip_int_net("%s/%s" % (right["prefix"]["addr"],
                                                       right["prefix"]["len"])))
        if isinstance(right, dict) and "range" in right:
            lo, hi = (ip_int(x) for x in right["range"])
            return lo <= value <= hi
        return value == ip_int(right) if isinstance(right, str) and is_ipv4(right) else None
    if key == "dport":
        if isinstance(right, dict) and "range" in right:
            return right["range"][0] <= value <= right["range"][1]
        return value == right if isinstance(right, int) else None
    if key in ("in", "out") and isinstance(right, str):
        return value.startswith(right[:-1]) if right.endswith("*") else value == right
    if key == "proto":
        return value == right or {"udp": 17}.get(value) == right
    if key == "state":
        return value == right
    return None


def nft_match(match, pkt):
    key = nft_field(match.get("left"))
    value = pkt.get(key)
    if key is None or value is None:
        return None
    result = nft_value(match.get("right"), value, key)
    op = match.get("op", "==")
    if result is None or op in ("==", "in"):
        return result
    return (not result) if op == "!=" else None


def nft_walk(chains, key, pkt, depth=0):
    """Where pkt ends in one chain: ("accept" | "drop" | "maybe" | None (falls through),
    what decided it). "maybe": a rule that may drop it matches on what this cannot tell."""
    if depth > 16 or key not in chains:
        return None, None
    unsure = None                       # the first rule that may have dropped or accepted it
    for expr in chains[key]["rules"]:
        applies, last = True, None
        for stmt in expr:
            if "match" in stmt:
                m = nft_match(stmt["match"], pkt)
                if m is False:
                    applies = False
                    break
                if m is None:
                    applies = None
            elif any(k in stmt for k in ("limit", "quota", "xt")):
                applies = None if applies else applies
            elif any(k in stmt for k in ("accept", "drop", "reject", "jump", "goto", "return",
                                         "vmap")):
                last = stmt
                break
        if applies is False or last is None:
            continue
        verdict = list(last)[0]
        if verdict in ("jump", "goto"):
            target = (key[0], key[1], last[verdict]["target"])
            sub, why = nft_walk(chains, target, pkt, depth + 1)
            if sub is None:
                continue
            verdict, expr = sub, why
        elif verdict == "vmap":
            verdict, applies = "maybe", None
        elif verdict == "return":
            if applies:
                return (None, None) if unsure is None else ("maybe", unsure)
            continue
        if verdict in ("drop", "reject", "maybe"):
            if applies and verdict != "maybe" and unsure is None:
                return "drop", expr
            unsure = unsure or expr
            continue
        if verdict == "accept" and applies:
            return ("accept", expr) if unsure is None else ("maybe", unsure)
        if verdict == "accept":
            unsure = unsure or expr
    policy = chains[key].get("policy")
    if policy == "drop":
        return ("drop", "policy drop") if unsure is None else ("maybe", unsure)
    return (None, None) if unsure is None else ("maybe", unsure)


def nft_text(expr):
    """A rule's expressions as short JSON (what nft -j printed), for a detail line."""
    text = expr if isinstance(expr, str) else json.dumps(expr)
    return text if len(text) <= 100 else text[:100] + "..."


def parse_firewalld_zones(text, default_zone=""):
    """firewall-cmd --list-all-zones (+ --get-default-zone) -> {zone: {default, target,
    interfaces, sources, ports, rich}}."""
    zones, cur, in_rich = {}, None, False
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            name, _, attrs = line.partition(" ")
            cur = zones[name] = {"default": "default" in attrs or name == default_zone,
                                 "target": "default",
                                 "interfaces": [], "sources": [], "ports": [], "rich": []}
            in_rich = False
        elif cur is not None and line.startswith("\t"):
            if in_rich:
                cur["rich"].append(line.strip())
        elif cur is not None:
            key, _, val = line.strip().partition(":")
            in_rich = key == "rich rules"
            if key in ("interfaces", "sources", "ports"):
                cur[key] = val.split()
            elif key == "target":
                cur["target"] = val.strip()
    return zones


def firewalld_zone(zones, iface=None, source=None):
    """The zone firewalld applies: by source, then by interface, then the default zone."""
    if source is not None:
        for name, z in zones.items():
            for src in z["sources"]:
                try:
                    if in_net(source, ip_int_net(src)):
                        return name
                except ValueError:
                    continue
    for name, z in zones.items():
        if iface in z["interfaces"]:
            return name
    for name, z in zones.items():
        if z["default"]:
            return name
    return None


def zone_trusted(zones, name):
    return name == "trusted" or (name in zones and zones[name]["target"] == "ACCEPT")


def zone_bound(zones, iface):
    return any(iface in z["interfaces"] for z in zones.values())


def route_table(routes):
    """`ip -j route` (main table) -> [(prefix length, (network, mask) ints, route)], longest
    prefix first, parsed once so a lookup per tunnel stays cheap."""
    out = []
    for r in routes:
        dst = r.get("dst")
        if dst == "default":
            dst = "0.0.0.0/0"
        if r.get("type", "unicast") != "unicast" or ":" in (dst or ":"):
            continue
        net = ipaddress.IPv4Network(dst if "/" in dst else dst + "/32", strict=False)
        out.append((net.prefixlen, (int(net.network_address), int(net.netmask)), r))
    out.sort(key=lambda t: -t[0])
    return out


def route_lookup(table, ip):
    """Longest-prefix match of ip over route_table() -> route dict or None."""
    n = ip_int(ip)
    for _plen, net, route in table:
        if n & net[1] == net[0]:
            return route
    return None


def route_mtu(route, links):
    mtu = (links.get(route.get("dev")) or {}).get("mtu")
    for m in route.get("metrics") or []:
        if isinstance(m, dict) and "mtu" in m:
            mtu = min(mtu or m["mtu"], m["mtu"])
    return mtu


def is_ipv4(text):
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return False


def loopback(text):
    return is_ipv4(text) and ipaddress.IPv4Address(text).is_loopback


def parse_nameservers(text):
    """resolv.conf text -> the IPv4 nameserver addresses, in order."""
    out = []
    for line in (text or "").splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and is_ipv4(words[1]):
            out.append(words[1])
    return out


def nets_overlap(a, b):
    """a, b: (network int, mask int) -> True when one holds the other."""
    mask = a[1] & b[1]
    return a[0] & mask == b[0] & mask


def kernel_older(release, major, minor):
    try:
        nums = [int(x) for x in release.split("-")[0].split(".")[:2]]
    except ValueError:
        return False
    return nums < [major, minor]


def listed(items):
    items = list(items)
    head = ", ".join(items[:MAX_LISTED])
    return head + (" and %d more" % (len(items) - MAX_LISTED) if len(items) > MAX_LISTED else "")


# ---- facts: the snapshot, read once ----------------------------------------------------------

class Fact(object):
    """A snapshot attribute read from one source. Once gather() is done (snap.sealed), reading
    a fact that snap.lost() names raises Skip with the reason, so every check that looks at an
    unreadable source SKIPs instead of judging an empty value."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, snap, owner):
        if snap is None:
            return self
        if snap.sealed and self.name in snap.unavailable:
            raise Skip(snap.unavailable[self.name])
        return snap.__dict__[self.name]

    def __set__(self, snap, value):
        snap.__dict__[self.name] = value


class Snapshot(object):
    """Everything the checks look at, gathered once up front so checks are pure functions."""
    links, links2, routes, ipt, zones, docker_net, fdb, pings, state, nameservers, direct, \
        nft = (Fact() for _ in range(12))

    def __init__(self, role, cfg, cfg_path, cfg_found=True, cfg_warnings=(), cfg_ignored=()):
        self.role, self.cfg, self.cfg_path, self.cfg_found = role, cfg, cfg_path, cfg_found
        self.cfg_warnings, self.cfg_ignored = list(cfg_warnings), list(cfg_ignored)
        self.unavailable = {}           # fact -> reason it could not be read
        self.sealed = False             # gather() done: a lost fact read by a check SKIPs it
        self.raw = {}                   # name -> raw text, for --bundle
        self.links, self.links2, self.routes = {}, {}, []
        self.sysctl, self.snmp1, self.snmp2 = {}, {}, {}
        self.ipt, self.ipt_active = {}, None
        self.zones = None
        self.docker_net, self.docker_error, self.fdb = None, None, None
        self.api = {}                   # "health"/"status" -> (status, obj) or error string
        self.pings = {}                 # "ping"/"df" -> (ok, detail)
        self.state = None               # host: parsed state file; runner: local allocation
        self.nameservers = []           # IPv4 nameservers of /etc/resolv.conf
        self.direct = None              # runner: {"neigh", "fdb"} of vxdirect0 (when it exists)
        self.nft = {}                   # nftables chains (parse_nft)
        self.state_mode = None
        self.alloc = None               # runner: the expected allocation
        self.layout = None              # host: Layout
        self.kernel = ""
        self.wg = None                  # `wg show kohaku-wg dump`, parsed (encryption on)
        self.memo = {}

    def cached(self, key, compute):
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def need(self, fact):
        """A fact by name (a lost one raises Skip, as reading the attribute does)."""
        if fact in self.unavailable:
            raise Skip(self.unavailable[fact])
        return getattr(self, fact)

    def lost(self, fact, reason):
        """fact could not be read: the checks that read it SKIP with reason."""
        self.unavailable[fact] = reason

    def known(self, fact, default):
        """A fact, or default when it could not be read (for a hint, never for a verdict)."""
        return default if fact in self.unavailable else getattr(self, fact)

    def table(self, name):
        """An iptables table (filter, nat) of the backend the iptables command uses."""
        return self.need("ipt")[self.ipt_active].get(name) or Table()

    def runner_name(self):
        return self.cfg["RUNNER_NAME"] or socket.gethostname()

    # addressing helpers used by several checks
    def local_ips(self):
        return self.cached("local_ips", lambda: dict(
            (a.split("/")[0], name) for name, link in self.links.items()
            for a in ipv4_addrs(link)))

    def vxlan_devices(self):
        if self.role == "host":
            return sorted((n for n in self.links if vxkr_id(n)), key=vxkr_id)
        return [RUNNER_VXLAN] if RUNNER_VXLAN in self.links else []

    def overlay_ifaces(self):
        if self.role == "host":
            return [n for n in [HOST_DEVICE] + self.vxlan_devices() if n in self.links]
        return [n for n in (self.cfg["OVERLAY_BRIDGE_NAME"], RUNNER_VXLAN) if n in self.links]

    def overlay_device(self, dev):
        """True for a device the overlay itself creates (its routes and addresses are ours)."""
        return dev in self.overlay_ifaces() or dev in (DIRECT_DEVICE, WG_DEVICE)

    def encrypted(self):
        """OVERLAY_ENCRYPTION on the host; what the host told a runner (its state file)."""
        if self.role == "host":
            return self.cfg.get("OVERLAY_ENCRYPTION") == "wireguard"
        return (self.alloc or {}).get("encryption") == "wireguard"

    def wg_ip(self, n):
        """The host's (0) or runner n's address on kohaku-wg (the host daemon's rule)."""
        net = ipaddress.IPv4Network(self.cfg.get("OVERLAY_WG_SUBNET") or "172.16.0.0/23")
        return str(net.network_address + 1 + n)

    def overlay_cidr(self):
        if self.role == "host":
            return self.layout.cidr
        return (self.alloc or {}).get("overlay_cidr")

    def api_url(self, path):
        if self.role == "host":
            bind = self.cfg["HOST_BIND_IP"]
            addr = "127.0.0.1" if bind in ("", "0.0.0.0") else bind
        else:
            addr = self.cfg["HOST_ADDRESS"]
        if ":" in addr:
            addr = "[%s]" % addr
        return "http://%s:%d%s" % (addr, self.cfg["HOST_PORT"], path)


def iptables_backends():
    """[(backend, save command)]: both backends when both are installed, and the backend
    the plain `iptables` command uses."""
    active = None
    path = which("iptables")
    if path:
        real = os.path.realpath(path)
        active = "legacy" if "legacy" in real else "nft" if "nft" in real else "default"
    found = [(b, "iptables-%s-save" % b) for b in ("nft", "legacy")
             if which("iptables-%s-save" % b)]
    if not found and which("iptables-save"):
        found = [(active or "default", "iptables-save")]
    if active not in [b for b, _ in found]:
        active = found[0][0] if found else None
    return found, active


def read_state_file(snap, path):
    """Host state file (or runner local allocation) -> parsed dict; records mode."""
    try:
        text = read_text(path)
        snap.state_mode = file_mode(path)
    except FileNotFoundError:
        return None
    except PermissionError:
        snap.lost("state", "%s is not readable: run as root" % path)
        return None
    except ValueError:
        return {"error": "is not UTF-8 text"}
    snap.raw["state.json"] = text
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError as e:
        return {"error": "does not parse as JSON (%s)" % e}
    return data


def read_links():
    """Links, addresses, details and counters in one command: needed before the role is
    known. -> (links, raw text)."""
    res = run(["ip", "-j", "-d", "-s", "addr", "show"])
    return parse_links(res.out), res.out


def gather(snap, links, links_text=""):
    """Read every fact with a constant number of commands, in parallel where it helps."""
    snap.links = links
    snap.raw["ip-addr.json"] = links_text
    snap.kernel = os.uname().release
    t_first = time.time()
    snap.snmp1 = parse_snmp(read_proc("/proc/net/snmp"))
    host = snap.role == "host"
    cfg = snap.cfg
    if host:
        snap.layout = Layout(cfg["OVERLAY_SUBNET"], cfg["OVERLAY_HOST_IP"],
                             cfg["OVERLAY_HOST_PREFIX"])
        if cfg["OVERLAY_VXLAN_ID"] + snap.layout.max_id > 2 ** 24 - 1:
            raise ConfigError("OVERLAY_VXLAN_ID = %d leaves no room for %d VNIs below 16777216" % (
                cfg["OVERLAY_VXLAN_ID"], snap.layout.max_id))
        snap.state = read_state_file(snap, cfg["OVERLAY_STATE_FILE"])
    else:
        snap.state = read_state_file(snap, cfg["OVERLAY_STATE_FILE"])
    read_sysctls(snap)
    read_nameservers(snap)

    jobs = {"routes": lambda: run(["ip", "-j", "route", "show", "table", "main"]).out,
            "zones": gather_firewalld, "api": lambda: gather_api(snap)}
    backends, snap.ipt_active = iptables_backends()
    for backend, cmd in backends:
        jobs["ipt:" + backend] = (lambda c: lambda: run([c]).out)(cmd)
    if WG_DEVICE in links:
        jobs["wg"] = lambda: run(["wg", "show", WG_DEVICE, "dump"]).out
    if not host:
        jobs["docker"] = lambda: gather_docker(cfg["OVERLAY_NETWORK_NAME"])
        jobs["fdb"] = lambda: run(["bridge", "-j", "fdb", "show", "br",
                                   cfg["OVERLAY_BRIDGE_NAME"]]).out
        if DIRECT_DEVICE in links:
            jobs["direct"] = lambda: {
                "neigh": json.loads(run(["ip", "-j", "neigh", "show", "dev",
                                         DIRECT_DEVICE]).out or "[]"),
                "fdb": json.loads(run(["bridge", "-j", "fdb", "show", "dev",
                                       DIRECT_DEVICE]).out or "[]")}
    if not which("nft"):
        snap.lost("nft", "nft is not installed: no native nftables to read")
    elif is_root():
        jobs["nft"] = lambda: run(["nft", "-j", "list", "ruleset"]).out
    else:
        snap.lost("nft", "nft needs root: run as root (sudo)")
    if not is_root():
        jobs = dict((k, v) for k, v in jobs.items() if not k.startswith("ipt:"))
        snap.lost("ipt", "iptables needs root: run as root (sudo)")
    elif not backends:
        snap.lost("ipt", "iptables is not installed: install iptables")

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs) + 2)
    try:
        futures = dict((k, pool.submit(f)) for k, f in jobs.items())
        # a runner that knows its allocation from its state file pings while the rest is read
        pings = {} if host else start_pings(snap, runner_allocation(snap), pool)
        results = {}
        for key, fut in futures.items():
            try:
                results[key] = (True, fut.result())
            except (OverlayError, OSError, ValueError) as e:
                results[key] = (False, str(e))
        store_results(snap, results)
        if not host:
            snap.alloc = runner_allocation(snap)
            collect_pings(snap, pings or start_pings(snap, snap.alloc, pool))
    finally:
        pool.shutdown(wait=True)

    wait = SAMPLE_GAP - (time.time() - t_first)
    if wait > 0:
        time.sleep(wait)
    try:
        second = run(["ip", "-j", "-s", "link", "show"])
        snap.links2 = parse_links(second.out)
    except (OverlayError, ValueError) as e:
        snap.lost("links2", str(e))
    snap.snmp2 = parse_snmp(read_proc("/proc/net/snmp"))
    snap.sealed = True
    return snap


def read_nameservers(snap):
    try:
        snap.nameservers = parse_nameservers(read_text(RESOLV_CONF))
    except FileNotFoundError:
        snap.nameservers = []
    except (OSError, ValueError) as e:
        snap.lost("nameservers", "%s is not readable (%s)" % (RESOLV_CONF, e))


def read_proc(path):
    try:
        return read_text(path)
    except OSError:
        return ""


def read_sysctls(snap):
    names = ["net/ipv4/ip_forward", "net/ipv4/conf/all/rp_filter"]
    names += ["net/ipv4/conf/%s/rp_filter" % n for n in snap.overlay_ifaces()]
    for name in names:
        text = read_proc("/proc/sys/" + name).strip()
        snap.sysctl[name.replace("/", ".")] = int(text) if text.isdigit() else None


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


def firewalld_process(proc="/proc"):
    """Does some process look like firewalld? Reads only /proc/PID/cmdline, which needs no
    capability (/proc/PID/ns/net needs more than the daemons' units keep); a firewalld of
    another network namespace is a candidate too: `firewall-cmd --state`, over this node's
    D-Bus, decides. No candidate: no firewall-cmd (a python program) spawned."""
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            argv = read_bytes(os.path.join(proc, pid, "cmdline")).split(b"\0")
        except OSError:
            continue        # the process just ended
        if is_firewalld_cmdline(argv):
            return True
    return False


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def system_bus_present():
    """Does the system D-Bus socket firewall-cmd would use exist? (A firewalld process seen in
    /proc may belong to another network namespace of the machine; without the bus firewall-cmd
    can only fail, slowly: each call is a python start.) True for a non-path bus address."""
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")
    for part in address.split(";")[0].split(":", 1)[-1].split(","):
        if part.startswith("path="):
            return os.path.exists(part[len("path="):])
    return True


def gather_firewalld():
    """(state, text): the zones (and the default zone, which --list-all-zones does not mark)
    when firewalld runs (`firewall-cmd --state` exits 0); firewall-cmd is slow to start, so the
    three calls run side by side."""
    if not which("firewall-cmd"):
        return ("missing", "firewall-cmd is not installed")
    if not firewalld_process():
        return ("stopped", "firewalld is not running")
    if not system_bus_present():
        return ("stopped", "firewalld is not running (no system D-Bus socket here)")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
    try:
        state_f = pool.submit(run, ["firewall-cmd", "--state"], False)
        zones_f = pool.submit(run, ["firewall-cmd", "--list-all-zones"], False)
        default_f = pool.submit(run, ["firewall-cmd", "--get-default-zone"], False)
        state, res, default = state_f.result(), zones_f.result(), default_f.result()
    finally:
        pool.shutdown(wait=True)
    if "DBUS_ERROR" in state.out + state.err + res.out + res.err:
        return ("stopped", "firewalld is not running (D-Bus not reachable)")
    if state.rc != 0 or res.rc == 252 or "not running" in res.out + res.err:
        return ("stopped", "firewalld is not running")
    if res.rc != 0:
        return ("error", "firewall-cmd --list-all-zones failed: %s" % first_line(res.err))
    return ("running", res.out, default.out.strip() if default.rc == 0 else "")


def gather_docker(name):
    res = run(["docker", "network", "inspect", name], check=False)
    if res.rc == 0:
        return ("found", res.out)
    # the docker CLI may print WARNING lines (its config file) before the error itself
    lines = [line.strip() for line in res.err.splitlines() if line.strip()]
    err = ([line for line in lines if not line.startswith("WARNING")] or lines or [""])[-1]
    if "not found" in err.lower() or "no such network" in err.lower():
        return ("missing", err)
    return ("error", err)


def gather_api(snap):
    """Ask /healthz and /api/overlay/status; errors are kept as strings."""
    out = {}
    asks = [("health", "/healthz", ""),
            ("status", "/api/overlay/status", snap.cfg["OVERLAY_TOKEN"])]
    if snap.role == "runner":
        asks.append(("peers", "/api/overlay/peers", snap.cfg["OVERLAY_TOKEN"]))
    for key, path, token in asks:
        url = snap.api_url(path)
        if snap.role == "runner" and not snap.cfg["HOST_ADDRESS"]:
            out[key] = "HOST_ADDRESS is not set"
            continue
        try:
            out[key] = http_get(url, token)
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            out[key] = "%s: %s" % (url, reason)
        if key == "health" and isinstance(out[key], str):
            break
    return out


def runner_allocation(snap):
    """The runner's expected allocation: its local state file, else the host's status."""
    state = snap.state if isinstance(snap.state, dict) and "runner_id" in snap.state else None
    body = host_status(snap)[0] or {}
    mine = my_allocation(snap, body)
    if state is None and mine is None:
        return None
    alloc = dict(state or {})
    if mine is not None:
        for key in ("runner_id", "subnet", "gateway", "host_vxlan_ip", "vni"):
            alloc.setdefault(key, mine.get(key))
        alloc.setdefault("overlay_cidr", body.get("overlay_cidr"))
        alloc["physical_ip"] = mine.get("physical_ip")
        alloc["host_overlay_ip"] = body.get("host_ip")
        alloc["source"] = "host status" if state is None else "state file"
    else:
        alloc["source"] = "state file"
    if not alloc.get("host_physical_ip") and is_ipv4(snap.cfg["HOST_ADDRESS"]):
        alloc["host_physical_ip"] = snap.cfg["HOST_ADDRESS"]
    alloc.setdefault("overlay_cidr", "10.0.0.0/8")
    return alloc


def start_pings(snap, alloc, pool):
    """Ping the host's overlay IP, and a don't-fragment probe at the MTU, side by side.
    -> {probe: (argv, future)}; collect_pings() waits for them."""
    if alloc is None:
        return {}
    target = alloc.get("host_overlay_ip") or alloc.get("host_vxlan_ip")
    mtu = alloc.get("mtu") or snap.cfg["OVERLAY_MTU"]
    probes = {"ping": ["ping", "-n", "-c", "1", "-W", "1", target],
              "df": ["ping", "-n", "-M", "do", "-s", str(mtu - 28), "-c", "1", "-W", "1",
                     target]}
    snap.pings["target"] = target
    return dict((k, (argv, pool.submit(run, argv, False))) for k, argv in probes.items())


def collect_pings(snap, started):
    if not started:
        snap.lost("pings", "no allocation known")
    for key, (argv, fut) in started.items():
        try:
            res = fut.result()
            text = (res.out + res.err).strip().splitlines()
            snap.pings[key] = (res.rc == 0, quote_argv(argv),
                               first_line(res.err) or (text[1] if len(text) > 1 else ""))
        except OverlayError as e:
            snap.lost("pings", str(e))


def store_results(snap, results):
    ok, routes = results.get("routes", (False, "not read"))
    if ok:
        snap.raw["ip-route.json"] = routes
        snap.routes = json.loads(routes or "[]")
    else:
        snap.lost("routes", routes)
    for key, (ok, val) in results.items():
        if key.startswith("ipt:"):
            if ok:
                snap.raw["iptables-save.%s.txt" % key[4:]] = val
                snap.ipt[key[4:]] = parse_iptables_save(val)
            elif key[4:] == snap.ipt_active:
                snap.lost("ipt", val)
    if snap.ipt_active not in snap.ipt and "ipt" not in snap.unavailable:
        snap.lost("ipt", "iptables-save could not be read")
    if "nft" in results:
        ok, val = results["nft"]
        try:
            snap.nft = parse_nft(val) if ok else None
            snap.raw["nft-ruleset.json"] = val
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            ok, val = False, "nft -j list ruleset printed no ruleset (%s)" % e
        if not ok:
            snap.lost("nft", val)
    ok, val = results["zones"]
    if not ok:
        snap.lost("zones", val)
    elif val[0] != "running":
        snap.lost("zones", val[1])
    else:
        snap.raw["firewalld-zones.txt"] = val[1]
        snap.zones = parse_firewalld_zones(val[1], val[2])
    ok, val = results["api"]
    snap.api = val if ok else {"health": val}
    if "docker" in results:
        ok, val = results["docker"]
        if not ok:
            snap.lost("docker_net", val)
        elif val[0] == "error":
            snap.docker_error = val[1]
        elif val[0] == "found":
            snap.raw["docker-network.json"] = val[1]
            nets = json.loads(val[1])
            snap.docker_net = nets[0] if nets else None
    if "direct" in results:
        ok, val = results["direct"]
        if ok:
            snap.direct = val
        else:
            snap.lost("direct", val)
    if "wg" in results:
        ok, val = results["wg"]
        if ok:
            snap.wg = parse_wg_dump(val)    # the private key is dropped there
        else:
            snap.lost("wg", val)
    if "fdb" in results:
        ok, val = results["fdb"]
        if ok:
            snap.fdb = json.loads(val or "[]")
        else:
            snap.lost("fdb", val)


# ---- the checks ----------------------------------------------------------------------------
# Each check is a function of the snapshot returning (status, detail, fix); fix is None for PASS
# and the exact command or config line otherwise. Its docstring says what PASSes and what FAILs
# (tests/unit/test_check.py holds those words to scripted snapshots). The functions are listed,
# in the order they run, in the registry CHECKS at the end of this section.

BOTH = ("host", "runner")
HOST, RUNNER = ("host",), ("runner",)


class Row(object):
    """One line of the registry. Ids are "<role>.<name>". Where the host and the runner differ,
    name, title, func or needs is a {role: value} dict: that is the one way a variant is said."""
    __slots__ = ("name", "title", "func", "roles", "needs")

    def __init__(self, name, title, func, roles=BOTH, needs=()):
        self.name, self.title, self.func, self.roles, self.needs = name, title, func, roles, needs

    def checks(self):
        for role in self.roles:
            def pick(value):
                return value[role] if isinstance(value, dict) else value
            yield Check(role, pick(self.name), pick(self.title), tuple(pick(self.needs)),
                        pick(self.func))


class Check(object):
    """One check of one role, as run_checks() runs it."""
    __slots__ = ("role", "name", "title", "needs", "func")

    def __init__(self, role, name, title, needs, func):
        self.role, self.name, self.title, self.needs, self.func = role, name, title, needs, func

    def id(self, role=None):
        return "%s.%s" % (role or self.role, self.name)


def checks_for(role):
    return [c for c in REGISTRY if c.role == role]


def ok(detail):
    return PASS, detail, None


def warn(detail, fix):
    return WARN, detail, fix


def fail(detail, fix):
    return FAIL, detail, fix


def skip(detail):
    return SKIP, detail, None


def py_literal(value):
    return json.dumps(value) if isinstance(value, str) else repr(value)


def config_line(snap, key, value):
    return "%s = %s   # in %s" % (key, py_literal(value), snap.cfg_path)


def restart(snap):
    return "systemctl restart %s" % SERVICES[snap.role]


# -- configuration ------------------------------------------------------------------------------

def check_config_file(snap):
    """PASS: the file parsed. WARN: a typo'd key ("OVERLAY_ENABLE"), or no file (defaults)."""
    if not snap.cfg_found:
        return warn("%s not found; using the defaults" % snap.cfg_path,
                    "create %s (see the guide's Step 2/3)" % snap.cfg_path)
    if snap.cfg_warnings:
        return warn("; ".join(snap.cfg_warnings), "rename the key in %s" % snap.cfg_path)
    extra = " (%d other keys ignored)" % len(snap.cfg_ignored) if snap.cfg_ignored else ""
    return ok("read %s%s" % (snap.cfg_path, extra))


def check_enabled(snap):
    """PASS: OVERLAY_ENABLED = True. FAIL: False (the default): the daemon builds nothing."""
    if snap.cfg["OVERLAY_ENABLED"] is True:
        return ok("OVERLAY_ENABLED = True")
    return fail("OVERLAY_ENABLED is False: the daemon does not build the overlay",
                config_line(snap, "OVERLAY_ENABLED", True) + ", then " + restart(snap))


def check_reachable_address(snap):
    """PASS: 192.168.88.53 on eth0. FAIL: 127.0.0.1 (the guide's warning), unset, or an
    address no interface holds; the fix names a local address."""
    addr = snap.cfg["HOST_REACHABLE_ADDRESS"]
    local = snap.local_ips()
    # suggest an address of the interface the default route leaves by, else any non-overlay one
    default_dev = [r.get("dev") for r in snap.known("routes", []) if r.get("dst") == "default"]
    candidates = sorted((ip for ip, dev in local.items() if dev != HOST_DEVICE and
                         not loopback(ip) and not vxkr_id(dev) and
                         ip_int(ip) & int(snap.layout.network.netmask) !=
                         int(snap.layout.network.network_address)),
                        key=lambda ip: local[ip] not in default_dev)
    fix = config_line(snap, "HOST_REACHABLE_ADDRESS",
                      candidates[0] if candidates else "<this host's IP>")
    if not addr:
        return fail("HOST_REACHABLE_ADDRESS is not set", fix)
    if not is_ipv4(addr):
        return fail("HOST_REACHABLE_ADDRESS %r is not an IPv4 address" % addr, fix)
    ip = ipaddress.IPv4Address(addr)
    if ip.is_loopback or ip.is_unspecified:
        return fail("HOST_REACHABLE_ADDRESS is %s: runners cannot reach it, VXLAN tunnels "
                    "fail" % addr, fix)
    if addr not in local:
        return fail("HOST_REACHABLE_ADDRESS %s is not on any interface of this host" % addr, fix)
    return ok("%s on %s" % (addr, local[addr]))


def check_host_address(snap):
    """PASS: HOST_ADDRESS 192.168.88.53. FAIL: unset or loopback."""
    addr = snap.cfg["HOST_ADDRESS"]
    fix = config_line(snap, "HOST_ADDRESS", "<the Host's IP>")
    if not addr:
        return fail("HOST_ADDRESS is not set", fix)
    if loopback(addr):
        return fail("HOST_ADDRESS is %s (loopback): the tunnel cannot reach the Host" % addr, fix)
    return ok("HOST_ADDRESS %s, port %d" % (addr, snap.cfg["HOST_PORT"]))


def check_ip_forward(snap):
    """PASS: /proc/sys/net/ipv4/ip_forward is 1. FAIL: 0 (fix: sysctl -w ...=1)."""
    val = snap.sysctl.get("net.ipv4.ip_forward")
    if val is None:
        return skip("/proc/sys/net/ipv4/ip_forward is not readable")
    if val == 1:
        return ok("net.ipv4.ip_forward = 1")
    return fail("net.ipv4.ip_forward = %d: the node does not route overlay traffic" % val,
                "sysctl -w net.ipv4.ip_forward=1")


def check_cidr_overlap(snap):
    """PASS: no route, address or nameserver of this node that is not the overlay's lies in the
    overlay CIDR. FAIL: one does (a corporate 10.0.0.0/8 route, a LAN address, the DNS server):
    the overlay would take its traffic; the fix is OVERLAY_SUBNET on the Host."""
    cidr = snap.overlay_cidr()
    if cidr is None:
        raise Skip("overlay CIDR unknown (no allocation)")
    net = ip_int_net(cidr)
    found = []
    for _plen, rnet, route in route_table(snap.routes):
        if rnet[1] and nets_overlap(rnet, net) and not snap.overlay_device(route.get("dev")):
            found.append("route %s" % " ".join(
                [route.get("dst")] + ["%s %s" % (word, route[key]) for word, key in
                                      (("via", "gateway"), ("dev", "dev")) if route.get(key)]))
    for dev, link in sorted(snap.links.items()):
        if not snap.overlay_device(dev):
            found += ["address %s on %s" % (a, dev) for a in ipv4_addrs(link)
                      if in_net(a.split("/")[0], net)]
    found += ["nameserver %s in %s" % (ip, RESOLV_CONF) for ip in snap.nameservers
              if in_net(ip, net)]
    if not found:
        return ok("no route, address or nameserver of this node lies in %s" % cidr)
    where = "~/.kohakuriver/host_config.py" if snap.role == "runner" else snap.cfg_path
    return fail("the overlay CIDR %s overlaps %s, which the overlay does not own: its traffic "
                "would go into the overlay" % (cidr, listed(found)),
                "on the Host: OVERLAY_SUBNET = \"<BASE/NETWORK_PREFIX/NODE_BITS/SUBNET_BITS clear "
                "of %s>\" in %s, then systemctl restart %s and every runner" % (
                    listed(found), where, SERVICES["host"]))


# -- host devices -------------------------------------------------------------------------------

def check_kohaku_host(snap):
    """PASS: kohaku-host exists (dummy, or a bridge without dummy support), admin up.
    FAIL: missing, or down."""
    link = snap.links.get(HOST_DEVICE)
    if link is None:
        return fail("%s does not exist" % HOST_DEVICE, restart(snap))
    if "UP" not in link.get("flags", []):
        return fail("%s is down" % HOST_DEVICE, "ip link set %s up" % HOST_DEVICE)
    return ok("%s (%s) up" % (HOST_DEVICE, link_kind(link) or "device"))


def check_kohaku_host_address(snap):
    """PASS: OVERLAY_HOST_IP/OVERLAY_HOST_PREFIX (10.0.0.1/8) on kohaku-host. FAIL: removed."""
    want = "%s/%d" % (snap.layout.host_ip, snap.layout.host_prefix)
    have = ipv4_addrs(snap.links[HOST_DEVICE])
    if want in have:
        return ok("%s on %s" % (want, HOST_DEVICE))
    return fail("%s has %s, not %s" % (HOST_DEVICE, listed(have) or "no IPv4 address", want),
                "ip addr add %s dev %s" % (want, HOST_DEVICE))


def check_state_file(snap):
    """PASS: parses, has an allocations list, mode 0600 (or not written yet and no tunnel).
    FAIL: corrupt, or readable by others. SKIP: not readable without root."""
    path = snap.cfg["OVERLAY_STATE_FILE"]
    state = snap.need("state")
    if state is None:
        if snap.vxlan_devices():
            return warn("%s is missing while %d tunnels exist" % (path, len(snap.vxlan_devices())),
                        "%s (the host rebuilds the state from the vxkr* devices)" % restart(snap))
        return ok("%s not written yet (no runner registered)" % path)
    if "error" in state:
        return fail("%s %s" % (path, state["error"]),
                    "%s (the host keeps the bad file aside and rebuilds from the devices)"
                    % restart(snap))
    if not isinstance(state.get("allocations"), list):
        return fail("%s has no \"allocations\" list" % path, restart(snap))
    if snap.state_mode & 0o077:
        return fail("%s is mode %04o, readable by others" % (path, snap.state_mode),
                    "chmod 600 %s" % path)
    return ok("%s: %d allocations, mode 0600" % (path, len(state["allocations"])))


def host_allocations(snap):
    """{runner_id: allocation} from the state file (empty when there is none)."""
    state = snap.state if isinstance(snap.state, dict) else {}
    out = {}
    for a in state.get("allocations") or []:
        if isinstance(a, dict) and isinstance(a.get("runner_id"), int):
            out[a["runner_id"]] = a
    return out


def check_tunnels(snap):
    """FAIL: an allocation without its vxkr device. WARN: a vxkr device without an allocation."""
    allocs = host_allocations(snap)
    devices = set(snap.vxlan_devices())
    missing = [vxkr_name(n) for n in sorted(allocs) if vxkr_name(n) not in devices]
    orphans = [d for d in sorted(devices, key=vxkr_id) if vxkr_id(d) not in allocs]
    if missing:
        return fail("allocations without a device: %s" % listed(missing),
                    "%s (the host recreates the tunnel of every allocation)" % restart(snap))
    if orphans:
        return warn("devices without an allocation: %s" % listed(orphans),
                    "; ".join("ip link del %s" % d for d in orphans))
    return ok("%d allocations, %d tunnels" % (len(allocs), len(devices)))


def host_tunnel_expectations(snap):
    """[(device, link, expected dict)] for every vxkr device present."""
    return snap.cached("tunnels", lambda: compute_host_tunnels(snap))


def compute_host_tunnels(snap):
    allocs = host_allocations(snap)
    cfg, out = snap.cfg, []
    for dev in snap.vxlan_devices():
        n = vxkr_id(dev)
        alloc = allocs.get(n) or {}
        wg = snap.encrypted()
        out.append((dev, snap.links[dev], {
            "vni": cfg["OVERLAY_VXLAN_ID"] + n,
            "local": snap.wg_ip(0) if wg else cfg["HOST_REACHABLE_ADDRESS"],
            "remote": snap.wg_ip(n) if wg else alloc.get("physical_ip"),
            "port": cfg["OVERLAY_VXLAN_PORT"],
            "mtu": cfg["OVERLAY_MTU"], "mac": tunnel_mac(cfg["OVERLAY_VXLAN_ID"] + n),
            "address": "%s/%d" % (snap.layout.host_addr(n), snap.layout.subnet_prefix)}))
    return out


def tunnel_mac(vni):
    """The host daemon's fixed MAC for a tunnel (from the VNI): a re-created vxkrN keeps it, so
    the runners' ARP entries for the host stay right."""
    return "02:6b:6f:%02x:%02x:%02x" % ((vni >> 16) & 255, (vni >> 8) & 255, vni & 255)


def vxlan_recreate(dev, want, master=None):
    """The commands that rebuild one VXLAN device as the daemons build it."""
    mac = " address %s" % want["mac"] if want.get("mac") else ""
    cmds = ["ip link del %s" % dev,
            "ip link add %s%s type vxlan id %s local %s remote %s dstport %s nolearning" % (
                dev, mac, want["vni"], want["local"] or "<local IP>",
                want["remote"] or "<remote IP>", want["port"]),
            "ip link set %s mtu %s" % (dev, want["mtu"])]
    if want.get("address"):
        cmds.append("ip addr add %s dev %s" % (want["address"], dev))
    if master:
        cmds.append("ip link set %s master %s" % (dev, master))
    cmds.append("ip link set %s up" % dev)
    return "\n".join(cmds)


class Field(object):
    """One row of VXLAN_FIELDS: what a VXLAN device's field holds (have), the detail when it is
    wrong (None: right) and the command that sets it."""
    __slots__ = ("name", "title", "have", "wrong", "fix", "roles")

    def __init__(self, name, title, have, wrong, fix, roles=BOTH):
        self.name, self.title, self.have, self.wrong, self.fix, self.roles = (
            name, title, have, wrong, fix, roles)


def differs(dev, field, have, want):
    expect = want[field]
    if expect is None or have == expect:
        return None
    return "%s %s is %s, not %s" % (dev, field, have, expect)


def recreate_fix(dev, field, want, master):
    return vxlan_recreate(dev, want, master)


def info_field(key):
    return lambda link: vxlan_info(link).get(key)


# a loopback local or remote is the guide's HOST_REACHABLE_ADDRESS mistake (LOOPBACK_DETAIL)
LOOPBACK_DETAIL = {"remote": lambda dev, have, want: "%s remote is %s, not %s" % (
                       dev, have, want["remote"] or "a peer's address"),
                   "local": lambda dev, have, want: "%s local is %s" % (dev, have)}

VXLAN_FIELDS = [
    Field("vni", "VNI is OVERLAY_VXLAN_ID + runner id", info_field("id"), differs, recreate_fix),
    Field("local", "local is this node's underlay address", info_field("local"), differs,
          recreate_fix),
    Field("remote", "remote is the peer's underlay address", info_field("remote"), differs,
          recreate_fix),
    Field("port", "dstport is OVERLAY_VXLAN_PORT", info_field("port"), differs, recreate_fix),
    Field("mtu", "MTU is OVERLAY_MTU", lambda link: link.get("mtu"), differs,
          lambda dev, field, want, master: "ip link set %s mtu %s" % (dev, want["mtu"])),
    Field("up", "device is up", lambda link: "UP" in link.get("flags", []),
          lambda dev, field, have, want: None if have else "%s is down" % dev,
          lambda dev, field, want, master: "ip link set %s up" % dev),
    Field("address", "holds the host's address on the runner subnet", ipv4_addrs,
          lambda dev, field, have, want: None if want["address"] in have else
          "%s has %s, not %s" % (dev, listed(have) or "no address", want["address"]),
          lambda dev, field, want, master: "ip addr add %s dev %s" % (want["address"], dev),
          roles=HOST),
]


def vxlan_field(snap, field, tunnels, master=None):
    """Compare one field (a VXLAN_FIELDS row) of every VXLAN device with what it should be."""
    if not tunnels:
        return skip("no VXLAN device to check (no runner registered)")
    bad, fixes, loop = [], [], False
    for dev, link, want in tunnels:
        have = field.have(link)
        if field.name in LOOPBACK_DETAIL and loopback(have):
            loop = True
            problem = LOOPBACK_DETAIL[field.name](dev, have, want)
        else:
            problem = field.wrong(dev, field.name, have, want)
        if problem is not None:
            bad.append(problem)
            fixes.append(field.fix(dev, field.name, want, master))
    if not bad:
        if len(tunnels) > 1:
            return ok("%s right on %d devices (%s)" % (field.name, len(tunnels),
                                                       listed(t[0] for t in tunnels)))
        dev, _, want = tunnels[0]
        return ok("%s is up" % dev if field.name == "up" else "%s %s %s" % (
            dev, field.name, want[field.name] if want[field.name] is not None else "ok"))
    detail = "; ".join(bad[:MAX_LISTED]) + (" (and %d more)" % (len(bad) - MAX_LISTED)
                                            if len(bad) > MAX_LISTED else "")
    if loop:
        detail += ": the HOST_REACHABLE_ADDRESS is not configured correctly"
        if snap.role == "runner" or field.name == "local":
            fixes.insert(0, "on the Host: HOST_REACHABLE_ADDRESS = \"<the Host's IP>\" in "
                            "~/.kohakuriver/host_config.py, then systemctl restart "
                            + SERVICES["host"] + "; then on this node:")
    return fail(detail, "\n".join(fixes[:MAX_LISTED + 1]))


def vxlan_tunnels(snap):
    """-> ([(device, link, expected dict)], the bridge they are ports of): the host checks every
    vxkr*, a runner its vxlan0."""
    if snap.role == "host":
        return host_tunnel_expectations(snap), None
    return runner_tunnel(snap), snap.cfg["OVERLAY_BRIDGE_NAME"]


def field_check(field):
    """The check of one VXLAN_FIELDS row."""
    def run_field_check(snap):
        return vxlan_field(snap, field, *vxlan_tunnels(snap))
    run_field_check.__doc__ = (
        "PASS: the %s of every device is what the daemon builds. FAIL: names each wrong device "
        "and the commands that set it (or re-create the device); a loopback local/remote is the "
        "guide's HOST_REACHABLE_ADDRESS mistake." % field.name)
    return run_field_check


def vxlan_field_rows():
    """One registry row per VXLAN_FIELDS row: host.vxkr.FIELD and runner.vxlan0.FIELD."""
    return [Row({"host": "vxkr." + f.name, "runner": "vxlan0." + f.name},
                {"host": "vxkr*: " + f.title, "runner": "vxlan0: " + f.title},
                field_check(f), f.roles,
                needs={"host": (), "runner": ("vxlan0.present", "allocation")})
            for f in VXLAN_FIELDS]


# -- runner devices -----------------------------------------------------------------------------

def check_allocation(snap):
    """PASS: the runner's state file (or the host's status) gives its id and subnet.
    FAIL: neither knows this runner."""
    alloc = snap.alloc
    path = snap.cfg["OVERLAY_STATE_FILE"]
    if alloc is None:
        if "state" in snap.unavailable:
            raise Skip(snap.unavailable["state"])
        return fail("no allocation: %s is missing and the host lists no runner %s" % (
            path, snap.runner_name()),
                    restart(snap))
    return ok("runner id %s, subnet %s (from the %s)" % (
        alloc.get("runner_id"), alloc.get("subnet"), alloc["source"]))


def runner_tunnel(snap):
    alloc, cfg = snap.alloc, snap.cfg
    local = cfg["RUNNER_ADDRESS"] or alloc.get("physical_ip")
    remote = alloc.get("host_physical_ip")
    if snap.encrypted():            # VXLAN between the tunnel addresses, inside kohaku-wg
        local, remote = alloc.get("wg_ip"), alloc.get("host_wg_ip")
    n = alloc.get("runner_id")
    return [(RUNNER_VXLAN, snap.links[RUNNER_VXLAN], {
        "vni": alloc.get("vni") or (cfg["OVERLAY_VXLAN_ID"] + n if n else None),
        "local": local, "remote": remote,
        "port": alloc.get("vxlan_port") or cfg["OVERLAY_VXLAN_PORT"],
        "mtu": alloc.get("mtu") or cfg["OVERLAY_MTU"], "up": True})]


def check_vxlan0_present(snap):
    """PASS: vxlan0 is a vxlan device with learning off. WARN: learning on. FAIL: missing,
    or not a vxlan device."""
    link = snap.links.get(RUNNER_VXLAN)
    if link is None:
        return fail("%s does not exist" % RUNNER_VXLAN, restart(snap))
    if link_kind(link) != "vxlan":
        return fail("%s is a %s, not a vxlan device" % (RUNNER_VXLAN, link_kind(link)),
                    "ip link del %s; %s" % (RUNNER_VXLAN, restart(snap)))
    if vxlan_info(link).get("learning"):
        return warn("%s learns remote MACs (should be nolearning)" % RUNNER_VXLAN,
                    "ip link set %s type vxlan nolearning" % RUNNER_VXLAN)
    return ok("%s (vxlan, nolearning)" % RUNNER_VXLAN)


def check_bridge(snap):
    """PASS: OVERLAY_BRIDGE_NAME is a bridge and up. FAIL: missing, not a bridge, or down."""
    name = snap.cfg["OVERLAY_BRIDGE_NAME"]
    link = snap.links.get(name)
    if link is None:
        return fail("bridge %s does not exist" % name, restart(snap))
    if link_kind(link) != "bridge":
        return fail("%s is a %s, not a bridge" % (name, link_kind(link)),
                    "ip link del %s; %s" % (name, restart(snap)))
    if "UP" not in link.get("flags", []):
        return fail("bridge %s is down" % name, "ip link set %s up" % name)
    return ok("bridge %s up, MTU %s" % (name, link.get("mtu")))


def check_bridge_gateway(snap):
    """PASS: the subnet's gateway (10.N.0.1/16) is on the bridge. FAIL: it is not."""
    name = snap.cfg["OVERLAY_BRIDGE_NAME"]
    subnet = snap.alloc.get("subnet")
    want = "%s/%s" % (snap.alloc.get("gateway"), subnet.split("/")[1] if subnet else "16")
    have = ipv4_addrs(snap.links[name])
    if want in have:
        return ok("%s on %s" % (want, name))
    return fail("%s has %s, not the gateway %s" % (name, listed(have) or "no address", want),
                "ip addr add %s dev %s" % (want, name))


def check_bridge_vxlan0(snap):
    """PASS: vxlan0's master is the bridge. FAIL: detached (nomaster) or elsewhere."""
    name = snap.cfg["OVERLAY_BRIDGE_NAME"]
    master = snap.links[RUNNER_VXLAN].get("master")
    if master == name:
        return ok("%s is a port of %s" % (RUNNER_VXLAN, name))
    return fail("%s is %s, not a port of %s: containers cannot reach the tunnel" % (
        RUNNER_VXLAN, "attached to %s" % master if master else "detached", name),
        "ip link set %s master %s" % (RUNNER_VXLAN, name))


def check_route(snap):
    """PASS: `10.0.0.0/8 via 10.N.0.254 dev kohaku-overlay`. FAIL: missing or elsewhere."""
    routes = snap.need("routes")
    cidr, via = snap.overlay_cidr(), snap.alloc.get("host_vxlan_ip")
    bridge = snap.cfg["OVERLAY_BRIDGE_NAME"]
    fix = "ip route replace %s via %s dev %s" % (cidr, via, bridge)
    for r in routes:
        if r.get("dst") == cidr:
            if r.get("gateway") == via and r.get("dev") == bridge:
                return ok("%s via %s dev %s" % (cidr, via, bridge))
            return fail("%s goes via %s dev %s, not via %s dev %s" % (
                cidr, r.get("gateway", "-"), r.get("dev"), via, bridge), fix)
    return fail("no route for %s" % cidr, fix)


# -- iptables -----------------------------------------------------------------------------------

# The FORWARD accept rules of daemons before issue 11.1: the overlay CIDR in and out, whatever
# the interface. BROAD_FORWARD is their verdict: WARN (too broad) since both daemons build the
# scoped rules of forward_forms() (it was PASS while they switched).
BROAD_FORWARD = WARN
RULE_KEYS = ("src", "dst", "in", "out", "proto", "dport", "dports", "states", "target")


def forward_forms(snap, cidr):
    """-> (the scoped rules the daemons build, the broad pair of before), as iptables specs.
    Runner: bridge in, bridge out, and with direct routing bridge <-> vxdirect0; host: between
    vxkr* devices."""
    tail = " -m comment --comment %s -j ACCEPT" % MARKER
    if snap.role == "host":
        pairs = [(HOST_VXLAN_PREFIX + "+",) * 2]
    else:
        br = snap.cfg["OVERLAY_BRIDGE_NAME"]
        pairs = [(br, br)] + ([(br, DIRECT_DEVICE), (DIRECT_DEVICE, br)]
                              if DIRECT_DEVICE in snap.links else [])
    return (["-s %s -d %s -i %s -o %s%s" % (cidr, cidr, i, o, tail) for i, o in pairs],
            ["-%s %s%s" % (k, cidr, tail) for k in "sd"])


def rule_index(rules, spec):
    """Index of the first rule that does what spec does (its comment aside), else None."""
    want = parse_rule("-A FORWARD " + spec)
    for i, r in enumerate(rules):
        if not r["complex"] and r["neg"] == want["neg"] and \
                all(r.get(k) == want.get(k) for k in RULE_KEYS):
            return i
    return None


def forward_found(snap, rules, cidr):
    """-> (form: "scoped", "broad" or None when neither is complete, its specs, their indexes
    (None: missing), the scoped specs)."""
    scoped, broad = forward_forms(snap, cidr)
    for form, specs in (("scoped", scoped), ("broad", broad)):
        idx = [rule_index(rules, spec) for spec in specs]
        if None not in idx:
            return form, specs, idx, scoped
    return None, scoped, [rule_index(rules, spec) for spec in scoped], scoped


def forward_reinsert(rules, specs, idx, insert=None):
    """Commands that delete the rules found at idx and insert `insert` (default: the same
    specs) as rules 1, 2, ... again."""
    dels = ["iptables -D FORWARD %s" % rules[i]["raw"][len("-A FORWARD "):]
            for i in sorted((i for i in idx if i is not None), reverse=True)]
    return dels + ["iptables -I FORWARD %d %s" % (n + 1, spec)
                   for n, spec in enumerate(specs if insert is None else insert)]


def forward_fix(snap, rules, cidr):
    """The commands that put the overlay's FORWARD rules back on top (the form found, else the
    scoped one)."""
    _form, specs, idx, _scoped = forward_found(snap, rules, cidr)
    return forward_reinsert(rules, specs, idx)


def short_spec(spec):
    return "`%s`" % spec.split(" -m comment")[0]


def check_forward_rules(snap):
    """PASS: the scoped accept rules (runner: `-s CIDR -d CIDR -i BRIDGE -o BRIDGE`, and the
    bridge <-> vxdirect0 pair with direct routing; host: `-i vxkr+ -o vxkr+`) ahead of every
    DROP/REJECT and every jump to a chain that can drop. FAIL: missing under policy DROP or a
    dropping rule; "at bottom" below one. WARN: missing with policy ACCEPT; once the daemons
    build the scoped rules, the broad `-s CIDR` / `-d CIDR` pair (it bypasses Docker's isolation
    and DOCKER-USER)."""
    table = snap.table("filter")
    cidr = snap.overlay_cidr()
    if cidr is None:
        raise Skip("overlay CIDR unknown (no allocation)")
    rules = table.rules("FORWARD")
    policy = table.policies.get("FORWARD", "ACCEPT")
    form, specs, idx, scoped = forward_found(snap, rules, cidr)
    blockers = [i for i, r in enumerate(rules) if r.get("target") in ("DROP", "REJECT") or
                (r.get("target") in table.chains and can_drop(table, r["target"]))]
    if form is None:
        missing = " and ".join(short_spec(sp) for sp, i in zip(specs, idx) if i is None)
        add = "\n".join(forward_reinsert(rules, specs, idx))
        if policy in ("DROP", "REJECT") or blockers:
            what = "policy %s" % policy if policy != "ACCEPT" else \
                "rule %d `%s`" % (blockers[0] + 1, rules[blockers[0]]["raw"])
            return fail("FORWARD accept rule %s missing: %s drops overlay traffic" % (
                missing, what), add)
        return warn("FORWARD accept rule %s missing (policy ACCEPT lets traffic through for now)"
                    % missing, add)
    above = [i for i in blockers if i < max(idx)]
    if above:
        return fail("FORWARD accept rules are at bottom: below rule %d `%s` which can drop" % (
            above[0] + 1, rules[above[0]]["raw"]), "\n".join(forward_reinsert(rules, specs, idx)))
    numbers = "rule%s %s" % ("s" if len(idx) > 1 else "", listed_and([str(i + 1) for i in idx]))
    if form == "broad" and BROAD_FORWARD == WARN:
        return warn("FORWARD %s accept all of %s whatever the interface: too broad, they "
                    "bypass Docker's isolation between networks and DOCKER-USER" % (
                        numbers, cidr), "\n".join(forward_reinsert(rules, specs, idx, scoped)))
    where = "" if form == "broad" else " from %s" % ", ".join(
        "%s to %s" % (sp.split()[5], sp.split()[7]) for sp in specs)
    return ok("FORWARD %s accept%s %s%s (policy %s)" % (
        numbers, "" if len(idx) > 1 else "s", cidr, where, policy))


def listed_and(items):
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


def check_nat(snap):
    """PASS: nat POSTROUTING `-s CIDR ! -d CIDR -j MASQUERADE`. FAIL: missing."""
    rules = snap.table("nat").rules("POSTROUTING")
    cidr = snap.overlay_cidr()
    for i, r in enumerate(rules):
        if r.get("src") == cidr and r.get("dst") == cidr and "dst" in r["neg"] \
                and "src" not in r["neg"] and r.get("target") == "MASQUERADE":
            return ok("nat POSTROUTING rule %d masquerades %s" % (i + 1, cidr))
    return fail("no `-s %s ! -d %s -j MASQUERADE` in nat POSTROUTING: containers cannot reach "
                "outside the overlay" % (cidr, cidr),
                "iptables -t nat -A POSTROUTING -s %s ! -d %s -m comment --comment %s "
                "-j MASQUERADE" % (cidr, cidr, MARKER))


def underlay_packet(snap, src, dst, port, vni=None):
    local = snap.local_ips()
    return {"src": ip_int(src) if src and is_ipv4(src) else None,
            "dst": ip_int(dst) if dst and is_ipv4(dst) else None,
            "dport": port, "in": local.get(dst), "out": None, "vni": vni}


def underlay_peers(snap, inner=True):
    """(this node's underlay address, [the peers' underlay addresses]) that VXLAN flows between:
    host: HOST_REACHABLE_ADDRESS and every registered runner; runner: its vxlan0 local address
    (RUNNER_ADDRESS without one) and the host. With encryption VXLAN flows between the tunnel
    addresses; inner=False gives the physical ones WireGuard's packets flow between."""
    if not inner and snap.encrypted() and snap.role == "runner":
        alloc = snap.alloc or {}
        host_ip = alloc.get("host_physical_ip")
        return (snap.cfg["RUNNER_ADDRESS"] or alloc.get("physical_ip"),
                [host_ip] if host_ip else [])
    if snap.role == "host" and inner and snap.encrypted():  # VXLAN comes out of kohaku-wg
        return snap.wg_ip(0), [snap.wg_ip(n) for n in sorted(host_allocations(snap))]
    if snap.role == "host":
        return snap.cfg["HOST_REACHABLE_ADDRESS"], sorted(set(
            a["physical_ip"] for a in host_allocations(snap).values() if a.get("physical_ip")))
    link = snap.links.get(RUNNER_VXLAN)
    local = vxlan_info(link).get("local") if link else snap.cfg["RUNNER_ADDRESS"]
    host_ip = (snap.alloc or {}).get(
        "host_wg_ip" if snap.encrypted() else "host_physical_ip")
    return local, [host_ip] if host_ip else []


# The VXLAN filter of daemons before issue 11.3 accepts a registered sender for every VNI.
# UNBOUND_VXLAN is its verdict: WARN since the Host binds each runner to its own VNI (it was PASS
# while the Host switched).
UNBOUND_VXLAN = WARN


def dropped(table, pkt):
    """-> the rule (or None: a policy) that drops pkt in INPUT, False when it passes."""
    target, rule = verdict(table, "INPUT", pkt)
    return (rule or None) if target in ("DROP", "REJECT") else False


def ours(rule):
    return rule is not None and rule is not False and \
        rule["chain"].startswith(SOURCE_FILTER_CHAIN)


def vni_bound(table):
    """True when our filter chains match on the VNI (the form of issue 11.3)."""
    return any("vni" in r for chain, rules in table.chains.items()
               if chain.startswith(SOURCE_FILTER_CHAIN) for r in rules)


def vxlan_filter_probes(snap, table, local, port, lo, hi, own):
    """The filter's other promises, as (status, detail) of the first one broken, else None:
    an unregistered sender of our VNIs is dropped; with the VNI-bound form, frames of VNIs
    outside LO..HI (Docker Swarm, EVPN) are not dropped by our chain."""
    probe = UNREGISTERED_PROBE
    if dropped(table, underlay_packet(snap, probe, local, port, own)) is False:
        return WARN, "UDP %d is accepted from unregistered senders (probe %s): anyone can " \
            "inject frames" % (port, probe)
    other = hi + 1 if hi < 2 ** 24 - 1 else lo - 1
    if vni_bound(table) and ours(dropped(table, underlay_packet(snap, probe, local, port, other))):
        return WARN, "%s drops UDP %d of VNI %d too, outside the overlay's %d..%d: other VXLAN " \
            "users of the port (Docker Swarm, EVPN) are cut off" % (
                SOURCE_FILTER_CHAIN, port, other, lo, hi)
    return None


def filter_chain_missing(snap, table, port):
    """FAIL when the VXLAN filter chain or INPUT's jump to it is missing, else None."""
    if SOURCE_FILTER_CHAIN not in table.chains:
        return fail("source filter chain %s is missing: UDP %d is open to anyone" % (
            SOURCE_FILTER_CHAIN, port), restart(snap))
    if not any(r.get("target") == SOURCE_FILTER_CHAIN for r in table.rules("INPUT")):
        return fail("INPUT does not jump to %s: the source filter is not applied" %
                    SOURCE_FILTER_CHAIN,
                    "iptables -I INPUT 1 -p udp --dport %d -m comment --comment %s -j %s" % (
                        port, MARKER, SOURCE_FILTER_CHAIN))
    return None


def check_runner_vxlan_port(snap):
    """Walks INPUT (jumps, RETURN, policy, the u32 VNI match) for a VXLAN packet from the host
    (vxlan0's remote) with this runner's VNI. FAIL: a rule or the policy drops it, or the
    KOHAKU-VXLAN filter is missing. WARN: an unregistered sender of our VNIs is accepted, or the
    filter drops VNIs outside ours."""
    table = snap.table("filter")
    port = snap.cfg["OVERLAY_VXLAN_PORT"]
    local, peers = underlay_peers(snap)
    if not peers:
        raise Skip("the host's underlay address is unknown (no allocation)")
    link = snap.links.get(RUNNER_VXLAN)
    remote = vxlan_info(link).get("remote") if link else None
    host_ip = remote if remote and not loopback(remote) else peers[0]
    alloc = snap.alloc
    own = alloc.get("vni") or snap.cfg["OVERLAY_VXLAN_ID"] + (alloc.get("runner_id") or 0)
    lo = own - (alloc.get("runner_id") or 0)
    node_bits = int((alloc.get("subnet") or "/16").split("/")[1]) - \
        ipaddress.IPv4Network(snap.overlay_cidr()).prefixlen
    hi = lo + 2 ** node_bits - 1
    rule = dropped(table, underlay_packet(snap, host_ip, local, port, own))
    if rule is not False:
        by = "rule `%s`" % rule["raw"] if rule else "INPUT policy %s" % \
            table.policies.get("INPUT")
        fix = restart(snap) if ours(rule) else \
            "iptables -I INPUT 1 -p udp -s %s --dport %d -m comment --comment %s -j ACCEPT" % (
                host_ip, port, MARKER)
        return fail("INPUT drops UDP %d from the host %s: %s" % (port, host_ip, by), fix)
    missing = filter_chain_missing(snap, table, port)
    if missing:
        return missing
    broken = vxlan_filter_probes(snap, table, local, port, lo, hi, own)
    if broken:
        return broken + (restart(snap),)
    return ok("INPUT accepts UDP %d from the host %s for VNI %d only" % (port, host_ip, own))


def check_host_vxlan_port(snap):
    """Walks INPUT (jumps, RETURN, policy, the u32 VNI match) for a VXLAN packet from each
    registered runner with its own VNI. FAIL: the KOHAKU-VXLAN source filter is missing or not
    jumped to, or a registered runner is dropped. WARN: an unregistered sender is accepted, the
    filter drops VNIs outside ours, or (once the Host binds sources to VNIs) a runner is
    accepted for another runner's VNI."""
    table = snap.table("filter")
    port, base = snap.cfg["OVERLAY_VXLAN_PORT"], snap.cfg["OVERLAY_VXLAN_ID"]
    local, _peers = underlay_peers(snap)
    wg = snap.encrypted()               # then the sources are the runners' tunnel addresses
    pairs = sorted((snap.wg_ip(n) if wg else a["physical_ip"], base + n)
                   for n, a in host_allocations(snap).items() if a.get("physical_ip"))
    source_filter = snap.cfg["OVERLAY_VXLAN_SOURCE_FILTER"]
    if source_filter:
        missing = filter_chain_missing(snap, table, port)
        if missing:
            return missing
    blocked = [(ip, vni, dropped(table, underlay_packet(snap, ip, local, port, vni)))
               for ip, vni in pairs]
    blocked = [b for b in blocked if b[2] is not False]
    if blocked:
        ip, vni, rule = blocked[0]
        by = "`%s`" % rule["raw"] if rule else "the INPUT policy"
        chain = SOURCE_FILTER_CHAIN if ours(rule) else "INPUT"
        fix = restart(snap) if vni_bound(table) and ours(rule) else "\n".join(
            "iptables -I %s 1 -s %s -p udp --dport %d -m comment --comment %s -j ACCEPT"
            % (chain, b[0], port, MARKER) for b in blocked[:MAX_LISTED])
        return fail("UDP %d from registered runners %s is dropped by %s" % (
            port, listed(b[0] for b in blocked), by), fix)
    if not source_filter:
        return ok("UDP %d accepted from %d registered runners (source filter off)" % (
            port, len(pairs)))
    lo, hi = base, base + snap.layout.max_id
    broken = vxlan_filter_probes(snap, table, local, port, lo, hi, pairs[0][1] if pairs else lo + 1)
    if broken:
        return broken + (restart(snap),)
    if pairs:
        ip, own = pairs[0]
        foreign = pairs[1][1] if len(pairs) > 1 else (own + 1 if own < hi else lo + 1)
        if dropped(table, underlay_packet(snap, ip, local, port, foreign)) is False:
            detail = "UDP %d from runner %s is accepted for VNI %d, not only its own %d: a " \
                "runner can inject frames into another runner's segment" % (
                    port, ip, foreign, own)
            if UNBOUND_VXLAN == WARN:
                return warn(detail, restart(snap))
            return ok("UDP %d accepted from %d registered runners only (not bound to their "
                      "VNIs: the Host's filter of before issue 11.3)" % (port, len(pairs)))
    return ok("UDP %d accepted from %d registered runners only, each for its own VNI" % (
        port, len(pairs)))


# -- WireGuard (OVERLAY_ENCRYPTION = "wireguard") -------------------------------------------------

def wg_needed(snap):
    if not snap.encrypted():
        raise Skip('encryption is off (OVERLAY_ENCRYPTION = "none" on the host)')


def wg_port(snap):
    if snap.role == "host":
        return snap.cfg["OVERLAY_WG_PORT"]
    return (snap.alloc or {}).get("wg_port") or 51820


def wg_want(snap):
    """{public key: (who, [allowed IPs])} kohaku-wg should hold, as the host sees it."""
    if snap.role == "host":
        return dict((a["wg_public_key"], (a.get("runner_name") or "runner %d" % n,
                                          ["%s/32" % snap.wg_ip(n)]))
                    for n, a in host_allocations(snap).items() if a.get("wg_public_key"))
    alloc = snap.alloc or {}
    key = alloc.get("host_wg_public_key")
    want = {key: ("the host", ["%s/32" % alloc.get("host_wg_ip")])} if key else {}
    on, peers, _, _ = direct_expected(snap)
    if on:                              # direct routing too: every peer with a key, a full mesh
        want.update((p["wg_public_key"], (p["runner_name"], ["%s/32" % p["wg_ip"]]))
                    for p in peers)
    return want


def check_wg_interface(snap):
    """PASS: kohaku-wg is up, kernel WireGuard or userspace wireguard-go (the detail says which).
    FAIL: missing, down, or not a WireGuard device. SKIP: encryption is off."""
    wg_needed(snap)
    link = snap.links.get(WG_DEVICE)
    if link is None:
        return fail("%s does not exist: nothing carries the encrypted tunnels" % WG_DEVICE,
                    restart(snap))
    impl = {"wireguard": "kernel WireGuard", "tun": "userspace wireguard-go"}.get(
        link_kind(link))
    if impl is None:
        return fail("%s is a %s, not a WireGuard device" % (WG_DEVICE, link_kind(link)),
                    "ip link del %s; %s" % (WG_DEVICE, restart(snap)))
    if "UP" not in link.get("flags", []):
        return fail("%s is down" % WG_DEVICE, "ip link set %s up" % WG_DEVICE)
    return ok("%s is up (%s, MTU %s)" % (WG_DEVICE, impl, link.get("mtu")))


def check_wg_peers(snap):
    """PASS: kohaku-wg's peers and their allowed IPs are the host's view (host: one per runner
    that registered a key; runner: the host alone), and a runner's own key is the one the host
    lists. FAIL: names the missing, stale or wrong peers."""
    wg_needed(snap)
    have = snap.need("wg")
    if have is None:
        raise Skip("%s is not there to read" % WG_DEVICE)
    want = wg_want(snap)
    problems = []
    for key in sorted(set(want) - set(have["peers"])):
        problems.append("%s (%s) is not a peer" % (want[key][0], key))
    for key in sorted(set(have["peers"]) - set(want)):
        problems.append("stale peer %s" % key)
    for key in sorted(set(want) & set(have["peers"])):
        if have["peers"][key]["allowed_ips"] != sorted(want[key][1]):
            problems.append("%s allows %s, not %s" % (want[key][0], listed(
                have["peers"][key]["allowed_ips"]) or "nothing", listed(want[key][1])))
    if snap.role == "runner":
        mine = my_allocation(snap, host_status(snap)[0] or {}) or {}
        if mine.get("wg_public_key") and mine["wg_public_key"] != have["public_key"]:
            problems.append("the host lists key %s for this runner, %s has %s" % (
                mine["wg_public_key"], WG_DEVICE, have["public_key"]))
    if problems:
        return fail("; ".join(problems[:MAX_LISTED]), "%s (it sets key, port and peers in one "
                    "`wg set`)" % restart(snap))
    return ok("%d peer(s), keys and allowed IPs as the host sees them" % len(want))


def check_wg_handshake(snap):
    """PASS: every peer we talk to handshook within the last 180 s. FAIL: a peer sent to (tx
    growing) without any handshake: UDP OVERLAY_WG_PORT does not get through between the nodes,
    or the keys differ; or a handshake older than 180 s."""
    wg_needed(snap)
    have = snap.need("wg")
    if have is None:
        raise Skip("%s is not there to read" % WG_DEVICE)
    want = wg_want(snap)
    if snap.role == "host":             # runners that are Inactive are not expected to talk
        body = host_status(snap)[0] or {}
        active = set(a.get("runner_name") for a in body.get("allocations") or []
                     if a.get("active"))
        want = dict((k, v) for k, v in want.items() if v[0] in active) if body else want
    now, never, old = time.time(), [], []
    for key, (who, _) in sorted(want.items()):
        peer = have["peers"].get(key)
        if peer is None:
            continue                    # wg.peers names it
        if not peer["handshake"]:
            never.append("%s (%d bytes sent, none answered)" % (who, peer["tx"]))
        elif now - peer["handshake"] > WG_HANDSHAKE_MAX:
            old.append("%s (%d s ago)" % (who, now - peer["handshake"]))
    port = wg_port(snap)
    if never or old:
        return fail("no WireGuard handshake with %s: UDP %d does not get through between the "
                    "nodes, or the keys differ" % (listed(never + old), port),
                    "open UDP %d between the nodes (iptables -I INPUT -p udp --dport %d -j "
                    "ACCEPT; firewall-cmd --add-port=%d/udp), then check wg.peers" % (
                        port, port, port))
    if not want:
        raise Skip("no WireGuard peer to talk to yet")
    return ok("%d peer(s) handshook within %d s (UDP %d)" % (len(want), WG_HANDSHAKE_MAX, port))


def check_backends(snap):
    """PASS: only one of iptables-nft / iptables-legacy holds rules. WARN: both do.
    FAIL: the other backend drops (its rules apply too and do not order against ours)."""
    snap.need("ipt")
    active = snap.ipt_active
    others = [b for b in snap.ipt if b != active and holds_rules(snap.ipt[b])]
    if not others:
        return ok("rules only in iptables-%s" % active if active != "default" else
                  "one iptables backend")
    other = others[0]
    tables = snap.ipt[other]
    drops = [c for t in tables.values() for c, p in t.policies.items()
             if p in ("DROP", "REJECT") and c in ("FORWARD", "INPUT")]
    drops += ["%s rule `%s`" % (c, r["raw"]) for t in tables.values() for c in
              ("FORWARD", "INPUT") for r in t.rules(c) if r.get("target") in ("DROP", "REJECT")]
    fix = ("iptables-%s-save > /root/iptables-%s.rules; move what is needed to iptables-%s, then "
           "iptables-%s -F; iptables-%s -P FORWARD ACCEPT; iptables-%s -P INPUT ACCEPT" % (
               other, other, active, other, other, other))
    if drops:
        return fail("iptables-%s also holds rules that drop (%s): they apply on top of the "
                    "iptables-%s rules and do not order against them" % (
                        other, listed(drops), active), fix)
    return warn("both iptables-%s and iptables-%s hold rules: rules in one do not order "
                "against the other" % (active, other), fix)


def overlay_packets(snap, cidr):
    """{hook: [(what, packet)]}: the overlay's own traffic as the forward and input hooks see
    it (a new connection between two runners' subnets; VXLAN from each peer)."""
    net = ipaddress.IPv4Network(cidr)
    if snap.role == "host":
        devs = (snap.vxlan_devices() + [vxkr_name(1), vxkr_name(2)])[:2]
        src, dst = (str(snap.layout.subnet(n).network_address + 2) for n in (1, 2))
        ends = (devs[0], devs[1])
    else:
        src = str(ipaddress.IPv4Network(snap.alloc.get("subnet")).network_address + 2)
        dst = snap.alloc.get("host_overlay_ip") or str(net.network_address + 1)
        ends = (snap.cfg["OVERLAY_BRIDGE_NAME"],) * 2
    forward = {"src": ip_int(src), "dst": ip_int(dst), "in": ends[0], "out": ends[1],
               "state": "new"}
    local, peers = underlay_peers(snap)
    port = snap.cfg["OVERLAY_VXLAN_PORT"]
    inputs = [("VXLAN from %s" % ip, dict(underlay_packet(snap, ip, local, port), proto="udp",
                                          state="new")) for ip in peers]
    return {"forward": [("%s -> %s" % (src, dst), forward)], "input": inputs}


def nft_fix(snap, family, table, chain, hook, what, cidr):
    if table == "firewalld" and family == "inet":
        if hook == "input":
            return "firewall-cmd --add-port=%d/udp && firewall-cmd --permanent " \
                "--add-port=%d/udp" % ((snap.cfg["OVERLAY_VXLAN_PORT"],) * 2)
        return "\n".join("firewall-cmd --zone=trusted --add-interface=%s" % i
                         for i in snap.overlay_ifaces())
    if hook == "input":
        return "nft insert rule %s %s %s ip saddr %s udp dport %d accept" % (
            family, table, chain, what.split()[-1], snap.cfg["OVERLAY_VXLAN_PORT"])
    return "nft insert rule %s %s %s ip saddr %s ip daddr %s accept" % (
        family, table, chain, cidr, cidr)


def check_nftables(snap):
    """PASS: no native nftables chain on the forward or input hook (a table of nft's own,
    firewalld's, ebtables'; not iptables-nft's, which iptables-save shows) drops overlay traffic.
    FAIL: one drops it (policy drop, a drop or reject rule), with the command that accepts it
    first. WARN: one may drop it (a rule that matches on what the check cannot tell)."""
    chains = snap.nft
    cidr = snap.overlay_cidr()
    if cidr is None:
        raise Skip("overlay CIDR unknown (no allocation)")
    packets = overlay_packets(snap, cidr)
    bad, unsure, looked = [], [], 0
    for key in sorted(chains):
        family, table, name = key
        hook = chains[key]["hook"]
        if hook not in packets or family not in NFT_FAMILIES or nft_compat(family, table):
            continue
        looked += 1
        for what, pkt in packets[hook]:
            if family == "bridge":          # bridge ports, not the bridge, are its in/out
                pkt = dict(pkt, **{"in": None, "out": None})
            verdict, why = nft_walk(chains, key, pkt)
            where = "table %s %s chain %s (hook %s)" % (family, table, name, hook)
            if verdict == "drop":
                bad.append(("%s drops %s: %s" % (where, what, nft_text(why)),
                            nft_fix(snap, family, table, name, hook, what, cidr)))
            elif verdict == "maybe" and table != "firewalld":   # firewalld.*: its zones
                unsure.append(("%s may drop %s: %s" % (where, what, nft_text(why)),
                               nft_fix(snap, family, table, name, hook, what, cidr)))
    for found, verdict in ((bad, fail), (unsure, warn)):
        if found:
            return verdict("; ".join(d for d, _ in found[:MAX_LISTED]) + (
                " (and %d more)" % (len(found) - MAX_LISTED) if len(found) > MAX_LISTED else ""),
                "\n".join(sorted(set(f for _, f in found), key=[f for _, f in found].index)))
    return ok("no native nftables chain on the forward or input hook drops overlay traffic "
              "(%d looked at)" % looked)


# -- firewalld ----------------------------------------------------------------------------------

def check_firewalld_trusted(snap):
    """PASS: every overlay interface in the trusted zone. FAIL: in another zone, the
    guide's "admin prohibited filter" case. SKIP: firewalld not installed or not running."""
    zones = snap.need("zones")
    bad = []
    for iface in snap.overlay_ifaces():
        zone = firewalld_zone(zones, iface=iface)
        if not zone_trusted(zones, zone):
            bad.append((iface, zone))
    if not bad:
        return ok("%s in the trusted zone" % listed(snap.overlay_ifaces()))
    fixes = ["firewall-cmd --zone=trusted --%s-interface=%s" % (
        "change" if zone_bound(zones, i) else "add", i) for i, _ in bad]
    return fail("%s in zone %s, not trusted: forwarded packets are rejected with "
                "'admin prohibited filter'" % (
                    listed(i for i, _ in bad), listed(sorted(set(str(z) for _, z in bad)))),
                "\n".join(fixes))


def check_firewalld_port(snap):
    """PASS: the zone that receives the peers' VXLAN packets (WireGuard's, OVERLAY_WG_PORT,
    with encryption) by source, interface or default is trusted, lists PORT/udp or has an
    accepting rich rule. FAIL: it does none of these."""
    zones = snap.need("zones")
    port = wg_port(snap) if snap.encrypted() else snap.cfg["OVERLAY_VXLAN_PORT"]
    local, peers = underlay_peers(snap, inner=False)
    iface = snap.local_ips().get(local)
    closed = []
    for peer in peers or [None]:
        zone = firewalld_zone(zones, iface=iface, source=peer)
        z = zones.get(zone) or {"ports": [], "rich": [], "target": "default"}
        rich_open = any('port="%d"' % port in r and "udp" in r and "accept" in r and
                        (peer is None or "source" not in r or peer in r) for r in z["rich"])
        if not (zone_trusted(zones, zone) or "%d/udp" % port in z["ports"] or rich_open):
            closed.append((peer, zone))
    if not closed:
        return ok("UDP %d open in firewalld for %s" % (
            port, listed(peers) if peers else "the underlay interface"))
    zone = closed[0][1]
    opt = "--zone=%s " % zone if zone else ""
    return fail("firewalld zone %s does not open UDP %d%s" % (
        zone or "(default)", port,
        " from " + listed(p for p, _ in closed if p) if closed[0][0] else ""),
        "firewall-cmd %s--add-port=%d/udp && firewall-cmd --permanent %s--add-port=%d/udp" % (
            opt, port, opt, port))


# -- Docker and the bridge FDB ------------------------------------------------------------------

def docker_create_cmd(snap):
    alloc, cfg = snap.alloc, snap.cfg
    sub = ipaddress.IPv4Network(alloc["subnet"])
    host_addr = alloc.get("host_vxlan_ip") or str(sub.network_address + 254)
    return ("docker network create --driver bridge --subnet %s --gateway %s --aux-address "
            "host=%s -o com.docker.network.bridge.name=%s -o com.docker.network.driver.mtu=%d %s"
            % (alloc["subnet"], alloc["gateway"], host_addr, cfg["OVERLAY_BRIDGE_NAME"],
               alloc.get("mtu") or cfg["OVERLAY_MTU"], cfg["OVERLAY_NETWORK_NAME"]))


def check_docker_network(snap):
    """PASS: OVERLAY_NETWORK_NAME is a bridge network on the overlay bridge with the
    allocation's subnet, gateway, MTU and an aux-address reserving the host's 10.N.0.254.
    FAIL: the network is missing or differs, or Docker does not answer."""
    net = snap.need("docker_net")
    name, alloc, cfg = snap.cfg["OVERLAY_NETWORK_NAME"], snap.alloc, snap.cfg
    create = docker_create_cmd(snap)
    if snap.docker_error:
        if "permission denied" in snap.docker_error.lower():
            raise Skip("docker: %s" % snap.docker_error)
        return fail("Docker does not answer: %s" % snap.docker_error, "systemctl start docker")
    if net is None:
        # docker network create puts Docker's FORWARD jumps back on top of the overlay's rules
        try:
            create += "\n" + "\n".join(forward_fix(
                snap, snap.table("filter").rules("FORWARD"), snap.overlay_cidr()))
        except Skip:
            create += "\nthen " + restart(snap)
        return fail("Docker network %s does not exist: containers cannot join the overlay" %
                    name, create)
    opts = net.get("Options") or {}
    ipam = ((net.get("IPAM") or {}).get("Config") or [{}])[0]
    mtu = alloc.get("mtu") or cfg["OVERLAY_MTU"]
    host_addr = alloc.get("host_vxlan_ip")
    wrong = []
    for what, have, want in (
            ("driver", net.get("Driver"), "bridge"),
            ("subnet", ipam.get("Subnet"), alloc.get("subnet")),
            ("gateway", ipam.get("Gateway"), alloc.get("gateway")),
            ("bridge", opts.get("com.docker.network.bridge.name"), cfg["OVERLAY_BRIDGE_NAME"]),
            ("mtu", opts.get("com.docker.network.driver.mtu"), str(mtu))):
        if have != want:
            wrong.append("%s %s (want %s)" % (what, have, want))
    if host_addr and host_addr not in (ipam.get("AuxiliaryAddresses") or {}).values():
        wrong.append("no aux-address reserving %s" % host_addr)
    if wrong:
        containers = len(net.get("Containers") or {})
        return fail("Docker network %s: %s" % (name, "; ".join(wrong)),
                    "docker network rm %s && %s%s" % (
                        name, create, " (disconnect its %d containers first)" % containers
                        if containers else ""))
    return ok("%s: bridge %s, subnet %s, MTU %s, %s reserved" % (
        name, cfg["OVERLAY_BRIDGE_NAME"], alloc.get("subnet"), mtu, host_addr))


def check_fdb(snap):
    """FAIL: a container's MAC learned on vxlan0 (frames of this node coming back through
    the host); it should sit on the container's veth."""
    fdb = snap.need("fdb")
    net = snap.need("docker_net")
    if net is None:
        raise Skip(snap.docker_error or "no Docker network, no containers to look for")
    macs = dict(((c.get("MacAddress") or "").lower(), c.get("Name"))
                for c in (net.get("Containers") or {}).values() if c.get("MacAddress"))
    bridge = snap.cfg["OVERLAY_BRIDGE_NAME"]
    wrong = [(e["mac"], macs[e["mac"].lower()]) for e in fdb
             if e.get("ifname") == RUNNER_VXLAN and e.get("master") == bridge
             and e.get("state") != "permanent" and e.get("mac", "").lower() in macs]
    if wrong:
        return fail("container MACs learned on %s: %s (frames loop back through the host)" % (
            RUNNER_VXLAN, listed("%s (%s)" % w for w in wrong)),
            "\n".join("bridge fdb del %s dev %s master" % (m, RUNNER_VXLAN) for m, _ in wrong))
    return ok("%d container MACs, none on %s" % (len(macs), RUNNER_VXLAN))


# -- the host API -------------------------------------------------------------------------------

def check_api_health(snap):
    """PASS: GET /healthz answers {"ok": true}. FAIL: refused, timed out, other answer."""
    res = snap.api.get("health")
    url = snap.api_url("/healthz")
    fix = restart(snap) if snap.role == "host" else \
        "on the Host: systemctl status %s; check HOST_ADDRESS and HOST_PORT in %s" \
        % (SERVICES["host"], snap.cfg_path)
    if isinstance(res, str):
        return fail("host API not reachable: %s" % res, fix)
    status, body = res
    if status == 200 and isinstance(body, dict) and body.get("ok") is True:
        return ok("%s answers {\"ok\": true}" % url)
    return fail("%s answered %s %s" % (url, status, json.dumps(body)[:80]), fix)


def host_status(snap):
    """The one reading of the host's /api/overlay/status answer -> (body, None) for a 200 with a
    JSON object, else (None, the FAIL that says why)."""
    res = snap.api.get("status")
    if not isinstance(res, tuple):
        return None, fail("GET /api/overlay/status failed: %s" % res, restart(snap))
    status, body = res
    if status == 200 and isinstance(body, dict):
        return body, None
    if status == 401:
        return None, fail("the host refuses OVERLAY_TOKEN (401)", "set OVERLAY_TOKEN in %s to "
                          "the host's OVERLAY_TOKEN" % snap.cfg_path)
    return None, fail("GET /api/overlay/status answered %s %s" % (
        status, json.dumps(body)[:80]), restart(snap))


def my_allocation(snap, body):
    """This runner's entry in the host's status body (None: not listed)."""
    name = snap.runner_name()
    return next((a for a in body.get("allocations") or [] if a.get("runner_name") == name),
                None)


SETTINGS = (("vxlan_id", "OVERLAY_VXLAN_ID"), ("vxlan_port", "OVERLAY_VXLAN_PORT"),
            ("mtu", "OVERLAY_MTU"))


def check_host_status(snap):
    """FAIL: the running daemon's status differs from this config (edited, not restarted)."""
    body, bad = host_status(snap)
    if bad:
        return bad
    cfg, wrong = snap.cfg, []
    if body.get("enabled") is not True:
        wrong.append("overlay disabled in the daemon")
    want_ip = str(snap.layout.host_ip)
    if body.get("host_ip") not in (None, want_ip):
        wrong.append("host_ip %s (config %s)" % (body.get("host_ip"), want_ip))
    for key, cfg_key in SETTINGS:
        if key in body and body[key] != cfg[cfg_key]:
            wrong.append("%s %s (config %s = %s)" % (key, body[key], cfg_key, cfg[cfg_key]))
    if wrong:
        return fail("the daemon runs with other settings than %s: %s" % (
            snap.cfg_path, "; ".join(wrong)), restart(snap))
    return ok("daemon: %s allocations, %s active" % (body.get("total"), body.get("active")))


def check_runner_status(snap):
    """PASS: the host's status lists RUNNER_NAME as active. FAIL: 401, absent, inactive."""
    body, bad = host_status(snap)
    if bad:
        return bad
    name, mine = snap.runner_name(), my_allocation(snap, body)
    if mine is None:
        return fail("the host has no allocation for runner %s" % name, restart(snap))
    if not mine.get("active"):
        return fail("the host lists %s as inactive (no heartbeat)" % name, restart(snap))
    return ok("host lists %s: id %s, %s, active" % (name, mine.get("runner_id"),
                                                    mine.get("subnet")))


def check_settings(snap):
    """FAIL: OVERLAY_VXLAN_ID/PORT/MTU differ from the host's status (else from the host's last
    answer kept in the state file). Works before registration too: a mismatch is exactly what
    makes the host refuse to register this runner (409)."""
    cfg, alloc = snap.cfg, snap.alloc or {"source": "none"}
    body = host_status(snap)[0] or {}
    host = {}
    n = alloc.get("runner_id")
    if alloc.get("vni") and n:
        host["vxlan_id"] = alloc["vni"] - n
    for key in ("vxlan_port", "mtu"):
        if alloc.get(key):
            host[key] = alloc[key]
    source = "the host's last answer (%s)" % alloc["source"]
    if any(key in body for key, _ in SETTINGS):
        host.update((k, body[k]) for k, _ in SETTINGS if k in body)
        source = "the host's status"
    if not host:
        raise Skip("the host's settings are unknown")
    wrong = [(cfg_key, cfg[cfg_key], host[key]) for key, cfg_key in SETTINGS
             if key in host and host[key] != cfg[cfg_key]]
    if not wrong and not snap.alloc and body:
        return ok("%s match the host's status" % ", ".join(
            "%s=%s" % (k, host[k]) for k, _ in SETTINGS if k in host))
    if wrong:
        return fail("%s; the host refuses registrations with these settings (409)" % "; ".join(
            "%s = %s here but %s on the host" % w for w in wrong),
            "\n".join(config_line(snap, k, h) for k, _, h in wrong) +
            "\nthen " + restart(snap))
    return ok("%s match %s" % (", ".join("%s=%s" % (k, host[k]) for k, _ in SETTINGS
                                         if k in host), source))


# -- probes and counters ------------------------------------------------------------------------

def check_ping(snap):
    """PASS: `ping -c 1 -W 1 <host overlay IP>` answers through the tunnel. FAIL: no
    answer."""
    pings = snap.need("pings")
    good, argv, detail = pings["ping"]
    if good:
        return ok("%s answers" % pings["target"])
    return fail("%s does not answer (%s): the tunnel carries nothing" % (
        pings["target"], detail or "timeout"),
        "tcpdump -ni any udp port %d (here and on the Host) and run kohaku_overlay_check.py "
        "on the Host" % snap.cfg["OVERLAY_VXLAN_PORT"])


def check_ping_df(snap):
    """PASS: `ping -M do -s MTU-28` answers: the underlay carries a full overlay frame.
    FAIL: no answer (or "message too long")."""
    pings = snap.need("pings")
    good, argv, detail = pings["df"]
    mtu = (snap.alloc or {}).get("mtu") or snap.cfg["OVERLAY_MTU"]
    if good:
        return ok("%s: %d-byte packets pass unfragmented" % (argv, mtu))
    return fail("%s failed (%s): the underlay cannot carry %d + %d bytes" % (
        argv, detail or "timeout", mtu, VXLAN_OVERHEAD),
        "OVERLAY_MTU = <underlay MTU - %d> in host_config.py and every runner_config.py, "
        "then restart them" % VXLAN_OVERHEAD)


def check_underlay_mtu(snap):
    """FAIL: OVERLAY_MTU > the MTU of the route to a tunnel peer - 50 (e.g. 1450 over a
    1450 underlay): large packets vanish while pings work."""
    routes = snap.need("routes")
    mtu = snap.cfg["OVERLAY_MTU"]
    remotes = set()
    for dev in snap.vxlan_devices():
        remote = vxlan_info(snap.links[dev]).get("remote")
        if remote and not loopback(remote):
            remotes.add(remote)
    if not remotes and snap.role == "runner" and is_ipv4(snap.cfg["HOST_ADDRESS"]):
        remotes.add(snap.cfg["HOST_ADDRESS"])
    if not remotes:
        raise Skip("no tunnel peer to route to")
    worst, table = None, route_table(routes)
    for remote in remotes:
        route = route_lookup(table, remote)
        limit = route_mtu(route, snap.links) if route else None
        if limit and (worst is None or limit < worst[0]):
            worst = (limit, remote, route.get("dev"))
    if worst is None:
        raise Skip("no route to the tunnel peers")
    limit, remote, dev = worst
    if mtu > limit - VXLAN_OVERHEAD:
        return fail("OVERLAY_MTU %d > %d - %d (route to %s via %s): large packets are dropped" % (
            mtu, limit, VXLAN_OVERHEAD, remote, dev),
            "OVERLAY_MTU = %d in host_config.py and every runner_config.py, then restart them"
            % (limit - VXLAN_OVERHEAD))
    return ok("OVERLAY_MTU %d <= %d - %d (underlay %s)" % (mtu, limit, VXLAN_OVERHEAD, dev))


def check_rp_filter(snap):
    """PASS: rp_filter 0 or 2 on every overlay interface. WARN: 1 (strict; the kernel uses the
    max of conf.all and the interface), which drops packets whose reply route differs."""
    all_val = snap.sysctl.get("net.ipv4.conf.all.rp_filter") or 0
    strict = [i for i in snap.overlay_ifaces()
              if max(all_val, snap.sysctl.get("net.ipv4.conf.%s.rp_filter" % i) or 0) == 1]
    if not strict:
        return ok("rp_filter loose or off on %s" % (listed(snap.overlay_ifaces()) or "-"))
    fix = ["sysctl -w net.ipv4.conf.all.rp_filter=2"] if all_val == 1 else []
    fix += ["sysctl -w net.ipv4.conf.%s.rp_filter=2" % i for i in strict[:MAX_LISTED]]
    return warn("strict rp_filter (1) on %s drops overlay packets whose reply route leaves "
                "another interface" % listed(strict), "\n".join(fix))


def active_devices(snap):
    """Host: the vxkr devices of runners the daemon lists as active (None: unknown)."""
    body = host_status(snap)[0]
    if body is None:
        return None
    return set(a.get("vxlan_device") or vxkr_name(a.get("runner_id", 0) or 1)
               for a in body.get("allocations") or [] if a.get("active"))


def check_vxlan_traffic(snap):
    """FAIL: tx grew between the two samples while rx is 0 (the runner's ping went out and
    nothing came back). WARN: the same where the host cannot tell whether the runner is active,
    or tx >= 10 and rx 0. A host does not count tunnels of inactive runners (a runner that is
    down receives nothing, and new devices send IPv6 neighbour discovery on their own)."""
    devs = snap.vxlan_devices()
    if not devs:
        raise Skip("no VXLAN device")
    second = snap.need("links2")
    active = active_devices(snap) if snap.role == "host" else set(devs)
    skipped = 0
    if active is not None:
        skipped = len(devs) - len([d for d in devs if d in active])
        devs = [d for d in devs if d in active]
    growing, silent = [], []
    for dev in devs:
        rx1, tx1 = counters(snap.links[dev])
        rx2, tx2 = counters(second.get(dev, snap.links[dev]))
        if rx2 == 0 and tx2 > tx1:
            growing.append("%s (tx %d -> %d, rx 0)" % (dev, tx1, tx2))
        elif rx2 == 0 and tx2 >= 10:
            silent.append("%s (tx %d, rx 0)" % (dev, tx2))
    port = snap.cfg["OVERLAY_VXLAN_PORT"]
    fix = ("open UDP %d between the two nodes (iptables/firewalld/security group); watch "
           "with: tcpdump -ni any udp port %d" % (port, port))
    if growing and active is not None:
        return fail("%s: sending but nothing comes back, UDP %d is blocked on the path" % (
            listed(growing), port), fix)
    if growing or silent:
        return warn("%s: nothing received, UDP %d may be blocked on the path" % (
            listed(growing + silent), port), fix)
    note = " (%d tunnels of inactive runners not counted)" % skipped if skipped else ""
    if not devs:
        return ok("no active runner's tunnel to watch%s" % note)
    return ok("%s receiving%s" % (listed(devs), note))


def check_udp_csum(snap):
    """WARN: Udp InCsumErrors > 0. FAIL: rising during the run. Names the pre-5.7 bug."""
    before = (snap.snmp1.get("Udp") or {}).get("InCsumErrors")
    after = (snap.snmp2.get("Udp") or {}).get("InCsumErrors")
    if after is None:
        raise Skip("/proc/net/snmp has no Udp InCsumErrors")
    if not after:
        return ok("Udp InCsumErrors 0")
    old = kernel_older(snap.kernel, 5, 7)
    why = (" (kernel %s < 5.7 has the VXLAN checksum offload bug)" % snap.kernel) if old else \
        " (kernel %s is past the < 5.7 VXLAN checksum offload bug: a sender sends bad " \
        "checksums)" % snap.kernel
    fix = ("ethtool -K %s tx-checksum-ip-generic off (or upgrade the kernel to 5.7+)" %
           (RUNNER_VXLAN if snap.role == "runner" else "vxkrN")) if old else \
        "find the sender: tcpdump -vv -ni any udp port %d | grep -i 'bad udp cksum'" % \
        snap.cfg["OVERLAY_VXLAN_PORT"]
    if before is not None and after > before:
        return fail("Udp InCsumErrors rising (%d -> %d)%s" % (before, after, why), fix)
    return warn("Udp InCsumErrors %d%s" % (after, why), fix)


# -- direct routing (runner) ---------------------------------------------------------------------

def direct_expected(snap):
    """(on, peers without this runner, version, source): the Host's peer table when it serves
    one (GET /api/overlay/peers), else what the runner's state file last kept; with encryption
    only the peers it carries a key for (mesh_peer)."""
    state = snap.state if isinstance(snap.state, dict) else {}
    res = snap.api.get("peers")
    if isinstance(res, tuple) and res[0] == 200 and isinstance(res[1], dict) and \
            isinstance(res[1].get("peers"), list):
        body, source = res[1], "the host's peer table"
        on = bool(body.get("version"))
    else:
        body = state.get("peers") if isinstance(state.get("peers"), dict) else {}
        on, source = state.get("direct_routing") is True, "the runner's state file"
    name = snap.runner_name()
    peers = [p for p in body.get("peers") or [] if isinstance(p, dict) and
             p.get("runner_name") != name and is_ipv4(str(p.get("physical_ip"))) and
             mesh_peer(snap, p)]
    return on, peers, body.get("version"), source


def mesh_peer(snap, peer):
    """With encryption a peer goes direct over kohaku-wg when the table carries its key and
    tunnel address (the runner's rule); without, every peer does."""
    if not snap.encrypted():
        return True
    return bool(WG_KEY_RE.match(str(peer.get("wg_public_key")))) and \
        is_ipv4(str(peer.get("wg_ip")))


def direct_paths(snap):
    """{peer name: {"path", "since"}} as the runner's serve last saved them."""
    state = snap.state if isinstance(snap.state, dict) else {}
    return dict((n, p) for n, p in (state.get("paths") or {}).items() if isinstance(p, dict))


def net_address(subnet):
    return str(ipaddress.IPv4Network(subnet, strict=False).network_address)


def check_direct_device(snap):
    """PASS: direct routing is off and vxdirect0 absent, or on and vxdirect0 right. FAIL:
    vxdirect0 missing while it is on, left over while it is off, or not VXLAN on the node-0 VNI
    and port, learning off, up, with the subnet's network address /32."""
    on, _, _, source = direct_expected(snap)
    dev = snap.links.get(DIRECT_DEVICE)
    if not on:
        if dev is not None:
            return fail("%s exists but direct routing is off (%s)" % (DIRECT_DEVICE, source),
                        restart(snap))
        return ok("direct routing is off (OVERLAY_DIRECT_ROUTING on the host): no %s" %
                  DIRECT_DEVICE)
    if dev is None:
        return fail("direct routing is on (%s) but %s does not exist" % (source, DIRECT_DEVICE),
                    restart(snap))
    info = (dev.get("linkinfo") or {})
    data = info.get("info_data") or {}
    want_addr = "%s/32" % net_address(snap.alloc["subnet"]) if (snap.alloc or {}).get(
        "subnet") else None
    problems = []
    if info.get("info_kind") != "vxlan":
        problems.append("is a %s, not VXLAN" % (info.get("info_kind") or "device"))
    if data.get("id") != snap.cfg["OVERLAY_VXLAN_ID"]:
        problems.append("VNI %s (want %s)" % (data.get("id"), snap.cfg["OVERLAY_VXLAN_ID"]))
    if data.get("port") != snap.cfg["OVERLAY_VXLAN_PORT"]:
        problems.append("port %s (want %s)" % (data.get("port"), snap.cfg["OVERLAY_VXLAN_PORT"]))
    if data.get("learning"):
        problems.append("learning on")
    if "UP" not in (dev.get("flags") or []):
        problems.append("down")
    if want_addr and want_addr not in ipv4_addrs(dev):
        problems.append("no address %s" % want_addr)
    if problems:
        return fail("%s: %s" % (DIRECT_DEVICE, ", ".join(problems)), restart(snap))
    return ok("%s: VNI %s, port %s, learning off, up%s" % (
        DIRECT_DEVICE, data.get("id"), data.get("port"), ", " + want_addr if want_addr else ""))


def check_direct_peers(snap):
    """PASS: per peer of the host's table, vxdirect0 holds the /32 route to its address, the
    subnet route (unless the peer is relayed), a permanent neighbour with its MAC and an FDB
    entry to its physical IP (its tunnel address with encryption), and nothing for runners not
    in the table. FAIL: what differs."""
    on, peers, version, source = direct_expected(snap)
    if not on:
        return ok("direct routing is off: no peers")
    routes = dict((r.get("dst"), r) for r in snap.need("routes") if r.get("dev") == DIRECT_DEVICE)
    facts = snap.need("direct") or {}
    neigh = dict((n.get("dst"), n) for n in facts.get("neigh") or [])
    fdb = dict((e.get("mac"), e.get("dst")) for e in facts.get("fdb") or [] if e.get("dst"))
    paths = direct_paths(snap)
    wrong, wanted_routes = [], set()
    for p in peers:
        addr, mac = net_address(p["subnet"]), p.get("vtep_mac")
        wanted_routes.add(addr)
        missing = []
        if addr not in routes:
            missing.append("the route to %s" % addr)
        if (paths.get(p["runner_name"]) or {}).get("path") != "relayed":
            wanted_routes.add(p["subnet"])
            r = routes.get(p["subnet"]) or {}
            if r.get("gateway") != addr:
                missing.append("the route %s via %s" % (p["subnet"], addr))
        n = neigh.get(addr) or {}
        if n.get("lladdr") != mac or "PERMANENT" not in (n.get("state") or []):
            missing.append("the permanent neighbour %s %s" % (addr, mac))
        dst = p["wg_ip"] if snap.encrypted() else p["physical_ip"]   # VXLAN inside kohaku-wg
        if fdb.get(mac) != dst:
            missing.append("the FDB entry %s dst %s" % (mac, dst))
        if missing:
            wrong.append("%s lacks %s" % (p["runner_name"], ", ".join(missing)))
    stale = sorted(set(routes) - wanted_routes) + sorted(
        set(fdb) - set(p.get("vtep_mac") for p in peers))
    if stale:
        wrong.append("stale entries for runners not in the table: %s" % listed(stale))
    if wrong:
        return fail("%s does not match %s (version %s): %s" % (
            DIRECT_DEVICE, source, version, "; ".join(wrong)), restart(snap))
    return ok("%d peer(s): routes, neighbours and FDB match %s (version %s)" % (
        len(peers), source, version))


def check_direct_paths(snap):
    """PASS: every peer is reached directly. WARN: peers reached only through the host, named
    with the likely cause (UDP to the VXLAN port, or with encryption the WireGuard port,
    blocked between the two runners)."""
    on, peers, _, _ = direct_expected(snap)
    if not on:
        return ok("direct routing is off: every runner is reached through the host")
    paths = direct_paths(snap)
    relayed = [p for p in peers if (paths.get(p["runner_name"]) or {}).get("path") == "relayed"]
    if not relayed:
        return ok("all %d peer(s) reached directly" % len(peers))
    me = (snap.alloc or {}).get("physical_ip") or snap.cfg["RUNNER_ADDRESS"] or "this runner"
    port = wg_port(snap) if snap.encrypted() else snap.cfg["OVERLAY_VXLAN_PORT"]
    since = paths[relayed[0]["runner_name"]].get("since")
    return warn("%s reached only through the host%s: the direct path does not answer, likely "
                "UDP %d blocked between %s and %s" % (
                    listed("%s (%s)" % (p["runner_name"], p["physical_ip"]) for p in relayed),
                    time.strftime(" since %H:%M:%S UTC", time.gmtime(since)) if since else "",
                    port, me, listed(p["physical_ip"] for p in relayed)),
                "open UDP %d in both directions between %s and %s (host firewall, security "
                "group, site firewall); the runner goes direct again within 5 s" % (
                    port, me, listed(p["physical_ip"] for p in relayed)))


# -- the registry -------------------------------------------------------------------------------
# One row per check, in the order they run; a check runs after the checks it needs (a FAIL or
# SKIP of one of those makes it SKIP). Row(name, title, function, roles=BOTH, needs=()); where
# the roles differ, name, title, function or needs is {"host": ..., "runner": ...}.

CHECKS = [
    Row("config.file", "config file readable", check_config_file),
    Row("config.enabled", "OVERLAY_ENABLED is True", check_enabled),
    Row("reachable_address", "HOST_REACHABLE_ADDRESS is a local, non-loopback address",
        check_reachable_address, HOST),
    Row("host_address", "HOST_ADDRESS is set and not loopback", check_host_address, RUNNER),
    Row("ip_forward", "net.ipv4.ip_forward is 1", check_ip_forward),
    Row("kohaku_host.present", "kohaku-host exists and is up", check_kohaku_host, HOST),
    Row("kohaku_host.address", "kohaku-host holds the host overlay IP",
        check_kohaku_host_address, HOST, needs=("kohaku_host.present",)),
    Row("state_file", "state file parses and is mode 0600", check_state_file, HOST),
    Row("tunnels", "every allocation has its vxkr device", check_tunnels, HOST,
        needs=("state_file",)),
    Row("allocation", "this runner holds an allocation", check_allocation, RUNNER),
    Row("cidr_overlap", "the overlay CIDR holds no route, address or nameserver not its own",
        check_cidr_overlap, needs={"host": (), "runner": ("allocation",)}),
    Row("vxlan0.present", "vxlan0 exists", check_vxlan0_present, RUNNER),
    *vxlan_field_rows(),
    Row("bridge.present", "the overlay bridge exists and is up", check_bridge, RUNNER),
    Row("bridge.gateway", "the bridge holds the runner subnet's gateway", check_bridge_gateway,
        RUNNER, needs=("bridge.present", "allocation")),
    Row("bridge.vxlan0", "vxlan0 is enslaved to the bridge", check_bridge_vxlan0, RUNNER,
        needs=("bridge.present", "vxlan0.present")),
    Row("route", "the overlay CIDR routes via the host's address on the bridge", check_route,
        RUNNER, needs=("bridge.present", "allocation")),
    Row("forward_rules", "FORWARD accepts the overlay CIDR ahead of any DROP/REJECT",
        check_forward_rules),
    Row("nat", "POSTROUTING masquerades overlay traffic leaving the overlay", check_nat, RUNNER,
        needs=("allocation",)),
    Row("vxlan_port", "UDP to the VXLAN port is accepted from the peers",
        {"host": check_host_vxlan_port, "runner": check_runner_vxlan_port}),
    Row("wg.interface", "kohaku-wg is up (kernel WireGuard or wireguard-go)", check_wg_interface),
    Row("wg.peers", "kohaku-wg's peers and keys are the host's view", check_wg_peers,
        needs=("wg.interface",)),
    Row("wg.handshake", "every WireGuard peer handshook recently", check_wg_handshake,
        needs=("wg.interface",)),
    Row("iptables.backends", "overlay rules live in one iptables backend only", check_backends),
    Row("nftables", "no native nftables chain drops overlay traffic", check_nftables),
    Row("firewalld.trusted", "overlay interfaces are in firewalld's trusted zone",
        check_firewalld_trusted),
    Row("firewalld.vxlan_port", "firewalld lets UDP to the VXLAN port in from the peers",
        check_firewalld_port),
    Row("docker.network", "the Docker network matches the allocation", check_docker_network,
        RUNNER, needs=("allocation",)),
    Row("fdb", "container MACs are learned on their veths, not vxlan0", check_fdb, RUNNER,
        needs=("bridge.present",)),
    Row("api.health", "the host API answers /healthz", check_api_health),
    Row("api.status", {"host": "the running host daemon uses this config",
                       "runner": "the host lists this runner, active"},
        {"host": check_host_status, "runner": check_runner_status}, needs=("api.health",)),
    Row("settings", "VNI base, port and MTU match the host's", check_settings, RUNNER),
    Row("ping", "the host overlay IP answers a ping", check_ping, RUNNER,
        needs=("allocation", "vxlan0.present")),
    Row("ping_df", "a don't-fragment ping at the MTU gets through", check_ping_df, RUNNER,
        needs=("ping",)),
    Row("underlay_mtu", "OVERLAY_MTU fits the underlay route's MTU minus 50", check_underlay_mtu),
    Row("rp_filter", "no strict rp_filter on overlay interfaces", check_rp_filter),
    Row("vxlan_traffic", "VXLAN devices receive what they send", check_vxlan_traffic),
    Row("udp_csum", "no UDP checksum errors", check_udp_csum),
    Row("direct.device", "vxdirect0 matches the host's direct routing switch",
        check_direct_device, RUNNER, needs=("allocation",)),
    Row("direct.peers", "vxdirect0's routes, neighbours and FDB match the host's peer table",
        check_direct_peers, RUNNER, needs=("direct.device",)),
    Row("direct.paths", "every peer is reached directly, not only through the host",
        check_direct_paths, RUNNER, needs=("direct.device",)),
]
REGISTRY = [c for role in BOTH for row in CHECKS for c in row.checks() if c.role == role]


# ---- the check runner and reporters ----------------------------------------------------------

class Outcome(object):
    __slots__ = ("id", "title", "status", "detail", "fix")

    def __init__(self, id, title, status, detail, fix=None):
        self.id, self.title, self.status, self.detail, self.fix = id, title, status, detail, fix

    def as_dict(self):
        return {"id": self.id, "title": self.title, "status": self.status,
                "detail": self.detail, "fix": self.fix}


def select(role, only=(), ignore=()):
    """Validate --only/--ignore ids (or prefixes) against the registry."""
    ids = [c.id(role) for c in checks_for(role)]
    for want in list(only) + list(ignore):
        if not any(i == want or i.startswith(want + ".") for i in ids):
            raise ConfigError("unknown check id %s for the %s role; see --list" % (want, role))
    return ids


def matches(check_id, patterns):
    return any(check_id == p or check_id.startswith(p + ".") for p in patterns)


def run_checks(snap, only=(), ignore=()):
    """Run the registry in order; prerequisites gate, crashes are FAIL, others still run."""
    done, out = {}, []
    for c in checks_for(snap.role):
        cid = c.id(snap.role)
        needs = ["%s.%s" % (snap.role, n) for n in c.needs]
        failed = [n for n in needs if done.get(n, PASS) in (FAIL, SKIP)]
        if failed:
            res = Outcome(cid, c.title, SKIP, "needs %s" % ", ".join(failed))
        else:
            try:
                status, detail, fix = c.func(snap)
            except Skip as e:
                status, detail, fix = SKIP, str(e), None
            except Exception as e:  # a buggy check must not hide the others
                status, detail, fix = FAIL, "check crashed: %s: %s" % (
                    type(e).__name__, e), "report this with the --bundle archive"
            res = Outcome(cid, c.title, status, detail, fix)
        done[cid] = res.status
        if res.status == FAIL and matches(cid, ignore):
            res.status, res.detail = WARN, res.detail + " (ignored)"
        if not only or matches(cid, only):
            out.append(res)
    return out


def summary(results):
    count = dict((s, sum(1 for r in results if r.status == s)) for s in (PASS, WARN, FAIL, SKIP))
    return {"passed": count[PASS], "warnings": count[WARN], "failed": count[FAIL],
            "skipped": count[SKIP]}


def summary_line(s):
    return "%d passed, %d warnings, %d failed, %d skipped" % (
        s["passed"], s["warnings"], s["failed"], s["skipped"])


def format_report(snap, results):
    lines = ["kohaku-overlay check %s: role %s, config %s" % (
        __version__, snap.role, snap.cfg_path)]
    width = max([len(r.id) for r in results] or [0])
    for r in results:
        lines.append("[%s] %-*s  %s" % (r.status, width, r.id, r.detail))
        if r.fix:
            fix_lines = r.fix.splitlines()
            lines.append("       fix: " + fix_lines[0])
            lines.extend("            " + f for f in fix_lines[1:])
    lines.append(summary_line(summary(results)))
    return "\n".join(lines) + "\n"


def escape_label_value(value):
    """A label value in the text exposition format: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(families):
    """[(name, type, help, [(labels dict, value)])] -> Prometheus text exposition format."""
    lines = []
    for name, kind, text, samples in families:
        lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
        for labels, value in samples:
            pairs = ",".join('%s="%s"' % (k, escape_label_value(v))
                             for k, v in sorted(labels.items()))
            lines.append("%s{%s} %s" % (name, pairs, repr(value)))
    return "".join(line + "\n" for line in lines)


def format_prometheus(snap, results, now=None):
    """One series per check, its status as a label (value always 1), and counts per status."""
    role, counts = {"role": snap.role}, summary(results)
    words = {PASS: "passed", WARN: "warnings", FAIL: "failed", SKIP: "skipped"}
    return render_metrics([
        ("kohaku_overlay_check_status", "gauge",
         "1 for each check with its status (PASS, WARN, FAIL, SKIP) as the status label.",
         [(dict(role, check=r.id, status=r.status), 1) for r in results]),
        ("kohaku_overlay_check_results", "gauge", "Checks by status in the last run.",
         [(dict(role, status=st), counts[words[st]]) for st in (PASS, WARN, FAIL, SKIP)]),
        ("kohaku_overlay_check_last_run_timestamp_seconds", "gauge",
         "Unix time the checks ran.", [(role, round(time.time() if now is None else now, 3))]),
        ("kohaku_overlay_check_info", "gauge", "The check script's version (always 1).",
         [(dict(role, version=__version__), 1)])])


def format_json(snap, results):
    s = summary(results)
    return json.dumps({"version": __version__, "role": snap.role, "config": snap.cfg_path,
                       "results": [r.as_dict() for r in results], "summary": s,
                       "exit_code": 1 if s["failed"] else 0}, indent=2) + "\n"


# ---- the bundle -------------------------------------------------------------------------------

def redact(text, token):
    out = []
    for line in text.splitlines(True):
        if line.lstrip().startswith("OVERLAY_TOKEN"):
            line = line.split("=", 1)[0] + '= "<redacted>"\n'
        out.append(line)
    text = "".join(out)
    return text.replace(token, "<redacted>") if token else text


def bundle_commands(snap):
    cmds = [("ip-link.txt", ["ip", "-d", "-s", "link", "show"]),
            ("ip-addr.txt", ["ip", "addr", "show"]),
            ("ip-route.txt", ["ip", "route", "show", "table", "all"]),
            ("ip-rule.txt", ["ip", "rule", "show"]),
            ("bridge-fdb.txt", ["bridge", "fdb", "show"])]
    if snap.role == "runner":
        cmds.append(("docker-network-ls.txt", ["docker", "network", "ls"]))
    if which("journalctl"):
        cmds.append(("journal.txt", ["journalctl", "-u", SERVICES[snap.role], "-n", "300",
                                     "--no-pager"]))
    return cmds


def write_bundle(path, snap, report, report_json):
    token = snap.cfg.get("OVERLAY_TOKEN") or ""
    files = dict(snap.raw)
    files["report.txt"] = report
    files["report.json"] = report_json
    status = snap.api.get("status")
    if isinstance(status, tuple):
        files["host-status.json"] = json.dumps(status[1], indent=2)
    if snap.cfg_found:
        try:
            files[os.path.basename(snap.cfg_path)] = read_text(snap.cfg_path)
        except OSError as e:
            files["config-error.txt"] = str(e)
    files["sysctl.txt"] = "".join("%s = %s\n" % kv for kv in sorted(snap.sysctl.items()))
    files["snmp.txt"] = read_proc("/proc/net/snmp")
    files["uname.txt"] = " ".join(os.uname()) + "\n"
    for name, argv in bundle_commands(snap):
        try:
            res = run(argv, check=False)
            files[name] = res.out + (("\n# stderr:\n" + res.err) if res.err.strip() else "")
        except OverlayError as e:
            files[name] = "# %s\n" % e
    top = "kohaku-overlay-%s-%s" % (socket.gethostname(), time.strftime("%Y%m%dT%H%M%S"))
    try:
        with tarfile.open(path, "w:gz") as tar:
            for name in sorted(files):
                data = redact(files[name], token).encode("utf-8")
                info = tarfile.TarInfo("%s/%s" % (top, name))
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
                tar.addfile(info, io.BytesIO(data))
        os.chmod(path, 0o600)
    except OSError as e:
        raise OverlayError("cannot write the bundle %s: %s; choose another path" % (
            path, e.strerror or e))


# ---- CLI --------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(
        prog="kohaku_overlay_check.py",
        description="Check a kohaku-overlay Host or Runner and print the fix for each problem.")
    p.add_argument("--role", choices=("host", "runner"))
    p.add_argument("--config", metavar="F", help="the daemon's config file")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--prometheus", action="store_true",
                     help="print the Prometheus text format (for node_exporter's textfile "
                     "collector)")
    p.add_argument("--bundle", metavar="FILE.tar.gz", help="write a diagnostics archive")
    p.add_argument("--only", metavar="ID,...", default="", help="run only these checks")
    p.add_argument("--ignore", metavar="ID,...", default="", help="report these FAILs as WARN")
    p.add_argument("--list", action="store_true", help="list the check ids and exit")
    p.add_argument("--version", action="version", version=__version__)
    return p


def default_config(role):
    return os.path.expanduser(os.path.join(CONFIG_DIR, CONFIG_FILES[role]))


def role_from_devices(links):
    if HOST_DEVICE in links or any(vxkr_id(n) for n in links):
        return "host"
    if RUNNER_VXLAN in links:
        return "runner"
    return None


def guess_role(text, path):
    """Role of an explicit --config file: by its keys, then by its name."""
    try:
        names = [n.targets[0].id if isinstance(n, ast.Assign) else n.target.id
                 for n in ast.parse(text).body if isinstance(n, (ast.Assign, ast.AnnAssign))
                 and isinstance(n.targets[0] if isinstance(n, ast.Assign) else n.target,
                                ast.Name)]
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        names = []
    # (not OVERLAY_SUBNET: KohakuRiver's own runner_config.py has it too)
    if set(names) & {"HOST_REACHABLE_ADDRESS", "OVERLAY_HOST_IP", "HOST_BIND_IP",
                     "OVERLAY_VXLAN_SOURCE_FILTER"}:
        return "host"
    if set(names) & {"HOST_ADDRESS", "RUNNER_NAME", "RUNNER_ADDRESS", "OVERLAY_NETWORK_NAME"}:
        return "runner"
    base = os.path.basename(path)
    return "runner" if "runner" in base else "host" if "host" in base else None


def load_config(role, path, explicit):
    try:
        text = read_text(path)
    except FileNotFoundError:
        if explicit:
            raise ConfigError("config file %s does not exist; pass the right --config" % path)
        return config_with_defaults({}, role), False, [], []
    except OSError as e:
        raise ConfigError("cannot read %s (%s); run as root or pass --config" % (
            path, e.strerror or e))
    except UnicodeDecodeError as e:
        raise ConfigError("%s is not UTF-8 text (byte 0x%02x at offset %d); save it as UTF-8" % (
            path, bytearray(e.object[e.start:e.start + 1] or b"\0")[0], e.start))
    values, warnings, ignored = parse_config(text, path, role)
    return config_with_defaults(values, role), True, warnings, ignored


def resolve_role(args, links):
    """--role, else the config file present, else the devices present."""
    if args.role:
        return args.role, args.config or default_config(args.role)
    if args.config:
        try:
            text = read_text(args.config)
        except (OSError, ValueError):
            text = ""
        role = guess_role(text, args.config) or role_from_devices(links)
        if role is None:
            raise ConfigError("cannot tell whether %s is a host or a runner config: pass "
                              "--role host or --role runner" % args.config)
        return role, args.config
    present = [r for r in ("host", "runner") if os.path.exists(default_config(r))]
    role = present[0] if len(present) == 1 else role_from_devices(links)
    if role is None and present:
        role = present[0]
    if role is None:
        raise ConfigError("cannot tell whether this node is the host or a runner (no config "
                          "file, no overlay device): pass --role host or --role runner")
    return role, default_config(role)


def split_ids(text):
    return [s.strip() for s in text.split(",") if s.strip()]


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 2
    try:
        if args.list:
            roles = [args.role] if args.role else ["host", "runner"]
            for role in roles:
                for c in checks_for(role):
                    print("%-32s %s" % (c.id(role), c.title))
            return 0
        links_error = None
        try:
            links, links_text = read_links()
        except (OverlayError, ValueError) as e:
            links, links_text, links_error = {}, "", str(e)
        role, path = resolve_role(args, links)
        only, ignore = split_ids(args.only), split_ids(args.ignore)
        select(role, only, ignore)
        cfg, found, warnings, ignored = load_config(role, path, bool(args.config))
        snap = Snapshot(role, cfg, path, found, warnings, ignored)
        if links_error:
            snap.lost("links", links_error)
        gather(snap, links, links_text)
        results = run_checks(snap, only, ignore)
        report, report_json = format_report(snap, results), format_json(snap, results)
        sys.stdout.write(report_json if args.json else
                         format_prometheus(snap, results) if args.prometheus else report)
        if args.bundle:
            write_bundle(args.bundle, snap, report, report_json)
            sys.stderr.write("bundle written to %s\n" % args.bundle)
        return 1 if summary(results)["failed"] else 0
    except ConfigError as e:
        sys.stderr.write("error: %s\n" % e)
        return 2
    except OverlayError as e:
        sys.stderr.write("error: %s\n" % e)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # last resort: one line, never a traceback
        sys.stderr.write("internal error: %r\n" % (e,))
        return 1


if __name__ == "__main__":
    sys.exit(main())
