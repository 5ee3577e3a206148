#!/usr/bin/env python3
"""The kohaku-overlay lab: a whole cluster on one Linux machine, inside network namespaces.

What it builds (and always removes again)::

    ns <prefix>sw    bridge <prefix>sw: the underlay "switch", one veth per node
    ns <prefix>host  eth0 198.51.100.1/24     the Host (runs kohaku_overlay_host.py)
    ns <prefix>r1    eth0 198.51.100.11/24    Runner 1 + its own dockerd (nsenter --net)
    ns <prefix>r2    eth0 198.51.100.12/24    Runner 2 + its own dockerd
    ...              (add_bare_node: more namespaces with an underlay address, no docker)

The machine's own (root) network namespace is never configured: no link, address, route, rule or
sysctl. Scripts run as processes inside the namespaces with the same python as the caller.

Importable API (tests/ is on sys.path through tests/conftest.py)::

    import labkit
    with labkit.Lab(runners=2, docker=True, firewalld=False, prefix=None) as c:
        c.host, c.runners[0]           # Node(name, ns, ip, workdir, docker_host)
                                       #   (runner i is c.runners[i-1])
        c.host_config(**overrides)     # -> Path of host_config.py (value None drops a key)
        c.runner_config(i, **over)     # -> Path of runner_config.py (i: 1-based index or a Node)
        c.start_host(args=())          # -> Popen; waits for GET /healthz from inside the host ns
        c.stop_host(sig=SIGTERM)       # sends sig, waits (SIGKILL after 15 s)
        c.start_runner(i, args=(), wait=None)  # -> Popen; wait=None: when the host runs, wait
                                       #    for the docker network (docker=False: bridge address)
        c.stop_runner(i, sig=SIGTERM)
        c.script(node, "host"|"runner"|"check", *args, check=False, timeout=60) -> CompletedProcess
                                       # one-shot; adds --config (and --role for check) unless given
        c.sh(node, *argv, check=True, timeout=30) -> CompletedProcess   # in the node's namespace
        c.docker(node, *args, check=True) -> CompletedProcess           # that runner's dockerd
        c.container(node, name, network="kohakuriver-overlay", args=()) -> name   # busybox sleep 1d
        c.container_ip(node, name, network="kohakuriver-overlay") -> "10.1.0.2"
        c.cexec(node, name, *argv, check=False) -> CompletedProcess    # inside the container
        c.ping(node, name, dst, count=1, size=None, df=False, timeout=2) -> bool  # all replies came
        c.ping_stream(node, name, dst, interval=0.2) -> PingStream; .stop() -> (sent, received)
        c.status() -> dict             # `host status --json`, parsed
        c.wait_active(["runner1", ...], timeout=20)   # until status shows exactly those Active
        c.firewall_cmd(*args, node=None) -> CompletedProcess  # that node's firewalld (default
                                       #    the Host); Lab(firewalld=True) runs one in the Host,
                                       #    firewalld=["host", "runner1"] in each node named
        c.wait_for(pred, timeout=10, interval=0.1, what="...", log=None)  # AssertionError + logs
        c.log_tail("host"|"runner1"|"dockerd-r1"|..., lines=40) -> str
        labkit.require(docker=True, firewalld=False)    # in a test: skip here / fail under CI=true
                                       #   (wireguard=True: also wg and wireguard-go)
    Lab(private_run=True)              # each node also gets its own mount namespace with a
                                       #   private /run (wireguard-go's control socket
                                       #   /run/wireguard/IFNAME.sock is per node, not shared)
    c.enter(node) -> argv prefix       # what runs a command inside that node's namespaces
        c.add_bare_node(name, ip) -> Node  # a namespace on the underlay, nothing else
        c.iptables_drift(node, delete=[rule], insert=[rule], flush=("filter", "nat"),
                         policy={"FORWARD": "DROP"})   # drift in ONE iptables-restore: the way
                                       #    to inject drift while a daemon repairs (rules in
                                       #    `iptables -S` form; ("nat", rule) for another table)
        c.teardown()                   # idempotent; also on exceptions, atexit and SIGTERM/SIGHUP

Behaviour worth knowing:

- Every script gets ``DOCKER_HOST`` (runners: their own dockerd; elsewhere a socket that does not
  exist, so nothing ever reaches a dockerd of the machine) and ``DBUS_SYSTEM_BUS_ADDRESS`` (the
  lab's private bus of that node when it runs a firewalld, otherwise a socket that does not
  exist, so ``firewall-cmd`` can never reach the machine's own firewalld).
- Logs: ``<workdir>/<node>/<proc>.log`` (host.log, runner.log, dockerd.log, firewalld.log);
  restarts append with a ``=== start ===`` line. Timeouts quote the log tails.
- ping: without ``df`` a container pings with its own busybox ``ping`` (``docker exec``); with
  ``df=True`` (and in ping_stream) iputils ``ping -M do`` runs in the container's network
  namespace through ``nsenter --net`` (busybox ping cannot set DF). ``name=None`` pings from the
  node namespace itself.
- docker=False (or docker="auto" when dockerd cannot run): "containers" are namespaces
  ``<prefix>c<k>`` with a veth on the runner's ``kohaku-overlay`` bridge and the next address of
  its subnet; cexec runs busybox applets there.
- private_run=True: the node's mount namespace (its file ``<workdir>/mnt/<ns>``) has a tmpfs on
  /run and a sysfs of its network namespace on /sys (as ``ip netns exec`` gives); scripts,
  ``sh`` and pings from the node itself enter it with ``nsenter --net --mount``. dockerd,
  firewalld and containers stay in the machine's mount namespace.
- resolv.conf: every lab namespace gets ``/etc/netns/<ns>/resolv.conf`` (``nameserver 127.0.0.1``),
  which ``ip netns exec`` (and a private_run node's mount namespace) puts over /etc/resolv.conf:
  the machine's own nameserver may lie inside the overlay CIDR, which the check and the runner
  report as a conflict (issue 11.4). Teardown removes the folder (and /etc/netns when empty).
- ``KOHAKU_LAB_LOGS=DIR``: teardown copies every log of the lab to DIR/<prefix>/ first.
- D-Bus: each firewalld node gets its own dbus-daemon on ``<workdir>/<node>/dbus.sock``
  (``--address`` and ``--nopidfile``: never the machine's /run/dbus, whatever the machine's
  D-Bus configuration includes); teardown removes any machine bus file its daemons left.
- Names: prefix ``ko<pid>x<rand>-``; workdir ``$KOHAKU_LAB_DIR`` or ``/tmp/kolab`` + ``/<prefix>``
  holding ``lab.json`` (owner pid and start time). Building a lab first removes labs whose owner is
  dead; ``python3 tests/labkit.py down`` removes those too (``--force``: also live ones).

CLI::

    python3 tests/labkit.py demo [--runners N] [--keep] [--firewalld] [--no-docker]
    python3 tests/labkit.py down [--force]
"""

import argparse
import atexit
import io
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

# ---- constants ----

