#!/usr/bin/env python3
"""kohaku-overlay benchmark: control plane, data plane and cost, side by side in one run.

    python3 bench/run.py            # as root: the whole bench, about 4 minutes
    python3 bench/run.py --quick    # a subset in about 40 s (1 repetition, 2 s runs)

It builds its own lab with tests/labkit.py (a switch, the Host, two Runners with their own dockerd,
all in network namespaces with a unique prefix) plus two hand-built reference networks in more
namespaces of the same prefix, runs the real scripts there, prints one table of figures (each a
ratio or a count measured in this run, with the raw numbers and PASS/MISS against the targets of
issue 7 and ../shared/BENCHMARKS.md), and removes everything again, also on failure and Ctrl-C.
The machine's own network namespace is never configured and no traffic leaves the namespaces.

Phases (in this order; --phases picks a subset):
    up       `kohaku_overlay_runner.py up` until a container on the overlay answers a ping
    data     iperf3 and ping: across runners through the Host vs the underlay, the same on a
             hand-built hub, same-runner containers vs a plain bridge (interleaved, medians)
    burst    253 fake runners register at once through the HTTP API (one namespace, one
             source address per request)
    check    `kohaku_overlay_check.py --role host` with 255 tunnels
    restart  SIGTERM the Host with 255 tunnels, start it, poll status until total == 255
    cost     processes spawned per registration / reconcile pass (PATH shims), state-file
             writes per registration (strace)

Exit code: 0 when every figure was measured (PASS or MISS), 1 when a phase failed, 2 bad usage.
"""

import argparse
import ipaddress
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH))

import labkit  # noqa: E402  (tests/labkit.py, the namespace harness)
import procs  # noqa: E402
import refnet  # noqa: E402

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


# ---- the results table -------------------------------------------------------------------------

class Results(object):
    """Rows of (section, figure, value, raw, target, verdict) and notes, printed at the end."""

    def __init__(self):
        self.rows = []
        self.errors = []
        self.notes = []

    def add(self, section, figure, value, raw="", target="", ok=None):
        verdict = "" if ok is None else ("PASS" if ok else "MISS")
        self.rows.append({"section": section, "figure": figure, "value": value, "raw": raw,
                          "target": target, "verdict": verdict})

    def error(self, phase, exc):
        msg = str(exc).strip().splitlines()
        self.errors.append("%s: %s" % (phase, " / ".join(msg[:6]) if msg else repr(exc)))
        self.rows.append({"section": phase, "figure": "phase failed", "value": "ERROR",
                          "raw": (msg[0] if msg else repr(exc))[:90], "target": "",
                          "verdict": "ERROR"})

    def note(self, text):
        self.notes.append(text)

    def render(self, header):
        cols = ("section", "figure", "value", "raw", "target", "verdict")
        widths = dict((c, max([len(c)] + [len(str(r[c])) for r in self.rows])) for c in cols)
        widths["raw"] = min(widths["raw"], 100)
        lines = [header, ""]
        fmt = "  ".join("%%-%ds" % widths[c] for c in cols)
        lines.append(fmt % cols)
        lines.append(fmt % tuple("-" * widths[c] for c in cols))
        last = None
        for r in self.rows:
            sec = r["section"] if r["section"] != last else ""
            last = r["section"]
            lines.append((fmt % (sec, r["figure"], r["value"], str(r["raw"])[:100], r["target"],
                                 r["verdict"])).rstrip())
        verdicts = [r["verdict"] for r in self.rows if r["verdict"]]
        lines.append("")
        lines.append("targets: %d PASS, %d MISS%s" % (
            verdicts.count("PASS"), verdicts.count("MISS"),
            (", %d phase(s) failed" % len(self.errors)) if self.errors else ""))
        for n in self.notes:
            lines.append("note: " + n)
        for e in self.errors:
            lines.append("error: " + e)
        return "\n".join(lines)


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


# ---- the bench ---------------------------------------------------------------------------------

