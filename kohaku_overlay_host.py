#!/usr/bin/env python3
"""kohaku-overlay host: the hub of a hub-and-spoke VXLAN overlay for a container cluster.

One Host routes between up to 255 Runners. Each runner N gets the subnet 10.N.0.0/16 (by
default) and a point-to-point VXLAN tunnel to the host (`vxkr<base36 N>` here, `vxlan0` there).
Runners register over a small JSON HTTP API; the host allocates ids, builds the tunnels, keeps
the FORWARD rules, the firewalld trusted zone and the VXLAN source filter in place, and
persists every allocation so that a restart (or a crash) never costs a tunnel.

Usage:
    kohaku_overlay_host.py serve   [--config F] [--dry-run]
    kohaku_overlay_host.py status  [--config F] [--json] [--ascii]
    kohaku_overlay_host.py release NAME [--config F] [--yes]
    kohaku_overlay_host.py cleanup [--config F] [--yes]
    kohaku_overlay_host.py down    [--config F] [--dry-run]

Exit codes: 0 success, 1 failure (an API error, a command that failed), 2 bad usage or config.

Files: the config (~/.kohakuriver/host_config.py), the state file (OVERLAY_STATE_FILE,
default /var/lib/kohakuriver/overlay-state.json), its lock `<state>.lock` (held around every
read-modify-write) and `<state>.serve.lock` (held by `serve` for its whole life); with
OVERLAY_ENCRYPTION = "wireguard" the host's WireGuard key pair `<state>-wg.key` (mode 0600) and
`<state>-wg.pub`, and the interface kohaku-wg.
"""

import argparse
import ast
import collections
import difflib
import errno
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import queue
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from urllib.parse import unquote

__version__ = "0.1.0"

log = logging.getLogger("kohaku-overlay-host")

# ---------------------------------------------------------------------------------------------
# Constants and defaults
# ---------------------------------------------------------------------------------------------

DEFAULT_CONFIG = "~/.kohakuriver/host_config.py"

# name -> (type, default). The one place the host's configuration is described.
CONFIG_KEYS = collections.OrderedDict([
    ("HOST_REACHABLE_ADDRESS", (str, "")),
    ("HOST_BIND_IP", (str, "0.0.0.0")),
    ("HOST_PORT", (int, 8000)),
    ("OVERLAY_ENABLED", (bool, False)),
    ("OVERLAY_BRIDGE_NAME", (str, "kohaku-overlay")),
    ("OVERLAY_HOST_IP", (str, "10.0.0.1")),
    ("OVERLAY_HOST_PREFIX", (int, None)),  # None: the layout's NETWORK_PREFIX
    ("OVERLAY_SUBNET", (str, "10.0.0.0/8/8/16")),
    ("OVERLAY_VXLAN_ID", (int, 100)),
    ("OVERLAY_VXLAN_PORT", (int, 4789)),
    ("OVERLAY_MTU", (int, 1450)),
    ("OVERLAY_STATE_FILE", (str, "/var/lib/kohakuriver/overlay-state.json")),
    ("OVERLAY_TOKEN", (str, "")),
    ("OVERLAY_INACTIVE_AFTER", (int, 30)),
    ("OVERLAY_VXLAN_SOURCE_FILTER", (bool, True)),
    ("OVERLAY_DIRECT_ROUTING", (bool, False)),
    ("OVERLAY_REPAIR_INTERVAL", (int, 10)),
    ("OVERLAY_ENCRYPTION", (str, "none")),         # "none" or "wireguard"
    ("OVERLAY_WG_PORT", (int, 51820)),
    ("OVERLAY_WG_SUBNET", (str, "172.16.0.0/23")),  # tunnel addresses: host first, runner N +N
])
# name -> (lowest, highest) accepted, checked as the file is read. The check script and the runner
# hold the same bounds for the keys they share (tests/unit/test_config_files.py); the Layout also
# bounds OVERLAY_HOST_PREFIX by NETWORK_PREFIX and OVERLAY_VXLAN_ID by the number of runners.
RANGES = {"HOST_PORT": (1, 65535), "OVERLAY_VXLAN_PORT": (1, 65535), "OVERLAY_MTU": (576, 9000),
          "OVERLAY_VXLAN_ID": (1, 2 ** 24 - 2), "OVERLAY_HOST_PREFIX": (1, 32),
          "OVERLAY_INACTIVE_AFTER": (1, 86400), "OVERLAY_REPAIR_INTERVAL": (1, 3600),
          "OVERLAY_WG_PORT": (1, 65535)}

HOST_DEVICE = "kohaku-host"
# IPv6 off on every device the host creates (issue 11.9): a container must not be able to send
# router advertisements into a tunnel and give the Host a route or an address.
IPV6_OFF = (("accept_ra", "0"), ("forwarding", "0"), ("disable_ipv6", "1"))
DEVICE_PREFIX = "vxkr"
RULE_COMMENT = "kohaku-overlay"
FILTER_CHAIN = "KOHAKU-VXLAN"
FILTER_LEAF = 8                 # addresses a filter chain lists before it splits in two
TRUSTED_ZONE = "trusted"
WG_DEV = "kohaku-wg"            # with encryption every VXLAN packet travels inside it
VXLAN_OVERHEAD = 50             # outer IPv4 + UDP + VXLAN + inner Ethernet
WG_OVERHEAD = 60                # IPv4 + UDP + WireGuard header and tag
WG_KEY_RE = re.compile(r"\A[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=\Z")

ADDRESS_WAIT = 30               # seconds serve waits at boot for HOST_REACHABLE_ADDRESS to appear
MAX_BODY = 64 * 1024            # a registration is a few hundred bytes
MAX_HEADER = 16 * 1024
REQUEST_DEADLINE = 5.0          # seconds a client gets to send its whole request
MAX_CONNECTIONS = 1024          # open connections (less when the fd limit is lower)
MAX_WORKERS = 32                # threads that run handlers (registration waits on a commit)
MAX_PENDING = 512               # complete requests waiting for a worker; more get 503
MAX_PER_SOURCE = 16             # open connections from one address (a runner needs one or two)
REFUSALS_LOGGED = 20            # refused requests logged per REFUSAL_WINDOW, the rest counted
REFUSAL_WINDOW = 60.0

# After a restart the host has heard nobody: an allocation not heard from since the start counts
# as possibly alive for GRACE_FACTOR * OVERLAY_INACTIVE_AFTER (a live runner heartbeats within
# OVERLAY_INACTIVE_AFTER, so two of them cover a slow one), and eviction takes only allocations
# unseen for EVICT_FACTOR * OVERLAY_INACTIVE_AFTER (5 minutes by default), never merely Inactive.
GRACE_FACTOR = 2
EVICT_FACTOR = 10

NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
STATE_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class OverlayError(Exception):
    """An error the operator can act on: printed as one sentence, exit 1."""
    exit_code = 1


class ConfigError(OverlayError):
    """Bad configuration or usage: exit 2."""
    exit_code = 2


class CommandError(OverlayError):
    """An external command failed; carries its argv, exit code and stderr."""

    def __init__(self, argv, returncode, stderr):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = (stderr or "").strip()
        detail = self.stderr.splitlines()[-1] if self.stderr else "no error output"
        super(CommandError, self).__init__(
            "`{}` failed with exit code {}: {}".format(
                " ".join(shlex.quote(a) for a in argv), returncode, detail))


class ApiError(Exception):
    """An HTTP error answer: status and one sentence."""

    def __init__(self, status, message):
        super(ApiError, self).__init__(message)
        self.status = int(status)
        self.message = message


# ---------------------------------------------------------------------------------------------
# The command wrapper: the only door to subprocess
# ---------------------------------------------------------------------------------------------

DRY_RUN = False
PACKAGES = {"ip": "iproute2", "bridge": "iproute2", "iptables": "iptables",
            "iptables-restore": "iptables", "firewall-cmd": "firewalld", "sysctl": "procps",
            "wg": "wireguard-tools", "wireguard-go": "wireguard-go"}
SPAWNED = [0]   # processes started, for the benchmark and the process-count tests

Result = collections.namedtuple("Result", "returncode stdout stderr")


SKIPPED = Result(0, "", "")   # what run() returns for a mutation it skipped under --dry-run


def run(argv, check=True, mutates=True, input=None, timeout=60, echo=None, write=None):
    """Run argv (a list, never a shell string) and return Result.

    Mutating commands are logged as `[#] cmd` (echo: the lines to show instead of argv, so a
    batch shows every command it carries); under --dry-run they are printed and skipped
    (the result is SKIPPED) while read-only probes (mutates=False) still run.
    write: {path: value} that argv (a `sysctl -w`) stands for, written here instead of starting
    a process; a path that does not exist is skipped (that knob is not in this kernel).
    """
    shown = " ".join(shlex.quote(a) for a in argv)
    if mutates:
        for line in [shown] if echo is None else echo:
            if DRY_RUN:
                print("[#] " + line)
            else:
                log.info("[#] %s", line)
        if DRY_RUN:
            return SKIPPED
    if write is not None:
        return _write_files(argv, write, check)
    SPAWNED[0] += 1
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                                universal_newlines=True)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise OverlayError("{} is not installed: install the {} package".format(
                argv[0], PACKAGES.get(argv[0], argv[0])))
        raise OverlayError("cannot run {}: {}".format(argv[0], exc.strerror))
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise OverlayError("`{}` did not finish within {} s".format(shown, timeout))
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, err)
    return Result(proc.returncode, out, err)


def _write_files(argv, values, check):
    for path, value in sorted(values.items()):
        try:
            with open(path, "w") as fh:
                fh.write(value)
        except (IOError, OSError) as exc:
            if exc.errno == errno.ENOENT:
                continue
            if check:
                raise CommandError(argv, 1, "cannot write {}: {}".format(path, exc.strerror))
            return Result(1, "", "cannot write {}: {}".format(path, exc.strerror))
    return Result(0, "", "")


def read_sysctl(path):
    """The value of a /proc/sys file, or None when it does not exist or cannot be read."""
    try:
        with open(path) as fh:
            return fh.read().strip()
    except (IOError, OSError):
        return None


def failpoint(name):
    """Crash here (SIGKILL, as a power cut would) when KOHAKU_OVERLAY_FAILPOINT names this point.

    Lets the fault tests kill the host at an exact step of a registration instead of racing it.
    """
    if os.environ.get("KOHAKU_OVERLAY_FAILPOINT") == name:
        log.warning("failpoint %s: killing myself", name)
        os.kill(os.getpid(), signal.SIGKILL)


def tool_exists(name):
    return shutil.which(name) is not None


# ---------------------------------------------------------------------------------------------
# Configuration: KohakuRiver-style Python files, parsed, never executed
# ---------------------------------------------------------------------------------------------


def read_config(path, keys, explicit):
    """The known keys of a config file over their defaults (see the KohakuRiver block below).

    Unknown OVERLAY_* names and near misses of ours are a warning naming the line; a missing
    default file means the defaults.
    """
    values = dict((k, d) for k, (t, d) in keys.items())
    full = os.path.expanduser(path)
    try:
        with open(full, "rb") as fh:
            source = fh.read()
    except (IOError, OSError) as exc:
        if not explicit and exc.errno == errno.ENOENT:
            log.debug("no config at %s, using defaults", full)
            return values
        raise ConfigError("cannot read config {}: {}; pass --config with a readable file".format(
            full, exc.strerror))
    spec = dict((k, ((t,), d is None)) for k, (t, d) in keys.items())
    found, warnings, _ignored = parse_config_source(source, os.path.basename(full), spec, RANGES)
    for warning in warnings:
        log.warning("%s", warning)
    values.update(found)
    return values


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


def _short(value):
    """repr() for messages: bounded, and safe for ints too long to print."""
    try:
        text = repr(value)
    except ValueError:
        return "a number too long to print"
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------
# Addressing: every overlay address comes from here
# ---------------------------------------------------------------------------------------------


class Layout(object):
    """OVERLAY_SUBNET = BASE/NETWORK_PREFIX/NODE_BITS/SUBNET_BITS, plus the host address."""

    def __init__(self, spec="10.0.0.0/8/8/16", host_ip="10.0.0.1", host_prefix=None):
        parts = spec.split("/")
        if len(parts) != 4:
            raise ConfigError("OVERLAY_SUBNET {!r} must look like BASE/NETWORK_PREFIX/NODE_BITS/"
                              "SUBNET_BITS, e.g. \"10.0.0.0/8/8/16\"".format(spec))
        try:
            prefix, node_bits, subnet_bits = (int(p) for p in parts[1:])
            self.network = ipaddress.IPv4Network("{}/{}".format(parts[0], prefix))
        except ValueError as exc:
            raise ConfigError("OVERLAY_SUBNET {!r} is not valid ({}); use e.g. "
                              "\"10.0.0.0/8/8/16\"".format(spec, exc))
        if prefix + node_bits + subnet_bits != 32 or min(node_bits, subnet_bits) < 1:
            raise ConfigError("OVERLAY_SUBNET {!r}: NETWORK_PREFIX + NODE_BITS + SUBNET_BITS must "
                              "be 32 with both bit counts at least 1".format(spec))
        if subnet_bits < 2:
            raise ConfigError("OVERLAY_SUBNET {!r}: SUBNET_BITS must be at least 2 so a runner "
                              "subnet holds a gateway and the host".format(spec))
        self.prefix, self.node_bits, self.subnet_bits = prefix, node_bits, subnet_bits
        self.max_id = (1 << node_bits) - 1
        self.subnet_prefix = prefix + node_bits
        try:
            self.host_ip = ipaddress.IPv4Address(host_ip)
        except ValueError:
            raise ConfigError("OVERLAY_HOST_IP {!r} is not an IPv4 address".format(host_ip))
        self.host_prefix = prefix if host_prefix is None else host_prefix
        if not prefix <= self.host_prefix <= 32:
            raise ConfigError("OVERLAY_HOST_PREFIX {} must be between {} and 32".format(
                _short(self.host_prefix), prefix))
        if self.host_ip not in self.network:
            raise ConfigError("OVERLAY_HOST_IP {} is outside the overlay network {}; pick an "
                              "address inside it".format(host_ip, self.network))
        if int(self.host_ip) - int(self.network.network_address) >= (1 << subnet_bits):
            raise ConfigError("OVERLAY_HOST_IP {} lies inside runner {}'s subnet; pick an "
                              "address in {} (node 0 is the host's)".format(
                                  host_ip, self.node_of(self.host_ip), self.subnet(0)))

    @property
    def cidr(self):
        return str(self.network)

    def subnet(self, n):
        base = int(self.network.network_address) + (n << self.subnet_bits)
        return ipaddress.IPv4Network((base, self.subnet_prefix))

    def node_of(self, addr):
        return (int(addr) - int(self.network.network_address)) >> self.subnet_bits

    def gateway(self, n):
        return self.subnet(n).network_address + 1

    def host_vxlan_ip(self, n):
        net = self.subnet(n)
        offset = 254 if net.num_addresses > 256 else net.num_addresses - 2
        return net.network_address + offset

    def host_vxlan_cidr(self, n):
        return "{}/{}".format(self.host_vxlan_ip(n), self.subnet_prefix)

    @staticmethod
    def device(n):
        return DEVICE_PREFIX + base36(n)

    def id_of_device(self, name):
        """vxkr<base36> -> id, or None when the name is not one of ours."""
        if not name.startswith(DEVICE_PREFIX) or len(name) == len(DEVICE_PREFIX):
            return None
        digits = name[len(DEVICE_PREFIX):]
        if not re.match(r"^[0-9a-z]+$", digits) or (len(digits) > 1 and digits[0] == "0"):
            return None
        n = int(digits, 36)
        return n if 1 <= n <= self.max_id else None

    def allocation(self, n, cfg):
        """The answer to a registration, without the runner's own fields."""
        return {
            "runner_id": n,
            "subnet": str(self.subnet(n)),
            "gateway": str(self.gateway(n)),
            "host_overlay_ip": str(self.host_ip),
            "host_vxlan_ip": str(self.host_vxlan_ip(n)),
            "host_physical_ip": cfg["HOST_REACHABLE_ADDRESS"],
            "vni": cfg["OVERLAY_VXLAN_ID"] + n,
            "vxlan_port": cfg["OVERLAY_VXLAN_PORT"],
            "mtu": cfg["OVERLAY_MTU"],
            "overlay_cidr": self.cidr,
        }


