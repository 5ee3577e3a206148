"""`kohaku_overlay_runner.py up` until a container on the overlay answers a ping

Leaves the containers c1, c1b (runner1) and c2 (runner2) that the data-plane phases measure.
"""

import labkit
from measure import container_netns, fmt_s, median, mono, ping_until_reply, script_timed

NEEDS = ()
QUICK = True


def run(b):
    c, r = b.c, b.r
    res, t_up1 = script_timed(c, 1, "runner", "up")
    if res.returncode != 0:
        raise labkit.LabError("runner1 up failed: %s" % (res.stderr or res.stdout)[-500:])
    c.container(1, "c1")
    c.container(1, "c1b")
    ns_c1 = container_netns(c, 1, "c1")
    # runner2 from nothing: up, start a container on the overlay, ping it from runner1's
    t0 = mono()
    res = c.script(2, "runner", "up")
    t1 = mono()
    if res.returncode != 0:
        raise labkit.LabError("runner2 up failed: %s" % (res.stderr or res.stdout)[-500:])
    c.container(2, "c2")
    t2 = mono()
    ip2 = c.container_ip(2, "c2")
    t3 = ping_until_reply(ns_c1, ip2)
    total, product = t3 - t0, (t1 - t0) + (t3 - t2)
    r.add("runner up", "up -> new container answers ping", fmt_s(total),
          "up %.3f s + docker run %.3f s + first reply %.3f s" % (t1 - t0, t2 - t1, t3 - t2),
          "< 1 s", total < 1.0)
    r.add("runner up", "  same, without docker run", fmt_s(product), "up + first reply",
          "< 1 s", product < 1.0)
    # the tunnel lost (a reboot of the link, `ip link del`): up repairs, the running
    # container answers again
    ups, reps = [], []
    for _ in range(b.timed_reps):
        c.sh(2, "ip", "link", "del", "vxlan0")
        t0 = mono()
        res = c.script(2, "runner", "up")
        t1 = mono()
        t3 = ping_until_reply(ns_c1, ip2)
        if res.returncode != 0:
            raise labkit.LabError("runner2 up (repair) failed: %s" % res.stderr[-300:])
        ups.append(t1 - t0)
        reps.append(t3 - t0)
    r.add("runner up", "up repairing vxlan0 -> running container answers", fmt_s(median(reps)),
          "median of %d; up alone %.3f s" % (len(reps), median(ups)), "< 1 s",
          median(reps) < 1.0)
    noop = []
    for _ in range(b.timed_reps):
        noop.append(script_timed(c, 2, "runner", "up")[1])
    r.add("runner up", "up with nothing to change", fmt_s(median(noop)),
          "runner1's first up: %.3f s" % t_up1)
    b.up_done = True
    b.containers = {"c1": ns_c1, "c1b": container_netns(c, 1, "c1b"),
                    "c2": container_netns(c, 2, "c2")}
    b.ips = {"c1b": c.container_ip(1, "c1b"), "c2": ip2}
