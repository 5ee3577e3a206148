"""Real systemd for the lab: one systemd-nspawn container per node, booted over an overlay of
this machine's own root file system, each in a network namespace the test made.

Nothing of the machine changes: the container's root is ``mount -t overlay overlay -o
lowerdir=/,upperdir=U,workdir=W ROOT`` with U and W in a folder of its own under /tmp, so every
file the container (or the test, through ``Machine.root``) writes lands in U. The network is the
namespace given (``--network-namespace-path=``); the container gets CAP_NET_ADMIN and CAP_NET_RAW
on top of nspawn's default set and a writable /proc/sys/net (SYSTEMD_NSPAWN_API_VFS_WRITABLE).
The machine itself need not run systemd: ``--register=no --keep-unit``.

Importable API (tests/ is on sys.path)::

    import nspawn
    nspawn.cannot_run_reason() -> None or "why not"
    with nspawn.Fleet() as fleet:
        m = fleet.machine("host", "/run/netns/ko1x2a-host", masks=("docker.service",))
        m.root                          # Path: write files there before (or after) boot
        m.dropin("firewalld.service", "rhel.conf", "[Service]\\n...")   # before boot
        m.enable("firewalld.service")   # systemctl --root=ROOT enable, before boot
        fleet.boot_all()                # boots every machine side by side, waits until up
        m.sh(*argv, check=True, timeout=60, input=None) -> CompletedProcess  # nsenter -a
        m.show(unit, *props) -> {prop: value}     # systemctl show
        m.main_pid(unit) -> int (in the machine's PID namespace) / m.host_pid(unit)
        m.journal(unit, lines=60) -> str
        m.poweroff(); m.boot(); m.wait_booted()   # a reboot keeps the upper dir (the "disk")
        fleet.close()                   # idempotent; also at exit: containers, mounts, folders

/etc/resolv.conf is ``nameserver 127.0.0.1`` (nspawn's --resolv-conf=off), as in labkit's
namespaces. Boot: only what the tests need starts (the machine's /etc/systemd/system/*.wants
are cut to firewalld, docker and containerd, the SysV generator is masked, ``masks`` are masked
per machine); /tmp is a tmpfs in each container.
"""

import atexit
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

BASE = Path(os.environ.get("KOHAKU_NSPAWN_DIR", "/tmp"))
KEEP_WANTS = {"firewalld.service", "docker.service", "containerd.service", "docker.socket"}
CAPABILITIES = "CAP_NET_ADMIN,CAP_NET_RAW"
NSPAWN_RUN = Path("/run/systemd/nspawn")
RESOLV_CONF = "nameserver 127.0.0.1\n"
# nspawn --keep-unit puts the container in <our cgroup>/payload and itself in .../supervisor
NSPAWN_CGROUPS = ("payload", "supervisor")
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "TERM": "dumb"}

_LIVE = []


class NspawnError(RuntimeError):
    """The container harness failed; the message says what and quotes the output."""


