"""Measurement helpers of the bench: clocks, medians and number formats, ping/iperf3/agent runs
inside the lab's namespaces, and `Bench`, the state the phases share (the lab, the results
table, the containers `up` left, the measured paths, the fake runners of `burst`).

Nothing here sends traffic from the machine's own namespace: every probe enters a lab
namespace (nsenter --net, ip netns exec) first.
"""

import ipaddress
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))

import labkit  # noqa: E402  (tests/labkit.py, the namespace harness)

AGENT = BENCH / "agent.py"
HOST_URL = "http://%s:8000" % labkit.HOST_IP
IPERF_PORT = 5201
TUNNELS = 255
BURST = 253


def mono():
    return time.monotonic()


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_s(x, digits=3):
    return "n/a" if x is None else ("%.*f s" % (digits, x))


def fmt_ms(x):
    if x is None:
        return "n/a"
    return ("%.0f us" % (x * 1e6)) if x < 0.01 else ("%.1f ms" % (x * 1000.0))


def fmt_gbps(x):
    return "n/a" if x is None else ("%.2f Gbit/s" % (x / 1e9))


def ratio(a, b):
    return None if a is None or not b else a / b


def fmt_r(x):
    return "n/a" if x is None else "%.3f" % x


def per_rep(xs, ys):
    """Median of the per-repetition ratios x/y (each pair measured under the same load)."""
    return median([ratio(x, y) for x, y in zip(xs, ys)])


def have(tool):
    return subprocess.run(["which", tool], stdout=subprocess.DEVNULL).returncode == 0


# ---- small helpers that run inside the lab's namespaces ---------------------------------------

def _run(argv, timeout=60, check=True, input=None):
    res = subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise labkit.LabError("%s exited %d: %s" % (" ".join(map(str, argv[:8])), res.returncode,
                                                    (res.stderr or res.stdout).strip()[-400:]))
    return res


def container_netns(c, node, name):
    pid = c.docker(node, "inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
    if pid in ("", "0"):
        raise labkit.LabError("container %s is not running" % name)
    return "/proc/%s/ns/net" % pid


def ping_until_reply(netns, dst, deadline=10.0):
    """iputils ping every 10 ms from `netns` until the first reply; the time it came back."""
    res = _run(["nsenter", "--net=" + netns, "ping", "-n", "-q", "-c", "1", "-i", "0.01",
                "-w", str(int(deadline)), dst], timeout=deadline + 10, check=False)
    if res.returncode != 0:
        raise labkit.LabError("no ping reply from %s within %ss: %s"
                              % (dst, deadline, res.stdout.strip()[-200:]))
    return mono()


def ping_rtt(netns, dst, count=20):
    """Average RTT in seconds of `count` pings 10 ms apart (after one to warm ARP)."""
    res = _run(["nsenter", "--net=" + netns, "ping", "-n", "-q", "-c", str(count), "-i", "0.01",
                "-W", "1", dst], timeout=30, check=False)
    m = re.search(r"= [\d.]+/([\d.]+)/[\d.]+/[\d.]+ ms", res.stdout)
    if res.returncode != 0 or not m:
        raise labkit.LabError("ping %s failed: %s"
                              % (dst, (res.stdout + res.stderr).strip()[-200:]))
    return float(m.group(1)) / 1000.0


def iperf(netns, dst, seconds):
    """(bits/s received, retransmits) of one iperf3 TCP run from `netns` to dst."""
    for attempt in range(20):
        res = _run(["nsenter", "--net=" + netns, "iperf3", "-c", dst, "-p", str(IPERF_PORT),
                    "-t", str(seconds), "-J"], timeout=seconds + 30, check=False)
        try:
            out = json.loads(res.stdout)
        except ValueError:
            out = {"error": res.stderr.strip() or "no JSON from iperf3"}
        if "error" in out:
            if "busy" in out["error"] or "refused" in out["error"]:
                time.sleep(0.2)
                continue
            raise labkit.LabError("iperf3 to %s: %s" % (dst, out["error"]))
        end = out["end"]
        return end["sum_received"]["bits_per_second"], end["sum_sent"].get("retransmits")
    raise labkit.LabError("iperf3 server at %s never answered" % dst)


def agent(c, node, *args, timeout=120):
    res = c.sh(node, c.python, str(AGENT), *args, check=False, timeout=timeout)
    try:
        return json.loads(res.stdout)
    except ValueError:
        raise labkit.LabError("bench agent %s failed (%d): %s" % (
            args[0], res.returncode, (res.stderr or res.stdout).strip()[-600:]))


def script_timed(c, node, kind, *args, timeout=120):
    t0 = mono()
    res = c.script(node, kind, *args, timeout=timeout)
    return res, mono() - t0


def host_log_mark(c):
    path = c.host.workdir / "host.log"
    return path.stat().st_size if path.exists() else 0


def host_log_wait(c, mark, text, timeout=30):
    path = c.host.workdir / "host.log"

    def seen():
        with open(str(path)) as fh:
            fh.seek(mark)
            return text in fh.read()
    return c.wait_for(seen, timeout=timeout, interval=0.02, what="host log line %r" % text,
                      log=["host"])


# ---- the host's VXLAN source filter, as a packet walks it ------------------------------------

def filter_chains(iptables_s):
    """{chain: [rule spec]} of the host's VXLAN source filter chains (KOHAKU-VXLAN*)."""
    chains = {}
    for line in iptables_s.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0] in ("-N", "-A") and parts[1].startswith("KOHAKU-VXLAN"):
            rules = chains.setdefault(parts[1], [])
            if parts[0] == "-A":
                rules.append(parts[2] if len(parts) > 2 else "")
    return chains


