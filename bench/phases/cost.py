"""processes spawned per registration, heartbeat and reconcile pass; state-file writes

Processes through the PATH shims of procs.py, state-file writes per registration with strace.
"""

import os
import re
import time

import labkit
import procs
from measure import HOST_URL, BURST, REPO, have, host_log_mark, host_log_wait, script_timed

NEEDS = ()
QUICK = True

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


def run(b):
    c, r = b.c, b.r
    b.ensure_tunnels()
    shims = procs.Shims(c.workdir / "shims")
    state_path = str(c.host.workdir / "state.json")     # set by b.host_config()
    have_strace = have("strace")
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
          procs.summarize(startup))

    def one(plan, label, target=None):
        m = shims.mark()
        st = None
        if have_strace:
            st = procs.strace_start(popen.pid, c.workdir / "strace.out")
        out = b.burst("one.json", plan)
        writes = execs = None
        if st is not None:
            writes, execs = procs.strace_stop(st, c.workdir / "strace.out", state_path)
        spawned = shims.since(m, "host", ppid=popen.pid)
        n = len(plan)
        per = len(spawned) / float(n)
        okc = sum(1 for x in out["results"] if x["status"] == 200)
        raw = "%s; %d/%d answered 200" % (procs.summarize(spawned), okc, n)
        if execs is not None and execs != len(spawned):
            raw += "; strace saw %d execve" % execs
        r.add("cost", "processes per registration, %s" % label,
              ("%d" % len(spawned)) if n == 1 else "%.3f (%d/%d)" % (per, len(spawned), n),
              raw, target or "", None if target is None else per <= 3)
        if writes is not None:
            r.add("cost", "state-file writes per registration, %s" % label,
                  ("%d" % writes) if n == 1 else "%.3f (%d/%d)" % (writes / float(n), writes, n),
                  "renames onto %s (strace)" % os.path.basename(state_path),
                  "1 (atomic write before the answer)" if n == 1 else "")

    # a full cluster: free one id, register a new runner into it, then the same name again
    # a fake with an address of its own, so the registration also changes the VXLAN
    # source filter (the dearer path)
    shared = [p[1] for p in b.fake_plan]
    victim = next(p for p in reversed(b.fake_plan) if shared.count(p[1]) == 1)
    rel = c.script(c.host, "host", "release", victim[0], "--yes")
    if rel.returncode != 0:
        raise labkit.LabError("release failed: %s" % (rel.stderr or rel.stdout)[-300:])
    procs.settle(shims, popen.pid)
    one([["newcomer", victim[1]]], "new runner into a cluster of %d" % (total - 1), "<= 3")
    one([["newcomer", victim[1]]], "same name again (%d tunnels)" % total, "<= 3")
    # heartbeats spawn nothing
    m = shims.mark()
    res = c.sh(b.fakes, c.python, "-c", HEARTBEAT_SNIPPET, HOST_URL, labkit.TOKEN,
               "newcomer", victim[1], check=False)
    hb = shims.since(m, "host", ppid=popen.pid)
    r.add("cost", "processes per heartbeat", "%d" % len(hb),
          "answered %s" % res.stdout.strip()[:40], "0", len(hb) == 0)
    # runner and check, one run each through the shims
    m = shims.mark()
    with procs.Env(shims, "runner"):
        c.script(2, "runner", "up")
    ru = shims.since(m, "runner", not_ppid=os.getpid())
    r.add("cost", "processes: runner up (already built)", "%d" % len(ru), procs.summarize(ru))
    if (REPO / labkit.SCRIPTS["check"]).exists():
        m = shims.mark()
        with procs.Env(shims, "check"):
            c.script(c.host, "check")
        ck = shims.since(m, "check", not_ppid=os.getpid())
        r.add("cost", "processes: check --role host, %d tunnels" % c.status()["total"],
              "%d" % len(ck), procs.summarize(ck))
    # a runner built from nothing (after `down --force`), through the shims
    down = c.script(2, "runner", "down", "--force")
    if down.returncode == 0:
        m = shims.mark()
        with procs.Env(shims, "runner"):
            res, t = script_timed(c, 2, "runner", "up")
        ru = shims.since(m, "runner", not_ppid=os.getpid())
        r.add("cost", "processes: runner up from nothing", "%d" % len(ru),
              "%s; %.3f s with the shims" % (procs.summarize(ru), t))
    else:
        r.note("runner2 down --force failed, no cold-up count: %s"
               % (down.stderr or down.stdout).strip()[-200:])
    # the whole burst again, through the shims: the group commit amortizes
    if not b.args.quick:
        c.script(c.host, "host", "release", "newcomer", "--yes")
        # release the fakes in one go: cleanup releases the inactive ones, which after
        # OVERLAY_INACTIVE_AFTER are all of them (the lab's runners ran `up`, not `serve`)
        c.wait_for(lambda: c.status()["active"] == 0, timeout=30, interval=0.5,
                   what="every runner inactive")
        c.script(c.host, "host", "cleanup", "--yes")
        procs.settle(shims, popen.pid)
        one([list(p) for p in b.fake_plan], "%d at once into an empty host" % BURST, "<= 3")
    # reconcile passes: restart with a 1 s repair interval and count what 3 passes spawn
    c.stop_host()
    b.host_config(OVERLAY_REPAIR_INTERVAL=1)
    logmark = host_log_mark(c)
    with procs.Env(shims, "host"):
        popen = c.start_host()
    host_log_wait(c, logmark, "serving the overlay API")
    time.sleep(0.3)
    m = shims.mark()
    time.sleep(3.4 if not b.args.quick else 2.2)
    spawned = shims.since(m, "host", ppid=popen.pid)
    passes = sum(1 for tool, a in spawned if tool == "ip" and re.search(r"-j\b.*\bshow", a))
    n = c.status()["total"]
    r.add("cost", "processes per reconcile pass, %d tunnels" % n,
          "%.1f" % (len(spawned) / float(passes)) if passes else "n/a",
          "%d passes: %s" % (passes, procs.summarize(spawned)),
          "constant (1 ip, 1 iptables read)", passes > 0 and len(spawned) <= 2 * passes)
    c.stop_host()
    b.host_config()
    c.start_host()
