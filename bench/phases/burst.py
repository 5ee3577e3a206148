"""253 fake runners register at once through the HTTP API, one source address each

Leaves the 255 tunnels (253 fakes and the two runners) that check, restart and cost measure.
"""

import json

from measure import fmt_ms, fmt_s, median

NEEDS = ()
QUICK = True


def run(b):
    c, r = b.c, b.r
    b.make_fakes()
    before = c.status()["total"]
    out = b.burst()
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
               "fake" % (len(b.free), len(res) - len(b.free), len(res)))