def base36(n):
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def load_settings(path, explicit):
    """Config plus layout, validated together; ConfigError on anything wrong."""
    cfg = read_config(path, CONFIG_KEYS, explicit)
    layout = Layout(cfg["OVERLAY_SUBNET"], cfg["OVERLAY_HOST_IP"], cfg["OVERLAY_HOST_PREFIX"])
    if cfg["OVERLAY_VXLAN_ID"] + layout.max_id > 0xFFFFFF:
        raise ConfigError("OVERLAY_VXLAN_ID = {} leaves no room for {} VNIs below 16777216".format(
            _short(cfg["OVERLAY_VXLAN_ID"]), layout.max_id))
    if not re.match(r"\A[\x21-\x7e]*\Z", cfg["OVERLAY_TOKEN"]):
        raise ConfigError("OVERLAY_TOKEN must be printable ASCII without spaces (it travels in an "
                          "HTTP header): generate one with `openssl rand -hex 32`")
    try:
        ipaddress.IPv4Address(cfg["HOST_BIND_IP"])
    except ValueError:
        raise ConfigError("HOST_BIND_IP {!r} is not an IPv4 address".format(cfg["HOST_BIND_IP"]))
    check_encryption(cfg, layout)
    return cfg, layout


def check_encryption(cfg, layout):
    """OVERLAY_ENCRYPTION and, when it is "wireguard", OVERLAY_WG_SUBNET and OVERLAY_WG_PORT."""
    if cfg["OVERLAY_ENCRYPTION"] not in ("none", "wireguard"):
        raise ConfigError('OVERLAY_ENCRYPTION = {} is not "none" or "wireguard"'.format(
            _short(cfg["OVERLAY_ENCRYPTION"])))
    if cfg["OVERLAY_ENCRYPTION"] != "wireguard":
        return
    try:
        net = ipaddress.IPv4Network(cfg["OVERLAY_WG_SUBNET"])
    except ValueError as exc:
        raise ConfigError('OVERLAY_WG_SUBNET {} is not an IPv4 network ({}): use e.g. '
                          '"172.16.0.0/23"'.format(_short(cfg["OVERLAY_WG_SUBNET"]), exc))
    if net.overlaps(layout.network):
        raise ConfigError("OVERLAY_WG_SUBNET {} overlaps the overlay network {}: the tunnel "
                          "addresses must lie outside it".format(net, layout.network))
    need = layout.max_id + 3     # network address, the host, every runner id, broadcast
    if net.num_addresses < need:
        raise ConfigError("OVERLAY_WG_SUBNET {} has {} addresses but the host and {} runners "
                          "need {}: use a /{} or larger".format(
                              net, net.num_addresses, layout.max_id, need,
                              32 - (need - 1).bit_length()))
    if cfg["OVERLAY_WG_PORT"] == cfg["OVERLAY_VXLAN_PORT"]:
        raise ConfigError("OVERLAY_WG_PORT = {0} is also OVERLAY_VXLAN_PORT: give WireGuard its "
                          "own port (51820)".format(cfg["OVERLAY_WG_PORT"]))


def wg_ip(cfg, n):
    """Node n's address on kohaku-wg: the host (0) takes the subnet's first, runner N the next
    N-th, so an address never moves with the order runners come in."""
    return str(ipaddress.IPv4Network(cfg["OVERLAY_WG_SUBNET"]).network_address + 1 + n)


def wg_mtu_error(overlay_mtu, underlay_mtu, dev):
    """None when OVERLAY_MTU fits VXLAN over WireGuard on the underlay, else the sentence."""
    fit = underlay_mtu - VXLAN_OVERHEAD - WG_OVERHEAD
    if overlay_mtu <= fit:
        return None
    return ("OVERLAY_MTU {} does not fit VXLAN over WireGuard on {} (MTU {} - {} - {}): set "
            "OVERLAY_MTU = {} on the Host and on every runner".format(
                overlay_mtu, dev, underlay_mtu, VXLAN_OVERHEAD, WG_OVERHEAD, fit))


# ---------------------------------------------------------------------------------------------
# Parsers: pure functions over tool output
# ---------------------------------------------------------------------------------------------

Link = collections.namedtuple("Link", "name kind up mtu vni local remote port learning addrs mac")
Link.__new__.__defaults__ = (None,)  # mac: only compared where the hub sets it


def parse_links(text):
    """`ip -j -d addr show` -> {name: Link}."""
    links = {}
    for item in json.loads(text or "[]"):
        info = item.get("linkinfo") or {}
        data = info.get("info_data") or {}
        addrs = set("{}/{}".format(a["local"], a["prefixlen"]) for a in item.get("addr_info", [])
                    if a.get("family") == "inet")
        links[item["ifname"]] = Link(
            name=item["ifname"], kind=info.get("info_kind"), up="UP" in item.get("flags", []),
            mtu=item.get("mtu"), vni=data.get("id"), local=data.get("local"),
            remote=data.get("remote"), port=data.get("port"), learning=data.get("learning"),
            addrs=addrs, mac=item.get("address"))
    return links


def parse_wg_dump(text):
    """`wg show IF dump` -> {"public_key", "listen_port", "peers": {key: {...}}}.

    The first line also carries the private key: it is dropped here, never kept or logged.
    """
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
                "handshake": int(f[4]) if f[4].isdigit() else 0}
    return have


def wg_impl(module_loaded, modules_text):
    """"kernel" when this kernel has WireGuard (loaded, built in, or a module to load), else
    "wireguard-go" (userspace), as wg-quick decides."""
    if module_loaded or re.search(r"(^|/)wireguard\.ko", modules_text or "", re.M):
        return "kernel"
    return "wireguard-go"


def parse_rules(text):
    """`iptables -S` -> (chains, {chain: [rule spec after '-A CHAIN ']})."""
    chains, rules = set(), collections.defaultdict(list)
    for line in text.splitlines():
        if line.startswith("-N "):
            chains.add(line.split()[1])
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            rules[chain].append(spec)
    return chains, rules


# ---------------------------------------------------------------------------------------------
# The kernel side: what the hub wants, and the commands that get it there
# ---------------------------------------------------------------------------------------------


class Actions(object):
    """What one converge step changes, and what the kernel looks like once it has.

    ip: `ip -batch` lines; links: {name: Link it becomes, or None when it goes}; rules: filter
    table lines for one iptables-restore; chains: our filter chains once the rules are in
    (None: the rules do not change them); trust: interfaces for firewalld's trusted zone;
    repair: the filter's pairs when our chain is not known to be there, so the table is probed
    (after the devices) and every rule of ours repaired; ipv6_off: devices whose IPv6 is
    switched off (IPV6_OFF) once they exist, written in-process: no process per device.
    """

    def __init__(self, ip=(), links=None, rules=(), chains=None, trust=(), repair=None,
                 ipv6_off=()):
        self.ip, self.links, self.rules = list(ip), dict(links or {}), list(rules)
        self.chains, self.trust = chains, list(trust)
        self.repair = repair  # filter pairs: probe the table after the devices, repair all
        self.ipv6_off = list(ipv6_off)

    def __add__(self, other):
        links = dict(self.links)
        links.update(other.links)
        return Actions(self.ip + other.ip, links, self.rules + other.rules,
                       self.chains if other.chains is None else other.chains,
                       self.trust + other.trust,
                       self.repair if other.repair is None else other.repair,
                       self.ipv6_off + other.ipv6_off)