def rules_walked(chains, ip, chain="KOHAKU-VXLAN"):
    """How many rules a VXLAN packet from `ip` looks at before ACCEPT or DROP (None: no verdict)."""
    walked, verdict = _walk(chains, ipaddress.IPv4Address(ip), chain)
    return walked if verdict else None


def _walk(chains, addr, chain):
    walked = 0
    for spec in chains.get(chain, []):
        walked += 1
        m = re.search(r"-s (\S+)", spec)
        target = re.search(r"-j (\S+)", spec)
        if not target or (m and addr not in ipaddress.IPv4Network(m.group(1), strict=False)):
            continue
        if target.group(1) in ("ACCEPT", "DROP"):
            return walked, target.group(1)
        below, verdict = _walk(chains, addr, target.group(1))
        walked += below
        if verdict:
            return walked, verdict
    return walked, None


# ---- what the phases share ----------------------------------------------------------------------

class Bench(object):
    """The lab, the options, the results table and what one phase leaves for the next.

    Written by `up`: containers {"c1", "c1b", "c2": netns path}, ips {"c1b", "c2": address},
    up_done. By `data` (add_path): paths {key: (client netns, destination)}, hub, plain,
    plain1450 (reference networks). By `burst` (make_fakes, burst): fakes, free, fake_plan,
    burst_done. A phase reads only what a phase it NEEDS writes, or calls ensure_tunnels().
    """

    def __init__(self, c, args, results):
        self.c, self.args, self.r = c, args, results
        self.fakes = None
        self.free = []
        self.fake_plan = []
        self.containers = {}
        self.ips = {}
        self.iperf_servers = []
        self.servers = {}
        self.paths = {}
        self.hub = self.plain = self.plain1450 = None
        self.burst_done = False
        self.up_done = False

    @property
    def timed_reps(self):
        """Repetitions of one measurement (--quick: 1, else 3), for the timed control-plane
        figures; the data plane uses args.reps."""
        return 1 if self.args.quick else 3

    def host_config(self, **extra):
        # a long repair interval: the timed phases should not race the periodic pass
        values = {"OVERLAY_REPAIR_INTERVAL": 3600,
                  "OVERLAY_STATE_FILE": str(self.c.host.workdir / "state.json")}
        values.update(extra)
        return self.c.host_config(**values)

    def start(self):
        self.host_config()
        self.c.start_host()
        for i in (1, 2):
            self.c.runner_config(i)

    # -- data plane: measured paths and interleaved repetitions ------------------------------
    def add_path(self, key, client, server, dst):
        """A measured path; one iperf3 server per server namespace, kept until cleanup()."""
        if server not in self.servers:
            self.servers[server] = subprocess.Popen(
                ["nsenter", "--net=" + server, "iperf3", "-s", "-p", str(IPERF_PORT)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.iperf_servers.append(self.servers[server])
        self.paths[key] = (client, dst)

    def measure(self, keys, reps, seconds, rtt=True, states=None):
        """Interleaved repetitions: per rep every key (under every state) once; medians later.

        states: [(label, apply, undo)] switched inside each rep, so that a what-if and its
        baseline see the same machine load. Returns {(state label, key): {"bps": [...], ...}}.
        """
        states = states or [("", None, None)]
        for key in keys:                      # ARP, and fail early on a broken path
            ping_until_reply(self.paths[key][0], self.paths[key][1], deadline=5)
        out = {}
        for rep in range(reps):
            for label, apply, undo in states:
                if apply:
                    apply()
                try:
                    for key in keys:
                        d = out.setdefault((label, key), {"bps": [], "rtt": [], "retr": []})
                        if rtt:
                            d["rtt"].append(ping_rtt(*self.paths[key]))
                    for key in keys:
                        b, rt = iperf(self.paths[key][0], self.paths[key][1], seconds)
                        out[(label, key)]["bps"].append(b)
                        out[(label, key)]["retr"].append(rt)
                finally:
                    if undo:
                        undo()
        return out

    # -- control plane: 253 fake runners in one namespace -------------------------------------
    def make_fakes(self):
        """One namespace holding every free underlay address of the lab's /24."""
        if self.fakes is not None:
            return
        used = {labkit.HOST_IP} | set(n.ip for n in self.c.runners)
        free = [str(a) for a in labkit.UNDERLAY.hosts() if str(a) not in used]
        self.fakes = self.c.add_bare_node("fakes", free[0])
        lines = ["addr add %s/24 dev eth0" % ip for ip in free[1:]]
        self.c.sh(self.fakes, "ip", "-batch", "-", input="\n".join(lines) + "\n")
        self.free = free
        # one registration per free address; the rest (the lab's runners hold two addresses
        # of the /24) share an address with another fake, which the SPEC allows
        names = ["fake%03d" % i for i in range(1, BURST + 1)]
        self.fake_plan = [[n, free[i % len(free)]] for i, n in enumerate(names)]

    def burst(self, plan_name="plan.json", plan=None):
        plan = self.fake_plan if plan is None else plan
        path = self.c.workdir / plan_name
        path.write_text(json.dumps(plan))
        out = agent(self.c, self.fakes, "register", "--url", HOST_URL, "--token", labkit.TOKEN,
                    "--plan", str(path), timeout=180)
        if plan is self.fake_plan:
            self.burst_done = True
        return out

    def ensure_tunnels(self):
        """Phases run alone (--phases) still get the full cluster: a silent burst first."""
        self.make_fakes()
        if not self.up_done:
            for i in range(1, len(self.c.runners) + 1):
                res = self.c.script(i, "runner", "up")
                if res.returncode != 0:
                    raise labkit.LabError("runner%d up failed: %s"
                                          % (i, (res.stderr or res.stdout)[-300:]))
            self.up_done = True
        if not self.burst_done:
            self.burst()

    def cleanup(self):
        for p in self.iperf_servers:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ref in (self.hub, self.plain, self.plain1450):
            if ref is not None:
                ref.remove()
