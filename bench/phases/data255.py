"""the data plane again with 255 tunnels: the host's VXLAN source filter walked, and what-ifs

What-ifs: the runners behind 250 more filter rules, and the same with an ipset match first.
"""

from measure import fmt_gbps, fmt_r, have, median, per_rep
from measure import filter_chains, rules_walked

NEEDS = ("data",)
QUICK = False


def input_counters(c):
    """(packets, bytes) of the host's INPUT jump to the VXLAN source filter, or None."""
    out = c.sh(c.host, "iptables", "-L", "INPUT", "-v", "-x", "-n", check=False).stdout
    for line in out.splitlines():
        if "KOHAKU-VXLAN" in line:
            f = line.split()
            return int(f[0]), int(f[1])
    return None


def run(b):
    c, r, args = b.c, b.r, b.args
    b.ensure_tunnels()
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
    have_ipset = have("ipset")
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
    before = input_counters(c)
    got = b.measure(["underlay", "cross"], args.reps, args.whatif_seconds, rtt=False,
                    states=states)
    after = input_counters(c)
    if before and after and after[0] > before[0]:
        pk, by = after[0] - before[0], after[1] - before[1]
        r.add("data plane", "  VXLAN packets through the host's INPUT filter", "%d" % pk,
              "%.0f bytes per packet: GSO/GRO super-packets, so the filter's per-packet "
              "cost is paid once per ~%d frames" % (by / float(pk), max(1, by // pk // 1500)))
    cross = got[("", "cross")]["bps"]
    under = got[("", "underlay")]["bps"]
    ratio255 = per_rep(cross, under)
    r.add("data plane", "TCP cross-runner / underlay, %d tunnels" % total, fmt_r(ratio255),
          "%s / %s; filter walk %s rules (worst runner %d, %d chains)" % (
              fmt_gbps(median(cross)), fmt_gbps(median(under)),
              "/".join(str(w) for w in walks), worst, len(chains)), ">= 0.50",
          ratio255 is not None and ratio255 >= 0.5)
    endc = got[("end of chain", "cross")]["bps"]
    endratio = per_rep(endc, got[("end of chain", "underlay")]["bps"])
    r.add("data plane", "  same, runners behind 250 more filter rules", fmt_r(endratio),
          "%s (what-if: a runner at the end of a one-rule-per-runner chain)"
          % fmt_gbps(median(endc)))
    if have_ipset:
        sc = got[("ipset", "cross")]["bps"]
        sratio = per_rep(sc, got[("ipset", "underlay")]["bps"])
        r.add("data plane", "  same, 250 more rules but an ipset match first", fmt_r(sratio),
              "%s (what-if: -m set --match-set hash:ip of %d runners ahead of the chain)"
              % (fmt_gbps(median(sc)), len(ips)))