class Kernel(object):
    """Desired host devices and rules, compared with what the kernel has, turned into Actions.

    The *_plan and *_actions methods only read; apply() is the one place that changes the
    kernel. Only the hub's writer thread (or a one-shot command) uses it: one mutator, no races.
    """

    def __init__(self, cfg, layout):
        self.cfg, self.layout = cfg, layout
        self.links = {}           # last snapshot of the links, kept current by our own changes
        self.filter_chains = set()  # our source-filter chains in the kernel, as last known
        self.firewalld = False
        self.wg = cfg["OVERLAY_ENCRYPTION"] == "wireguard"
        self.wg_public = None     # the host's public key, once ensure_wg_key has run
        self.wg_have = None       # kohaku-wg's key, port and peers as last probed or set

    # -- converge: the one door for every change ---------------------------------------------
    def apply(self, act, step=None, tolerate=False, check=False):
        """Run the actions: one `ip -force -batch`, one iptables-restore, one firewall-cmd, each
        command echoed once; the caches follow the actions that really ran (not under
        --dry-run). Returns the first line of a failed batch, or None (check: raise instead).

        step names the failpoint `<step>:after-device` between the devices and the rules;
        tolerate logs a failed rule or zone update instead of raising it (a registration is
        answered even so; the repair pass tries again).
        """
        error = None
        if act.ip:
            res = run(["ip", "-force", "-batch", "-"], check=check,
                      input="\n".join(act.ip) + "\n", echo=["ip " + line for line in act.ip])
            if res.returncode != 0:
                self.refresh()
                error = (res.stderr.strip() or "ip -batch failed").splitlines()[0]
            elif res is not SKIPPED:
                for name, link in act.links.items():
                    if link is None:
                        self.links.pop(name, None)
                    else:
                        self.links[name] = link
        if act.ipv6_off:
            settings = [("net.ipv6.conf.{}.{}".format(dev, key), value)
                        for dev in act.ipv6_off for key, value in IPV6_OFF]
            run(["sysctl", "-w"] + ["{}={}".format(k, v) for k, v in settings], check=check,
                write=dict(("/proc/sys/" + k.replace(".", "/"), v) for k, v in settings))
        if step:
            failpoint(step + ":after-device")
        try:
            if act.repair is not None:
                act = act + self.rules_actions(act.repair)
            if act.rules:
                res = run(["iptables-restore", "--noflush"],
                          input="*filter\n" + "\n".join(act.rules) + "\nCOMMIT\n",
                          echo=["iptables " + _rule_command(line) for line in act.rules])
                if res is not SKIPPED and act.chains is not None:
                    self.filter_chains = set(act.chains)
        except OverlayError as exc:
            if not tolerate:
                raise
            log.error("cannot update the VXLAN source filter: %s", exc)
        if act.trust and self.firewalld:
            try:
                run(["firewall-cmd", "--zone=" + TRUSTED_ZONE] +
                    ["--change-interface=" + n for n in sorted(act.trust)])
            except OverlayError as exc:
                if not tolerate:
                    raise
                log.error("cannot add %s to the firewalld zone %s: %s", " ".join(act.trust),
                          TRUSTED_ZONE, exc)
        return error

    # -- rules -------------------------------------------------------------------------------
    def forward_rules(self):
        """Overlay to overlay between the tunnels only: nothing from the LAN or another
        interface is forwarded into the overlay by our rule (issue 11.1)."""
        cidr, tunnels = self.layout.cidr, DEVICE_PREFIX + "+"
        return ["-s {0} -d {0} -i {1} -o {1} -m comment --comment {2} -j ACCEPT".format(
            cidr, tunnels, RULE_COMMENT)]

    def input_rule(self):
        return "-p udp -m udp --dport {} -m comment --comment {} -j {}".format(
            self.cfg["OVERLAY_VXLAN_PORT"], RULE_COMMENT, FILTER_CHAIN)

    def input_rules(self):
        """Our INPUT rules, in order. With encryption the WireGuard port is all the underlay
        needs, and VXLAN that did not come out of kohaku-wg is dropped before the source
        filter (whose addresses are then the runners' tunnel addresses)."""
        rules = []
        if self.wg:
            rules += ["-p udp -m udp --dport {} -m comment --comment {} -j ACCEPT".format(
                          self.cfg["OVERLAY_WG_PORT"], RULE_COMMENT),
                      "! -i {} -p udp -m udp --dport {} -m comment --comment {} -j DROP".format(
                          WG_DEV, self.cfg["OVERLAY_VXLAN_PORT"], RULE_COMMENT)]
        if self.cfg["OVERLAY_VXLAN_SOURCE_FILTER"]:
            rules.append(self.input_rule())
        return rules

    def filter_tree(self, pairs):
        """{chain: [rules]} of the VXLAN source filter for [(runner address, its VNI)]."""
        lo = self.cfg["OVERLAY_VXLAN_ID"]
        return filter_tree(pairs, (lo, lo + self.layout.max_id))

    @staticmethod
    def chain_lines(tree, stale=()):
        """Restore lines that (re)fill the filter chains and delete the stale ones."""
        stale = sorted(stale)
        return ([":{} - [0:0]".format(c) for c in tree] +
                ["-A {} {}".format(c, r) for c, rules in tree.items() for r in rules] +
                ["-F " + c for c in stale] + ["-X " + c for c in stale])

    @staticmethod
    def our_chains(chains):
        return set(c for c in chains if c == FILTER_CHAIN or c.startswith(FILTER_CHAIN + "-"))

    def rules_plan(self, rules_text, pairs):
        """iptables-restore lines that put our rules first and the filter chains right, or []."""
        chains, rules = parse_rules(rules_text)
        want_forward = self.forward_rules()
        use_filter = self.cfg["OVERLAY_VXLAN_SOURCE_FILTER"]
        want_input = self.input_rules()
        tree = self.filter_tree(pairs) if use_filter else {}
        ours = self.our_chains(chains)
        ok = (rules["FORWARD"][:len(want_forward)] == want_forward
              and sum(RULE_COMMENT in r for r in rules["FORWARD"]) == len(want_forward)
              and rules["INPUT"][:len(want_input)] == want_input
              and sum(RULE_COMMENT in r for r in rules["INPUT"]) == len(want_input)
              and ours == set(tree) and all(rules[c] == r for c, r in tree.items()))
        if ok:
            return []
        lines = _marked_deletes(rules)
        lines += ["-I FORWARD {} {}".format(i + 1, r) for i, r in enumerate(want_forward)]
        lines += ["-I INPUT {} {}".format(i + 1, r) for i, r in enumerate(want_input)]
        if use_filter:
            return self.chain_lines(tree, ours - set(tree)) + lines
        return lines + self.chain_lines({}, ours)

    def removal_plan(self, rules_text):
        chains, rules = parse_rules(rules_text)
        return _marked_deletes(rules) + self.chain_lines({}, self.our_chains(chains))

    def read_rules(self):
        """Probe the filter table; what it shows of our chains becomes the cache."""
        text = run(["iptables", "-S"], mutates=False).stdout
        self.filter_chains = self.our_chains(parse_rules(text)[0])
        return text

    def rules_actions(self, pairs):
        """Probe once; the Actions that repair every rule of ours (none when all is right)."""
        lines = self.rules_plan(self.read_rules(), pairs)
        chains = set(self.filter_tree(pairs)) if self.cfg["OVERLAY_VXLAN_SOURCE_FILTER"] else \
            set()
        return Actions(rules=lines, chains=chains)

    def filter_actions(self, pairs):
        """The registration path: rewrite only the filter chains (no probe), unless our chain
        is not known to be there: then the full repair."""
        if not self.cfg["OVERLAY_VXLAN_SOURCE_FILTER"]:
            return Actions()
        if FILTER_CHAIN not in self.filter_chains:
            return Actions(repair=pairs)
        tree = self.filter_tree(pairs)
        return Actions(rules=self.chain_lines(tree, self.filter_chains - set(tree)),
                       chains=set(tree))

    def ensure_rules(self, pairs):
        """Probe once, then repair in one iptables-restore. Returns the lines applied."""
        act = self.rules_actions(pairs)
        self.apply(act)
        return act.rules

    # -- devices -----------------------------------------------------------------------------
    def refresh(self):
        self.links = parse_links(run(["ip", "-j", "-d", "addr", "show"], mutates=False).stdout)
        return self.links

    def tunnel_spec(self, n, remote):
        vni = self.cfg["OVERLAY_VXLAN_ID"] + n
        local = wg_ip(self.cfg, 0) if self.wg else self.cfg["HOST_REACHABLE_ADDRESS"]
        return Link(name=self.layout.device(n), kind="vxlan", up=True, mtu=self.cfg["OVERLAY_MTU"],
                    vni=vni, local=local, remote=remote,
                    port=self.cfg["OVERLAY_VXLAN_PORT"], learning=False,
                    addrs={self.layout.host_vxlan_cidr(n)}, mac=tunnel_mac(vni))

    def tunnel_plan(self, n, remote):
        """ip batch lines that make vxkrN what allocation n wants (none when it already is)."""
        want = self.tunnel_spec(n, remote)
        have = self.links.get(want.name)
        lines = []
        identity = ("kind", "vni", "local", "remote", "port", "learning")
        if have is not None and any(getattr(have, f) != getattr(want, f) for f in identity):
            lines.append("link del " + want.name)
            have = None
        if have is None:
            lines.append("link add {} address {} type vxlan id {} local {} remote {} dstport {} "
                         "nolearning".format(want.name, want.mac, want.vni, want.local,
                                             want.remote, want.port))
        elif have.mac != want.mac:
            lines.append("link set {} address {}".format(want.name, want.mac))
        if have is None or have.mtu != want.mtu:
            lines.append("link set {} mtu {}".format(want.name, want.mtu))
        for extra in sorted((have.addrs if have else set()) - want.addrs):
            lines.append("addr del {} dev {}".format(extra, want.name))
        if have is None or not want.addrs <= have.addrs:
            lines.append("addr replace {} dev {}".format(self.layout.host_vxlan_cidr(n), want.name))
        if have is None or not have.up:
            lines.append("link set {} up".format(want.name))
        return lines, want

    def tunnel_actions(self, wanted, prune):
        """Actions that bring every vxkr* in line with {id: remote}; the others go when prune."""
        act = Actions()
        for n, remote in sorted(wanted.items()):
            lines, spec = self.tunnel_plan(n, remote)
            act.ip += lines
            act.links[spec.name] = spec
            if any(line.startswith("link add ") for line in lines):
                act.ipv6_off.append(spec.name)
        if prune:
            for name, link in sorted(self.links.items()):
                n = self.layout.id_of_device(name)
                if link.kind == "vxlan" and name.startswith(DEVICE_PREFIX) and (
                        n is None or n not in wanted):
                    act.ip.append("link del " + name)
                    act.links[name] = None
        return act

    def tunnel_errors(self, wanted, error):
        """{id: error or None} after a batch: the ids whose device is still not right."""
        return dict((n, error if error and self.tunnel_plan(n, remote)[0] else None)
                    for n, remote in wanted.items())

    def sync_tunnels(self, wanted, prune):
        """Bring every vxkr* in line with {id: remote}; remove the others when prune.

        Returns ({id: error or None}, lines run). One `ip` process however many tunnels.
        """
        act = self.tunnel_actions(wanted, prune)
        return self.tunnel_errors(wanted, self.apply(act)), act.ip

    def host_device_plan(self):
        """Lines for kohaku-host; the device type is chosen at apply time (dummy or bridge)."""
        have = self.links.get(HOST_DEVICE)
        cidr = "{}/{}".format(self.layout.host_ip, self.layout.host_prefix)
        lines = []
        if have is not None and have.kind not in ("dummy", "bridge"):
            lines.append("link del " + HOST_DEVICE)
            have = None
        return have is None, lines + _address_lines(HOST_DEVICE, have, cidr)

    def ensure_host_device(self):
        """Create kohaku-host (a dummy, or an empty bridge without dummy support)."""
        missing, lines = self.host_device_plan()
        if missing:
            kind = "dummy"
            res = run(["ip", "link", "add", HOST_DEVICE, "type", "dummy"], check=False)
            if res.returncode != 0:
                kind = "bridge"
                log.info("this kernel has no dummy device type (%s); %s is an empty bridge",
                         res.stderr.strip() or "ip failed", HOST_DEVICE)
                run(["ip", "link", "add", HOST_DEVICE, "type", "bridge"])
            log.info("created %s (%s) with %s/%s", HOST_DEVICE, kind, self.layout.host_ip,
                     self.layout.host_prefix)
        self.apply(Actions(ip=lines, ipv6_off=[HOST_DEVICE] if missing else []), check=True)
        return lines

    def ensure_ipv6_off(self, names):
        """IPv6 off on these devices of ours; probes /proc/sys (no process), returns the
        devices it had to fix (a device or a kernel without IPv6 needs nothing)."""
        wrong = [dev for dev in names if any(
            read_sysctl("/proc/sys/net/ipv6/conf/{}/{}".format(dev, key)) not in (None, value)
            for key, value in IPV6_OFF)]
        self.apply(Actions(ipv6_off=wrong), check=True)
        return wrong

    # -- WireGuard (OVERLAY_ENCRYPTION = "wireguard") -----------------------------------------
    def underlay(self):
        """(device, MTU) of the link holding HOST_REACHABLE_ADDRESS (None, None: not found)."""
        for name, link in sorted(self.links.items()):
            if any(a.split("/")[0] == self.cfg["HOST_REACHABLE_ADDRESS"] for a in link.addrs):
                return name, link.mtu
        return None, None

    def check_wg_mtu(self):
        """serve refuses an OVERLAY_MTU that does not fit VXLAN over WireGuard."""
        dev, mtu = self.underlay()
        error = wg_mtu_error(self.cfg["OVERLAY_MTU"], mtu, dev) if mtu else None
        if error:
            raise ConfigError(error)

    def create_wg(self):
        """kohaku-wg: `ip link add ... type wireguard` where the kernel has it, else wireguard-go
        (as wg-quick does); one log line says which."""
        release = os.uname()[2]
        text = ""
        for name in ("modules.builtin", "modules.dep"):
            try:
                with open("/lib/modules/{}/{}".format(release, name)) as fh:
                    text += fh.read()
            except (IOError, OSError):
                pass
        impl = wg_impl(os.path.isdir("/sys/module/wireguard"), text)
        if impl == "kernel" and run(["ip", "link", "add", WG_DEV, "type", "wireguard"],
                                    check=False).returncode != 0:
            impl = "wireguard-go"            # the module may be missing after all: as wg-quick
        if impl == "wireguard-go":
            run(["wireguard-go", WG_DEV])
        log.info("%s: %s", WG_DEV, "kernel WireGuard" if impl == "kernel" else
                 "userspace wireguard-go (this kernel has no WireGuard module)")
        self.wg_have = {"public_key": None, "listen_port": None, "peers": {}}
        return impl

    def wg_plan(self, peers, have):
        """The one `wg set` argv that gives kohaku-wg the host key, port and exactly `peers`
        ({public key: tunnel address}), or None. Pure. The private key goes by file name; a
        peer's endpoint is learnt from its handshake (runners behind NAT)."""
        args = []
        if have.get("public_key") != self.wg_public or self.wg_public is None:
            args += ["private-key", wg_key_paths(self.cfg["OVERLAY_STATE_FILE"])[0]]
        if have.get("listen_port") != self.cfg["OVERLAY_WG_PORT"]:
            args += ["listen-port", str(self.cfg["OVERLAY_WG_PORT"])]
        had = have.get("peers") or {}
        for key, ip in sorted(peers.items()):
            if (had.get(key) or {}).get("allowed_ips") != [ip + "/32"]:
                args += ["peer", key, "allowed-ips", ip + "/32"]
        args += [a for key in sorted(set(had) - set(peers)) for a in ("peer", key, "remove")]
        return ["wg", "set", WG_DEV] + args if args else None

    def wg_link_plan(self):
        """ip batch lines for kohaku-wg's MTU (underlay - 60), address and state."""
        have = self.links.get(WG_DEV)
        dev, under = self.underlay()
        mtu = (under or self.cfg["OVERLAY_MTU"] + VXLAN_OVERHEAD + WG_OVERHEAD) - WG_OVERHEAD
        cidr = "{}/{}".format(wg_ip(self.cfg, 0),
                              ipaddress.IPv4Network(self.cfg["OVERLAY_WG_SUBNET"]).prefixlen)
        lines = [] if have is not None and have.mtu == mtu else [
            "link set {} mtu {}".format(WG_DEV, mtu)]
        spec = Link(name=WG_DEV, kind=have.kind if have else "wireguard", up=True, mtu=mtu,
                    vni=None, local=None, remote=None, port=None, learning=None, addrs={cidr})
        return lines + _address_lines(WG_DEV, have, cidr), spec

    def ensure_wg(self, peers, probe=True):
        """kohaku-wg with the host's key and port and one peer per runner key; probe=False (a
        registration) trusts what this process last set. Returns True when something changed."""
        link = self.links.get(WG_DEV)
        if not self.wg:                 # encryption switched off: kohaku-wg goes
            if link is None or link.kind not in ("wireguard", "tun"):
                return False
            self.apply(Actions(ip=["link del " + WG_DEV], links={WG_DEV: None}), check=True)
            return True
        changed = False
        if link is not None and link.kind not in ("wireguard", "tun"):
            self.apply(Actions(ip=["link del " + WG_DEV], links={WG_DEV: None}), check=True)
            link = None
        if link is None:
            self.create_wg()
            changed = True
        elif probe or self.wg_have is None:
            self.wg_have = parse_wg_dump(run(["wg", "show", WG_DEV, "dump"],
                                             mutates=False).stdout)
        argv = self.wg_plan(peers, self.wg_have)
        if argv:
            if run(argv) is not SKIPPED:
                self.wg_have = {"public_key": self.wg_public,
                                "listen_port": self.cfg["OVERLAY_WG_PORT"],
                                "peers": dict((k, {"allowed_ips": [ip + "/32"]})
                                              for k, ip in peers.items())}
            changed = True
        lines, spec = self.wg_link_plan()
        if lines:
            self.apply(Actions(ip=lines, links={WG_DEV: spec}), check=True)
            changed = True
        return changed

    # -- sysctl and firewalld ----------------------------------------------------------------
    @staticmethod
    def ensure_forwarding():
        with open("/proc/sys/net/ipv4/ip_forward") as fh:
            if fh.read().strip() == "1":
                return False
        run(["sysctl", "-w", "net.ipv4.ip_forward=1"])
        return True

    def detect_firewalld(self):
        """True when firewalld runs here: a process looks like it and `firewall-cmd --state`
        says running. Cheap when none does: no python process spawned."""
        self.firewalld = False
        bus = system_bus_path()
        if not tool_exists("firewall-cmd") or (bus is not None and not os.path.exists(bus)) \
                or not _firewalld_process():
            return False
        self.firewalld = run(["firewall-cmd", "--state"], check=False,
                             mutates=False).returncode == 0
        return self.firewalld

    @staticmethod
    def trusted_interfaces():
        return set(run(["firewall-cmd", "--zone=" + TRUSTED_ZONE, "--list-interfaces"],
                       mutates=False).stdout.split())

    def ensure_trusted(self, names):
        if not self.detect_firewalld():
            return []
        missing = sorted(set(names) - self.trusted_interfaces())
        self.apply(Actions(trust=missing))  # runtime only: one firewall-cmd call
        return missing


