"""what-ifs in the runners' namespaces (NOTRACK, bridge-nf-call-iptables=0, no netfilter)

Each what-if is switched on and undone inside every repetition, next to its "as built"
baseline; then the hand-built hub is given a conntrack hook like Docker's.
"""

from measure import _run, fmt_gbps, fmt_ms, fmt_r, have, median, per_rep

NEEDS = ("data",)
QUICK = False

SECTION = "why (what-if, runners' namespaces)"


def run(b):
    c, r, args = b.c, b.r, b.args

    def runners_do(*argv):
        for node in c.runners:
            c.sh(node, *argv)

    notrack = [("-t", "raw", "%s", "PREROUTING", "-p", "udp", "--dport", "4789", "-m",
                "comment", "--comment", "kohaku-bench", "-j", "NOTRACK"),
               ("-t", "raw", "%s", "OUTPUT", "-p", "udp", "--dport", "4789", "-m",
                "comment", "--comment", "kohaku-bench", "-j", "NOTRACK")]

    def rules(op):
        return lambda: [runners_do("iptables", *[a % op if a == "%s" else a for a in rule])
                        for rule in notrack]

    def brnf(v):
        return lambda: runners_do("sysctl", "-q", "-w",
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
    if have("nft"):
        states.append(("no netfilter at all", no_netfilter, netfilter_back))
    got = b.measure(["cross", "same"], args.reps, args.whatif_seconds, rtt=False, states=states)
    base = dict((k, got[("as built", k)]["bps"]) for k in ("cross", "same"))
    for label, _, _ in states[1:]:
        for k in ("cross", "same"):
            vals = got[(label, k)]["bps"]
            r.add(SECTION, "%s: %s vs as built" % (
                "cross-runner" if k == "cross" else "same-runner", label),
                fmt_r(per_rep(vals, base[k])),
                "%s vs %s" % (fmt_gbps(median(vals)), fmt_gbps(median(base[k]))))
    # the other way round: give the hand-built hub's runners what Docker gives ours, a
    # netfilter hook with connection tracking (one rule that never matches)
    ct_rule = ["FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-m", "comment",
               "--comment", "kohaku-bench", "-j", "DROP"]

    def hb_ct(op):
        def do():
            for n in (1, 2):
                _run(["ip", "netns", "exec", b.hub.runner[n], "iptables", op] + ct_rule)
        return do

    hb_states = [("as built", None, None), ("conntrack", hb_ct("-A"), hb_ct("-D"))]
    got = b.measure(["hb_underlay", "hb_cross"], args.reps, args.whatif_seconds,
                    rtt=True, states=hb_states)
    plain_r = per_rep(got[("as built", "hb_cross")]["bps"], got[("as built", "hb_underlay")]["bps"])
    ct_r = per_rep(got[("conntrack", "hb_cross")]["bps"], got[("conntrack", "hb_underlay")]["bps"])
    r.add(SECTION, "hand-built hub with conntrack in its runners",
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