class Bench(object):
    def __init__(self, c, args, results):
        self.c, self.args, self.r = c, args, results
        self.fakes = None
        self.fake_plan = []
        self.containers = {}
        self.iperf_servers = []
        self.servers = {}
        self.paths = {}
        self.hub = self.plain = self.plain1450 = None
        self.burst_done = False
        self.up_done = False

    # -- setup -------------------------------------------------------------------------------
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

    # -- phase: runner up until a container answers ------------------------------------------
    def phase_up(self):
        c, r = self.c, self.r
        res, t_up1 = script_timed(c, 1, "runner", "up")
        if res.returncode != 0:
            raise labkit.LabError("runner1 up failed: %s" % (res.stderr or res.stdout)[-500:])
        c.container(1, "c1")
        c.container(1, "c1b")
        ns_c1 = container_netns(c, 1, "c1")
        # runner2 from nothing: up, start a container on the overlay, ping it from runner1's
        t0 = mono()
        res = c.script(2, "runner", "up")
        t1 = mono()
        if res.returncode != 0:
            raise labkit.LabError("runner2 up failed: %s" % (res.stderr or res.stdout)[-500:])
        c.container(2, "c2")
        t2 = mono()
        ip2 = c.container_ip(2, "c2")
        t3 = ping_until_reply(ns_c1, ip2)
        total, product = t3 - t0, (t1 - t0) + (t3 - t2)
        r.add("runner up", "up -> new container answers ping", fmt_s(total),
              "up %.3f s + docker run %.3f s + first reply %.3f s" % (t1 - t0, t2 - t1, t3 - t2),
              "< 1 s", total < 1.0)
        r.add("runner up", "  same, without docker run", fmt_s(product), "up + first reply",
              "< 1 s", product < 1.0)
        # the tunnel lost (a reboot of the link, `ip link del`): up repairs, the running
        # container answers again
        ups, reps = [], []
        for _ in range(1 if self.args.quick else 3):
            c.sh(2, "ip", "link", "del", "vxlan0")
            t0 = mono()
            res = c.script(2, "runner", "up")
            t1 = mono()
            t3 = ping_until_reply(ns_c1, ip2)
            if res.returncode != 0:
                raise labkit.LabError("runner2 up (repair) failed: %s" % res.stderr[-300:])
            ups.append(t1 - t0)
            reps.append(t3 - t0)
        r.add("runner up", "up repairing vxlan0 -> running container answers", fmt_s(median(reps)),
              "median of %d; up alone %.3f s" % (len(reps), median(ups)), "< 1 s",
              median(reps) < 1.0)
        noop = []
        for _ in range(1 if self.args.quick else 3):
            noop.append(script_timed(c, 2, "runner", "up")[1])
        r.add("runner up", "up with nothing to change", fmt_s(median(noop)),
              "runner1's first up: %.3f s" % t_up1)
        self.up_done = True
        self.containers = {"c1": ns_c1, "c1b": container_netns(c, 1, "c1b"),
                           "c2": container_netns(c, 2, "c2")}
        self.ips = {"c1b": c.container_ip(1, "c1b"), "c2": ip2}

    # -- phase: data plane -------------------------------------------------------------------
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

    def phase_data(self):
        c, r, args = self.c, self.r, self.args
        if not self.containers:
            raise labkit.LabError("the up phase did not leave containers to measure")
        self.hub = refnet.HandBuiltHub(c.prefix).build()
        self.plain = refnet.PlainBridge(c.prefix).build()
        self.plain1450 = refnet.PlainBridge(c.prefix, letter="q", mtu=refnet.MTU).build()
        hub, plain, q = self.hub, self.plain, self.plain1450
        ns = lambda name: "/run/netns/" + name  # noqa: E731
        self.add_path("underlay", c.runners[0].netns_path, c.runners[1].netns_path,
                      c.runners[1].ip)
        self.add_path("cross", self.containers["c1"], self.containers["c2"], self.ips["c2"])
        self.add_path("hb_underlay", ns(hub.runner[1]), ns(hub.runner[2]), hub.runner_ip[2])
        self.add_path("hb_cross", ns(hub.cont[1]), ns(hub.cont[2]), hub.cont_ip[2])
        self.add_path("same", self.containers["c1"], self.containers["c1b"], self.ips["c1b"])
        self.add_path("plain", ns(plain.a), ns(plain.b), plain.ip[plain.b])
        self.add_path("plain1450", ns(q.a), ns(q.b), q.ip[q.b])
        time.sleep(0.2)
        keys = ["underlay", "cross", "hb_underlay", "hb_cross", "same", "plain", "plain1450"]
        got = self.measure(keys, args.reps, args.seconds)
        bps = dict((k, got[("", k)]["bps"]) for k in keys)
        rtt = dict((k, got[("", k)]["rtt"]) for k in keys)
        retr = dict((k, got[("", k)]["retr"]) for k in keys)

        def per_rep(a, b, src):
            return median([ratio(x, y) for x, y in zip(src[a], src[b])])

        m = dict((k, median(v)) for k, v in bps.items())
        mr = dict((k, median(v)) for k, v in rtt.items())
        ours = per_rep("cross", "underlay", bps)
        hand = per_rep("hb_cross", "hb_underlay", bps)
        same = per_rep("same", "plain", bps)
        n = "median of %d x %d s" % (args.reps, args.seconds)
        r.add("data plane", "TCP cross-runner / underlay", fmt_r(ours),
              "%s / %s (%s)" % (fmt_gbps(m["cross"]), fmt_gbps(m["underlay"]), n), ">= 0.50",
              ours is not None and ours >= 0.5)
        r.add("data plane", "  hand-built hub: cross / underlay", fmt_r(hand),
              "%s / %s" % (fmt_gbps(m["hb_cross"]), fmt_gbps(m["hb_underlay"])),
              "(BENCHMARKS: 0.60-0.64)")
        frac = ratio(ours, hand)
        r.add("data plane", "  ours as a fraction of hand-built",
              "n/a" if frac is None else "%.3f" % frac, "ratio / ratio",
              ">= 0.95", frac is not None and frac >= 0.95)
        r.add("data plane", "TCP same-runner / plain bridge", fmt_r(same),
              "%s / %s" % (fmt_gbps(m["same"]), fmt_gbps(m["plain"])), ">= 0.90",
              same is not None and same >= 0.9)
        r.add("data plane", "  plain bridge at MTU 1450 / at 1500",
              fmt_r(per_rep("plain1450", "plain", bps)),
              "%s / %s" % (fmt_gbps(m["plain1450"]), fmt_gbps(m["plain"])))
        r.add("data plane", "RTT cross-runner / underlay", fmt_r(per_rep("cross", "underlay", rtt)),
              "%s / %s (avg of 20 pings)" % (fmt_ms(mr["cross"]), fmt_ms(mr["underlay"])))
        r.add("data plane", "  hand-built hub: RTT cross / underlay",
              fmt_r(per_rep("hb_cross", "hb_underlay", rtt)),
              "%s / %s" % (fmt_ms(mr["hb_cross"]), fmt_ms(mr["hb_underlay"])))
        r.add("data plane", "RTT same-runner / plain bridge", fmt_r(per_rep("same", "plain", rtt)),
              "%s / %s" % (fmt_ms(mr["same"]), fmt_ms(mr["plain"])))
        r.add("data plane", "TCP retransmits per run (median)",
              "%s" % median(retr["cross"]),
              "cross %s, underlay %s, hb cross %s, same %s, plain %s" % (
                  median(retr["cross"]), median(retr["underlay"]), median(retr["hb_cross"]),
                  median(retr["same"]), median(retr["plain"])))
        self.data = {"bps": bps, "rtt": rtt, "retransmits": retr}

    # -- phase: why (what-ifs in the runners' namespaces, undone after each run) ---------------
    def runners_do(self, *argv):
        for node in self.c.runners:
            self.c.sh(node, *argv)

    def phase_why(self):
        c, r, args = self.c, self.r, self.args
        if "cross" not in self.paths:
            raise labkit.LabError("the why phase needs the data phase's paths")
        notrack = [("-t", "raw", "%s", "PREROUTING", "-p", "udp", "--dport", "4789", "-m",
                    "comment", "--comment", "kohaku-bench", "-j", "NOTRACK"),
                   ("-t", "raw", "%s", "OUTPUT", "-p", "udp", "--dport", "4789", "-m",
                    "comment", "--comment", "kohaku-bench", "-j", "NOTRACK")]

        def rules(op):
            return lambda: [self.runners_do("iptables", *[a % op if a == "%s" else a for a in rule])
                            for rule in notrack]

        def brnf(v):
            return lambda: self.runners_do("sysctl", "-q", "-w",
                                           "net.bridge.bridge-nf-call-iptables=%d" % v)

        saved = {}

        def no_netfilter():
            # every rule of the runners and the host gone (Docker's too), put back right after
            for node in list(c.runners) + [c.host]:
                saved[node.name] = c.sh(node, "iptables-save").stdout
                c.sh(node, "nft", "flush", "ruleset")

        def netfilter_back():
            for node in list(c.runners) + [c.host]:
                if node.name in saved:
                    c.sh(node, "iptables-restore", input=saved.pop(node.name))

        states = [("as built", None, None),
                  ("NOTRACK udp/4789", rules("-A"), rules("-D")),
                  ("bridge-nf-call-iptables=0", brnf(0), brnf(1))]
        if subprocess.run(["which", "nft"], stdout=subprocess.DEVNULL).returncode == 0:
            states.append(("no netfilter at all", no_netfilter, netfilter_back))
        got = self.measure(["cross", "same"], args.reps, args.whatif_seconds, rtt=False,
                           states=states)
        base = dict((k, got[("as built", k)]["bps"]) for k in ("cross", "same"))
        for label, _, _ in states[1:]:
            for k in ("cross", "same"):
                vals = got[(label, k)]["bps"]
                gain = median([ratio(x, y) for x, y in zip(vals, base[k])])
                r.add("why (what-if, runners' namespaces)", "%s: %s vs as built" % (
                    "cross-runner" if k == "cross" else "same-runner", label), fmt_r(gain),
                    "%s vs %s" % (fmt_gbps(median(vals)), fmt_gbps(median(base[k]))))
        # the other way round: give the hand-built hub's runners what Docker gives ours, a
        # netfilter hook with connection tracking (one rule that never matches)
        ct_rule = ["FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-m", "comment",
                   "--comment", "kohaku-bench", "-j", "DROP"]

        def hb_ct(op):
            def do():
                for n in (1, 2):
                    _run(["ip", "netns", "exec", self.hub.runner[n], "iptables", op] + ct_rule)
            return do

        hb_states = [("as built", None, None), ("conntrack", hb_ct("-A"), hb_ct("-D"))]
        got = self.measure(["hb_underlay", "hb_cross"], args.reps, args.whatif_seconds,
                           rtt=True, states=hb_states)
        plain_r = median([ratio(x, y) for x, y in zip(got[("as built", "hb_cross")]["bps"],
                                                      got[("as built", "hb_underlay")]["bps"])])
        ct_r = median([ratio(x, y) for x, y in zip(got[("conntrack", "hb_cross")]["bps"],
                                                   got[("conntrack", "hb_underlay")]["bps"])])
        r.add("why (what-if, runners' namespaces)", "hand-built hub with conntrack in its runners",
              fmt_r(ct_r), "cross / underlay, against %s without; RTT cross %s vs %s" % (
                  fmt_r(plain_r), fmt_ms(median(got[("conntrack", "hb_cross")]["rtt"])),
                  fmt_ms(median(got[("as built", "hb_cross")]["rtt"]))))
        conntrack = c.sh(c.runners[0], "sysctl", "-n", "net.netfilter.nf_conntrack_count",
                         check=False).stdout.strip()
        r.note("Docker puts netfilter hooks into the runners' namespaces (nf_conntrack_count %s on "
               "runner1; net.bridge.bridge-nf-call-iptables=1), so every bridged frame and every "
               "VXLAN packet walks Docker's chains and conntrack; the hand-built hub has no hooks. "
               "Compare the 'no netfilter at all' and 'bridge-nf-call-iptables=0' rows with the "
               "gap to the hand-built hub; the product's own rules are first in FORWARD and "
               "accept at once" % (conntrack or "?"))

    def input_counters(self):
        """(packets, bytes) of the host's INPUT jump to the VXLAN source filter, or None."""
        out = self.c.sh(self.c.host, "iptables", "-L", "INPUT", "-v", "-x", "-n",
                        check=False).stdout
        for line in out.splitlines():
            if "KOHAKU-VXLAN" in line:
                f = line.split()
                return int(f[0]), int(f[1])
        return None

    # -- phase: data plane again with 255 tunnels ---------------------------------------------
    def phase_data255(self):
        c, r, args = self.c, self.r, self.args
        if "cross" not in self.paths:
            raise labkit.LabError("the data255 phase needs the data phase's paths")
        self.ensure_tunnels()
        total = c.status()["total"]
        chains = filter_chains(c.sh(c.host, "iptables", "-S", check=False).stdout)
        walks = [rules_walked(chains, n.ip) for n in c.runners]
        filler = ["-I KOHAKU-VXLAN 1 -s 192.0.2.%d/32 -m comment --comment kohaku-bench -j ACCEPT"
                  % i for i in range(1, 251)]

        def fill():
            c.sh(c.host, "iptables-restore", "--noflush",
                 input="*filter\n" + "\n".join(filler) + "\nCOMMIT\n")

        def unfill():
            c.sh(c.host, "iptables-restore", "--noflush",
                 input="*filter\n" + "\n".join(
                     rule.replace("-I KOHAKU-VXLAN 1", "-D KOHAKU-VXLAN") for rule in filler)
                 + "\nCOMMIT\n")

        ips = sorted(set(a["physical_ip"] for a in c.status()["allocations"]))
        worst = max([rules_walked(chains, ip) or 0 for ip in ips] or [0])
        have_ipset = subprocess.run(["which", "ipset"], stdout=subprocess.DEVNULL).returncode == 0
        setrule = ["INPUT", "1", "-p", "udp", "--dport", "4789", "-m", "set", "--match-set",
                   "kb-runners", "src", "-m", "comment", "--comment", "kohaku-bench",
                   "-j", "ACCEPT"]

        def with_set():
            fill()
            c.sh(c.host, "ipset", "restore", input="create kb-runners hash:ip\n" + "".join(
                "add kb-runners %s\n" % ip for ip in ips))
            c.sh(c.host, "iptables", "-I", *setrule)

        def without_set():
            c.sh(c.host, "iptables", "-D", *[a for i, a in enumerate(setrule) if i != 1])
            c.sh(c.host, "ipset", "destroy", "kb-runners")
            unfill()

        states = [("", None, None), ("end of chain", fill, unfill)]
        if have_ipset:
            states.append(("ipset", with_set, without_set))
        before = self.input_counters()
        got = self.measure(["underlay", "cross"], args.reps, args.whatif_seconds, rtt=False,
                           states=states)
        after = self.input_counters()
        if before and after and after[0] > before[0]:
            pk, by = after[0] - before[0], after[1] - before[1]
            r.add("data plane", "  VXLAN packets through the host's INPUT filter", "%d" % pk,
                  "%.0f bytes per packet: GSO/GRO super-packets, so the filter's per-packet "
                  "cost is paid once per ~%d frames" % (by / float(pk), max(1, by // pk // 1500)))
        cross = got[("", "cross")]["bps"]
        under = got[("", "underlay")]["bps"]
        ratio255 = median([ratio(x, y) for x, y in zip(cross, under)])
        r.add("data plane", "TCP cross-runner / underlay, %d tunnels" % total, fmt_r(ratio255),
              "%s / %s; filter walk %s rules (worst runner %d, %d chains)" % (
                  fmt_gbps(median(cross)), fmt_gbps(median(under)),
                  "/".join(str(w) for w in walks), worst, len(chains)), ">= 0.50",
              ratio255 is not None and ratio255 >= 0.5)
        endc = got[("end of chain", "cross")]["bps"]
        endunder = got[("end of chain", "underlay")]["bps"]
        endratio = median([ratio(x, y) for x, y in zip(endc, endunder)])
        r.add("data plane", "  same, runners behind 250 more filter rules", fmt_r(endratio),
              "%s (what-if: a runner at the end of a one-rule-per-runner chain)"
              % fmt_gbps(median(endc)))
        if have_ipset:
            sc = got[("ipset", "cross")]["bps"]
            sratio = median([ratio(x, y) for x, y in zip(sc, got[("ipset", "underlay")]["bps"])])
            r.add("data plane", "  same, 250 more rules but an ipset match first", fmt_r(sratio),
                  "%s (what-if: -m set --match-set hash:ip of %d runners ahead of the chain)"
                  % (fmt_gbps(median(sc)), len(ips)))

    # -- phase: 253 registrations at once ----------------------------------------------------
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

    def phase_burst(self):
        c, r = self.c, self.r
        self.make_fakes()
        before = c.status()["total"]
        out = self.burst()
        res = out["results"]
        ok = [x for x in res if x["status"] == 200]
        lat = [x["end"] - x["start"] for x in res]
        total = out["t1"] - out["t0"]
        bad = sorted(set("%s %s" % (x["status"], x.get("error"))
                         for x in res if x["status"] != 200))
        st = c.status()
        devs = json.loads(c.sh(c.host, "ip", "-j", "link", "show", "type", "vxlan").stdout)
        ids = set(x["runner_id"] for x in ok)
        r.add("control plane", "%d registrations at once (HTTP)" % len(res), fmt_s(total),
              "%d answered 200, %d distinct ids, %d source addresses" % (
                  len(ok), len(ids), len(set(x["source"] for x in res))),
              "< 5 s", total < 5.0 and len(ok) == len(res))
        r.add("control plane", "  per registration: median / worst",
              "%s / %s" % (fmt_ms(median(lat)), fmt_ms(max(lat))),
              "peer (sequential, no HTTP): 137 ms median / 485 ms worst")
        r.add("control plane", "  tunnels after the burst",
              "%d" % len(devs), "status total %d (before %d), %d vxkr devices" % (
                  st["total"], before, len(devs)))
        if bad:
            r.note("burst failures: " + "; ".join(bad[:5]))
        if len(res) != len(set(x["source"] for x in res)):
            r.note("the lab's /24 has %d free addresses for fake runners (the Host and the two "
                   "Runners hold the rest): %d of the %d fakes share an address with another "
                   "fake" % (len(self.free), len(res) - len(self.free), len(res)))

    # -- phase: check with 255 tunnels --------------------------------------------------------
    def phase_check(self):
        c, r = self.c, self.r
        self.ensure_tunnels()
        if not (REPO / labkit.SCRIPTS["check"]).exists():
            r.add("control plane", "check --role host", "SKIP", "kohaku_overlay_check.py is not "
                  "in the repository yet", "< 2 s")
            return
        total = c.status()["total"]
        times, rc, summary = [], None, ""
        for _ in range(1 if self.args.quick else 3):
            res, t = script_timed(c, c.host, "check", "--json")
            times.append(t)
            rc = res.returncode
            try:
                out = json.loads(res.stdout)
                items = out.get("results", out) if isinstance(out, dict) else out
                counts = {}
                for item in items:
                    counts[item.get("status")] = counts.get(item.get("status"), 0) + 1
                summary = ", ".join("%d %s" % (v, k) for k, v in sorted(counts.items()))
                notpass = ["%s %s" % (i.get("status"), i.get("id")) for i in items
                           if i.get("status") not in ("PASS", "SKIP")]
                if notpass and len(times) == (1 if self.args.quick else 3):
                    found = ["%s %s: %s" % (i.get("status"), i.get("id"),
                                            (i.get("detail") or "")[:120])
                             for i in items if i.get("status") not in ("PASS", "SKIP")]
                    r.note("check on the host with %d tunnels: %s" % (total, "; ".join(found)))
            except (ValueError, AttributeError, TypeError):
                summary = (res.stdout or res.stderr).strip().splitlines()[-1:] or ["?"]
                summary = summary[0][:60]
        r.add("control plane", "check --role host, %d tunnels" % total, fmt_s(median(times)),
              "median of %d, exit %s: %s" % (len(times), rc, summary), "< 2 s",
              median(times) < 2.0)

    # -- phase: host restart with 255 tunnels -------------------------------------------------
    def restart_once(self, total, cold):
        c = self.c
        t_stop0 = mono()
        c.stop_host()
        t_stop = mono() - t_stop0
        if cold:
            # what a reboot leaves: no vxkr* devices (the state file survives)
            devs = json.loads(c.sh(c.host, "ip", "-j", "link", "show", "type", "vxlan").stdout)
            lines = ["link del %s" % d["ifname"] for d in devs if d["ifname"].startswith("vxkr")]
            if lines:
                c.sh(c.host, "ip", "-batch", "-", input="\n".join(lines) + "\n")
        poller = subprocess.Popen(
            ["ip", "netns", "exec", c.host.ns, c.python, str(AGENT), "wait-status", "--url",
             "http://127.0.0.1:8000", "--token", labkit.TOKEN, "--total", str(total),
             "--devices", str(total), "--timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        time.sleep(0.4)        # the poller's python is up and polling a closed port
        t0 = mono()
        c.start_host(wait=False)
        out, err = poller.communicate(timeout=90)
        try:
            got = json.loads(out)
        except ValueError:
            raise labkit.LabError("restart poller failed: %s" % err.strip()[-300:])
        if got["t_status"] is None:
            raise labkit.LabError("status never showed %d allocations (last %s)" % (
                total, got.get("last_total")))
        t_dev = None if got["t_devices"] is None else max(0.0, got["t_devices"] - t0)
        c.wait_for(lambda: c.status()["total"] == total, timeout=30, interval=0.1,
                   what="host status after the restart", log=["host"])
        return got["t_status"] - t0, t_dev, t_stop

    def phase_restart(self):
        c, r = self.c, self.r
        self.ensure_tunnels()
        total = c.status()["total"]
        n = 1 if self.args.quick else 3
        for cold in (False, True):
            if cold and self.args.quick:
                continue
            runs = [self.restart_once(total, cold) for _ in range(n)]
            st = median([x[0] for x in runs])
            dv = median([x[1] for x in runs])
            label = "cold (devices gone)" if cold else "warm (devices kept)"
            r.add("control plane", "host restart %s, %d tunnels: status complete" % (label, total),
                  fmt_s(st), "median of %d; all %d vxkr up after %s; SIGTERM stop %s" % (
                      n, total, fmt_s(dv), fmt_s(median([x[2] for x in runs]))),
                  "< 0.4 s (issue: < 2 s)", st < 0.4)
        if total != TUNNELS:
            r.note("restart measured with %d tunnels, not %d" % (total, TUNNELS))

    # -- phase: cost (processes, state writes) -----------------------------------------------
    def strace_start(self, pid, out):
        p = subprocess.Popen(["strace", "-f", "-qq", "-o", str(out), "-e",
                              "trace=execve,rename,renameat,renameat2", "-p", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)     # attached to every thread
        return p

    def strace_stop(self, p, out, state_path):
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

    def phase_cost(self):
        c, r = self.c, self.r
        self.ensure_tunnels()
        shims = procs.Shims(c.workdir / "shims")
        state_path = str(c.host.workdir / "state.json")     # set by host_config() above
        have_strace = subprocess.run(["which", "strace"], stdout=subprocess.DEVNULL).returncode == 0
        # restart the host through the shims (the timed phases ran without them)
        c.stop_host()
        mark = shims.mark()
        logmark = host_log_mark(c)
        with procs.Env(shims, "host"):
            popen = c.start_host()
        host_log_wait(c, logmark, "serving the overlay API")
        total = c.status()["total"]
        startup = shims.since(mark, "host", ppid=popen.pid)
        r.add("cost", "processes: host start-up, %d tunnels" % total, "%d" % len(startup),
              summarize(startup))

        def one(plan, label, target=None):
            m = shims.mark()
            st = None
            if have_strace:
                st = self.strace_start(popen.pid, c.workdir / "strace.out")
            out = self.burst("one.json", plan)
            writes = execs = None
            if st is not None:
                writes, execs = self.strace_stop(st, c.workdir / "strace.out", state_path)
            spawned = shims.since(m, "host", ppid=popen.pid)
            n = len(plan)
            per = len(spawned) / float(n)
            okc = sum(1 for x in out["results"] if x["status"] == 200)
            raw = "%s; %d/%d answered 200" % (summarize(spawned), okc, n)
            if execs is not None and execs != len(spawned):
                raw += "; strace saw %d execve" % execs
            r.add("cost", "processes per registration, %s" % label,
                  ("%d" % len(spawned)) if n == 1 else "%.3f (%d/%d)" % (per, len(spawned), n),
                  raw, target or "", None if target is None else per <= 3)
            if writes is not None:
                r.add("cost", "state-file writes per registration, %s" % label,
                      ("%d" % writes) if n == 1 else "%.3f (%d/%d)" % (writes / float(n), writes,
                                                                       n),
                      "renames onto %s (strace)" % os.path.basename(state_path),
                      "1 (atomic write before the answer)" if n == 1 else "")

        # a full cluster: free one id, register a new runner into it, then the same name again
        # a fake with an address of its own, so the registration also changes the VXLAN
        # source filter (the dearer path)
        shared = [p[1] for p in self.fake_plan]
        victim = next(p for p in reversed(self.fake_plan) if shared.count(p[1]) == 1)
        rel = c.script(c.host, "host", "release", victim[0], "--yes")
        if rel.returncode != 0:
            raise labkit.LabError("release failed: %s" % (rel.stderr or rel.stdout)[-300:])
        settle(shims, popen.pid)
        one([["newcomer", victim[1]]], "new runner into a cluster of %d" % (total - 1), "<= 3")
        one([["newcomer", victim[1]]], "same name again (%d tunnels)" % total, "<= 3")
        # heartbeats spawn nothing
        m = shims.mark()
        res = c.sh(self.fakes, c.python, "-c", HEARTBEAT_SNIPPET, HOST_URL, labkit.TOKEN,
                   "newcomer", victim[1], check=False)
        hb = shims.since(m, "host", ppid=popen.pid)
        r.add("cost", "processes per heartbeat", "%d" % len(hb),
              "answered %s" % res.stdout.strip()[:40], "0", len(hb) == 0)
        # runner and check, one run each through the shims
        m = shims.mark()
        with procs.Env(shims, "runner"):
            c.script(2, "runner", "up")
        ru = shims.since(m, "runner", not_ppid=os.getpid())
        r.add("cost", "processes: runner up (already built)", "%d" % len(ru), summarize(ru))
        if (REPO / labkit.SCRIPTS["check"]).exists():
            m = shims.mark()
            with procs.Env(shims, "check"):
                c.script(c.host, "check")
            ck = shims.since(m, "check", not_ppid=os.getpid())
            r.add("cost", "processes: check --role host, %d tunnels" % c.status()["total"],
                  "%d" % len(ck), summarize(ck))
        # a runner built from nothing (after `down --force`), through the shims
        down = c.script(2, "runner", "down", "--force")
        if down.returncode == 0:
            m = shims.mark()
            with procs.Env(shims, "runner"):
                res, t = script_timed(c, 2, "runner", "up")
            ru = shims.since(m, "runner", not_ppid=os.getpid())
            r.add("cost", "processes: runner up from nothing", "%d" % len(ru),
                  "%s; %.3f s with the shims" % (summarize(ru), t))
        else:
            r.note("runner2 down --force failed, no cold-up count: %s"
                   % (down.stderr or down.stdout).strip()[-200:])
        # the whole burst again, through the shims: the group commit amortizes
        if not self.args.quick:
            c.script(c.host, "host", "release", "newcomer", "--yes")
            # release the fakes in one go: cleanup releases the inactive ones, which after
            # OVERLAY_INACTIVE_AFTER are all of them (the lab's runners ran `up`, not `serve`)
            c.wait_for(lambda: c.status()["active"] == 0, timeout=30, interval=0.5,
                       what="every runner inactive")
            c.script(c.host, "host", "cleanup", "--yes")
            settle(shims, popen.pid)
            one([list(p) for p in self.fake_plan], "%d at once into an empty host" % BURST, "<= 3")
        # reconcile passes: restart with a 1 s repair interval and count what 3 passes spawn
        c.stop_host()
        self.host_config(OVERLAY_REPAIR_INTERVAL=1)
        logmark = host_log_mark(c)
        with procs.Env(shims, "host"):
            popen = c.start_host()
        host_log_wait(c, logmark, "serving the overlay API")
        time.sleep(0.3)
        m = shims.mark()
        time.sleep(3.4 if not self.args.quick else 2.2)
        spawned = shims.since(m, "host", ppid=popen.pid)
        passes = sum(1 for tool, a in spawned if tool == "ip" and re.search(r"-j\b.*\bshow", a))
        n = c.status()["total"]
        r.add("cost", "processes per reconcile pass, %d tunnels" % n,
              "%.1f" % (len(spawned) / float(passes)) if passes else "n/a",
              "%d passes: %s" % (passes, summarize(spawned)), "constant (1 ip, 1 iptables read)",
              passes > 0 and len(spawned) <= 2 * passes)
        c.stop_host()
        self.host_config()
        c.start_host()

    def cleanup(self):
        for p in self.iperf_servers:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ref in (self.hub, self.plain, self.plain1450):
            if ref is not None:
                ref.remove()


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


def settle(shims, pid, quiet=0.5, timeout=15):
    """Wait until the host has spawned nothing for `quiet` seconds: a release is answered
    before its tunnel is removed, and that work must not be counted as the next step's."""
    deadline = mono() + timeout
    mark, last_change = shims.mark(), mono()
    while mono() < deadline:
        time.sleep(0.05)
        now = shims.mark()
        if now != mark:
            mark, last_change = now, mono()
        elif mono() - last_change >= quiet:
            return


def firewalld_elsewhere():
    """Pids of firewalld processes on this machine (other labs' included: one pid namespace)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as fh:
                argv = fh.read().split(b"\0")[:2]
        except OSError:
            continue
        if any(os.path.basename(a) == b"firewalld" for a in argv):
            pids.append(int(pid))
    return pids


def loadavg():
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"


HEARTBEAT_SNIPPET = r"""
import http.client, sys
url, token, name, src = sys.argv[1:5]
host, port = url.split("://")[1].split(":")
conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(src, 0))
conn.request("PUT", "/api/overlay/heartbeat/" + name, body=b"",
             headers={"Authorization": "Bearer " + token, "Content-Length": "0"})
r = conn.getresponse()
print(r.status, r.read().decode())
"""


def summarize(spawned):
    """'ip x2, iptables-restore x1' from [(tool, args)]."""
    counts = {}
    for tool, args in spawned:
        first = args.split()[:1]
        key = tool + (" " + first[0] if first else "")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join("%s x%d" % (k, v) for k, v in sorted(counts.items())) or "none"


PHASES = ("up", "data", "why", "burst", "data255", "check", "restart", "cost")
QUICK_SKIPS = ("why", "data255")


def machine_line():
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh
                          if line.startswith("model name")), "?")
    except OSError:
        model = "?"
    return "%s, kernel %s, %d cores (%s), Python %s" % (
        platform.node(), platform.release(), os.cpu_count() or 0, model,
        platform.python_version())


def build_parser():
    ap = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="a subset in about 40 s: 1 repetition, 2 s iperf3 runs, no what-ifs")
    ap.add_argument("--reps", type=int, default=None, help="data-plane repetitions (default 3)")
    ap.add_argument("--seconds", type=int, default=None, help="seconds per iperf3 run (default 3)")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help="comma-separated subset of: %s" % ", ".join(PHASES))
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    ap.add_argument("--verbose", action="store_true", help="print the lab's progress lines")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if args.quick and args.phases == ",".join(PHASES):
        phases = [p for p in phases if p not in QUICK_SKIPS]
    bad = [p for p in phases if p not in PHASES]
    if bad:
        print("error: unknown phase %s: choose from %s" % (", ".join(bad), ", ".join(PHASES)),
              file=sys.stderr)
        return 2
    args.reps = args.reps or (1 if args.quick else 3)
    args.seconds = args.seconds or (2 if args.quick else 3)
    args.whatif_seconds = min(args.seconds, 2)      # the what-ifs: more states, shorter runs
    if args.reps < 1 or args.seconds < 1:
        print("error: --reps and --seconds must be at least 1", file=sys.stderr)
        return 2
    reason = labkit.cannot_run_reason(docker=True)
    if reason is None:
        missing = [t for t in ("iperf3", "nsenter") if subprocess.run(
            ["which", t], stdout=subprocess.DEVNULL).returncode != 0]
        if missing:
            reason = "missing %s: apt-get install %s" % (", ".join(missing), " ".join(missing))
    if reason:
        print("error: %s" % reason, file=sys.stderr)
        return 2
    results = Results()
    started = time.time()
    header = "kohaku-overlay benchmark, %s UTC, %s%s\nload average at start: %s" % (
        time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)), machine_line(),
        ", --quick" if args.quick else "", loadavg())
    print(header, file=sys.stderr)
    interrupted = False
    c = labkit.Lab(runners=2, docker=True, verbose=args.verbose)
    bench = None
    try:
        c.up()
        bench = Bench(c, args, results)
        bench.start()
        # "up" leaves the containers "data" measures; the others need 255 tunnels from "burst"
        for phase in PHASES:
            if phase not in phases:
                continue
            if phase in ("data", "why", "data255") and "up" not in phases:
                results.error(phase, "the %s phase needs the up phase (its containers)" % phase)
                continue
            print("bench: %s ..." % phase, file=sys.stderr, flush=True)
            t = mono()
            try:
                getattr(bench, "phase_" + phase)()
            except (labkit.LabError, AssertionError, refnet.RefError, subprocess.SubprocessError,
                    OSError, KeyError, ValueError) as exc:
                results.error(phase, exc)
            print("bench: %s done in %.1f s" % (phase, mono() - t), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        results.note("interrupted: the figures above are what was measured so far")
    except (labkit.LabError, AssertionError) as exc:
        results.error("setup", exc)
    finally:
        if bench is not None:
            bench.cleanup()
        c.teardown()
    results.note("whole run %.0f s, lab built and removed by tests/labkit.py; load average at the "
                 "end %s (2 cores: other work on the machine moves the data-plane figures)"
                 % (time.time() - started, loadavg()))
    fw = firewalld_elsewhere()
    if fw:
        results.note("%d firewalld process(es) run elsewhere on this machine (other labs): the "
                     "host's firewalld probe sees them and spawns firewall-cmd --state "
                     "(see /work/host-bugs.md)" % len(fw))
    print(results.render(header))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": results.rows,
                                               "notes": results.notes,
                                               "errors": results.errors}, indent=1))
    if interrupted:
        return 130
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