def _address_lines(dev, have, cidr):
    """ip batch lines that leave dev (its Link, or None when just made) with exactly cidr, up."""
    lines = ["addr del {} dev {}".format(extra, dev)
             for extra in sorted((have.addrs if have else set()) - {cidr})]
    if have is None or cidr not in have.addrs:
        lines.append("addr replace {} dev {}".format(cidr, dev))
    if have is None or not have.up:
        lines.append("link set {} up".format(dev))
    return lines


def _marked_deletes(rules):
    """`-D` lines for every rule of ours (by marker) in FORWARD and INPUT."""
    return ["-D {} {}".format(chain, spec) for chain in ("FORWARD", "INPUT")
            for spec in rules[chain] if RULE_COMMENT in spec]


def _rule_command(line):
    """A restore line as the iptables command it stands for (`:CHAIN - [0:0]` is `-N CHAIN`),
    so --dry-run and the log show the rules themselves."""
    return "-N " + line[1:].split()[0] if line.startswith(":") else line


def vni_match(lo, hi=None):
    """The u32 match on the VNI of a VXLAN datagram, as `iptables -S` prints it: the IHL jumps
    to the UDP header, the VNI is the top 24 bits of the 4 bytes at UDP offset 12."""
    want = "{:#x}".format(lo) if hi is None else "{:#x}:{:#x}".format(lo, hi)
    return '-m u32 --u32 "0x0>>0x16&0x3c@0xc>>0x8={}"'.format(want)


def filter_tree(pairs, vnis):
    """{chain: [rules]} of the VXLAN source filter: each runner's address is accepted for its
    own VNI only, then ONE drop of our VNI range vnis = (lo, hi); frames of other VNIs (Docker
    Swarm, EVPN on the same port) fall through to the rest of INPUT.

    A binary tree over the runners' addresses: a chain lists at most FILTER_LEAF addresses,
    else it splits them at their first differing bit into two sub-chains, each entered
    through its common prefix. A packet walks about 2*log2(n) + FILTER_LEAF rules instead
    of one rule per runner.
    """
    tree, by_ip = collections.OrderedDict(), collections.defaultdict(set)
    for ip, vni in pairs:
        by_ip[ipaddress.IPv4Address(ip)].add(vni)

    def fill(name, addrs):
        tree[name] = rules = []
        for group in _split(addrs):
            if len(group) <= FILTER_LEAF:
                rules += ["-s {}/32 {} -j ACCEPT".format(ip, vni_match(vni))
                          for ip in group for vni in sorted(by_ip[ip])]
            else:
                net = _common_prefix(group)
                child = "{}-{:08x}-{}".format(FILTER_CHAIN, int(net.network_address),
                                              net.prefixlen)
                rules.append("-s {} -j {}".format(net, child))
                fill(child, group)

    fill(FILTER_CHAIN, sorted(by_ip))
    tree[FILTER_CHAIN].append("{} -j DROP".format(vni_match(*vnis)))
    return tree


def _split(addrs):
    """Sorted addresses -> [addrs] when few, else the two halves at their first differing bit."""
    if len(addrs) <= FILTER_LEAF:
        return [addrs]
    bit = (int(addrs[0]) ^ int(addrs[-1])).bit_length() - 1
    cut = next(i for i, a in enumerate(addrs) if int(a) >> bit & 1)
    return [addrs[:cut], addrs[cut:]]


def _common_prefix(addrs):
    """The smallest network holding every one of these sorted addresses."""
    prefix = 32 - (int(addrs[0]) ^ int(addrs[-1])).bit_length()
    return ipaddress.IPv4Network((int(addrs[0]) >> (32 - prefix) << (32 - prefix), prefix))


def tunnel_mac(vni):
    """A fixed MAC per tunnel (locally administered, from the VNI): a re-created vxkrN keeps
    its address, so the runners' ARP entries for the host stay right and traffic resumes at
    once instead of after the neighbour entry expires."""
    return "02:6b:6f:{:02x}:{:02x}:{:02x}".format((vni >> 16) & 255, (vni >> 8) & 255, vni & 255)


def vtep_mac(n):
    """Runner n's vxdirect0 MAC (direct routing): the runner derives the same from its id."""
    return "02:6b:64:{:02x}:{:02x}:{:02x}".format((n >> 16) & 255, (n >> 8) & 255, n & 255)


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


def system_bus_path():
    """The system D-Bus socket path firewall-cmd would use, or None when it is not a path
    (firewalld cannot run where that socket does not exist)."""
    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")
    for part in address.split(";")[0].split(":", 1)[-1].split(","):
        if part.startswith("path="):
            return part[len("path="):]
    return None


def _firewalld_process(proc="/proc"):
    """Does some process look like firewalld? Reads only /proc/PID/cmdline, which needs no
    capability (the unit keeps CAP_NET_ADMIN/CAP_NET_RAW only: /proc/PID/ns/net is closed to it).
    A firewalld of another network namespace is a candidate too: `firewall-cmd --state`, over
    this node's D-Bus, decides.
    """
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            with open(os.path.join(proc, pid, "cmdline"), "rb") as fh:
                argv = fh.read().split(b"\0")
        except (IOError, OSError):
            continue        # the process just ended
        if is_firewalld_cmdline(argv):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# The state store: flock on a lock file that is never replaced, atomic writes
# ---------------------------------------------------------------------------------------------


def wg_key_paths(state_path):
    """(private key file, public key file) beside the state file."""
    base = os.path.splitext(os.path.abspath(os.path.expanduser(state_path)))[0]
    return base + "-wg.key", base + "-wg.pub"


def read_wg_key(path):
    """The key held in path, None when the file does not exist."""
    try:
        with open(path) as fh:
            key = fh.read().strip()
    except (IOError, OSError) as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise OverlayError("cannot read {}: {}; run as root".format(path, exc.strerror))
    if not WG_KEY_RE.match(key):
        raise OverlayError("{} does not hold a WireGuard key: remove it (a new key pair is then "
                           "made, and every runner picks it up at its next heartbeat)".format(path))
    return key


