"""SIGTERM the Host with 255 tunnels, start it, poll status until total == 255 (warm and cold)"""

import json
import subprocess
import time

import labkit
from measure import AGENT, TUNNELS, fmt_s, median, mono

NEEDS = ()
QUICK = True


def restart_once(c, total, cold):
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


def run(b):
    c, r = b.c, b.r
    b.ensure_tunnels()
    total = c.status()["total"]
    n = b.timed_reps
    for cold in (False, True):
        if cold and b.args.quick:
            continue
        runs = [restart_once(c, total, cold) for _ in range(n)]
        st = median([x[0] for x in runs])
        dv = median([x[1] for x in runs])
        label = "cold (devices gone)" if cold else "warm (devices kept)"
        r.add("control plane", "host restart %s, %d tunnels: status complete" % (label, total),
              fmt_s(st), "median of %d; all %d vxkr up after %s; SIGTERM stop %s" % (
                  n, total, fmt_s(dv), fmt_s(median([x[2] for x in runs]))),
              "< 0.4 s (issue: < 2 s)", st < 0.4)
    if total != TUNNELS:
        r.note("restart measured with %d tunnels, not %d" % (total, TUNNELS))
