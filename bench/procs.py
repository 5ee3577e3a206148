"""The cost phase's instruments: count the processes a script spawns, by wrapping its PATH with
counting shims, and the state-file writes it makes, with strace.

`Shims(folder)` writes one tiny /bin/sh script per tool the scripts call (ip, iptables, ...): it
appends `<tag> <parent pid> <tool> <args>` to a log and execs the real binary (resolved once, by
absolute path, so stdin, exit code and argv[0] are the real tool's). The tag comes from the
environment variable KOHAKU_BENCH_TAG, which the bench sets only around the processes it wants
counted; everything else the lab runs is tagged "-" and ignored. A shim costs one extra
`sh` exec (about a millisecond), so the timed phases of the bench run without shims.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

TOOLS = ("ip", "bridge", "iptables", "iptables-save", "iptables-restore", "ip6tables",
         "iptables-legacy", "iptables-nft", "firewall-cmd", "sysctl", "docker", "nsenter", "ping",
         "tc", "ethtool", "modprobe", "ss", "tcpdump", "journalctl", "systemctl", "uname", "tar")
TAG_VAR = "KOHAKU_BENCH_TAG"


class Shims(object):
    def __init__(self, folder, path=None):
        self.folder = str(folder)
        self.log = os.path.join(self.folder, "spawn.log")
        self.base_path = path or os.environ.get("PATH", "")
        os.makedirs(self.folder, exist_ok=True)
        open(self.log, "a").close()
        self.tools = []
        for tool in TOOLS:
            real = shutil.which(tool, path=self.base_path)
            if real is None:
                continue
            shim = os.path.join(self.folder, tool)
            with open(shim, "w") as fh:
                fh.write('#!/bin/sh\necho "${%s:--} $PPID %s $*" >> %s\nexec %s "$@"\n'
                         % (TAG_VAR, tool, shlex.quote(self.log), shlex.quote(real)))
            os.chmod(shim, 0o755)
            self.tools.append(tool)

    @property
    def path(self):
        return self.folder + ":" + self.base_path

    def mark(self):
        """A position in the log: pass it to since()."""
        return os.path.getsize(self.log)

    def since(self, mark, tag, ppid=None, not_ppid=None):
        """[(tool, args)] logged with `tag` after `mark`: only children of `ppid` when given,
        never those of `not_ppid` (the bench itself, whose `ip netns exec` starts the script)."""
        with open(self.log) as fh:
            fh.seek(mark)
            lines = fh.read().splitlines()
        out = []
        for line in lines:
            parts = line.split(" ", 3)
            if len(parts) < 3 or parts[0] != tag:
                continue
            if ppid is not None and parts[1] != str(ppid):
                continue
            if not_ppid is not None and parts[1] == str(not_ppid):
                continue
            out.append((parts[2], parts[3] if len(parts) > 3 else ""))
        return out


class Env(object):
    """Context manager: PATH through the shims and the tag set, for processes started inside."""

    def __init__(self, shims, tag):
        self.shims, self.tag = shims, tag

    def __enter__(self):
        self.saved = (os.environ.get("PATH"), os.environ.get(TAG_VAR))
        os.environ["PATH"] = self.shims.path
        os.environ[TAG_VAR] = self.tag
        return self

    def __exit__(self, *exc):
        path, tag = self.saved
        os.environ["PATH"] = path
        if tag is None:
            os.environ.pop(TAG_VAR, None)
        else:
            os.environ[TAG_VAR] = tag
        return False


def summarize(spawned):
    """'ip x2, iptables-restore x1' from [(tool, args)]."""
    counts = {}
    for tool, args in spawned:
        first = args.split()[:1]
        key = tool + (" " + first[0] if first else "")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join("%s x%d" % (k, v) for k, v in sorted(counts.items())) or "none"


def settle(shims, pid, quiet=0.5, timeout=15):
    """Wait until the host has spawned nothing for `quiet` seconds: a release is answered
    before its tunnel is removed, and that work must not be counted as the next step's."""
    deadline = time.monotonic() + timeout
    mark, last_change = shims.mark(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = shims.mark()
        if now != mark:
            mark, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet:
            return


def strace_start(pid, out):
    """strace every thread of `pid` for execve and rename* into the file `out`."""
    p = subprocess.Popen(["strace", "-f", "-qq", "-o", str(out), "-e",
                          "trace=execve,rename,renameat,renameat2", "-p", str(pid)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)     # attached to every thread
    return p


def strace_stop(p, out, state_path):
    """Stop strace_start's strace -> (renames onto state_path, execve not through a shim)."""
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    text = Path(out).read_text() if Path(out).exists() else ""
    writes = len(re.findall(r"rename\w*\(.*%s\"" % re.escape(os.path.basename(state_path)),
                            text))
    execs = len(re.findall(r"execve\(\"(?![^\"]*/shims/)", text))
    return writes, execs