def write_secret(path, text):
    """A small file written whole with mode 0600 from its creation (temp file, fsync, rename)."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        os.makedirs(folder, 0o700)
    fd, tmp = tempfile.mkstemp(prefix=".wg-", dir=folder)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_wg_key(state_path, read_only=False):
    """The host's public key, making the key pair on first start: `wg genkey` into a 0600 file,
    `wg pubkey` with the private key on stdin. Never logged, never in argv. Under --dry-run
    (read_only; run() alone reads DRY_RUN) nothing is made or changed (the public key is then
    None when there is no key yet)."""
    priv, pub = wg_key_paths(state_path)
    private = read_wg_key(priv)
    if private is None:
        res = run(["wg", "genkey"], echo=["wg genkey > {}  # mode 0600".format(priv)])
        if res is SKIPPED:
            return None
        private = res.stdout.strip()
        if not WG_KEY_RE.match(private):
            raise OverlayError("`wg genkey` printed no key: reinstall wireguard-tools")
        write_secret(priv, private + "\n")
    elif os.stat(priv).st_mode & 0o077 and not read_only:
        os.chmod(priv, 0o600)
        log.warning("%s was readable by others: set to mode 0600", priv)
    public = read_wg_key(pub)
    if public is None:
        public = run(["wg", "pubkey"], input=private + "\n", mutates=False).stdout.strip()
        if not read_only:
            write_secret(pub, public + "\n")
            log.info("WireGuard key pair in %s (public key %s)", priv, public)
    return public


class StateStore(object):
    """Allocations in a JSON file: {"version": 1, "allocations": [{...}, ...]}.

    Every read-modify-write holds an flock on `<path>.lock`; writes go to a temp file that is
    fsynced, renamed over the state and followed by an fsync of the folder. Mode 0600.
    """

    FIELDS = ("runner_id", "runner_name", "physical_ip", "last_seen")

    def __init__(self, path, read_only=False):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.read_only = read_only  # --dry-run: read, never write, never move a file aside
        self.folder = os.path.dirname(self.path)
        self.lock_path = self.path + ".lock"
        self.serve_lock_path = self.path + ".serve.lock"
        self.writes = 0

    def _ensure_folder(self):
        try:
            os.makedirs(self.folder, 0o700)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise OverlayError("cannot create the state folder {}: {}".format(
                    self.folder, exc.strerror))

    def _open_lock(self, path):
        self._ensure_folder()
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise OverlayError("cannot open the lock file {}: {}; run as root".format(
                path, exc.strerror))

    def hold_serve_lock(self):
        """Taken by `serve` for its lifetime; a second `serve` on the same state refuses."""
        fd = self._open_lock(self.serve_lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (IOError, OSError):
            os.close(fd)
            raise OverlayError("another kohaku_overlay_host.py serve already uses {}: stop it "
                               "first (systemctl stop kohakuriver-overlay-host)".format(self.path))
        os.ftruncate(fd, 0)
        os.write(fd, "{}\n".format(os.getpid()).encode())
        return fd

    def serve_running(self):
        """True while some process holds the serve lock."""
        if not os.path.exists(self.serve_lock_path):
            return False
        fd = os.open(self.serve_lock_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except (IOError, OSError):
            return True
        finally:
            os.close(fd)

    @staticmethod
    def _validate(data):
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION or \
                not isinstance(data.get("allocations"), list):
            raise ValueError("not a version {} state file".format(STATE_VERSION))
        allocs = {}
        for item in data["allocations"]:
            if not isinstance(item, dict):
                raise ValueError("an allocation is not an object")
            n, name, ip = item.get("runner_id"), item.get("runner_name"), item.get("physical_ip")
            if type(n) is not int or n < 1 or n in allocs:
                raise ValueError("bad or duplicate runner_id {!r}".format(n))
            if name is not None and (not isinstance(name, str) or not NAME_RE.match(name)):
                raise ValueError("bad runner_name {!r}".format(name))
            ipaddress.IPv4Address(ip)
            seen = item.get("last_seen", 0)
            if not isinstance(seen, (int, float)) or isinstance(seen, bool):
                raise ValueError("bad last_seen {!r}".format(seen))
            key = item.get("wg_public_key")
            if key is not None and (not isinstance(key, str) or not WG_KEY_RE.match(key)):
                raise ValueError("bad wg_public_key of runner_id {}".format(n))
            allocs[n] = new_allocation(n, name, ip, float(seen), key)
        names = [a["runner_name"] for a in allocs.values() if a["runner_name"]]
        if len(names) != len(set(names)):
            raise ValueError("a runner name appears twice")
        return allocs

    def read(self, move_aside=True):
        """(allocations {id: dict} or None when there is no usable file, corrupt_moved_to)."""
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except (IOError, OSError) as exc:
            if exc.errno == errno.ENOENT:
                return None, None
            raise OverlayError("cannot read the state file {}: {}".format(self.path, exc.strerror))
        try:
            return self._validate(json.loads(raw.decode("utf-8"))), None
        except (ValueError, UnicodeDecodeError, TypeError) as exc:
            if not move_aside or self.read_only:
                return None, None
            aside = "{}.corrupt-{}".format(self.path, time.strftime("%Y%m%dT%H%M%S"))
            os.rename(self.path, aside)
            log.error("the state file %s is corrupt (%s); kept it as %s and rebuilding the "
                      "allocations from the vxkr* devices", self.path, exc, aside)
            return None, aside

    def _write(self, allocs):
        started = time.monotonic()
        try:
            self._write_file(allocs)
        except BaseException:
            METRICS.inc("state_write_failures")
            raise
        METRICS.observe_write(time.monotonic() - started)

    def _write_file(self, allocs):
        self._ensure_folder()
        body = json.dumps({"version": STATE_VERSION, "allocations": [
            self._record(allocs[n]) for n in sorted(allocs)]},
            indent=1, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.folder)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, body)
            os.fsync(fd)
            os.close(fd)
            fd = None
            os.replace(tmp, self.path)
        except BaseException:
            if fd is not None:
                os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        dfd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.writes += 1

    def _record(self, alloc):
        """An allocation as saved: FIELDS, and the runner's WireGuard public key when it sent
        one (public: it travels in the registration anyway)."""
        record = dict((f, alloc[f]) for f in self.FIELDS)
        if alloc.get("wg_public_key"):
            record["wg_public_key"] = alloc["wg_public_key"]
        return record

    def _changed(self, change, fallback):
        allocs = self.read()[0]
        if allocs is None:
            allocs = dict((n, dict(a)) for n, a in (fallback or {}).items())
        change(allocs)
        return allocs

    def update(self, change, fallback=None):
        """Read, apply change(allocs) in place, write; all under the lock. Returns allocs.

        fallback: the allocations to start from when the file is missing or corrupt.
        Read-only (--dry-run): the change is made on a copy and nothing is written.
        """
        if self.read_only:
            return self._changed(change, fallback)
        fd = self._open_lock(self.lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            allocs = self._changed(change, fallback)
            self._write(allocs)
            return allocs
        finally:
            os.close(fd)  # closing the descriptor releases the lock


# ---------------------------------------------------------------------------------------------
# Allocation rules (pure: a dict of allocations in, a decision out)
# ---------------------------------------------------------------------------------------------


def allocate(allocs, max_id, name, physical_ip, previous_id, is_active, evictable=None):
    """Choose the runner id for a registration and update allocs in place.

    Returns (runner_id, evicted allocation or None). Raises ApiError(409) when the name is
    Active at another physical IP (two machines with one RUNNER_NAME), ApiError(503) when no
    id is free and none is evictable (default: not active). The rules, in order: the same name
    gets its id back; a recovered tunnel (no name) is claimed by the runner at its physical IP;
    a free previous_runner_id is granted; the lowest free id; else the least recently seen
    evictable allocation is evicted.
    """
    evictable = evictable or (lambda a: not is_active(a))
    by_name = dict((a["runner_name"], n) for n, a in allocs.items() if a["runner_name"])
    n, evicted = by_name.get(name), None
    if n is not None and allocs[n]["physical_ip"] != physical_ip and is_active(allocs[n]):
        raise ApiError(409, "runner {} is Active at {} and this registration comes from {}: two "
                            "machines use RUNNER_NAME = \"{}\"; give each its own RUNNER_NAME in "
                            "runner_config.py".format(name, allocs[n]["physical_ip"],
                                                      physical_ip, name))
    if n is None:
        recovered = sorted(i for i, a in allocs.items()
                           if a["runner_name"] is None and a["physical_ip"] == physical_ip)
        if recovered:
            n = recovered[0]
        elif previous_id is not None and 1 <= previous_id <= max_id and previous_id not in allocs:
            n = previous_id
        else:
            free = (i for i in range(1, max_id + 1) if i not in allocs)
            n = next(free, None)
        if n is None:
            idle = [a for a in allocs.values() if evictable(a)]
            if not idle:
                raise ApiError(503, "no free runner id: all {} are held by active runners; "
                                    "release one (kohaku_overlay_host.py release NAME) or use "
                                    "a larger OVERLAY_SUBNET node range".format(max_id))
            evicted = min(idle, key=lambda a: (a["last_seen"], a["runner_id"]))
            n = evicted["runner_id"]
            log.warning("evicting inactive runner %s (id %d, last seen %s) for %s",
                        evicted["runner_name"] or "(recovered)", n,
                        _when(evicted["last_seen"]), name)
    allocs[n] = new_allocation(n, name, physical_ip, time.time())
    return n, evicted


def new_allocation(n, name, physical_ip, last_seen, wg_public_key=None):
    """The one shape of an allocation, in memory and in the state file (StateStore._record)."""
    alloc = {"runner_id": n, "runner_name": name, "physical_ip": physical_ip,
             "last_seen": last_seen}
    if wg_public_key:
        alloc["wg_public_key"] = wg_public_key
    return alloc


def _when(stamp):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "never"


# ---------------------------------------------------------------------------------------------
# Metrics: the counters of this process, and the Prometheus text of GET /metrics
# ---------------------------------------------------------------------------------------------

# One family: name, type ("counter", "gauge", "histogram"), help text, samples
# [(labels dict, value)] (a histogram's samples carry their own suffix: (suffix, labels, value)).
Family = collections.namedtuple("Family", "name type help samples")
METRIC_PREFIX = "kohaku_overlay_"
REPAIR_KINDS = ("device", "rules", "zone", "sysctl")
RELEASE_KINDS = ("release", "cleanup")
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REFUSALS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "wrong_method",
            408: "timeout", 409: "settings_mismatch", 411: "length_required", 413: "too_large",
            431: "headers_too_large", 500: "internal_error"}
LINK_STATS = (("bytes", "bytes", "bytes"), ("packets", "packets", "packets"),
              ("drops", "dropped", "packets dropped"), ("errors", "errors", "errors"))
TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def refusal_reason(status, answer):
    """The reason label of a refused request (an answer of 400 or more)."""
    if status == 503:
        text = answer.get("error", "") if isinstance(answer, dict) else ""
        if text.startswith("no free runner id"):
            return "no_free_id"
        return "disabled" if "is disabled" in text else "busy"
    return REFUSALS.get(status, "http_{}".format(status))


class Counters(object):
    """Every counter of this process, in one registry (METRICS), incremented where the events
    happen. Module-level on purpose: a Hub or an ApiServer made again inside the same process
    (as the tests do) never makes a counter go down; a new process starts them all at 0."""

    def __init__(self):
        self.lock = threading.Lock()
        self.values = collections.Counter()
        self.buckets = [0] * (len(WRITE_BUCKETS) + 1)   # per bucket, the last one is +Inf
        self.write_seconds = 0.0
        self.started = time.time()

    def inc(self, name, label=None, by=1):
        with self.lock:
            self.values[(name, label)] += by

    def observe_write(self, seconds):
        with self.lock:
            i = next((i for i, le in enumerate(WRITE_BUCKETS) if seconds <= le),
                     len(WRITE_BUCKETS))
            self.buckets[i] += 1
            self.write_seconds += seconds

    def snapshot(self):
        with self.lock:
            return dict(self.values), list(self.buckets), self.write_seconds


METRICS = Counters()


def counter_families(values, buckets, write_seconds):
    """The counter families from a Counters.snapshot(); every label of a kind is shown, 0 too."""
    p = METRIC_PREFIX

    def one(name):
        return [({}, values.get((name, None), 0))]

    refused = sorted(set(REFUSALS.values()) | {"no_free_id", "disabled", "busy"} |
                     set(label for name, label in values if name == "refused"))
    cumulative, total = [], 0
    for le, n in zip([repr(b) for b in WRITE_BUCKETS] + ["+Inf"], buckets):
        total += n
        cumulative.append(("_bucket", {"le": le}, total))
    return [
        Family(p + "registrations_total", "counter", "Registrations answered with an allocation.",
               one("registrations")),
        Family(p + "heartbeats_total", "counter", "Heartbeats accepted.", one("heartbeats")),
        Family(p + "releases_total", "counter", "Allocations released, by how.",
               [({"how": k}, values.get(("releases", k), 0)) for k in RELEASE_KINDS]),
        Family(p + "evictions_total", "counter",
               "Inactive allocations evicted for a new runner (no free id).", one("evictions")),
        Family(p + "refused_requests_total", "counter", "API requests refused, by reason.",
               [({"reason": r}, values.get(("refused", r), 0)) for r in refused]),
        Family(p + "repairs_total", "counter", "Drift repaired by the periodic pass, by kind.",
               [({"kind": k}, values.get(("repairs", k), 0)) for k in REPAIR_KINDS]),
        Family(p + "state_write_failures_total", "counter", "State-file writes that failed.",
               one("state_write_failures")),
        Family(p + "state_write_duration_seconds", "histogram",
               "Time to write the state file (temp file, fsync, rename, fsync of the folder).",
               cumulative + [("_sum", {}, round(write_seconds, 6)), ("_count", {}, total)])]


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
        lines.append("# HELP {} {}".format(fam.name, fam.help.replace("\\", "\\\\").replace(
            "\n", "\\n")))
        lines.append("# TYPE {} {}".format(fam.name, fam.type))
        for sample in fam.samples:
            suffix, labels, value = sample if len(sample) == 3 else ("",) + tuple(sample)
            text = ",".join('{}="{}"'.format(k, escape_label_value(v))
                            for k, v in sorted(labels.items()))
            lines.append("{}{}{} {}".format(fam.name, suffix, "{" + text + "}" if text else "",
                                            sample_value(value)))
    return "".join(line + "\n" for line in lines)


def parse_link_stats(text):
    """`ip -s -j link show` -> {ifname: {"rx": {...}, "tx": {...}}} (stats64, else stats)."""
    out = {}
    for link in json.loads(text or "[]"):
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
            families.append(Family("{}{}_{}_total".format(prefix, word, suffix), "counter",
                                   "{} {} of {} (kernel counter).".format(verb, noun, what),
                                   samples))
    return families


class MetricsText(str):
    """An answer that is Prometheus text, not JSON (http_response sends it as it is)."""
    content_type = TEXT_TYPE


# ---------------------------------------------------------------------------------------------
# The hub: allocations in memory (a mirror of the state file), one writer thread
# ---------------------------------------------------------------------------------------------


class Job(object):
    """A change to the allocations, applied by the writer thread in a group commit.

    decide() fills in the outcome (status and answer, or the runner id a registration got);
    Hub.answer() is the one place that hands it back to the waiting request.
    """

    def __init__(self, kind, **args):
        self.kind, self.args = kind, args
        self.done = threading.Event()
        self.status, self.answer = 500, {"error": "the request was not processed"}
        self.runner_id = None
        self.evicted = None

    def finish(self, status, answer):
        self.status, self.answer = status, answer
        self.done.set()


class Hub(object):
    def __init__(self, cfg, layout, store, kernel):
        self.cfg, self.layout, self.store, self.kernel = cfg, layout, store, kernel
        self.allocs = {}            # id -> {"runner_id", "runner_name", "physical_ip", "last_seen"}
        self.beats = {}             # name -> time.monotonic() of its last heartbeat since start
        self.seen = {}              # name -> wall-clock time of its last heartbeat, not yet saved
        self.lock = threading.Lock()
        self.jobs = queue.Queue()
        self.stop = threading.Event()
        self.started = time.monotonic()
        self._peers = (None, 0, [])  # (the allocs it was computed from, version, peer table)

    # -- reading ------------------------------------------------------------------------------
    def is_active(self, alloc):
        t = self.beats.get(alloc["runner_name"])
        return t is not None and time.monotonic() - t <= self.cfg["OVERLAY_INACTIVE_AFTER"]

    def in_grace(self, alloc):
        """Not heard from since this host started, and the start is too recent to tell."""
        return alloc["runner_name"] not in self.beats and time.monotonic() - self.started < \
            GRACE_FACTOR * self.cfg["OVERLAY_INACTIVE_AFTER"]

    def may_be_released(self, alloc):
        """What `cleanup` releases: Inactive, and not in the grace window after a start."""
        return not self.is_active(alloc) and not self.in_grace(alloc)

    def evictable(self, alloc):
        """Unseen far longer than OVERLAY_INACTIVE_AFTER: heard of by this host long ago, or
        (not heard since the start) last seen long ago by the state file's clock."""
        if self.in_grace(alloc):
            return False
        t = self.beats.get(alloc["runner_name"])
        unseen = time.monotonic() - t if t is not None else time.time() - alloc["last_seen"]
        return unseen > EVICT_FACTOR * self.cfg["OVERLAY_INACTIVE_AFTER"]

    def filter_pairs(self, allocs):
        """[(address, VNI)] the VXLAN source filter accepts: each runner for its own VNI, from
        the address its tunnel points at (its physical IP, or its kohaku-wg address with
        encryption)."""
        return sorted(set((ip, self.cfg["OVERLAY_VXLAN_ID"] + n)
                          for n, ip in self.remotes(allocs).items()),
                      key=lambda p: (ipaddress.IPv4Address(p[0]), p[1]))

    def wg_peers(self, allocs):
        """{runner public key: its tunnel address} of every runner that registered a key."""
        return dict((a["wg_public_key"], wg_ip(self.cfg, n)) for n, a in allocs.items()
                    if a.get("wg_public_key"))

    def wg_answer(self, n):
        """The encryption part of the registration and heartbeat answers for runner n."""
        if not self.kernel.wg:
            return {"encryption": "none"}
        return {"encryption": "wireguard", "wg_port": self.cfg["OVERLAY_WG_PORT"],
                "host_wg_public_key": self.kernel.wg_public, "host_wg_ip": wg_ip(self.cfg, 0),
                "wg_ip": wg_ip(self.cfg, n), "wg_subnet": self.cfg["OVERLAY_WG_SUBNET"]}

    def status(self):
        with self.lock:
            allocs = dict(self.allocs)
            seen = dict(self.seen)
        rows, now = [], time.time()
        for n in sorted(allocs):
            a = allocs[n]
            rows.append({
                "runner_name": a["runner_name"], "runner_id": n,
                "subnet": str(self.layout.subnet(n)), "gateway": str(self.layout.gateway(n)),
                "host_vxlan_ip": str(self.layout.host_vxlan_ip(n)),
                "physical_ip": a["physical_ip"], "vxlan_device": self.layout.device(n),
                "vni": self.cfg["OVERLAY_VXLAN_ID"] + n, "active": self.is_active(a),
                "last_seen": min(seen.get(a["runner_name"], a["last_seen"]), now) or None})
            if self.kernel.wg:
                rows[-1].update(wg_ip=wg_ip(self.cfg, n), wg_public_key=a.get("wg_public_key"))
        active = sum(r["active"] for r in rows)
        return {"enabled": self.cfg["OVERLAY_ENABLED"], "host_ip": str(self.layout.host_ip),
                "host_prefix": self.layout.host_prefix,
                "bridge": self.cfg["OVERLAY_BRIDGE_NAME"], "overlay_cidr": self.layout.cidr,
                "total": len(rows), "active": active, "inactive": len(rows) - active,
                "available_ids": self.layout.max_id - len(rows), "max_ids": self.layout.max_id,
                "vxlan_id": self.cfg["OVERLAY_VXLAN_ID"],
                "vxlan_port": self.cfg["OVERLAY_VXLAN_PORT"], "mtu": self.cfg["OVERLAY_MTU"],
                "encryption": self.cfg["OVERLAY_ENCRYPTION"], "allocations": rows}

    def peers(self):
        """Direct routing's peer table from memory: (version, peers). The version is a digest
        of the table, so it changes with every registration, release, eviction or address
        change and survives a restart unchanged; 0 (and no peers) when direct routing is off.
        With encryption every peer also carries its WireGuard public key and tunnel address (a
        full mesh of kohaku-wg), so a new key changes the version too."""
        if not self.cfg["OVERLAY_DIRECT_ROUTING"]:
            return 0, []
        allocs = self.allocs
        cached = self._peers
        if cached[0] is not allocs:
            peers = [{"runner_name": a["runner_name"], "runner_id": n,
                      "subnet": str(self.layout.subnet(n)), "physical_ip": a["physical_ip"],
                      "vtep_mac": vtep_mac(n)}
                     for n, a in sorted(allocs.items()) if a["runner_name"]]
            if self.kernel.wg:
                for p in peers:
                    p.update(wg_public_key=allocs[p["runner_id"]].get("wg_public_key"),
                             wg_ip=wg_ip(self.cfg, p["runner_id"]))
            digest = hashlib.sha256(json.dumps(peers, sort_keys=True).encode()).digest()
            cached = self._peers = (allocs, int.from_bytes(digest[:4], "big") >> 1 or 1, peers)
        return cached[1], cached[2]

    def direct_settings(self):
        """What registration and heartbeat answers tell every runner about direct routing."""
        return {"direct_routing": self.cfg["OVERLAY_DIRECT_ROUTING"],
                "peers_version": self.peers()[0]}

    def heartbeat(self, name, peer):
        with self.lock:
            alloc = next((a for a in self.allocs.values() if a["runner_name"] == name), None)
            if alloc is None:
                raise ApiError(404, "runner {} is not registered here: register again".format(name))
            if alloc["physical_ip"] != peer:
                raise ApiError(404, "runner {} is registered from {}, not {}: register "
                                    "again".format(name, alloc["physical_ip"], peer))
            self.beats[name] = time.monotonic()
            self.seen[name] = time.time()
            n = alloc["runner_id"]
        METRICS.inc("heartbeats")
        answer = {"ok": True}
        answer.update(self.direct_settings())
        answer.update(self.wg_answer(n))
        return answer

    def metrics(self):
        """GET /metrics: the hub's figures and METRICS. Holds the hub's lock only to copy the
        allocations (never waits on the writer thread); reads every tunnel's counters with one
        `ip -s -j link show`."""
        with self.lock:
            allocs = dict((n, dict(a)) for n, a in self.allocs.items())
            beats, seen = dict(self.beats), dict(self.seen)
        try:
            stats = parse_link_stats(run(["ip", "-s", "-j", "link", "show"],
                                         mutates=False).stdout)
        except (OverlayError, ValueError) as exc:   # the rest is still worth scraping
            log.warning("GET /metrics without the tunnel counters: `ip -s -j link show` "
                        "failed (%s)", exc)
            stats = None
        return MetricsText(render_metrics(self.metric_families(allocs, beats, seen, stats)))

    def metric_families(self, allocs, beats, seen, stats, now=None, wall=None):
        """Everything /metrics shows, from copies of the hub's state (pure but for METRICS).
        stats None: the link counters could not be read (kohaku_overlay_tunnel_stats_ok 0)."""
        p = METRIC_PREFIX
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        inactive_after = self.cfg["OVERLAY_INACTIVE_AFTER"]
        runners, ages, by_device = [], [], {}
        for n in sorted(allocs):
            a = allocs[n]
            who = {"runner_name": a["runner_name"] or "", "runner_id": n}
            beat = beats.get(a["runner_name"])
            active = beat is not None and now - beat <= inactive_after
            runners.append((who, active))
            last = seen.get(a["runner_name"], a["last_seen"])
            if beat is not None:
                ages.append((who, round(now - beat, 3)))
            elif last:
                ages.append((who, round(max(0.0, wall - last), 3)))
            by_device[self.layout.device(n)] = dict(who, device=self.layout.device(n))
        active = sum(1 for _, up in runners if up)
        build = {"version": __version__,
                 "mode": "direct" if self.cfg.get("OVERLAY_DIRECT_ROUTING") else "hub",
                 "encryption": self.cfg.get("OVERLAY_ENCRYPTION") or "none"}
        return [
            Family(p + "build_info", "gauge", "Host version, routing mode and encryption "
                   "(always 1).", [(build, 1)]),
            Family(p + "start_time_seconds", "gauge",
                   "Unix time this host process started (its counters start at 0 then).",
                   [({}, round(METRICS.started, 3))]),
            Family(p + "runners", "gauge", "Allocations by state.",
                   [({"state": "active"}, active), ({"state": "inactive"}, len(runners) - active)]),
            Family(p + "free_ids", "gauge", "Runner ids free for a new runner.",
                   [({}, self.layout.max_id - len(allocs))]),
            Family(p + "max_ids", "gauge", "Runner ids this layout has.",
                   [({}, self.layout.max_id)]),
            Family(p + "runner_active", "gauge",
                   "1 when the runner heartbeated within OVERLAY_INACTIVE_AFTER.", runners),
            Family(p + "runner_heartbeat_age_seconds", "gauge",
                   "Seconds since the runner's last heartbeat.", ages),
            Family(p + "tunnel_stats_ok", "gauge",
                   "1 when this scrape read the tunnels' kernel counters.",
                   [({}, stats is not None)]),
        ] + counter_families(*METRICS.snapshot()) + link_stat_families(
            p + "tunnel_", "the runner's tunnel device", stats or {}, by_device.get)

    def submit(self, kind, timeout=30, **args):
        """Queue a change for the writer thread and wait for its answer."""
        job = Job(kind, **args)
        self.jobs.put(job)
        if not job.done.wait(timeout):
            raise ApiError(503, "the host is busy: try again")
        return job.status, job.answer

    # -- start-up -----------------------------------------------------------------------------
    def recovered(self, links):
        """Allocations rebuilt from vxkr* devices whose VNI matches their name."""
        found = {}
        for name, link in links.items():
            n = self.layout.id_of_device(name)
            if n is None or link.kind != "vxlan" or link.vni != self.cfg["OVERLAY_VXLAN_ID"] + n:
                continue
            try:
                usable = _physical_ip_problem(link.remote or "", self.layout) is None
            except ValueError:
                usable = False
            if usable:
                found[n] = new_allocation(n, None, link.remote, 0.0)
        return found

    def load(self):
        """Read the state file, or rebuild it from the devices when it is missing or corrupt."""
        allocs, aside = self.store.read()
        links = self.kernel.refresh()
        if allocs is None:
            found = self.recovered(links)
            if found or aside:
                log.warning("recovered %d allocation(s) from vxkr* devices: %s", len(found),
                            ", ".join("{} -> {}".format(self.layout.device(n), a["physical_ip"])
                                      for n, a in sorted(found.items())) or "none")
            allocs = self.store.update(lambda a: None, fallback=found)
        self.allocs = allocs
        log.info("%d allocation(s) loaded from %s", len(allocs), self.store.path)

    def remotes(self, allocs):
        """{id: address}: what the tunnels must point at (the runner's kohaku-wg address with
        encryption, else its physical IP)."""
        if self.kernel.wg:
            return dict((n, wg_ip(self.cfg, n)) for n in allocs)
        return dict((n, a["physical_ip"]) for n, a in allocs.items())

    def reconcile(self, startup=False):
        """Make the kernel match the allocations: devices, forwarding, rules, firewalld zone.

        Reads the kernel with a constant number of commands, whatever the number of runners.
        """
        repairs, kinds = [], collections.Counter()
        if self.kernel.ensure_forwarding():
            repairs.append("net.ipv4.ip_forward=1")
            kinds["sysctl"] += 1
        if not startup:
            self.kernel.refresh()
        if self.kernel.ensure_host_device():
            repairs.append(HOST_DEVICE)
            kinds["device"] += 1
        with self.lock:
            allocs = dict(self.allocs)
        if self.kernel.ensure_wg(self.wg_peers(allocs)):
            repairs.append(WG_DEV)
        errors, lines = self.kernel.sync_tunnels(self.remotes(allocs), prune=True)
        devices = sorted(set(line.split()[2] if line.startswith("link") else line.split()[-1]
                             for line in lines))
        repairs += devices
        kinds["device"] += len(devices)
        for n, err in sorted(errors.items()):
            if err:
                log.error("cannot build %s for %s: %s", self.layout.device(n),
                          allocs[n]["runner_name"] or "(recovered)", err)
        ipv6 = self.kernel.ensure_ipv6_off([HOST_DEVICE, WG_DEV] +  # absent: nothing to do
                                           [self.layout.device(n) for n in allocs])
        if ipv6:
            repairs.append("IPv6 off on " + " ".join(ipv6))
        if self.kernel.ensure_rules(self.filter_pairs(allocs)):
            repairs.append("iptables rules")
            kinds["rules"] += 1
        trusted = self.kernel.ensure_trusted(
            [HOST_DEVICE] + [self.layout.device(n) for n in allocs] +
            ([WG_DEV] if self.kernel.wg else []))
        if trusted:
            repairs.append("firewalld zone {} for {}".format(TRUSTED_ZONE, " ".join(trusted)))
            kinds["zone"] += len(trusted)
        for kind, count in kinds.items():
            if not startup:                  # at start-up it is building, not repairing
                METRICS.inc("repairs", kind, count)
        if repairs and not startup:
            log.warning("repaired drift: %s", ", ".join(repairs))
        elif repairs:
            log.info("start-up reconcile put in place: %s", ", ".join(repairs))
        if self.seen:
            self.persist(lambda allocs: None)
        return repairs

    # -- the write path: decide -> persist -> converge -> answer -------------------------------
    def decide(self, job, allocs):
        """One job's change to allocs (in place) and its outcome; no I/O, no answer yet."""
        kind, args = job.kind, job.args
        try:
            if kind == "register":
                key = args.get("wg_public_key")
                other = next((a["runner_name"] for a in allocs.values() if key and
                              a.get("wg_public_key") == key and
                              a["runner_name"] != args["runner_name"]), None)
                if other:
                    raise ApiError(409, "wg_public_key is already runner {}'s: give every runner "
                                        "its own key pair (remove the copied *-wg.key)".format(
                                            other))
                job.runner_id, job.evicted = allocate(
                    allocs, self.layout.max_id, args["runner_name"], args["physical_ip"],
                    args.get("previous_runner_id"), self.is_active, self.evictable)
                if key:
                    allocs[job.runner_id]["wg_public_key"] = key
                job.status = 200
            elif kind == "release":
                n = next((i for i, a in allocs.items() if a["runner_name"] == args["name"]), None)
                if n is None:
                    raise ApiError(404, "runner {} has no allocation".format(args["name"]))
                del allocs[n]
                job.status, job.answer = 200, {"released": True}
            elif kind == "cleanup":
                idle = [n for n, a in allocs.items() if self.may_be_released(a)]
                for n in idle:
                    del allocs[n]
                job.status, job.answer = 200, {"released": len(idle)}
        except ApiError as exc:
            job.status, job.answer = exc.status, {"error": exc.message}

    def persist(self, change):
        """One read-modify-write of the state file, merging the heartbeats seen since the last."""
        with self.lock:
            seen, self.seen = self.seen, {}
            fallback = self.allocs

        def apply(allocs):
            now = time.time()
            for a in allocs.values():  # a clock that was ahead leaves no stamp from the future
                a["last_seen"] = min(a["last_seen"], now)
                if a["runner_name"] in seen:
                    a["last_seen"] = max(a["last_seen"], min(seen[a["runner_name"]], now))
            change(allocs)

        try:
            allocs = self.store.update(apply, fallback=fallback)
        except BaseException:
            with self.lock:
                seen.update(self.seen)
                self.seen = seen
            raise
        with self.lock:
            self.allocs = allocs
        return allocs

    def converge(self, before, allocs):
        """One Kernel.apply for the group: the tunnels, the filter when its (address, VNI) pairs
        changed, the zone for new devices. Returns {id: error or None} of the tunnels."""
        wanted = self.remotes(allocs)
        act = self.kernel.tunnel_actions(wanted, prune=True)
        pairs = self.filter_pairs(allocs)
        if pairs != self.filter_pairs(before):
            act += self.kernel.filter_actions(pairs)
        act += Actions(trust=[self.layout.device(n) for n in set(allocs) - set(before)])
        errors = self.kernel.tunnel_errors(wanted, self.kernel.apply(act, "commit", tolerate=True))
        peers = self.wg_peers(allocs)
        if peers != self.wg_peers(before):
            try:
                self.kernel.ensure_wg(peers, probe=False)
            except OverlayError as exc:     # the repair pass tries again
                log.error("cannot update the WireGuard peers of %s: %s", WG_DEV, exc)
        return errors

    def answer(self, jobs, errors=None, failure=None):
        """Hand every job its outcome: the one place a job is answered."""
        now = time.monotonic()
        for job in jobs:
            if failure is not None:
                job.finish(*failure)
                continue
            if job.kind != "register" or job.status != 200:
                if job.kind == "release" and job.status == 200:
                    log.info("released runner %s", job.args["name"])
                    METRICS.inc("releases", "release")
                elif job.kind == "cleanup" and job.status == 200:
                    METRICS.inc("releases", "cleanup", job.answer["released"])
                job.finish(job.status, job.answer)
                continue
            name, n = job.args["runner_name"], job.runner_id
            with self.lock:
                if job.evicted is not None:
                    self.beats.pop(job.evicted["runner_name"], None)
                if not errors.get(n):
                    self.beats[name] = now
            if errors.get(n):
                job.finish(500, {"error": "the host could not build {}: {}".format(
                    self.layout.device(n), errors[n])})
                continue
            answer = {"runner_name": name}
            answer.update(self.layout.allocation(n, self.cfg))
            answer.update(self.direct_settings())
            answer.update(self.wg_answer(n))
            log.info("registered %s as runner %d (%s) from %s", name, n, answer["subnet"],
                     job.args["physical_ip"])
            METRICS.inc("registrations")
            if job.evicted is not None:
                METRICS.inc("evictions")
            job.finish(200, answer)

    def commit(self, jobs):
        """A group of jobs: decide and persist in one state write, converge in one
        Kernel.apply (one `ip` batch, one filter update), then answer each job."""
        before = self.allocs
        failpoint("commit:before-save")
        try:
            allocs = self.persist(lambda allocs: [self.decide(j, allocs) for j in jobs])
        except Exception as exc:  # a failed write answers everyone; nothing was applied
            log.error("cannot save the state: %s", exc)
            self.answer(jobs, failure=(500, {
                "error": "the host cannot save its state: {}".format(exc)}))
            return
        failpoint("commit:after-save")
        errors = self.converge(before, allocs)
        failpoint("commit:before-answer")
        self.answer(jobs, errors)

    def writer(self):
        """The only thread that changes the state file or the kernel while serving."""
        interval = self.cfg["OVERLAY_REPAIR_INTERVAL"]
        next_pass = time.monotonic() + interval
        while not self.stop.is_set():
            jobs = self._next_group(max(0.0, next_pass - time.monotonic()))
            if jobs:
                try:
                    self.commit(jobs)
                except Exception as exc:
                    log.exception("internal error while applying changes: %r", exc)
                    self.answer([j for j in jobs if not j.done.is_set()],
                                failure=(500, {"error": "internal error: {}".format(exc)}))
            if time.monotonic() >= next_pass and not self.stop.is_set():
                try:
                    self.reconcile()
                except OverlayError as exc:
                    log.error("repair pass failed: %s", exc)
                except Exception as exc:
                    log.exception("internal error in the repair pass: %r", exc)
                next_pass = time.monotonic() + interval
        self.answer(self._next_group(None),
                    failure=(503, {"error": "the host is shutting down: try again"}))

    def _next_group(self, timeout):
        """The jobs queued now (waiting up to timeout for a first one; None: do not wait)."""
        jobs = []
        if timeout is not None:
            try:
                jobs.append(self.jobs.get(timeout=timeout))
            except queue.Empty:
                pass
        while True:
            try:
                jobs.append(self.jobs.get_nowait())
            except queue.Empty:
                return [j for j in jobs if j is not None]


