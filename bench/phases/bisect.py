"""cluster bisection with shaped NICs: 2 cross-runner flows through the Host, direct, underlay

Its own lab beside the bench's (a Host and 4 runners; namespaces as containers, since the
figure is the NICs', not Docker's): every node's underlay NIC shaped to RATE with `tc tbf` in
both directions (the node's end and the switch's end of its veth), two concurrent iperf3 flows
runner1 -> runner2 and runner3 -> runner4, their aggregate through the Host
(OVERLAY_DIRECT_ROUTING False), direct (True, the same cluster after a Host restart) and on the
plain underlay, as ratios of the underlay's; what the Host carries meanwhile (its NIC's bytes
and the serve's CPU time); and the time and processes a runner takes to apply 254 peers.
"""

import json
import subprocess
import threading
import time

import labkit
from measure import IPERF_PORT, fmt_gbps, fmt_r, fmt_s, iperf, median, per_rep

NEEDS = ()
QUICK = False

RATE = "400mbit"
RATE_BPS = 400e6
TBF = ["tbf", "rate", RATE, "burst", "256kb", "latency", "50ms"]

# run in a runner's namespace (its serve stopped): apply a table of 254 peers to vxdirect0 with
# the runner's own ensure_peers, counting the processes it starts
APPLY_254 = r"""
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("r", sys.argv[1])
r = importlib.util.module_from_spec(spec)
spec.loader.exec_module(r)
calls = []
real = r.run
def counted(argv, *a, **kw):
    calls.append(argv[0] + " " + argv[1])
    return real(argv, *a, **kw)
r.run = counted
peers = [{"runner_name": "peer%d" % i, "runner_id": i, "subnet": "10.%d.0.0/16" % i,
          "physical_ip": "198.51.100.%d" % i, "vtep_mac": r.vtep_mac(i)}
         for i in range(1, 256) if i != int(sys.argv[2])]      # every id but this runner's
out = {}
for label, table in (("254", peers), ("one more gone", peers[:-1])):
    calls[:] = []
    t0 = time.monotonic()
    r.ensure_peers({"peers": table, "relayed": set()})
    out[label] = {"seconds": time.monotonic() - t0, "processes": list(calls)}
r.ensure_peers({"peers": [], "relayed": set()})
print(json.dumps(out))
"""


def shape(c):
    for node in [c.host] + list(c.runners):
        c.sh(node, "tc", "qdisc", "replace", "dev", "eth0", "root", *TBF)
    out = c._sh_ns(c.switch_ns, "ip", "-j", "link", "show", "master", c.prefix + "sw")
    for port in json.loads(out.stdout or "[]"):
        c._sh_ns(c.switch_ns, "tc", "qdisc", "replace", "dev", port["ifname"], "root", *TBF)


def netns_of(c, i, name=None):
    node = c.runners[i - 1]
    return node.netns_path if name is None else c._container_netns(node, name)[len("--net="):]