REPO = Path(__file__).resolve().parent.parent
BASE_DIR = Path(os.environ.get("KOHAKU_LAB_DIR", "/tmp/kolab"))
NETNS_ETC = Path("/etc/netns")       # ip netns exec binds NETNS_ETC/<ns>/* over /etc/*
LAB_RESOLV_CONF = "# kohaku-overlay lab: no nameserver of the machine\nnameserver 127.0.0.1\n"
UNDERLAY = ipaddress.ip_network("198.51.100.0/24")
HOST_IP = "198.51.100.1"
TOKEN = "lab-token"
IMAGE = "kohaku-lab/busybox"
OVERLAY_NETWORK = "kohakuriver-overlay"
OVERLAY_BRIDGE = "kohaku-overlay"
SCRIPTS = {
    "host": "kohaku_overlay_host.py",
    "runner": "kohaku_overlay_runner.py",
    "check": "kohaku_overlay_check.py",
}
PREFIX_RE = re.compile(r"^(ko\d+x[0-9a-f]{2}-)")
# the summary line of iputils ping ("3 received") and busybox ping ("3 packets received")
PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
REQUIRED_TOOLS = ("ip", "nsenter", "iptables", "ping", "busybox")
WIREGUARD_TOOLS = ("wg", "wireguard-go")
DOCKER_TOOLS = ("dockerd", "docker")
FIREWALLD_TOOLS = ("firewalld", "firewall-cmd", "dbus-daemon")
BUSYBOX = "/bin/busybox"
HEALTH_PROBE = ("import sys, urllib.request as u\n"
                "print(u.urlopen(sys.argv[1], timeout=2).read().decode())")

_LIVE = []          # labs not torn down yet (atexit / signal handlers walk this)
CREATED = []        # (prefix, workdir) of every lab this process built: the session-end check


def _free_prefix():
    """ko<pid>x<nn>- with an <nn> no namespace or workdir of this machine uses yet: two labs of
    one process live at once (a module's cluster and a test's own), and a random byte alone
    collided one CI run in a few dozen ("/run/netns/...-sw: File exists")."""
    taken = set(list_netns())
    for nn in random.sample(range(256), 256):
        prefix = "ko%dx%02x-" % (os.getpid(), nn)
        used = any(n.startswith(prefix) for n in taken)
        if not used and not (BASE_DIR / prefix.rstrip("-")).exists():
            return prefix
    raise LabError("every lab prefix of this process is taken: remove old labs "
                   "(python3 tests/labkit.py down)")


class LabError(RuntimeError):
    """Something in the lab itself failed; the message says what and quotes the output."""


class LabDied(LabError):
    """A daemon the lab started exited while the lab waited for it (ends a wait at once)."""


def _tail(text, lines=30):
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _fmt_fail(argv, res):
    out = "\n".join(x for x in (_tail(res.stdout or "", 20), _tail(res.stderr or "", 20)) if x)
    return "%s exited %d%s" % (" ".join(map(str, argv)), res.returncode,
                               (":\n" + out) if out else "")


def missing_tools(docker=True, firewalld=False):
    """Names of the binaries the lab needs and this machine lacks (empty list = ready)."""
    want = list(REQUIRED_TOOLS)
    if docker:
        want += DOCKER_TOOLS
    if firewalld:
        want += FIREWALLD_TOOLS
    return [t for t in want if shutil.which(t, path=_path()) is None]


def cannot_run_reason(docker=True, firewalld=False):
    """None when the lab can run here, else one sentence saying why not."""
    if sys.platform != "linux":
        return "the lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, dockerd): run as root"
    miss = missing_tools(docker, firewalld)
    if miss:
        return "missing tools: %s (apt-get install iproute2 iptables iputils-ping util-linux " \
               "busybox-static docker.io firewalld dbus)" % ", ".join(miss)
    return None


def require(docker=True, firewalld=False, wireguard=False):
    """For tests: skip with the reason when the lab cannot run here, fail instead under CI=true.

    wireguard=True also needs wireguard-tools and wireguard-go (installed by .ci/install).
    """
    import pytest
    reason = cannot_run_reason(docker=docker, firewalld=firewalld)
    miss = [t for t in WIREGUARD_TOOLS if wireguard and shutil.which(t, path=_path()) is None]
    if reason is None and miss:
        reason = "missing tools: %s (apt-get install wireguard-tools wireguard-go)" % \
            ", ".join(miss)
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but the lab cannot run: %s" % reason, pytrace=False)
    pytest.skip(reason)


def _path():
    parts = os.environ.get("PATH", "").split(":")
    for extra in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if extra not in parts:
            parts.append(extra)
    return ":".join(p for p in parts if p)


def _run(argv, check=True, timeout=30, env=None, input=None):
    """subprocess.run with text output; failures and timeouts become LabError with the output."""
    argv = [str(a) for a in argv]
    try:
        res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=timeout, env=env, input=input)
    except subprocess.TimeoutExpired as exc:
        output = _tail(_text(exc.stdout) + _text(exc.stderr))
        raise LabError("%s timed out after %ss:\n%s" % (" ".join(argv), timeout, output))
    except FileNotFoundError:
        raise LabError("%s is not installed" % argv[0])
    if check and res.returncode != 0:
        raise LabError(_fmt_fail(argv, res))
    return res


def _text(b):
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


# ---- processes and namespaces of this machine ----

def _proc_start(pid):
    """Start time (clock ticks since boot) of pid, or None when it is gone or a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _alive(pid, start=None):
    st = _proc_start(pid)
    return st is not None and (start is None or st == start)


def list_netns():
    res = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _ns_inode(path):
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _pids_in_netns(inodes):
    """Pids whose network namespace is one of `inodes` (the netns file inodes)."""
    want = {"net:[%d]" % i for i in inodes if i}
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink("/proc/%s/ns/net" % entry) in want:
                pids.append(int(entry))
        except OSError:
            pass
    return pids


def _pids_with_arg(fragment):
    """Pids whose command line mentions `fragment` (a lab workdir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if fragment in cmd:
            pids.append(int(entry))
    return pids


def _kill_all(pids, grace=5.0):
    """SIGTERM, wait up to `grace`, then SIGKILL what is left."""
    pids = [p for p in set(pids) if p != os.getpid() and _alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.time() + (grace if sig == signal.SIGTERM else 5.0)
        while time.time() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return
            time.sleep(0.05)


def _unmount_under(path):
    """Lazily unmount everything mounted at or below `path`, deepest first."""
    path = str(path).rstrip("/")
    try:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1].replace("\\040", " ") for line in f]
    except OSError:
        return
    points = [p for p in points if p == path or p.startswith(path + "/")]
    for p in sorted(set(points), key=lambda s: s.count("/"), reverse=True):
        subprocess.run(["umount", "-l", p], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _write_netns_resolv_conf(ns):
    """NETNS_ETC/<ns>/resolv.conf (a concurrent teardown may remove an empty NETNS_ETC: retry)."""
    for _ in range(5):
        try:
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "resolv.conf").write_text(LAB_RESOLV_CONF)
            return
        except FileNotFoundError:
            continue
    raise LabError("cannot write %s" % (NETNS_ETC / ns / "resolv.conf"))


def _remove_netns_etc(prefix):
    for d in NETNS_ETC.glob(prefix + "*") if NETNS_ETC.is_dir() else []:
        shutil.rmtree(str(d), ignore_errors=True)
    try:
        NETNS_ETC.rmdir()
    except OSError:
        pass            # absent, or another lab's namespaces still have theirs