# ---------------------------------------------------------------------------------------------
# The API: a pure dispatch() behind a small selectors-based HTTP/1.1 server
# ---------------------------------------------------------------------------------------------

REGISTER_FIELDS = (("runner_name", str), ("physical_ip", str), ("vxlan_id", int),
                   ("vxlan_port", int), ("mtu", int))
SETTINGS = (("vxlan_id", "OVERLAY_VXLAN_ID"), ("vxlan_port", "OVERLAY_VXLAN_PORT"),
            ("mtu", "OVERLAY_MTU"))


class Api(object):
    def __init__(self, hub):
        self.hub = hub
        self.token = hub.cfg["OVERLAY_TOKEN"].encode("utf-8")

    def dispatch(self, method, path, headers, body, peer):
        """(method, path, {lowercase header: value}, body bytes or None, peer ip)
        -> (status, obj)."""
        try:
            return self._route(method, path.split("?", 1)[0], headers, body, peer)
        except ApiError as exc:
            return exc.status, {"error": exc.message}

    def _authorized(self, headers):
        if not self.token:
            return True
        given = headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode("latin-1", "replace"), self.token)

    def _route(self, method, path, headers, body, peer):
        if path == "/healthz":
            self._method(method, "GET")
            return 200, {"ok": True}
        if path == "/metrics":
            self._method(method, "GET")
            if not self._authorized(headers):
                raise ApiError(401, "missing or wrong bearer token: send Authorization: Bearer "
                                    "<OVERLAY_TOKEN> (Prometheus: authorization: credentials)")
            return 200, self.hub.metrics()
        if not path.startswith("/api/overlay/"):
            raise ApiError(404, "no such endpoint: {} {}".format(method, path[:100]))
        if not self._authorized(headers):
            raise ApiError(401, "missing or wrong bearer token: send Authorization: Bearer "
                                "<OVERLAY_TOKEN>")
        parts = path[len("/api/overlay/"):].split("/")
        verb, arg = parts[0], unquote("/".join(parts[1:])) if len(parts) > 1 else None
        if verb == "status" and arg is None:
            self._method(method, "GET")
            return 200, self.hub.status()
        if verb == "register" and arg is None:
            self._method(method, "POST")
            return self._register(body, peer)
        if verb == "peers" and arg is None:
            self._method(method, "GET")
            self._enabled()
            version, peers = self.hub.peers()
            return 200, {"version": version, "peers": peers}
        if verb == "cleanup" and arg is None:
            self._method(method, "POST")
            self._enabled()
            return self.hub.submit("cleanup")
        if verb in ("heartbeat", "release") and arg is not None:
            self._method(method, "PUT" if verb == "heartbeat" else "POST")
            if bad_name(arg):
                raise ApiError(400, bad_name(arg))
            self._enabled()
            if verb == "release":
                return self.hub.submit("release", name=arg)
            return 200, self.hub.heartbeat(arg, peer)
        raise ApiError(404, "no such endpoint: {} {}".format(method, path[:100]))

    @staticmethod
    def _method(method, want):
        if method != want:
            raise ApiError(405, "use {} for this endpoint".format(want))

    def _enabled(self):
        if not self.hub.cfg["OVERLAY_ENABLED"]:
            raise ApiError(503, "the overlay is disabled on this host (OVERLAY_ENABLED = False "
                                "in host_config.py); containers use kohakuriver-net")

    def _register(self, body, peer):
        if body is None:
            raise ApiError(411, "a registration needs a JSON body sent with Content-Length")
        try:
            req = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise ApiError(400, "the body is not valid UTF-8 JSON")
        if not isinstance(req, dict):
            raise ApiError(400, "the body must be a JSON object")
        for field, kind in REGISTER_FIELDS:
            if field not in req:
                raise ApiError(400, "missing field {}".format(field))
            if type(req[field]) is not kind:
                raise ApiError(400, "field {} must be {}".format(
                    field, "a string" if kind is str else "an integer"))
        prev = req.get("previous_runner_id")
        if prev is not None and type(prev) is not int:
            raise ApiError(400, "field previous_runner_id must be an integer or null")
        wg_key = req.get("wg_public_key")
        if wg_key is not None and (not isinstance(wg_key, str) or not WG_KEY_RE.match(wg_key)):
            raise ApiError(400, "field wg_public_key must be a WireGuard public key (the output "
                                "of wg pubkey)")
        name, ip = req["runner_name"], req["physical_ip"]
        if bad_name(name, "runner_name"):
            raise ApiError(400, bad_name(name, "runner_name"))
        try:
            problem = _physical_ip_problem(ip, self.hub.layout,
                                           self.hub.cfg["HOST_REACHABLE_ADDRESS"])
        except ValueError:
            raise ApiError(400, "physical_ip {!r} is not an IPv4 address".format(ip[:80]))
        if problem:
            raise ApiError(400, "physical_ip {} is {}: use the runner's underlay address".format(
                ip, problem))
        if ip != peer:
            raise ApiError(400, "physical_ip {} is not the address this request came from ({}): "
                                "set RUNNER_ADDRESS to the runner's underlay address".format(
                                    ip, peer))
        for field, key in SETTINGS:
            mine = self.hub.cfg[key]
            if req[field] != mine:
                raise ApiError(409, "{} is {} on the runner but {} on the host: set {} = {} in "
                                    "runner_config.py".format(field, req[field], mine, key, mine))
        self._enabled()
        return self.hub.submit("register", runner_name=name, physical_ip=ip,
                               previous_runner_id=prev, wg_public_key=wg_key)