def flows(pairs, seconds):
    """Concurrent iperf3 runs [(client netns, dst)] -> their bits/s."""
    got = [None] * len(pairs)
    errors = []

    def one(k, client, dst):
        try:
            got[k] = iperf(client, dst, seconds)[0]
        except labkit.LabError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(k, cl, dst)) for k, (cl, dst) in
               enumerate(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return got


def host_nic_bytes(c):
    link = json.loads(c.sh(c.host, "ip", "-j", "-s", "link", "show", "dev", "eth0").stdout)[0]
    return link["stats64"]["rx"]["bytes"] + link["stats64"]["tx"]["bytes"]


def serve_cpu(c):
    """CPU seconds (user + system) of the Host's serve process so far."""
    pid = c._procs["host"][0].pid
    with open("/proc/%d/stat" % pid) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def measure_mode(c, pairs, reps, seconds):
    """reps x 2 concurrent flows -> (aggregates, Host NIC bytes, Host serve CPU s), per rep."""
    aggs, nic, cpu = [], [], []
    for _ in range(reps):
        b0, t0 = host_nic_bytes(c), serve_cpu(c)
        aggs.append(sum(flows(pairs, seconds)))
        nic.append(host_nic_bytes(c) - b0)
        cpu.append(serve_cpu(c) - t0)
    return aggs, nic, cpu


def direct_everywhere(c):
    for i in (1, 3):
        peer = "runner%d" % (i + 1)
        res = c.script(i, "runner", "status", "--json", check=True)
        st = json.loads(res.stdout)["direct"]
        if not st["enabled"] or [p["path"] for p in st["peers"]
                                 if p["runner_name"] == peer] != ["direct"]:
            return False
    return True


def run(b):
    r, args = b.r, b.args
    reps, seconds = args.reps, max(args.seconds, 3)
    with labkit.Lab(runners=4, docker=False, verbose=args.verbose) as c:
        c.host_config(OVERLAY_DIRECT_ROUTING=False)
        c.start_host()
        for i in (1, 2, 3, 4):
            c.runner_config(i)
            c.start_runner(i)
        c.wait_active()
        for i in (1, 2, 3, 4):
            c.container(i, "c%d" % i)
        shape(c)
        servers = [subprocess.Popen(["nsenter", "--net=" + ns, "iperf3", "-s", "-p",
                                     str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
                   for ns in (netns_of(c, 2, "c2"), netns_of(c, 4, "c4"), netns_of(c, 2),
                              netns_of(c, 4))]
        try:
            over = [(netns_of(c, 1, "c1"), c.container_ip(2, "c2")),
                    (netns_of(c, 3, "c3"), c.container_ip(4, "c4"))]
            under = [(netns_of(c, 1), c.runners[1].ip), (netns_of(c, 3), c.runners[3].ip)]
            time.sleep(0.5)
            hub, hub_nic, _ = measure_mode(c, over, reps, seconds)
            underlay, _, _ = measure_mode(c, under, reps, seconds)
            c.host_config(OVERLAY_DIRECT_ROUTING=True)
            c.stop_host()
            c.start_host()
            c.wait_for(lambda: direct_everywhere(c), timeout=30,
                       what="runners 1 and 3 to reach 2 and 4 directly")
            direct, direct_nic, direct_cpu = measure_mode(c, over, reps, seconds)
            underlay2, _, _ = measure_mode(c, under, reps, seconds)
            c.stop_runner(4)
            res = c.sh(4, c.python, "-c", APPLY_254, str(labkit.REPO / labkit.SCRIPTS["runner"]),
                       "4", check=False)
            if res.returncode != 0:
                raise labkit.LabError("applying 254 peers on runner4 failed: %s"
                                      % (res.stderr or res.stdout).strip()[-300:])
            applied = json.loads(res.stdout)
        finally:
            for p in servers:
                p.kill()
                p.wait()
    und = underlay + underlay2
    ratio_direct = per_rep(direct, underlay2)
    ratio_hub = per_rep(hub, underlay)
    n = "2 flows, %d x %d s, NICs shaped to %s" % (reps, seconds, RATE)
    r.add("bisection", "direct / underlay aggregate", fmt_r(ratio_direct),
          "%s / %s (%s)" % (fmt_gbps(median(direct)), fmt_gbps(median(underlay2)), n), ">= 0.90",
          ratio_direct is not None and ratio_direct >= 0.9)
    r.add("bisection", "  through the Host / underlay aggregate", fmt_r(ratio_hub),
          "%s / %s" % (fmt_gbps(median(hub)), fmt_gbps(median(underlay))),
          "(docs/benchmarks.md: 0.46-0.48)")
    r.add("bisection", "  underlay aggregate / 2 x NIC rate", fmt_r(median(und) / (2 * RATE_BPS)),
          "%s of %s" % (fmt_gbps(median(und)), fmt_gbps(2 * RATE_BPS)), "(0.96 hand-built)")
    per_flow = median(direct_nic) / max(1.0, median(hub_nic))
    r.add("bisection", "Host NIC bytes, direct / through the Host", "%.4f" % per_flow,
          "%d / %d bytes per run" % (median(direct_nic), median(hub_nic)), "~0",
          per_flow < 0.01)
    r.add("bisection", "Host serve CPU during the direct flows", fmt_s(median(direct_cpu)),
          "user + system of the serve process per %d s run" % seconds, "~0",
          median(direct_cpu) < 0.05 * seconds)
    full, one = applied["254"], applied["one more gone"]
    r.add("bisection", "a runner applies 254 peers", fmt_s(full["seconds"]),
          "%d processes: %s" % (len(full["processes"]), ", ".join(full["processes"])),
          "<= 3 processes, < 1 s", len(full["processes"]) <= 3 and full["seconds"] < 1.0)
    r.add("bisection", "  then a change of one", fmt_s(one["seconds"]),
          "%d processes: %s" % (len(one["processes"]), ", ".join(one["processes"])),
          "<= 3 processes, < 1 s", len(one["processes"]) <= 3 and one["seconds"] < 1.0)
