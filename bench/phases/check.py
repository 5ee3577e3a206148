"""`kohaku_overlay_check.py --role host` with 255 tunnels"""

import json

import labkit
from measure import REPO, fmt_s, median, script_timed

NEEDS = ()
QUICK = True


def run(b):
    c, r = b.c, b.r
    b.ensure_tunnels()
    if not (REPO / labkit.SCRIPTS["check"]).exists():
        r.add("control plane", "check --role host", "SKIP", "kohaku_overlay_check.py is not "
              "in the repository yet", "< 2 s")
        return
    total = c.status()["total"]
    times, rc, summary = [], None, ""
    for _ in range(b.timed_reps):
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
            if notpass and len(times) == b.timed_reps:
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