def _physical_ip_problem(value, layout, host_address=None):
    """Why an address cannot be a runner's physical IP, or None."""
    ip = ipaddress.IPv4Address(value)
    for flag, what in ((ip.is_loopback, "a loopback address"),
                       (ip.is_unspecified, "the unspecified address"),
                       (ip.is_multicast, "a multicast address"),
                       (ip.is_link_local, "a link-local address"),
                       (ip == ipaddress.IPv4Address("255.255.255.255"), "the broadcast address"),
                       (ip.is_reserved, "a reserved address"),
                       (ip in layout.network, "inside the overlay {}".format(layout.cidr)),
                       (host_address is not None and value == host_address,
                        "the host's own address")):
        if flag:
            return what
    return None


def bad_name(value, what="runner name"):
    """The one sentence for a runner name that NAME_RE refuses, or None."""
    if NAME_RE.match(value):
        return None
    return "bad {} {!r}: use 1-63 of A-Za-z0-9._- starting with a letter or digit".format(
        what, value[:80])


class _Conn(object):
    __slots__ = ("sock", "peer", "deadline", "buf", "draining", "closed")

    def __init__(self, sock, peer, deadline):
        self.sock, self.peer, self.deadline, self.buf = sock, peer, deadline, b""
        self.draining = self.closed = False


class ApiServer(object):
    """One thread reads every request in whole, with a deadline for the whole request (a
    client trickling a byte at a time holds no thread); a bounded pool runs the handlers."""

    def __init__(self, dispatch, address, port, deadline=REQUEST_DEADLINE, workers=MAX_WORKERS):
        self.dispatch, self.deadline = dispatch, deadline
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((address, port))
        except OSError as exc:
            self.sock.close()
            if exc.errno == errno.EADDRINUSE:  # issue 11.13: KohakuRiver's own host has 8000
                raise OverlayError(
                    "HOST_PORT {} is already in use on {} (KohakuRiver's own host listens on "
                    "8000 by default): set HOST_PORT to a free port in the Host's config and the "
                    "same HOST_PORT in every runner's config".format(port, address))
            raise OverlayError("cannot listen on {}:{}: {}; set HOST_BIND_IP/HOST_PORT or stop "
                               "what uses the port".format(address, port, exc.strerror))
        self.sock.listen(512)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ)
        self.conns = {}
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_conns = MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else \
            max(16, min(MAX_CONNECTIONS, soft - workers - 64))
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.pending = [0]
        self.per_source = collections.Counter()  # open connections by peer address
        self.pending_lock = threading.Lock()      # guards pending and per_source
        self.refusals = RefusalLog()
        self.stopped = threading.Event()

    def serve(self):
        try:
            while not self.stopped.is_set():
                for key, _ in self.sel.select(timeout=0.25):
                    if key.fileobj is self.sock:
                        self._accept()
                    else:
                        self._read(self.conns.get(key.fileobj))
                self._expire()
        finally:
            for conn in list(self.conns.values()):
                self._close(conn)
            self.sel.close()
            self.sock.close()
            self.pool.shutdown(wait=False)

    def shutdown(self):
        self.stopped.set()

    def _accept(self):
        for _ in range(64):
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.warning("accept failed: %s", exc)
                return
            if len(self.conns) >= self.max_conns:
                sock.close()
                self.refusals.note(addr[0], 503, "", "", "over {} open connections".format(
                    self.max_conns))
                continue
            with self.pending_lock:
                crowded = self.per_source[addr[0]] >= MAX_PER_SOURCE
                if not crowded:
                    self.per_source[addr[0]] += 1
            if crowded:  # one client cannot hold every slot
                error = "too many connections from {}: at most {} at a time".format(
                    addr[0], MAX_PER_SOURCE)
                self.refusals.note(addr[0], 503, "", "", error)
                try:
                    sock.setblocking(False)
                    sock.send(http_response(503, {"error": error}))
                except OSError:
                    pass
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, addr[0], time.monotonic() + self.deadline)
            self.conns[sock] = conn
            self.sel.register(sock, selectors.EVENT_READ)

    def _release(self, conn):
        """Close the connection's socket and give its source its slot back (once)."""
        try:
            conn.sock.close()
        except OSError:
            pass
        with self.pending_lock:
            if not conn.closed:
                conn.closed = True
                self.per_source[conn.peer] -= 1
                if self.per_source[conn.peer] <= 0:
                    del self.per_source[conn.peer]

    def _drop(self, conn):
        self.conns.pop(conn.sock, None)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _close(self, conn, status=None, answer=None):
        self._drop(conn)
        if status is not None:
            try:
                conn.sock.send(http_response(status, answer))
            except OSError:
                pass
        self._release(conn)

    def _refuse(self, conn, status, answer):
        """Answer early (the body is still arriving), then read and discard what the client
        still sends for a moment: closing with unread data would reset the connection before
        the client reads the answer."""
        self.refusals.note(conn.peer, status, *_request_line(conn.buf), error=answer["error"])
        try:
            conn.sock.send(http_response(status, answer))
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.draining, conn.buf = True, b""
        conn.deadline = min(conn.deadline, time.monotonic() + 2.0)

    def _read(self, conn):
        if conn is None:
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if conn.draining:
            return
        conn.buf += data
        try:
            request = parse_request(conn.buf)
        except ApiError as exc:
            self._refuse(conn, exc.status, {"error": exc.message})
            return
        except Exception as exc:  # a parser bug must never end the loop that serves everyone
            log.exception("cannot parse a request from %s: %r", conn.peer, exc)
            self._refuse(conn, 400, {"error": "malformed request"})
            return
        if request is None:
            return
        with self.pending_lock:
            if self.pending[0] >= MAX_PENDING:
                busy = True
            else:
                busy = False
                self.pending[0] += 1
        if busy:
            self._refuse(conn, 503, {"error": "the host is busy: try again"})
            return
        self._drop(conn)
        self.pool.submit(self._handle, conn, request)

    def _expire(self):
        now = time.monotonic()
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            if conn.draining:
                self._close(conn)
            else:
                error = "the request was not complete within {} s".format(self.deadline)
                self.refusals.note(conn.peer, 408, *_request_line(conn.buf), error=error)
                self._close(conn, 408, {"error": error})

    def _handle(self, conn, request):
        method, path, headers, body = request
        try:
            try:
                status, answer = self.dispatch(method, path, headers, body, conn.peer)
            except Exception as exc:  # never a traceback to the client
                log.exception("internal error on %s %s: %r", printable(method, 16),
                              printable(path, 100), exc)
                status, answer = 500, {"error": "internal error: {}".format(exc)}
            if status >= 400:
                self.refusals.note(conn.peer, status, method, path, answer.get("error"))
            conn.sock.setblocking(True)
            conn.sock.settimeout(2.0)
            conn.sock.sendall(http_response(status, answer))
        except OSError:
            pass
        finally:
            with self.pending_lock:
                self.pending[0] -= 1
            self._release(conn)


