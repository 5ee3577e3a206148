"""encryption: cross-runner over WireGuard vs a hand-built wireguard-go hub and the plain overlay

A second lab (Host and two runners, containers as namespaces, each node in its own mount
namespace) with OVERLAY_ENCRYPTION = "wireguard" and OVERLAY_MTU 1390. In the same namespaces a
hand-built wireguard-go hub (interface refwg, port 51821: runner 1 -> Host -> runner 2, routed, no
VXLAN) is the reference. Interleaved with data's plain cross-runner path, medians.
"""

import labkit
from measure import fmt_gbps, fmt_r, median, per_rep

NEEDS = ("data",)
QUICK = False

REF_NET = "100.127.0.%d"            # the reference tunnel's addresses (inside the lab only)
REF_PORT = 51821
MTU = 1390                          # 1500 - 50 (VXLAN) - 60 (WireGuard)
KEYS = ["wg_cross", "wg_ref", "cross"]


def hand_built_hub(c):
    """refwg on the Host and both runners: each runner's one peer is the Host, which routes."""
    nodes = [c.host] + c.runners
    pub = {}
    for k, node in enumerate(nodes):
        key = str(node.workdir / "refwg.key")
        c.sh(node, "sh", "-c", "umask 077; wg genkey > %s" % key)
        pub[k] = c.sh(node, "sh", "-c", "wg pubkey < %s" % key).stdout.strip()
        c.sh(node, "wireguard-go", "refwg")
        c.sh(node, "wg", "set", "refwg", "private-key", key, "listen-port", str(REF_PORT))
        c.sh(node, "ip", "-batch", "-", input="addr add %s/24 dev refwg\nlink set refwg mtu "
             "1440 up\n" % (REF_NET % (k + 1)))
    for k in (1, 2):
        c.sh(c.host, "wg", "set", "refwg", "peer", pub[k], "allowed-ips",
             REF_NET % (k + 1) + "/32")
        c.sh(nodes[k], "wg", "set", "refwg", "peer", pub[0], "allowed-ips", REF_NET % 0 + "/24",
             "endpoint", "%s:%d" % (labkit.HOST_IP, REF_PORT), "persistent-keepalive", "25")


def run(b):
    r, args = b.r, b.args
    labkit.require(docker=False, wireguard=True)
    with labkit.Lab(runners=2, docker=False, private_run=True) as c:
        c.host_config(OVERLAY_ENCRYPTION="wireguard", OVERLAY_MTU=MTU,
                      OVERLAY_REPAIR_INTERVAL=3600)
        for i in (1, 2):
            c.runner_config(i, OVERLAY_MTU=MTU, HEARTBEAT_INTERVAL=5)
        c.start_host()
        c.start_runner(1)
        c.start_runner(2)
        c.wait_active()
        c.container(1, "w1")
        c.container(2, "w2")
        hand_built_hub(c)
        w1 = c._container_netns(c.runners[0], "w1").split("=", 1)[1]
        w2 = c._container_netns(c.runners[1], "w2").split("=", 1)[1]
        b.add_path("wg_cross", w1, w2, c.container_ip(2, "w2"))
        b.add_path("wg_ref", c.runners[0].netns_path, c.runners[1].netns_path, REF_NET % 3)
        got = b.measure(KEYS, args.reps, args.seconds)
        for key in ("wg_cross", "wg_ref"):
            b.paths.pop(key)            # their namespaces go with this lab
    bps = dict((k, got[("", k)]["bps"]) for k in KEYS)
    m = dict((k, median(v)) for k, v in bps.items())
    vs_ref = per_rep(bps["wg_cross"], bps["wg_ref"])
    r.add("encryption", "TCP cross-runner encrypted / hand-built wireguard-go hub",
          fmt_r(vs_ref), "%s / %s (median of %d x %d s)" % (
              fmt_gbps(m["wg_cross"]), fmt_gbps(m["wg_ref"]), args.reps, args.seconds),
          ">= 0.90", vs_ref is not None and vs_ref >= 0.9)
    plain = per_rep(bps["wg_cross"], bps["cross"])
    r.add("encryption", "  encrypted / plain overlay cross-runner", fmt_r(plain),
          "%s / %s" % (fmt_gbps(m["wg_cross"]), fmt_gbps(m["cross"])))