def destroy(prefix, workdir=None):
    """Remove every trace of the lab `prefix`: its processes, mounts, namespaces and workdir.

    Safe to call on a half-built or already removed lab. Only touches namespaces whose name starts
    with `prefix`, processes inside them or naming the workdir, and mounts below the workdir.
    """
    names = [n for n in list_netns() if n.startswith(prefix)]
    inodes = [_ns_inode("/run/netns/" + n) for n in names]
    if workdir and Path(workdir).is_dir():
        # container namespaces that dockerd bind-mounted under its exec root
        for nsfile in Path(workdir).glob("*/exec/netns/*"):
            inodes.append(_ns_inode(str(nsfile)))
    pids = _pids_in_netns(inodes)
    if workdir:
        pids += _pids_with_arg(str(workdir) + "/")
    _kill_all(pids)
    if workdir:
        _unmount_under(workdir)
    for n in names:
        subprocess.run(["ip", "netns", "delete", n], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    _remove_netns_etc(prefix)
    if workdir and Path(workdir).exists():
        shutil.rmtree(str(workdir), ignore_errors=True)


def known_labs():
    """{prefix: {"workdir": Path|None, "alive": bool}} for every lab found on this machine."""
    labs = {}
    if BASE_DIR.is_dir():
        for d in BASE_DIR.iterdir():
            meta = d / "lab.json"
            if not meta.is_file():
                continue
            try:
                info = json.loads(meta.read_text())
                labs[info["prefix"]] = {"workdir": d,
                                        "alive": _alive(int(info["pid"]), info.get("start"))}
            except (ValueError, KeyError, OSError):
                continue
    for n in list_netns():
        m = PREFIX_RE.match(n)
        if m and m.group(1) not in labs:
            pid = int(m.group(1)[2:].split("x")[0])
            wd = BASE_DIR / m.group(1).rstrip("-")
            labs[m.group(1)] = {"workdir": wd if wd.is_dir() else None, "alive": _alive(pid)}
    return labs


def remove_stale(force=False, say=None):
    """Remove labs whose owner process is gone (all with force); returns the prefixes removed."""
    removed = []
    for prefix, info in sorted(known_labs().items()):
        if info["alive"] and not force:
            continue
        if say:
            say("removing lab %s (%s)" % (prefix, "owner alive" if info["alive"] else "stale"))
        destroy(prefix, info["workdir"])
        removed.append(prefix)
    return removed


# ---- D-Bus: the lab's private buses never touch the machine's ----

# the machine's own system bus: no dbus-daemon of the lab may create (or leave) these
SYSTEM_BUS_FILES = ("/run/dbus/system_bus_socket", "/run/dbus/pid")
# elements of the machine's system.conf that belong to the machine's bus alone
_MACHINE_ONLY = (r"<user>.*?</user>", r"<fork\s*/>", r"<pidfile>.*?</pidfile>", r"<syslog\s*/>",
                 r"<servicehelper>.*?</servicehelper>", r"<standard_system_servicedirs\s*/>",
                 r"<listen>.*?</listen>",
                 # the legacy /etc/dbus-1/system.conf (kept on upgraded machines) and
                 # system-local.conf bring the machine's <listen> and <pidfile> back
                 r"<include\b[^>]*>[^<]*/etc/dbus-1/system(-local)?\.conf</include>")


def bus_config(text, socket, confdir):
    """The lab's dbus-daemon config, made from the machine's system.conf `text` (pure).

    It listens on `socket` alone; it has no pid file, user switch, fork, syslog or service
    activation, and none of the includes that carry the machine's own bus settings; relative
    <includedir>s (the bus policies, FirewallD.conf among them) are made absolute to `confdir`.
    """
    for pat in _MACHINE_ONLY:
        text = re.sub(pat, "", text, flags=re.S)
    text = text.replace("</busconfig>", "<listen>unix:path=%s</listen>\n</busconfig>" % socket)
    return text.replace("<includedir>system.d</includedir>",
                        "<includedir>%s/system.d</includedir>" % confdir)


def dbus_argv(conf, socket):
    """The lab's dbus-daemon command line. --address overrides every <listen> the config (or a
    file it includes) may still name, --nopidfile every <pidfile>: the machine's bus paths are
    never created, whatever the machine's configuration holds."""
    return ["dbus-daemon", "--config-file=%s" % conf, "--address=unix:path=%s" % socket,
            "--nofork", "--nopidfile"]


def _identities(paths):
    """{path: (inode, mtime_ns)} of those of `paths` that exist."""
    found = {}
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        found[path] = (st.st_ino, st.st_mtime_ns)
    return found


def _nobody_listens(path):
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        sock.close()
    return False


def bus_leftovers(before, pids, paths=SYSTEM_BUS_FILES):
    """Which of `paths` the lab's dbus-daemons (`pids`, all stopped by now) left behind.

    Only files that appeared after `before` ({path: identity}, taken before the first of them
    started): a pid file naming one of `pids`, or a socket nobody listens on. A file that was
    there before, is someone else's pid, or a live bus is never the lab's to remove.
    """
    pids = set(str(p) for p in pids)
    left = []
    for path, ident in sorted(_identities(paths).items()):
        if before.get(path) == ident:
            continue
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            if _nobody_listens(path):
                left.append(path)
        elif stat.S_ISREG(st.st_mode):
            try:
                with open(path) as f:
                    if f.read().strip() in pids:
                        left.append(path)
            except OSError:
                pass
    return left


# ---- iptables drift, injected in one step ----

def _drift_rule(rule):
    """(table, rule line): a plain rule line is the filter table's."""
    return rule if isinstance(rule, tuple) else ("filter", rule)


def _drift_tables(delete=(), insert=(), flush=(), policy=None):
    tables = [_drift_rule(r)[0] for r in list(delete) + list(insert)] + list(flush)
    if policy:
        tables.append("filter")
    return sorted(set(tables))


def edit_iptables_save(dump, delete=(), insert=(), flush=(), policy=None):
    """The iptables-restore input that injects drift into an iptables-save `dump` (pure).

    delete: rules as `iptables -S`/iptables-save print them ("-A FORWARD -s ... -j ACCEPT"),
    of the filter table or as (table, rule); each must be there (LabError otherwise).
    insert: rules put first in their chain in the order given (`iptables -I CHAIN 1`).
    flush: tables whose every rule goes, their chains stay (`iptables -t TABLE -F`).
    policy: {built-in chain of the filter table: "DROP"|"ACCEPT"}.
    Only the tables it changes are in the result: iptables-restore leaves the others alone.
    """
    want = _drift_tables(delete, insert, flush, policy)
    tables, order, table = {}, [], None
    for line in dump.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            tables[table] = {"head": [], "rules": []}
            order.append(table)
        elif table is None or line.startswith("#") or not line.strip():
            continue
        elif line == "COMMIT":
            table = None
        elif line.startswith("-A "):
            tables[table]["rules"].append(line)
        else:
            tables[table]["head"].append(line)
    missing = [t for t in want if t not in tables]
    if missing:
        raise LabError("iptables-save has no table %s" % ", ".join(missing))
    for t, rule in (_drift_rule(r) for r in delete):
        if rule not in tables[t]["rules"]:
            raise LabError("cannot delete %r from table %s: no such rule" % (rule, t))
        tables[t]["rules"].remove(rule)
    for t in flush:
        tables[t]["rules"] = []
    for t, rule in reversed([_drift_rule(r) for r in insert]):
        chain = rule.split()[1]
        rules = tables[t]["rules"]
        first = next((i for i, r in enumerate(rules) if r.split()[1] == chain), len(rules))
        rules.insert(first, rule)
    for chain, target in sorted((policy or {}).items()):
        head = tables["filter"]["head"]
        i = next((i for i, h in enumerate(head) if h.split()[0] == ":" + chain), None)
        if i is None:
            raise LabError("the filter table has no chain %s" % chain)
        head[i] = " ".join([":" + chain, target] + head[i].split()[2:])
    out = []
    for t in order:
        if t in want:
            out += ["*" + t] + tables[t]["head"] + tables[t]["rules"] + ["COMMIT"]
    return "\n".join(out) + "\n"


# ---- the cluster ----

class Node(object):
    """One machine of the lab: a network namespace with an underlay address."""

    def __init__(self, name, ns, ip, workdir, docker_host=None, index=None, role="runner"):
        self.name = name
        self.ns = ns
        self.ip = ip
        self.workdir = Path(workdir)
        self.docker_host = docker_host
        self.index = index
        self.role = role
        self.mnt_ns = None      # its mount namespace file with Lab(private_run=True)

    @property
    def netns_path(self):
        return "/run/netns/" + self.ns

    def __repr__(self):
        return "Node(name=%r, ns=%r, ip=%r)" % (self.name, self.ns, self.ip)


class PingStream(object):
    """A continuous iputils ping; stop() returns (transmitted, received)."""

    def __init__(self, popen, logfile):
        self.popen = popen
        self.logfile = logfile

    def stop(self):
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        out = Path(self.logfile).read_text()
        m = PING_SUMMARY.search(out)
        if not m:
            raise LabError("ping printed no summary:\n" + _tail(out))
        return int(m.group(1)), int(m.group(2))

    @property
    def output(self):
        return Path(self.logfile).read_text()


def _write_config(path, values, header):
    lines = ['"""%s (written by tests/labkit.py)."""' % header, ""]
    for key, value in values.items():
        if value is None:
            continue
        lines.append("%s: %s = %r" % (key, type(value).__name__, value))
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


class Lab(object):
    """A cluster in namespaces. See the module docstring for the API."""

    def __init__(self, runners=2, docker=True, firewalld=False, prefix=None, keep=False,
                 verbose=False, private_run=False):
        if prefix is None:
            prefix = _free_prefix()
        if not re.match(r"^[a-z][a-z0-9]*-$", prefix) or len(prefix) > 13:
            raise LabError("prefix %r: use up to 13 characters [a-z0-9] ending in '-'" % prefix)
        self.prefix = prefix
        self.nrunners = runners
        self.want_docker = docker
        self.has_docker = bool(docker)
        self.docker_error = None
        # firewalld: True (the Host), or the names of the nodes that run one ("host", "runner1")
        self.firewalld_nodes = (["host"] if firewalld is True else list(firewalld or ()))
        self.want_firewalld = bool(self.firewalld_nodes)
        self.dbus_addresses = {}    # node name -> its private system bus
        self._bus_files_before = None   # SYSTEM_BUS_FILES before the first dbus-daemon started
        self.keep = keep
        self.verbose = verbose
        self.private_run = private_run
        self.workdir = BASE_DIR / prefix.rstrip("-")
        # the interpreter the scripts run under: KOHAKU_LAB_PYTHON=python3.6 holds them to the floor
        self.python = shutil.which(os.environ.get("KOHAKU_LAB_PYTHON", "")) or sys.executable
        self.host = None
        self.runners = []
        self.bare = []
        self.switch_ns = prefix + "sw"
        self._procs = {}        # key -> (Popen, log Path)
        self._configs = {}      # node name -> (path, values)
        self._containers = {}   # (node name, container name) -> {"ns":, "ip":} (docker=False)
        self._next_cip = {}
        self._down = False
        self._built = False
        self._lock = threading.RLock()

    # -- context manager --

    def __enter__(self):
        try:
            self.up()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc):
        if not self.keep:
            self.teardown()
        return False

    def say(self, msg):
        line = "lab: %s" % msg
        if self.verbose:
            print(line, file=sys.stderr, flush=True)
        try:
            with open(str(self.workdir / "lab.log"), "a") as f:
                f.write("%s %s\n" % (time.strftime("%H:%M:%S"), line))
        except OSError:
            pass

    # -- build --

    def up(self):
        reason = cannot_run_reason(docker=self.want_docker is True, firewalld=self.want_firewalld)
        if reason:
            raise LabError(reason)
        remove_stale(say=self.say)
        _install_handlers()
        _LIVE.append(self)
        CREATED.append((self.prefix, self.workdir))
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "lab.json").write_text(json.dumps({
            "prefix": self.prefix, "pid": os.getpid(), "start": _proc_start(os.getpid()),
            "created": time.time()}))
        self.say("building %d runner(s) in namespaces %s* (workdir %s)"
                 % (self.nrunners, self.prefix, self.workdir))
        self._add_ns(self.switch_ns)
        self._sh_ns(self.switch_ns, "ip", "link", "add", self.prefix + "sw", "type", "bridge")
        self._sh_ns(self.switch_ns, "ip", "link", "set", "dev", self.prefix + "sw", "up")
        if self.private_run:
            self._private_mounts()
        self.host = self._add_node("host", self.prefix + "host", HOST_IP, "h", role="host")
        for i in range(1, self.nrunners + 1):
            node = self._add_node("runner%d" % i, "%sr%d" % (self.prefix, i),
                                  str(UNDERLAY.network_address + 10 + i), "r%d" % i, index=i)
            self.runners.append(node)
        for node in self.runners:
            node.docker_host = "unix://%s/docker.sock" % node.workdir
        # firewalld first, as at boot (docker.service is ordered after firewalld.service): a
        # firewalld that starts later flushes the chains Docker made in that namespace
        for name in self.firewalld_nodes:
            self._start_firewalld(self._node(name))
        if self.want_docker:
            try:
                self._start_dockerds()
            except LabError as exc:
                if self.want_docker != "auto":
                    raise
                self.docker_error = str(exc).splitlines()[0]
                self.say("Docker cannot run here (%s): containers will be plain namespaces"
                         % self.docker_error)
                self._stop_dockerds()
                self.has_docker = False
        if not self.has_docker:
            for node in self.runners:
                node.docker_host = "unix://%s/no-docker.sock" % node.workdir
        self._built = True
        return self

    def _add_ns(self, ns):
        _write_netns_resolv_conf(ns)
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "set", "dev", "lo", "up"])

    def _add_node(self, name, ns, ip, port, index=None, role="runner"):
        """Namespace + veth eth0 (ip/24) whose peer `port` sits on the switch bridge."""
        workdir = self.workdir / ns[len(self.prefix):]
        workdir.mkdir(parents=True, exist_ok=True)
        self._add_ns(ns)
        _run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
              "netns", self.switch_ns])
        _run(["ip", "-n", self.switch_ns, "link", "set", "dev", port, "master", self.prefix + "sw",
              "up"])
        _run(["ip", "-n", ns, "addr", "add", "%s/%d" % (ip, UNDERLAY.prefixlen), "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "dev", "eth0", "up"])
        node = Node(name, ns, ip, workdir, index=index, role=role)
        if self.private_run:
            self._add_mount_ns(node)
        return node

    # -- private mount namespaces (private_run=True) --

    @property
    def _mnt_dir(self):
        return self.workdir / "mnt"

    def _private_mounts(self):
        """A private bind mount to hold the namespace files (unshare refuses a shared one)."""
        d = self._mnt_dir
        d.mkdir(parents=True, exist_ok=True)
        _run(["mount", "--bind", d, d])
        _run(["mount", "--make-private", d])

    def _add_mount_ns(self, node):
        """node.mnt_ns: a mount namespace with a tmpfs /run and the node's own sysfs.

        Slave propagation: a namespace file unmounted in the machine's namespace (another lab's
        `ip netns delete`) is released here too, so no namespace is kept alive by this copy.
        """
        path = self._mnt_dir / node.ns
        path.touch()
        _run(["nsenter", "--net=" + node.netns_path, "unshare", "--mount=%s" % path,
              "--propagation", "slave", "sh", "-c",
              "mount -t tmpfs -o mode=0755 kolab-run /run && umount -l /sys && "
              "mount -t sysfs kolab-sys /sys && { [ ! -f /etc/resolv.conf ] || "
              "mount --bind %s /etc/resolv.conf; }" % (NETNS_ETC / node.ns / "resolv.conf")])
        node.mnt_ns = str(path)

    def enter(self, node):
        """The argv prefix that runs a command inside `node`'s namespaces."""
        node = self._node(node)
        if node.mnt_ns:
            return ["nsenter", "--net=" + node.netns_path, "--mount=" + node.mnt_ns, "--"]
        return ["ip", "netns", "exec", node.ns]

    def add_bare_node(self, name, ip):
        """A namespace with an underlay address and nothing else (a cheap fake runner)."""
        with self._lock:
            if not re.match(r"^[a-z0-9][a-z0-9_.-]{0,30}$", name):
                raise LabError("bare node name %r: use [a-z0-9_.-], up to 31 characters" % name)
            if ipaddress.ip_address(ip) not in UNDERLAY:
                raise LabError("bare node address %s is outside %s" % (ip, UNDERLAY))
            node = self._add_node(name, "%sb%d" % (self.prefix, len(self.bare) + 1), ip,
                                  "b%d" % (len(self.bare) + 1), role="bare")
            node.docker_host = "unix://%s/no-docker.sock" % node.workdir
            self.bare.append(node)
            return node

    # -- docker --

    def _start_dockerds(self):
        tarball = self._busybox_tarball()
        for node in self.runners:
            w = node.workdir
            (w / "daemon.json").write_text("{}\n")
            self._spawn(self._dockerd_key(node), w / "dockerd.log",
                        ["nsenter", "--net=" + node.netns_path, "dockerd",
                         "--config-file", w / "daemon.json",
                         "--data-root", w / "docker", "--exec-root", w / "exec",
                         "-H", node.docker_host, "--pidfile", w / "docker.pid"],
                        env=self._env(node))      # a node's firewalld is visible to its dockerd
        for node in self.runners:
            key = self._dockerd_key(node)
            self.wait_for(lambda: self._docker_ready(node, key), timeout=60, interval=0.2,
                          what="dockerd of %s to answer" % node.name, log=[key])
            self.docker(node, "import", "-c", 'CMD ["/bin/sh"]', "-c", "ENV PATH=/bin",
                        tarball, IMAGE)
            self.say("dockerd of %s is up (%s), %s imported" % (node.name, node.docker_host, IMAGE))

    def _dockerd_key(self, node):
        """The process key (and log name) of runner `node`'s dockerd: dockerd-r1, ..."""
        return "dockerd-" + node.ns[len(self.prefix):]

    def _docker_ready(self, node, key):
        self._raise_if_died(key, "dockerd of %s" % node.name)
        return _run(["docker", "version"], check=False, timeout=10,
                    env=self._docker_env(node)).returncode == 0

    def _busybox_tarball(self):
        """A rootfs tarball of busybox-static with every applet linked (cached in the workdir)."""
        path = self.workdir / "busybox.tar"
        if path.exists():
            return path
        applets = _run([BUSYBOX, "--list"]).stdout.split()
        tmp = path.with_suffix(".tmp")
        with tarfile.open(str(tmp), "w") as tar:
            for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
                tar.addfile(info)
            tar.add(BUSYBOX, arcname="bin/busybox")
            for a in applets:
                if a == "busybox":
                    continue
                info = tarfile.TarInfo("bin/" + a)
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
                tar.addfile(info)
            for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                               ("etc/group", "root:x:0:\n")):
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        tmp.rename(path)
        return path

    def _stop_dockerds(self):
        for node in self.runners:
            key = self._dockerd_key(node)
            if key not in self._procs or self._procs[key][0].poll() is not None:
                continue
            res = _run(["docker", "ps", "-aq"], check=False, timeout=20,
                       env=self._docker_env(node))
            ids = res.stdout.split()
            if res.returncode == 0 and ids:
                _run(["docker", "rm", "-f"] + ids, check=False, timeout=60,
                     env=self._docker_env(node))
        for node in self.runners:
            key = self._dockerd_key(node)
            if key in self._procs:
                self._stop(key, signal.SIGTERM, grace=20)

    def docker(self, node, *args, check=True, timeout=60, input=None):
        """The docker CLI against `node`'s own dockerd."""
        node = self._node(node)
        if not self.has_docker:
            raise LabError("this lab runs without Docker (%s)"
                           % (self.docker_error or "docker=False"))
        return _run(["docker"] + list(args), check=check, timeout=timeout,
                    env=self._docker_env(node), input=input)

    def _docker_env(self, node):
        env = self._base_env()
        env["DOCKER_HOST"] = node.docker_host
        return env

    # -- firewalld --

    @staticmethod
    def _fw_key(node, what):
        """Process keys: "dbus"/"firewalld" for the Host (as ever), "firewalld-runner1"..."""
        return what if node.role == "host" else "%s-%s" % (what, node.name)

    def _start_firewalld(self, node):
        """A private dbus-daemon and firewalld inside `node`'s namespace (never the machine's)."""
        w = node.workdir
        conf = Path("/usr/share/dbus-1/system.conf")
        if not conf.exists():
            conf = Path("/etc/dbus-1/system.conf")
        (w / "dbus.conf").write_text(bus_config(conf.read_text(), w / "dbus.sock", conf.parent))
        dbus_key, fw_key = self._fw_key(node, "dbus"), self._fw_key(node, "firewalld")
        if self._bus_files_before is None:
            self._bus_files_before = _identities(SYSTEM_BUS_FILES)
        argv = ["nsenter", "--net=" + node.netns_path] + dbus_argv(w / "dbus.conf",
                                                                   w / "dbus.sock")
        self._spawn(dbus_key, w / "dbus.log", argv, env=self._base_env())
        self.wait_for(lambda: (w / "dbus.sock").exists(), timeout=10, what="dbus-daemon socket",
                      log=[dbus_key])
        self.dbus_addresses[node.name] = "unix:path=%s/dbus.sock" % w
        fwconf = w / "firewalld-etc"
        if not fwconf.exists():
            shutil.copytree("/etc/firewalld", str(fwconf))
        env = self._base_env()
        env["DBUS_SYSTEM_BUS_ADDRESS"] = self.dbus_addresses[node.name]
        self._spawn(fw_key, w / "firewalld.out",
                    ["nsenter", "--net=" + node.netns_path, "firewalld", "--nofork", "--nopid",
                     "--system-config", fwconf, "--log-target", "file",
                     "--log-file", w / "firewalld.log"], env=env)
        self.wait_for(lambda: self._firewalld_running(node), timeout=60, interval=0.3,
                      what="firewalld in %s to run" % node.ns, log=[fw_key, dbus_key])
        # what an operator following the guide does: permanent (written to the lab's copy of
        # /etc/firewalld, never the machine's) so that a later --reload keeps them
        ports = ["--add-port=8000/tcp", "--add-port=4789/udp"] if node.role == "host" else \
            ["--add-port=4789/udp"]
        self.firewall_cmd("--permanent", *ports, check=True, node=node)
        self.firewall_cmd("--reload", check=True, node=node)
        self.say("firewalld runs in %s (bus %s, config %s), %s open"
                 % (node.ns, self.dbus_addresses[node.name], fwconf,
                    " ".join(p.split("=")[1] for p in ports)))

    def _firewalld_running(self, node):
        key = self._fw_key(node, "firewalld")
        self._raise_if_died(key, key)
        return self.firewall_cmd("--state", node=node).stdout.strip() == "running"

    def firewall_cmd(self, *args, check=False, timeout=60, node=None):
        """firewall-cmd against the lab's firewalld of `node` (default: the Host)."""
        node = self.host if node is None else self._node(node)
        if node.name not in self.dbus_addresses:
            raise LabError("%s runs no firewalld (use Lab(firewalld=[..., %r]))"
                           % (node.name, node.name))
        return _run(["ip", "netns", "exec", node.ns, "firewall-cmd"] + list(args),
                    check=check, timeout=timeout, env=self._env(node))

    # -- drift --

    def iptables_drift(self, node, delete=(), insert=(), flush=(), policy=None):
        """Inject iptables drift into `node` ATOMICALLY: one iptables-restore of its own
        iptables-save, edited by edit_iptables_save (same arguments). A daemon repairing while
        the test changes rules one by one (`iptables -D`, `-F`, `-I`) races it: the test's
        second -D finds the rule already gone, or a repair lands between two steps."""
        node = self._node(node)
        tables = _drift_tables(delete, insert, flush, policy)
        dump = "".join(self.sh(node, "iptables-save", "-t", t).stdout for t in tables)
        text = edit_iptables_save(dump, delete=delete, insert=insert, flush=flush, policy=policy)
        return self.sh(node, "iptables-restore", input=text)

    # -- configs --

    def host_config(self, **overrides):
        """Write the host's host_config.py (lab defaults + overrides; None drops a key)."""
        values = {
            "HOST_REACHABLE_ADDRESS": HOST_IP,
            "HOST_PORT": 8000,
            "OVERLAY_ENABLED": True,
            "OVERLAY_STATE_FILE": str(self.host.workdir / "state.json"),
            "OVERLAY_TOKEN": TOKEN,
            "OVERLAY_INACTIVE_AFTER": 6,
        }
        values.update(overrides)
        path = _write_config(self.host.workdir / "host_config.py", values, "lab host config")
        self._configs[self.host.name] = (path, values)
        return path

    def runner_config(self, i, **overrides):
        """Write runner i's runner_config.py (i: 1-based index or a Node)."""
        node = self._node(i)
        values = {
            "HOST_ADDRESS": HOST_IP,
            "HOST_PORT": 8000,
            "RUNNER_NAME": node.name,
            "OVERLAY_ENABLED": True,
            "OVERLAY_TOKEN": TOKEN,
            "HEARTBEAT_INTERVAL": 1,
            "OVERLAY_STATE_FILE": str(node.workdir / "runner-state.json"),
        }
        values.update(overrides)
        path = _write_config(node.workdir / "runner_config.py", values, "lab runner config")
        self._configs[node.name] = (path, values)
        return path

    def _config_of(self, node):
        if node.name not in self._configs:
            if node is self.host:
                self.host_config()
            else:
                self.runner_config(node)
        return self._configs[node.name]

    # -- processes --

    def _base_env(self):
        env = dict(os.environ)
        for k in ("DOCKER_HOST", "DBUS_SYSTEM_BUS_ADDRESS", "NOTIFY_SOCKET", "DOCKER_CONTEXT",
                  "DOCKER_CONFIG"):
            env.pop(k, None)
        env["PATH"] = _path()
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("LANG", "C.UTF-8")
        # nothing the lab runs may reach a dockerd or a firewalld of the machine itself
        env["DOCKER_HOST"] = "unix://%s/no-docker.sock" % self.workdir
        env["DBUS_SYSTEM_BUS_ADDRESS"] = "unix:path=%s/no-dbus.sock" % self.workdir
        return env

    def _env(self, node):
        env = self._base_env()
        if node.docker_host:
            env["DOCKER_HOST"] = node.docker_host
        if node.name in self.dbus_addresses:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = self.dbus_addresses[node.name]
        return env

    def _spawn(self, key, log, argv, env):
        with self._lock:
            if key in self._procs and self._procs[key][0].poll() is None:
                raise LabError("%s is already running (pid %d)" % (key, self._procs[key][0].pid))
            log = Path(log)
            with open(str(log), "a") as f:
                f.write("=== start %s: %s\n" % (time.strftime("%H:%M:%S"),
                                                " ".join(str(a) for a in argv)))
                popen = subprocess.Popen([str(a) for a in argv], stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
            self._procs[key] = (popen, log)
            return popen

    def _raise_if_died(self, key, what):
        """The guard of every wait for a daemon: LabDied (which ends the wait at once) quoting
        its log when the process `key` has exited."""
        popen = self._procs[key][0]
        if popen.poll() is not None:
            raise LabDied("%s exited with %s:\n%s" % (what, popen.returncode, self.log_tail(key)))

    def _stop(self, key, sig=signal.SIGTERM, grace=15):
        entry = self._procs.get(key)
        if not entry:
            return None
        popen = entry[0]
        if popen.poll() is None:
            try:
                popen.send_signal(sig)
            except OSError:
                pass
            try:
                popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.say("%s did not stop within %ss after %s: killing it" % (key, grace, sig))
                popen.kill()
                popen.wait()
        return popen.returncode

    def _script_argv(self, node, kind, args):
        if kind not in SCRIPTS:
            raise LabError("unknown script %r (host, runner or check)" % kind)
        path = REPO / SCRIPTS[kind]
        if not path.exists():
            raise LabError("%s is not in the repository yet" % SCRIPTS[kind])
        args = [str(a) for a in args]
        if "--config" not in args and not any(a.startswith("--config=") for a in args):
            args += ["--config", str(self._config_of(node)[0])]
        if kind == "check" and "--role" not in args:
            args += ["--role", "host" if node is self.host else "runner"]
        return self.enter(node) + [self.python, str(path)] + args

    def start_host(self, args=(), wait=True, timeout=30):
        """`kohaku_overlay_host.py serve` in the host namespace; waits for /healthz."""
        argv = self._script_argv(self.host, "host", ["serve"] + list(args))
        popen = self._spawn("host", self.host.workdir / "host.log", argv, self._env(self.host))
        self.say("host serve started (pid %d, log %s)"
                 % (popen.pid, self.host.workdir / "host.log"))
        if wait:
            self.wait_for(self._host_healthy, timeout=timeout, interval=0.2,
                          what="host API /healthz", log=["host"])
        return popen

    def _host_healthy(self):
        self._raise_if_died("host", "host serve")
        values = self._config_of(self.host)[1]
        bind = values.get("HOST_BIND_IP") or "0.0.0.0"
        addr = HOST_IP if bind == "0.0.0.0" else bind
        # (busybox-static's wget crashes on Debian 12: static glibc cannot resolve)
        res = self.sh(self.host, self.python, "-c", HEALTH_PROBE,
                      "http://%s:%s/healthz" % (addr, values.get("HOST_PORT", 8000)),
                      check=False, timeout=10)
        return res.returncode == 0 and '"ok"' in res.stdout

    def stop_host(self, sig=signal.SIGTERM, grace=15):
        """Send `sig` to host serve and wait for it (SIGKILL after `grace` seconds)."""
        return self._stop("host", sig, grace)

    def start_runner(self, i, args=(), wait=None, timeout=30):
        """`kohaku_overlay_runner.py serve` in runner i's namespace with its DOCKER_HOST.

        wait=None waits for the overlay Docker network (docker=False: the bridge's address) when
        the host serve is running; True always waits, False never.
        """
        node = self._node(i)
        argv = self._script_argv(node, "runner", ["serve"] + list(args))
        popen = self._spawn(node.name, node.workdir / "runner.log", argv, self._env(node))
        self.say("%s serve started (pid %d)" % (node.name, popen.pid))
        if wait is None:
            wait = self.proc_running("host")
        if wait:
            self.wait_for(lambda: self._runner_ready(node), timeout=timeout, interval=0.2,
                          what="%s to build its overlay" % node.name, log=[node.name, "host"])
        return popen

    def _runner_ready(self, node):
        self._raise_if_died(node.name, "%s serve" % node.name)
        if self.has_docker:
            return self.docker(node, "network", "inspect", OVERLAY_NETWORK,
                               check=False).returncode == 0
        res = self.sh(node, "ip", "-j", "addr", "show", "dev", OVERLAY_BRIDGE, check=False)
        return res.returncode == 0 and '"family":"inet"' in res.stdout.replace(" ", "")

    def stop_runner(self, i, sig=signal.SIGTERM, grace=15):
        return self._stop(self._node(i).name, sig, grace)

    def proc_running(self, key):
        entry = self._procs.get(key)
        return bool(entry) and entry[0].poll() is None

    def script(self, node, kind, *args, check=False, timeout=60):
        """One-shot run of a script in `node`'s namespace (adds --config, and --role for check)."""
        node = self._node(node)
        argv = self._script_argv(node, kind, args)
        return _run(argv, check=check, timeout=timeout, env=self._env(node))

    def sh(self, node, *argv, check=True, timeout=30, input=None):
        """Any command inside `node`'s network namespace."""
        node = self._node(node)
        return _run(self.enter(node) + list(argv), check=check, timeout=timeout,
                    env=self._env(node), input=input)

    def status(self):
        """The host's `status --json`, parsed (LabError when it fails)."""
        res = self.script(self.host, "host", "status", "--json", check=True)
        return json.loads(res.stdout)

    def wait_active(self, names=None, timeout=20):
        """Wait until status lists exactly `names` (default: all runners), each Active."""
        names = sorted(names if names is not None else [r.name for r in self.runners])

        def ok():
            st = self.status()
            return sorted(a["runner_name"] for a in st["allocations"] if a["active"]) == names \
                and len(st["allocations"]) == len(names)
        self.wait_for(ok, timeout=timeout, interval=0.3, what="runners %s Active" % names)
        return self.status()

    # -- containers --

    def container(self, node, name, network=OVERLAY_NETWORK, args=()):
        """A busybox `sleep 1d` container named `name` on `network`; returns the name."""
        node = self._node(node)
        if self.has_docker:
            self.docker(node, "run", "-d", "--name", name, "--hostname", name,
                        "--network", network, *args, IMAGE, "sleep", "1d")
            return name
        return self._ns_container(node, name)

    def _ns_container(self, node, name):
        """docker=False: a namespace on the runner's overlay bridge with the next free address."""
        with self._lock:
            res = self.sh(node, "ip", "-j", "addr", "show", "dev", OVERLAY_BRIDGE, check=False)
            addrs = [a for link in (json.loads(res.stdout) if res.returncode == 0 else [])
                     for a in link.get("addr_info", []) if a.get("family") == "inet"]
            if not addrs:
                raise LabError("%s has no %s bridge with an address: is the runner up?"
                               % (node.name, OVERLAY_BRIDGE))
            gw = ipaddress.ip_interface("%s/%s" % (addrs[0]["local"], addrs[0]["prefixlen"]))
            mtu = json.loads(self.sh(node, "ip", "-j", "link", "show", "dev",
                                     OVERLAY_BRIDGE).stdout)[0]["mtu"]
            k = self._next_cip.get(node.name, 1) + 1
            ip = gw.ip + (k - 1)
            if ip == gw.network.network_address + 254:      # the Host's address on the segment
                k, ip = k + 1, ip + 1
            self._next_cip[node.name] = k
            idx = len(self._containers) + 1
            cns, port = "%sc%d" % (self.prefix, idx), "lc%d" % idx
            self._add_ns(cns)
            _run(["ip", "-n", cns, "link", "add", "eth0", "mtu", mtu, "type", "veth", "peer",
                  "name", port, "netns", node.ns])
            _run(["ip", "-n", node.ns, "link", "set", "dev", port, "master", OVERLAY_BRIDGE,
                  "mtu", mtu, "up"])
            _run(["ip", "-n", cns, "addr", "add", "%s/%d" % (ip, gw.network.prefixlen), "dev",
                  "eth0"])
            _run(["ip", "-n", cns, "link", "set", "dev", "eth0", "up"])
            _run(["ip", "-n", cns, "route", "add", "default", "via", str(gw.ip)])
            self._containers[(node.name, name)] = {"ns": cns, "ip": str(ip)}
            return name

    def container_ip(self, node, name, network=OVERLAY_NETWORK):
        node = self._node(node)
        if not self.has_docker:
            return self._containers[(node.name, name)]["ip"]
        fmt = '{{with index .NetworkSettings.Networks "%s"}}{{.IPAddress}}{{end}}' % network
        ip = self.docker(node, "inspect", "-f", fmt, name).stdout.strip()
        if not ip:
            raise LabError("container %s on %s has no address on %s" % (name, node.name, network))
        return ip

    def _container_netns(self, node, name):
        """nsenter argument that enters the container's network namespace."""
        if not self.has_docker:
            return "--net=/run/netns/" + self._containers[(node.name, name)]["ns"]
        pid = self.docker(node, "inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
        if pid in ("", "0"):
            raise LabError("container %s on %s is not running" % (name, node.name))
        return "--net=/proc/%s/ns/net" % pid

    def cexec(self, node, name, *argv, check=False, timeout=30):
        """A command inside the container (docker=False: a busybox applet in its namespace)."""
        node = self._node(node)
        if self.has_docker:
            return self.docker(node, "exec", name, *argv, check=check, timeout=timeout)
        return _run(["nsenter", self._container_netns(node, name), BUSYBOX] + list(argv),
                    check=check, timeout=timeout, env=self._base_env())

    def ping(self, node, name, dst, count=1, size=None, df=False, timeout=2):
        """True when all `count` echo replies came back (name=None: from the node namespace)."""
        node = self._node(node)
        if name is not None and self.has_docker and not df:
            argv = ["ping", "-c", count, "-W", timeout]
            if size is not None:
                argv += ["-s", size]
            res = self.cexec(node, name, *(argv + [dst]), timeout=timeout * count + 15)
        else:
            argv = ["ping", "-n", "-c", count, "-W", timeout, "-i", "0.2"]
            if size is not None:
                argv += ["-s", size]
            if df:
                argv += ["-M", "do"]
            argv.append(dst)
            if name is None:
                res = self.sh(node, *argv, check=False, timeout=timeout * count + 15)
            else:
                res = _run(["nsenter", self._container_netns(node, name)] + argv, check=False,
                           timeout=timeout * count + 15, env=self._base_env())
        m = PING_SUMMARY.search(res.stdout)
        return res.returncode == 0 and m is not None and int(m.group(2)) == count

    def ping_stream(self, node, name, dst, interval=0.2):
        """Start a continuous ping from the container (name=None: the node); see PingStream."""
        node = self._node(node)
        enter = (["nsenter", self._container_netns(node, name)] if name is not None
                 else self.enter(node))
        log = node.workdir / ("ping-%s-%s-%d.log" % (name or "node", dst, int(time.time() * 1000)))
        with open(str(log), "w") as f:
            popen = subprocess.Popen(enter + ["ping", "-n", "-i", str(interval), "-W", "1", dst],
                                     stdout=f, stderr=subprocess.STDOUT, env=self._base_env())
        self._procs["ping-%d" % popen.pid] = (popen, log)
        return PingStream(popen, log)

    # -- waiting and logs --

    def log_tail(self, key, lines=40):
        entry = self._procs.get(key)
        if not entry:
            return "(no process %r)" % key
        try:
            return _tail(entry[1].read_text(errors="replace"), lines)
        except OSError as exc:
            return "(cannot read %s: %s)" % (entry[1], exc)

    def wait_for(self, predicate, timeout=10, interval=0.1, what="the condition", log=None):
        """Poll `predicate` until truthy (returned); AssertionError naming `what` + log tails.

        LabDied raised by the predicate (a daemon died) ends the wait at once; any other
        exception counts as "not yet" and is quoted if the wait times out.
        """
        deadline = time.time() + timeout
        last_exc = None
        while True:
            try:
                value = predicate()
                if value:
                    return value
                last_exc = None
            except LabDied:
                raise
            except Exception as exc:  # a probe that failed this time; report it if it stays so
                last_exc = exc
            if time.time() >= deadline:
                break
            time.sleep(interval)
        keys = log if log is not None else [k for k in self._procs if not k.startswith("ping-")]
        if isinstance(keys, str):
            keys = [keys]
        parts = ["timed out after %ss waiting for %s" % (timeout, what)]
        if last_exc is not None:
            parts.append("last error: %s" % last_exc)
        for k in keys:
            parts.append("--- %s log (tail) ---\n%s" % (k, self.log_tail(k, 25)))
        raise AssertionError("\n".join(parts))

    # -- teardown --

    def teardown(self):
        """Stop everything this lab started and delete its namespaces and workdir (idempotent)."""
        with self._lock:
            if self._down:
                return
            old = None
            if threading.current_thread() is threading.main_thread():
                old = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                self.say("tearing down")
                services = ("dockerd-", "firewalld", "dbus")
                for key in [k for k in self._procs if not k.startswith(services)]:
                    self._stop(key, signal.SIGTERM, grace=10)
                for key in [k for k in self._procs if k.startswith("firewalld")]:
                    self._stop(key, signal.SIGTERM, grace=20)
                for key in [k for k in self._procs if k.startswith("dbus")]:
                    self._stop(key, signal.SIGTERM, grace=5)
                self._remove_bus_leftovers()
                self._stop_dockerds()
                self._save_logs()
                destroy(self.prefix, self.workdir)
                self._down = True
                if self in _LIVE:
                    _LIVE.remove(self)
            finally:
                if old is not None:
                    signal.signal(signal.SIGINT, old)

    def _remove_bus_leftovers(self):
        """Remove the machine-bus files (SYSTEM_BUS_FILES) that this lab's dbus-daemons left,
        and nothing else (see bus_leftovers)."""
        if self._bus_files_before is None:
            return
        pids = [popen.pid for key, (popen, _log) in self._procs.items() if key.startswith("dbus")]
        for path in bus_leftovers(self._bus_files_before, pids, SYSTEM_BUS_FILES):
            self.say("removing %s: left by this lab's dbus-daemon" % path)
            try:
                os.unlink(path)
            except OSError:
                pass

    def _save_logs(self):
        """With $KOHAKU_LAB_LOGS set, copy every log of the lab there before it is deleted."""
        dest = os.environ.get("KOHAKU_LAB_LOGS")
        if not dest or not self.workdir.is_dir():
            return
        for log in self.workdir.glob("**/*.log"):
            if "/docker/" in str(log) or "/exec/" in str(log):
                continue
            target = Path(dest) / self.prefix.rstrip("-") / log.relative_to(self.workdir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(str(log), str(target))

    # -- helpers --

    def _node(self, ref):
        if isinstance(ref, Node):
            return ref
        if isinstance(ref, int):
            if not 1 <= ref <= len(self.runners):
                raise LabError("runner %d does not exist (1..%d)" % (ref, len(self.runners)))
            return self.runners[ref - 1]
        for node in [self.host] + self.runners + self.bare:
            if node is not None and ref in (node.name, node.ns):
                return node
        raise LabError("no node %r in this lab" % (ref,))

    def _sh_ns(self, ns, *argv):
        return _run(["ip", "netns", "exec", ns] + list(argv))


# ---- process-wide cleanup ----

_HANDLERS_INSTALLED = False


def _teardown_all():
    for lab in list(_LIVE):
        if not lab.keep:
            try:
                lab.teardown()
            except Exception as exc:  # keep going: the next lab must be removed too
                print("lab: teardown of %s failed: %s" % (lab.prefix, exc), file=sys.stderr)


def _on_signal(signum, frame):
    _teardown_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers():
    """atexit always; SIGTERM/SIGHUP only where nobody else handles them (SIGINT raises
    KeyboardInterrupt, which runs the with-block, pytest finalizers and atexit)."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_teardown_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


# ---- demo ----

def _matrix(c, containers):
    """[(source label, target label, ok)] for the demo's connectivity matrix."""
    rows = []
    for node, name in containers:
        ip = c.container_ip(node, name)
        src = "%s/%s %s" % (node.name, name, ip)
        gw = str(ipaddress.ip_interface(ip + "/16").network.network_address + 1)
        for onode, oname in containers:
            if onode is not node:
                oip = c.container_ip(onode, oname)
                rows.append((src, "%s/%s %s" % (onode.name, oname, oip),
                             c.ping(node, name, oip, count=2)))
        rows.append((src, "host 10.0.0.1", c.ping(node, name, "10.0.0.1", count=2)))
        rows.append((src, "gateway %s" % gw, c.ping(node, name, gw, count=2)))
    return rows


def demo(args):
    c = Lab(runners=args.runners, docker=False if args.no_docker else "auto",
            firewalld=args.firewalld, keep=args.keep, verbose=True)
    failed = True
    try:
        c.up()
        if not c.has_docker:
            print("%s; containers are plain namespaces instead." % (
                "Docker cannot run on this machine (%s)" % c.docker_error if c.docker_error
                else "--no-docker"))
        c.host_config()
        c.start_host()
        for i in range(1, args.runners + 1):
            c.runner_config(i)
            c.start_runner(i)
        c.wait_active()
        containers = []
        for node in c.runners:
            containers.append((node, c.container(node, "c%d" % node.index)))
        print()
        print(c.script(c.host, "host", "status", check=True).stdout)
        rows = _matrix(c, containers)
        w1 = max(len(r[0]) for r in rows)
        w2 = max(len(r[1]) for r in rows)
        print("Connectivity (ping from each container)")
        print("  %-*s  %-*s  %s" % (w1, "from", w2, "to", "result"))
        for src, dst, ok in rows:
            print("  %-*s  %-*s  %s" % (w1, src, w2, dst, "PASS" if ok else "FAIL"))
        print()
        print("Checks (kohaku_overlay_check.py)")
        for node in [c.host] + c.runners:
            try:
                res = c.script(node, "check")
                lines = [line for line in res.stdout.splitlines() if line.strip()]
                summary = lines[-1] if lines else (res.stderr.strip().splitlines() or ["?"])[-1]
                print("  %-8s exit %d  %s" % (node.name, res.returncode, summary))
            except LabError as exc:
                print("  %-8s not run: %s" % (node.name, str(exc).splitlines()[0]))
        failed = not all(ok for _, _, ok in rows)
        print()
        print("connectivity: %s" % ("all PASS" if not failed else "some pings FAILED"))
        if args.keep:
            print("the lab stays up (namespaces %s*, workdir %s); remove it with: "
                  "python3 tests/labkit.py down (the next lab built here removes it too)"
                  % (c.prefix, c.workdir))
            for node in c.runners:
                print("  %s: DOCKER_HOST=%s docker ps; ip netns exec %s ip -br addr"
                      % (node.name, node.docker_host, node.ns))
    except (LabError, AssertionError) as exc:
        print("lab: demo failed: %s" % exc, file=sys.stderr)
        failed = True
    finally:
        if not args.keep:
            c.teardown()
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tests/labkit.py", description="kohaku-overlay lab")
    sub = ap.add_subparsers(dest="cmd")
    d = sub.add_parser("demo", help="Host + runners + containers, status, pings, checks")
    d.add_argument("--runners", type=int, default=2)
    d.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    d.add_argument("--firewalld", action="store_true", help="run firewalld in the Host namespace")
    d.add_argument("--no-docker", action="store_true",
                   help="plain namespaces as containers (what happens where dockerd cannot run)")
    dn = sub.add_parser("down", help="remove labs left on this machine")
    dn.add_argument("--force", action="store_true", help="also labs whose owner still runs")
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.print_help()
        return 2
    if args.cmd == "demo":
        if not 1 <= args.runners <= 50:
            print("error: --runners must be between 1 and 50", file=sys.stderr)
            return 2
        reason = cannot_run_reason(docker=False, firewalld=args.firewalld)
        if reason:
            print("error: %s" % reason, file=sys.stderr)
            return 2
        return demo(args)
    if os.geteuid() != 0:
        print("error: removing labs needs root: run as root", file=sys.stderr)
        return 2
    removed = remove_stale(force=args.force, say=lambda m: print("lab: " + m))
    left = [p for p in known_labs()]
    print("removed %d lab(s)%s" % (len(removed), ("; still running (use --force): %s"
                                                  % ", ".join(left)) if left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