class RefusalLog(object):
    """Refused requests, logged at most REFUSALS_LOGGED per REFUSAL_WINDOW seconds (a flood
    cannot fill the journal); the rest are counted and the count logged when a window ends.
    Method, path and error are cut and their control characters escaped."""

    def __init__(self, limit=REFUSALS_LOGGED, window=REFUSAL_WINDOW, clock=time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self.lock = threading.Lock()
        self.start, self.logged, self.dropped = clock(), 0, 0

    def note(self, peer, status, method, path, error):
        with self.lock:
            now = self.clock()
            if now - self.start >= self.window:
                if self.dropped:
                    log.warning("%d more refused request(s) in the last %d s were not logged",
                                self.dropped, now - self.start)
                self.start, self.logged, self.dropped = now, 0, 0
            if self.logged >= self.limit:
                self.dropped += 1
                return
            self.logged += 1
        log.info("%s %s from %s: %d %s", printable(method, 16) or "-", printable(path, 100) or "-",
                 peer, status, printable(error or "", 200))


def printable(text, limit):
    """text cut to limit characters, every control or non-ASCII character escaped (\\x1b), so
    a request cannot forge log lines or terminal escapes."""
    out = "".join(c if " " <= c <= "~" and c != "\\" else "\\x{:02x}".format(ord(c))
                  if ord(c) < 256 else "\\u{:04x}".format(ord(c) & 0xFFFF) for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


def _request_line(buf):
    """(method, path) of a request whose start has arrived, for the log; ("", "") before."""
    line = buf.split(b"\r\n", 1)[0].decode("latin-1")
    method, _, rest = line.partition(" ")
    return method, rest.rsplit(" ", 1)[0] if " " in rest else rest


def parse_request(buf):
    """Bytes received so far -> None (need more) or (method, path, headers, body or None).

    Raises ApiError for a request that can never be valid (too large, chunked, malformed).
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEADER:
            raise ApiError(431, "request headers over {} bytes".format(MAX_HEADER))
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    request = lines[0].split(" ")
    if len(request) != 3 or not request[2].startswith("HTTP/1."):
        raise ApiError(400, "malformed request line")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ApiError(400, "malformed header line")
        name, value = name.lower(), value.strip()
        if name in headers and name == "content-length" and headers[name] != value:
            raise ApiError(400, "conflicting Content-Length headers")
        headers[name] = value
    if "transfer-encoding" in headers:
        raise ApiError(400, "chunked or encoded request bodies are not accepted: send "
                            "Content-Length")
    if "content-length" not in headers:
        return request[0], request[1], headers, None
    length = headers["content-length"]
    if not re.match(r"\A[0-9]{1,12}\Z", length):
        raise ApiError(400, "Content-Length must be a non-negative integer")
    if int(length) > MAX_BODY:
        raise ApiError(413, "request body over {} bytes".format(MAX_BODY))
    body = buf[end + 4:end + 4 + int(length)]
    if len(body) < int(length):
        return None
    return request[0], request[1], headers, body


def http_response(status, obj):
    """The bytes of an answer (JSON, or the text of a MetricsText). Every answer the server
    sends comes through here, so this is where a refused request (400 and up) is counted."""
    if status >= 400:
        METRICS.inc("refused", refusal_reason(status, obj))
    if isinstance(obj, MetricsText):
        body, kind = obj.encode("utf-8"), obj.content_type
    else:
        body, kind = (json.dumps(obj, sort_keys=True) + "\n").encode(), "application/json"
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    head = "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n" \
           "Cache-Control: no-store\r\n\r\n".format(status, phrase, kind, len(body))
    return head.encode() + body


# ---------------------------------------------------------------------------------------------
# Status rendering: the guide's panel and table
# ---------------------------------------------------------------------------------------------

BOX = {"unicode": dict(zip("tl tr bl br h v Tl Tm Tr Th Tv Hl Hm Hr Bl Bm Br".split(),
                           "╭ ╮ ╰ ╯ ─ │ ┏ ┳ ┓ ━ ┃ ┡ ╇ ┩ └ ┴ ┘".split())),
       "ascii": dict(zip("tl tr bl br h v Tl Tm Tr Th Tv Hl Hm Hr Bl Bm Br".split(),
                         "+ + + + - | + + + = | + + + + + +".split()))}
PANEL_TITLE, TABLE_TITLE = "Overlay Network Status", "Runner Allocations"
PANEL_WIDTH = 64                # inner width, as the guide prints it
TABLE_TITLE_INDENT = 10
COLUMNS = (("Runner", 14, "<"), ("ID", 2, ">"), ("Subnet", 13, "<"), ("Physical IP", 13, "<"),
           ("Status", 6, "<"))


def render_status(st, ascii_only=False):
    b = BOX["ascii" if ascii_only else "unicode"]
    lines = ["Host IP: {}/{}".format(st["host_ip"], st["host_prefix"]),
             "Bridge: {}".format(st["bridge"]),
             "Total Allocations: {}".format(st["total"]),
             "Active: {} | Inactive: {}".format(st["active"], st["inactive"]),
             "Available IDs: {}/{}".format(st["available_ids"], st["max_ids"])]
    if not st["enabled"]:
        lines.insert(0, "Overlay: disabled (OVERLAY_ENABLED = False)")
    inner = max([PANEL_WIDTH] + [len(line) + 2 for line in lines])
    dashes = inner - len(PANEL_TITLE) - 2
    out = [b["tl"] + b["h"] * (dashes // 2) + " " + PANEL_TITLE + " " +
           b["h"] * (dashes - dashes // 2) + b["tr"]]
    out += [b["v"] + " " + line.ljust(inner - 2) + " " + b["v"] for line in lines]
    out += [b["bl"] + b["h"] * inner + b["br"], ""]
    rows = [[a["runner_name"] or "(recovered)", str(a["runner_id"]), a["subnet"],
             a["physical_ip"], "Active" if a["active"] else "Inactive"]
            for a in st["allocations"]]
    widths = [max([w, len(title)] + [len(r[i]) for r in rows])
              for i, (title, w, _) in enumerate(COLUMNS)]

    def row(cells, sep):
        return sep + sep.join(" " + (c.rjust(w) if align == ">" else c.ljust(w)) + " "
                              for c, w, (_, _, align) in zip(cells, widths, COLUMNS)) + sep

    def rule(left, mid, right, h):
        return left + mid.join(h * (w + 2) for w in widths) + right

    out.append(" " * TABLE_TITLE_INDENT + TABLE_TITLE)
    out.append(rule(b["Tl"], b["Tm"], b["Tr"], b["Th"]))
    out.append(row([c[0] for c in COLUMNS], b["Tv"]))
    out.append(rule(b["Hl"], b["Hm"], b["Hr"], b["Th"]))
    out += [row(r, b["v"]) for r in rows]
    out.append(rule(b["Bl"], b["Bm"], b["Br"], b["h"]))
    return "\n".join(out)


def can_print_unicode(stream):
    try:
        "╭━┃".encode(getattr(stream, "encoding", None) or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(prog="kohaku_overlay_host.py",
                                description="kohaku-overlay host: the VXLAN hub.")
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, helptext, func):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--config", default=None, help="config file (default {})".format(
            DEFAULT_CONFIG))
        sp.set_defaults(func=func)
        return sp

    add("serve", "run the hub (foreground; systemd ExecStart)", cmd_serve).add_argument(
        "--dry-run", action="store_true", help="print the commands it would run, change nothing")
    sp = add("status", "print the allocation table from the running hub", cmd_status)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--ascii", action="store_true", help="plain ASCII borders")
    sp = add("release", "release one runner's allocation and tunnel", cmd_release)
    sp.add_argument("name")
    sp.add_argument("--yes", action="store_true", help="do not ask")
    add("cleanup", "release every inactive allocation", cmd_cleanup).add_argument(
        "--yes", action="store_true", help="do not ask")
    add("down", "remove kohaku-host, every vxkr* and the rules", cmd_down).add_argument(
        "--dry-run", action="store_true", help="print the commands it would run, change nothing")
    return p


def cmd_serve(args, cfg, layout):
    global DRY_RUN
    DRY_RUN = args.dry_run
    store = StateStore(cfg["OVERLAY_STATE_FILE"], read_only=args.dry_run)
    kernel = Kernel(cfg, layout)
    hub = Hub(cfg, layout, store, kernel)
    enabled = cfg["OVERLAY_ENABLED"]
    if enabled:
        check_reachable_address(cfg, wait=0 if args.dry_run else ADDRESS_WAIT)
        if kernel.wg:
            kernel.refresh()
            kernel.check_wg_mtu()
    if args.dry_run:
        if enabled:
            kernel.wg_public = ensure_wg_key(cfg["OVERLAY_STATE_FILE"], read_only=True) \
                if kernel.wg else None
            hub.load()
            hub.reconcile(startup=True)
        print("dry run: the commands above would run; nothing was changed")
        return 0
    store.hold_serve_lock()  # held until the process exits
    if not cfg["OVERLAY_TOKEN"]:
        log.warning("OVERLAY_TOKEN is empty: anyone who reaches port %d can register runners "
                    "and release allocations; set OVERLAY_TOKEN on the host and every runner",
                    cfg["HOST_PORT"])
    if enabled:
        if kernel.wg:
            kernel.wg_public = ensure_wg_key(cfg["OVERLAY_STATE_FILE"])
        hub.load()
    else:
        log.warning("OVERLAY_ENABLED is False: serving status only, registrations are refused")
        hub.allocs = store.read(move_aside=False)[0] or {}
    server = ApiServer(Api(hub).dispatch, cfg["HOST_BIND_IP"], cfg["HOST_PORT"])

    def stop(signum, frame):
        log.info("signal %d: stopping; tunnels stay in place", signum)
        hub.stop.set()
        hub.jobs.put(None)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    thread = threading.Thread(target=server.serve, name="api")
    thread.daemon = True
    thread.start()
    try:
        if enabled:
            hub.reconcile(startup=True)
        log.info("serving the overlay API on %s:%d (overlay %s, %d runner(s))",
                 cfg["HOST_BIND_IP"], server.port, layout.cidr, len(hub.allocs))
        notify_systemd("READY=1")
        if enabled:
            hub.writer()
        else:
            while not hub.stop.wait(3600):
                pass
    finally:
        notify_systemd("STOPPING=1")
        server.shutdown()
        thread.join(5)
    return 0


def notify_systemd(message):
    """sd_notify without libsystemd: a datagram to $NOTIFY_SOCKET, if set."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.connect(path)
        sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc)
    finally:
        sock.close()


def check_reachable_address(cfg, wait=0):
    value = cfg["HOST_REACHABLE_ADDRESS"]
    if not value:
        raise ConfigError("HOST_REACHABLE_ADDRESS is not set: set it in host_config.py to this "
                          "host's underlay IP that runners can reach")
    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        raise ConfigError("HOST_REACHABLE_ADDRESS {!r} is not an IPv4 address: set it to this "
                          "host's underlay IP".format(value))
    if ip.is_loopback or ip.is_unspecified:
        raise ConfigError("HOST_REACHABLE_ADDRESS is {}, which runners cannot reach (VXLAN "
                          "tunnels would fail): set it to the Host's actual IP".format(value))
    deadline = time.monotonic() + wait
    while value not in local_addresses():
        if time.monotonic() >= deadline:
            raise ConfigError("HOST_REACHABLE_ADDRESS {} is not an address of this machine: set "
                              "it to one of this host's own IPs (see `ip -br addr`)".format(value))
        if wait:  # at boot the address may come a little after us (DHCP, slow links)
            log.warning("HOST_REACHABLE_ADDRESS %s is not on any interface yet; waiting up to "
                        "%d s", value, wait)
            wait = 0
        time.sleep(1)


def local_addresses():
    out = run(["ip", "-j", "addr", "show"], mutates=False).stdout
    return set(a["local"] for item in json.loads(out or "[]") for a in item.get("addr_info", []))


def cmd_status(args, cfg, layout):
    st = api_call(cfg, "GET", "/api/overlay/status")
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(render_status(st, args.ascii or not can_print_unicode(sys.stdout)))
    return 0


def cmd_release(args, cfg, layout):
    if bad_name(args.name):
        raise ConfigError(bad_name(args.name))
    if not confirm("Release runner {}? Its id and tunnel are freed; a runner that still runs "
                   "registers again at its next heartbeat.".format(args.name), args.yes):
        print("nothing released")
        return 1
    api_call(cfg, "POST", "/api/overlay/release/" + args.name)
    print("released {}".format(args.name))
    return 0


def cmd_cleanup(args, cfg, layout):
    if not confirm("Release every inactive runner's allocation and tunnel?", args.yes):
        print("nothing released")
        return 1
    answer = api_call(cfg, "POST", "/api/overlay/cleanup")
    print("released {} inactive allocation(s)".format(answer["released"]))
    return 0


def confirm(question, yes):
    if yes or not sys.stdin.isatty():
        return True
    try:
        answer = input(question + " [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def api_call(cfg, method, path):
    """Talk to the running host's API (127.0.0.1 when it binds every address)."""
    import http.client  # only the one-shot commands need it; serve starts faster without
    address = "127.0.0.1" if cfg["HOST_BIND_IP"] == "0.0.0.0" else cfg["HOST_BIND_IP"]
    where = "http://{}:{}".format(address, cfg["HOST_PORT"])
    headers = {"Content-Length": "0"}
    if cfg["OVERLAY_TOKEN"]:
        headers["Authorization"] = "Bearer " + cfg["OVERLAY_TOKEN"]
    conn = http.client.HTTPConnection(address, cfg["HOST_PORT"], timeout=10)
    try:
        conn.request(method, path, body=b"", headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise OverlayError("cannot reach the host API at {}: {}; is `kohaku_overlay_host.py "
                           "serve` running? (systemctl status kohakuriver-overlay-host)".format(
                               where, getattr(exc, "strerror", None) or exc))
    finally:
        conn.close()
    try:
        answer = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise OverlayError("the host API at {} answered {} with something that is not "
                           "JSON".format(where, resp.status))
    if resp.status != 200:
        raise OverlayError("the host API answered {}: {}".format(resp.status, answer.get("error")))
    return answer


def cmd_down(args, cfg, layout):
    """Remove kohaku-host, every vxkr*, the rules and zone entries; allocations are kept."""
    global DRY_RUN
    DRY_RUN = args.dry_run
    store = StateStore(cfg["OVERLAY_STATE_FILE"])
    if store.serve_running():
        raise OverlayError("kohaku_overlay_host.py serve is running and would rebuild everything: "
                           "stop it first (systemctl stop kohakuriver-overlay-host)")
    kernel = Kernel(cfg, layout)
    links = kernel.refresh()
    names = sorted(n for n, l in links.items() if n == HOST_DEVICE or (
        l.kind == "vxlan" and layout.id_of_device(n) is not None) or (
        n == WG_DEV and l.kind in ("wireguard", "tun")))   # wireguard-go exits with it
    if kernel.detect_firewalld():
        ours = sorted(set(names) & kernel.trusted_interfaces())
        if ours:
            run(["firewall-cmd", "--zone=" + TRUSTED_ZONE] +
                ["--remove-interface=" + n for n in ours])
    kernel.apply(Actions(ip=["link del " + n for n in names]), check=True)
    rules = kernel.removal_plan(kernel.read_rules())
    kernel.apply(Actions(rules=rules))
    what = "would remove" if args.dry_run else "removed"
    print("{} {} device(s) and {} rule change(s); allocations kept in {}".format(
        what, len(names), len(rules), store.path))
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    daemon = args.command == "serve" and not getattr(args, "dry_run", False)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO if args.command in ("serve", "down") else
        logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if daemon else "%(message)s")
    try:
        cfg, layout = load_settings(args.config or DEFAULT_CONFIG, args.config is not None)
        return args.func(args, cfg, layout)
    except OverlayError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception as exc:  # the last line of defence: one line, never a traceback
        log.debug("internal error", exc_info=True)
        print("error: internal error: {!r}; please report it".format(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