def cannot_run_reason():
    """None when containers can boot here, else one sentence saying why not."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter", "mount", "umount"):
        if not shutil.which(tool, path=ENV["PATH"]):
            return "%s is not installed (apt-get install systemd-container util-linux)" % tool
    if not Path("/lib/systemd/systemd").exists() and not Path("/usr/lib/systemd/systemd").exists():
        return "systemd is not installed on this machine (the containers boot its own root)"
    return None


def _tail(text, lines=40):
    return "\n".join((text or "").rstrip("\n").splitlines()[-lines:])


def _run(argv, check=True, timeout=60, input=None, env=None):
    argv = [str(a) for a in argv]
    try:
        res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, input=input,
                             universal_newlines=True, timeout=timeout, env=env or ENV)
    except subprocess.TimeoutExpired as exc:
        raise NspawnError("%s timed out after %ss:\n%s" % (
            " ".join(argv), timeout, _tail(_text(exc.stdout) + _text(exc.stderr))))
    if check and res.returncode != 0:
        raise NspawnError("%s exited %d:\n%s" % (" ".join(argv), res.returncode,
                                                 _tail(res.stdout + res.stderr)))
    return res


def _text(b):
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def _mounted(path):
    path = os.path.realpath(str(path))
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == path for line in f)
    except OSError:
        return False


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _children():
    """{ppid: [pid, ...]} of every process of the machine."""
    tree = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _nspid(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


class Machine(object):
    """One container: an overlay root, a network namespace, a booted systemd."""

    def __init__(self, fleet, name, netns_path, masks=()):
        self.fleet = fleet
        self.name = name
        self.machine = "%s-%s" % (fleet.tag, name)
        self.netns_path = str(netns_path)
        self.dir = fleet.dir / name
        self.upper, self.work, self.root = self.dir / "upper", self.dir / "work", self.dir / "root"
        self.console = self.dir / "console.log"
        self.popen = None
        self.leader = None
        for d in (self.upper, self.work, self.root):
            d.mkdir(parents=True)
        _run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=/,upperdir=%s,workdir=%s"
              % (self.upper, self.work), self.root])
        self._trim_boot(masks)

    def __repr__(self):
        return "Machine(%s, leader %s)" % (self.machine, self.leader)

    # -- before boot --

    def _trim_boot(self, masks):
        # the machine's nameserver is nothing a lab namespace can reach (and may sit inside the
        # overlay's range): the container gets the lab's resolv.conf, as labkit's namespaces
        resolv = self.root / "etc/resolv.conf"
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        resolv.write_text(RESOLV_CONF)
        etc = self.root / "etc/systemd/system"
        for wants in etc.glob("*.wants"):
            for link in wants.iterdir():
                if link.name not in KEEP_WANTS:
                    link.unlink()
        gens = self.root / "etc/systemd/system-generators"
        gens.mkdir(parents=True, exist_ok=True)
        (gens / "systemd-sysv-generator").symlink_to("/dev/null")
        for unit in masks:
            self.mask(unit)

    def mask(self, unit):
        path = self.root / "etc/systemd/system" / unit
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to("/dev/null")

    def enable(self, *units):
        """`systemctl enable` inside the root before boot (the machine's systemd is not asked)."""
        _run(["systemctl", "--root=%s" % self.root, "enable"] + list(units))

    def dropin(self, unit, name, text):
        d = self.root / "etc/systemd/system" / (unit + ".d")
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)

    # -- boot and shutdown --

    def boot(self):
        if self.popen is not None and self.popen.poll() is None:
            raise NspawnError("%s is already running" % self.machine)
        env = dict(ENV, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network")
        argv = ["systemd-nspawn", "--quiet", "--boot", "--directory", str(self.root),
                "--machine", self.machine, "--hostname", self.name, "--register=no",
                "--keep-unit", "--network-namespace-path=" + self.netns_path,
                "--capability=" + CAPABILITIES, "--tmpfs=/tmp", "--console=pipe",
                "--resolv-conf=off",
                "--kill-signal=SIGRTMIN+3"]
        with open(str(self.console), "a") as log:
            log.write("=== boot %s ===\n" % time.strftime("%H:%M:%S"))
            log.flush()
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        self.leader = None
        deadline = time.time() + 20
        while time.time() < deadline:
            self.leader = self._find_leader()
            if self.leader:
                return self
            if self.popen.poll() is not None:
                raise NspawnError("systemd-nspawn for %s exited %s:\n%s" % (
                    self.machine, self.popen.returncode, self.console_tail()))
            time.sleep(0.1)
        raise NspawnError("no container init of %s after 20 s:\n%s"
                          % (self.machine, self.console_tail()))

    def _find_leader(self):
        """The container's PID 1, seen from here: a descendant of nspawn whose NSpid ends in 1."""
        tree, todo = _children(), [self.popen.pid]
        while todo:
            pid = todo.pop()
            ns = _nspid(pid)
            if len(ns) > 1 and ns[-1] == 1:
                return pid
            todo += tree.get(pid, [])
        return None

    def wait_booted(self, timeout=120):
        """Until systemd says running or degraded; returns that word (degraded names no unit of
        ours: the test looks at its units itself)."""
        deadline = time.time() + timeout
        while True:
            res = self.sh("systemctl", "is-system-running", "--wait", check=False,
                          timeout=max(5, deadline - time.time()))
            state = res.stdout.strip()
            if state in ("running", "degraded"):
                return state
            if time.time() > deadline:
                raise NspawnError("%s did not finish booting (%s):\n%s"
                                  % (self.machine, state, self.console_tail()))
            time.sleep(0.5)

    def poweroff(self, timeout=40):
        """An orderly shutdown (SIGRTMIN+3 to the container's systemd); SIGKILL when it hangs."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._forget_leader()

    def kill(self):
        """SIGKILL the container's PID 1 (that ends its PID namespace) and nspawn."""
        for pid in (self.leader, self.popen.pid if self.popen else None):
            if pid and _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if self.popen is not None:
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._forget_leader()

    def _forget_leader(self):
        deadline = time.time() + 10
        while self.leader and _alive(self.leader) and time.time() < deadline:
            time.sleep(0.1)
        self.leader = None
        for d in ("propagate", "locks"):
            p = NSPAWN_RUN / d / self.machine
            if p.is_dir():
                shutil.rmtree(str(p), ignore_errors=True)

    def remove(self):
        """Stop the container, unmount the root, delete the folder (only once nothing is
        mounted there: the root is an overlay of the machine's own /)."""
        if self.popen is not None:
            self.poweroff(timeout=20)
        for lazy in (False, False, True):
            if not _mounted(self.root):
                break
            _run(["umount"] + (["-l"] if lazy else []) + [self.root], check=False)
            time.sleep(0.2)
        if _mounted(self.root):
            raise NspawnError("%s is still mounted: not deleting %s" % (self.root, self.dir))
        shutil.rmtree(str(self.dir), ignore_errors=True)

    # -- inside --

    def sh(self, *argv, check=True, timeout=60, input=None):
        if not self.leader:
            raise NspawnError("%s is not running" % self.machine)
        return _run(["nsenter", "-t", str(self.leader), "-a"] + list(argv), check=check,
                    timeout=timeout, input=input)

    def show(self, unit, *props):
        res = self.sh("systemctl", "show", unit, "-p", ",".join(props))
        out = {}
        for line in res.stdout.splitlines():
            key, _, value = line.partition("=")
            out[key] = value
        return out

    def main_pid(self, unit):
        return int(self.show(unit, "MainPID")["MainPID"])

    def host_pid(self, pid):
        """The machine-wide pid of the container's process `pid` (for /proc from here)."""
        tree, todo = _children(), [self.leader]
        while todo:
            p = todo.pop()
            ns = _nspid(p)
            if ns and ns[-1] == pid:
                return p
            todo += tree.get(p, [])
        raise NspawnError("no process %d in %s" % (pid, self.machine))

    def journal(self, unit=None, lines=60):
        argv = ["journalctl", "--no-pager", "-n", str(lines)] + (["-u", unit] if unit else [])
        res = self.sh(*argv, check=False, timeout=30)
        return res.stdout + res.stderr

    def console_tail(self, lines=40):
        try:
            return _tail(self.console.read_text(errors="replace"), lines)
        except OSError:
            return "(no console log)"


class Fleet(object):
    """The containers of one test module; close() removes every trace (also at exit)."""

    def __init__(self):
        reason = cannot_run_reason()
        if reason:
            raise NspawnError(reason)
        remove_stale()
        self.tag = "kons%dx%02x" % (os.getpid(), random.randrange(256))
        self.dir = BASE / self.tag
        self.dir.mkdir(mode=0o700)
        (self.dir / "owner").write_text("%d\n" % os.getpid())
        self.nspawn_run_existed = NSPAWN_RUN.exists()
        self.cgroups_before = {str(p) for p in _nspawn_cgroups()}
        self.machines = []
        self._closed = False
        self.keep = False
        _LIVE.append(self)
        # labkit's SIGTERM/SIGHUP handler tears down what is in its list (atexit does not run
        # then): first in it, so the containers go before the lab's namespaces
        try:
            import labkit
            labkit._LIVE.insert(0, self)
        except ImportError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def machine(self, name, netns_path, masks=()):
        m = Machine(self, name, netns_path, masks)
        self.machines.append(m)
        return m

    def boot_all(self, timeout=120):
        for m in self.machines:
            m.boot()
        return {m.name: m.wait_booted(timeout) for m in self.machines}

    def teardown(self):
        self.close()

    def close(self):
        if self._closed:
            return
        errors = []
        for m in reversed(self.machines):
            try:
                m.remove()
            except Exception as exc:        # keep going: the next container must go too
                errors.append(str(exc))
        if not errors:
            shutil.rmtree(str(self.dir), ignore_errors=True)
            self._closed = True
            if self in _LIVE:
                _LIVE.remove(self)
            try:
                import labkit
                if self in labkit._LIVE:
                    labkit._LIVE.remove(self)
            except ImportError:
                pass
        if not self.nspawn_run_existed:
            for d in (NSPAWN_RUN / "propagate", NSPAWN_RUN / "locks", NSPAWN_RUN):
                try:
                    d.rmdir()
                except OSError:
                    pass
        # the empty cgroups nspawn made (rmdir only removes a cgroup without processes)
        for top in _nspawn_cgroups():
            if str(top) in self.cgroups_before:
                continue
            for dirpath, _dirs, _files in sorted(os.walk(str(top)), key=lambda x: -len(x[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
        if errors:
            raise NspawnError("; ".join(errors))


def _nspawn_cgroups():
    """payload/ and supervisor/ beside this process's cgroup, in every hierarchy it is in."""
    found = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if controllers == "":
            mount = Path("/sys/fs/cgroup/unified")
            if not mount.is_dir():
                mount = Path("/sys/fs/cgroup")
        elif controllers == "name=systemd":
            mount = Path("/sys/fs/cgroup/systemd")
        else:
            continue
        for name in NSPAWN_CGROUPS:
            p = mount / path.lstrip("/") / name
            if p.is_dir():
                found.append(p)
    return found


def remove_stale():
    """Folders of fleets whose owner process is gone: unmount their roots and delete them."""
    for d in BASE.glob("kons*x*"):
        try:
            owner = int((d / "owner").read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        tree = _children()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    cmd = f.read().decode(errors="replace")
            except OSError:
                continue
            if "systemd-nspawn" in cmd and str(d) + "/" in cmd:
                todo, found = [int(entry)], []
                while todo:
                    pid = todo.pop()
                    ns = _nspid(pid)
                    if len(ns) > 1 and ns[-1] == 1:
                        found.append(pid)
                    else:
                        todo += tree.get(pid, [])
                for pid in found + [int(entry)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        time.sleep(0.5)
        for root in d.glob("*/root"):
            for lazy in (False, True):
                if _mounted(root):
                    _run(["umount"] + (["-l"] if lazy else []) + [root], check=False)
        if not any(_mounted(r) for r in d.glob("*/root")):
            shutil.rmtree(str(d), ignore_errors=True)


def _close_all():
    for fleet in list(_LIVE):
        try:
            fleet.close()
        except Exception:
            pass


atexit.register(_close_all)
