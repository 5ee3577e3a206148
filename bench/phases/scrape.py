"""the Host's GET /metrics with 255 tunnels: wall time, Host CPU and processes per scrape

Time and CPU on the running host (CPU: utime+stime of the serve process and of the children it
waited for, from /proc/PID/stat, over a series of scrapes made by one client process);
processes through the PATH shims of procs.py, on a host restarted with them.
"""

import json
import os

import labkit
import procs
from measure import HOST_URL, fmt_ms, host_log_mark, host_log_wait, median

NEEDS = ()
QUICK = True

SCRAPER = r"""
import json, sys, time, urllib.request
url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
req = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
times, body = [], b""
for _ in range(n):
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
    times.append(time.monotonic() - t0)
text = body.decode()
print(json.dumps({"times": times, "bytes": len(body),
                  "series": sum(1 for l in text.splitlines() if l and not l.startswith("#"))}))
"""


def cpu_seconds(pid):
    """utime + stime + cutime + cstime of pid, in seconds."""
    with open("/proc/%d/stat" % pid) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / float(os.sysconf("SC_CLK_TCK"))


def scrapes(c, n):
    res = c.sh(c.host, c.python, "-c", SCRAPER, HOST_URL + "/metrics", labkit.TOKEN, str(n),
               timeout=120)
    return json.loads(res.stdout)


def run(b):
    c, r = b.c, b.r
    b.ensure_tunnels()
    total = c.status()["total"]
    pid = c._procs["host"][0].pid
    scrapes(c, 1)                                   # warm: the first one pays for imports
    n = 10 if b.args.quick else 40
    before = cpu_seconds(pid)
    got = scrapes(c, n)
    cpu = (cpu_seconds(pid) - before) / n
    r.add("cost", "GET /metrics, %d tunnels: wall time" % total, fmt_ms(median(got["times"])),
          "median of %d, %d series, %d bytes" % (n, got["series"], got["bytes"]), "< 100 ms",
          median(got["times"]) < 0.1)
    r.add("cost", "GET /metrics, %d tunnels: Host CPU" % total, fmt_ms(cpu),
          "mean of %d: utime+stime of serve and its children (/proc/%d/stat)" % (n, pid),
          "< 50 ms", cpu < 0.05)
    # processes: the host again, through the shims, for one scrape
    shims = procs.Shims(c.workdir / "shims")
    c.stop_host()
    mark = host_log_mark(c)
    with procs.Env(shims, "host"):
        popen = c.start_host()
    try:
        host_log_wait(c, mark, "serving the overlay API")
        procs.settle(shims, popen.pid)
        m = shims.mark()
        scrapes(c, 1)
        spawned = shims.since(m, "host", ppid=popen.pid)
        r.add("cost", "processes per GET /metrics, %d tunnels" % total, "%d" % len(spawned),
              procs.summarize(spawned), "<= 2", len(spawned) <= 2)
    finally:
        c.stop_host()
        c.start_host()
