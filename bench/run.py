#!/usr/bin/env python3
"""kohaku-overlay benchmark: control plane, data plane and cost, side by side in one run.

    python3 bench/run.py            # as root: the whole bench, about 4 minutes
    python3 bench/run.py --quick    # a subset in about 40 s (1 repetition, 2 s runs)

It builds its own lab with tests/labkit.py (a switch, the Host, two Runners with their own dockerd,
all in network namespaces with a unique prefix) plus two hand-built reference networks in more
namespaces of the same prefix, runs the real scripts there, prints one table of figures (each a
ratio or a count measured in this run, with the raw numbers and PASS/MISS against the targets
that docs/benchmarks.md lists), and removes everything again, also on failure and Ctrl-C.
The machine's own network namespace is never configured and no traffic leaves the namespaces.

Phases (in this order; --phases picks a subset, --quick leaves out those marked "full run"):
    up       `kohaku_overlay_runner.py up` until a container on the overlay answers a ping
    data     iperf3 and ping: across runners through the Host vs the underlay, the same on a
             hand-built hub, same-runner containers vs a plain bridge (interleaved, medians);
             needs up
    why      what-ifs in the runners' namespaces: NOTRACK, bridge-nf-call-iptables=0, no
             netfilter at all, and a hand-built hub given conntrack; needs data; full run
    burst    253 fake runners register at once through the HTTP API (one namespace, one
             source address per request)
    data255  the data plane again with 255 tunnels: the source filter walked, 250 more rules,
             an ipset match; needs data; full run
    check    `kohaku_overlay_check.py --role host` with 255 tunnels
    scrape   the Host's GET /metrics with 255 tunnels: wall time, Host CPU and processes per
             scrape
    restart  SIGTERM the Host with 255 tunnels, start it, poll status until total == 255
    cost     processes spawned per registration / heartbeat / reconcile pass (PATH shims),
             state-file writes per registration (strace)
    wg       encryption: cross-runner over WireGuard (a second lab, OVERLAY_ENCRYPTION =
             "wireguard") vs a hand-built wireguard-go hub in the same namespaces, and vs the
             plain overlay; needs data; full run
    bisect   direct routing: a lab of its own with 4 runners and every underlay NIC shaped
             to 400 Mbit/s, 2 concurrent cross-runner flows through the Host, direct and on
             the underlay; the Host's share meanwhile; applying 254 peers; full run
A phase that needs another refuses to run without it (exit 2, before the lab is built); check,
scrape, restart and cost get the 255 tunnels from a silent burst when burst is not selected.

Layout: measure.py (measurement helpers and the state the phases share), phases/ (one module
per phase, REGISTRY in phases/__init__.py: adding a phase is one module and one line there, and
a line above), procs.py (the cost phase's PATH shims and strace), refnet.py (the reference
networks), agent.py (the client run inside a lab namespace), run.py (the driver and the table).

Exit code: 0 when every figure was measured (PASS or MISS), 1 when a phase failed, 2 bad usage.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure  # noqa: E402  (puts tests/ on sys.path for labkit)
import phases  # noqa: E402
import refnet  # noqa: E402
from measure import labkit, mono  # noqa: E402


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


# ---- the machine ----------------------------------------------------------------------------

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
    ap = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="phases:\n" + "\n".join(
            "  %-8s %s%s%s" % (p.name, p.summary,
                               "; needs %s" % ", ".join(p.needs) if p.needs else "",
                               "" if p.quick else "; full run only")
            for p in phases.all_phases()))
    ap.add_argument("--quick", action="store_true",
                    help="a subset in about 40 s: 1 repetition, 2 s iperf3 runs, no what-ifs")
    ap.add_argument("--reps", type=int, default=None, help="data-plane repetitions (default 3)")
    ap.add_argument("--seconds", type=int, default=None, help="seconds per iperf3 run (default 3)")
    ap.add_argument("--phases", default=None,
                    help="comma-separated subset of: %s (default: all; with --quick those "
                         "not marked full run)" % ", ".join(p.name for p in phases.all_phases()))
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    ap.add_argument("--verbose", action="store_true", help="print the lab's progress lines")
    return ap


def selected_phases(args):
    """The phases to run -> list of phases.Phase; phases.UsageError (one sentence) otherwise."""
    names = None
    if args.phases is not None:
        names = [p.strip() for p in args.phases.split(",") if p.strip()]
    return phases.resolve(names, quick=args.quick)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        todo = selected_phases(args)
    except phases.UsageError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    args.reps = args.reps or (1 if args.quick else 3)
    args.seconds = args.seconds or (2 if args.quick else 3)
    args.whatif_seconds = min(args.seconds, 2)      # the what-ifs: more states, shorter runs
    if args.reps < 1 or args.seconds < 1:
        print("error: --reps and --seconds must be at least 1", file=sys.stderr)
        return 2
    reason = labkit.cannot_run_reason(docker=True)
    if reason is None:
        missing = [t for t in ("iperf3", "nsenter") if not measure.have(t)]
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
        bench = measure.Bench(c, args, results)
        bench.start()
        for phase in todo:
            print("bench: %s ..." % phase.name, file=sys.stderr, flush=True)
            t = mono()
            try:
                phase.run(bench)
            except (labkit.LabError, AssertionError, refnet.RefError, subprocess.SubprocessError,
                    OSError, KeyError, ValueError) as exc:
                results.error(phase.name, exc)
            print("bench: %s done in %.1f s" % (phase.name, mono() - t), file=sys.stderr,
                  flush=True)
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
                     "host's firewalld probe sees them and spawns firewall-cmd --state"
                     % len(fw))
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
