"""iperf3 and ping: cross-runner vs underlay, a hand-built hub, same-runner vs a plain bridge

Across runners through the Host vs the underlay, the same on a hand-built hub, same-runner
containers vs a plain bridge; interleaved repetitions, medians of per-repetition ratios.
Leaves the measured paths (b.paths) and the reference networks that why and data255 reuse.
"""

import time

import refnet
from measure import fmt_gbps, fmt_ms, fmt_r, median, per_rep, ratio

NEEDS = ("up",)
QUICK = True

KEYS = ["underlay", "cross", "hb_underlay", "hb_cross", "same", "plain", "plain1450"]


def run(b):
    c, r, args = b.c, b.r, b.args
    b.hub = refnet.HandBuiltHub(c.prefix).build()
    b.plain = refnet.PlainBridge(c.prefix).build()
    b.plain1450 = refnet.PlainBridge(c.prefix, letter="q", mtu=refnet.MTU).build()
    hub, plain, q = b.hub, b.plain, b.plain1450

    def ns(name):
        return "/run/netns/" + name

    b.add_path("underlay", c.runners[0].netns_path, c.runners[1].netns_path, c.runners[1].ip)
    b.add_path("cross", b.containers["c1"], b.containers["c2"], b.ips["c2"])
    b.add_path("hb_underlay", ns(hub.runner[1]), ns(hub.runner[2]), hub.runner_ip[2])
    b.add_path("hb_cross", ns(hub.cont[1]), ns(hub.cont[2]), hub.cont_ip[2])
    b.add_path("same", b.containers["c1"], b.containers["c1b"], b.ips["c1b"])
    b.add_path("plain", ns(plain.a), ns(plain.b), plain.ip[plain.b])
    b.add_path("plain1450", ns(q.a), ns(q.b), q.ip[q.b])
    time.sleep(0.2)
    got = b.measure(KEYS, args.reps, args.seconds)
    bps = dict((k, got[("", k)]["bps"]) for k in KEYS)
    rtt = dict((k, got[("", k)]["rtt"]) for k in KEYS)
    retr = dict((k, got[("", k)]["retr"]) for k in KEYS)

    m = dict((k, median(v)) for k, v in bps.items())
    mr = dict((k, median(v)) for k, v in rtt.items())
    ours = per_rep(bps["cross"], bps["underlay"])
    hand = per_rep(bps["hb_cross"], bps["hb_underlay"])
    same = per_rep(bps["same"], bps["plain"])
    n = "median of %d x %d s" % (args.reps, args.seconds)
    r.add("data plane", "TCP cross-runner / underlay", fmt_r(ours),
          "%s / %s (%s)" % (fmt_gbps(m["cross"]), fmt_gbps(m["underlay"]), n), ">= 0.50",
          ours is not None and ours >= 0.5)
    r.add("data plane", "  hand-built hub: cross / underlay", fmt_r(hand),
          "%s / %s" % (fmt_gbps(m["hb_cross"]), fmt_gbps(m["hb_underlay"])),
          "(docs/benchmarks.md: 0.60-0.64)")
    frac = ratio(ours, hand)
    r.add("data plane", "  ours as a fraction of hand-built",
          "n/a" if frac is None else "%.3f" % frac, "ratio / ratio",
          ">= 0.95", frac is not None and frac >= 0.95)
    r.add("data plane", "TCP same-runner / plain bridge", fmt_r(same),
          "%s / %s" % (fmt_gbps(m["same"]), fmt_gbps(m["plain"])), ">= 0.90",
          same is not None and same >= 0.9)
    r.add("data plane", "  plain bridge at MTU 1450 / at 1500",
          fmt_r(per_rep(bps["plain1450"], bps["plain"])),
          "%s / %s" % (fmt_gbps(m["plain1450"]), fmt_gbps(m["plain"])))
    r.add("data plane", "RTT cross-runner / underlay",
          fmt_r(per_rep(rtt["cross"], rtt["underlay"])),
          "%s / %s (avg of 20 pings)" % (fmt_ms(mr["cross"]), fmt_ms(mr["underlay"])))
    r.add("data plane", "  hand-built hub: RTT cross / underlay",
          fmt_r(per_rep(rtt["hb_cross"], rtt["hb_underlay"])),
          "%s / %s" % (fmt_ms(mr["hb_cross"]), fmt_ms(mr["hb_underlay"])))
    r.add("data plane", "RTT same-runner / plain bridge",
          fmt_r(per_rep(rtt["same"], rtt["plain"])),
          "%s / %s" % (fmt_ms(mr["same"]), fmt_ms(mr["plain"])))
    r.add("data plane", "TCP retransmits per run (median)",
          "%s" % median(retr["cross"]),
          "cross %s, underlay %s, hb cross %s, same %s, plain %s" % (
              median(retr["cross"]), median(retr["underlay"]), median(retr["hb_cross"]),
              median(retr["same"]), median(retr["plain"])))
