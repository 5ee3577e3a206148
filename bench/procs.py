"""Count the processes a script spawns, by wrapping its PATH with counting shims.

`Shims(folder)` writes one tiny /bin/sh script per tool the scripts call (ip, iptables, ...): it
appends `<tag> <parent pid> <tool> <args>` to a log and execs the real binary (resolved once, by
absolute path, so stdin, exit code and argv[0] are the real tool's). The tag comes from the
environment variable KOHAKU_BENCH_TAG, which the bench sets only around the processes it wants
counted; everything else the lab runs is tagged "-" and ignored. A shim costs one extra
`sh` exec (about a millisecond), so the timed phases of the bench run without shims.
"""

import os
import shlex
import shutil

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
