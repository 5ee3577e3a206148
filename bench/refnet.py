"""Reference networks the benchmark measures the product against, built by hand in namespaces.

Both live in namespaces named with the lab's prefix, so the lab's teardown (which deletes every
namespace starting with its prefix, also after a crash or Ctrl-C) removes them too; `remove()`
deletes them earlier. Nothing here touches the machine's own namespace.

hand-built hub (the SPEC's devices, no iptables rules, namespaces as containers)::

    <p>xsw   bridge sw: its own underlay switch (an L2 domain apart from the lab's)
    <p>xhub  eth0 198.51.100.1/24, vxkr1/vxkr2 (vxlan id 101/102 remote .11/.12 dstport 4789
             nolearning mtu 1450, 10.N.0.254/16), ip_forward=1
    <p>xrN   eth0 198.51.100.1N/24, bridge kohaku-overlay 10.N.0.1/16 mtu 1450 with vxlan0
             (id 10N remote .1 nolearning mtu 1450) enslaved, 10.0.0.0/8 via 10.N.0.254,
             ip_forward=1
    <p>xcN   eth0 10.N.0.2/16 mtu 1450 (veth on the runner's bridge), default via 10.N.0.1

plain bridge (same-runner reference; a second one with letter "q" at the overlay's MTU 1450)::

    <p>pbr   bridge br0;  <p>pa eth0 10.9.0.2/24 and <p>pb eth0 10.9.0.3/24 on it (mtu 1500)
"""

import subprocess

UNDERLAY_HUB = "198.51.100.1"
MTU = 1450
PORT = 4789
BASE_VNI = 100


class RefError(RuntimeError):
    pass


def _run(argv, input=None):
    res = subprocess.run([str(a) for a in argv], input=input, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    if res.returncode != 0:
        raise RefError("%s failed (%d): %s" % (" ".join(map(str, argv)), res.returncode,
                                               res.stderr.strip()))
    return res


def _ns(name):
    _run(["ip", "netns", "add", name])
    _run(["ip", "-n", name, "link", "set", "dev", "lo", "up"])


def _batch(ns, lines):
    _run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n")


def _sysctl(ns, key, value):
    # inside the namespace only (ip netns exec remounts /proc/sys for it)
    _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "%s=%s" % (key, value)])


class HandBuiltHub(object):
    def __init__(self, prefix):
        self.p = prefix + "x"
        self.sw, self.hub = self.p + "sw", self.p + "hub"
        self.runner = {n: "%sr%d" % (self.p, n) for n in (1, 2)}
        self.cont = {n: "%sc%d" % (self.p, n) for n in (1, 2)}
        self.runner_ip = {n: "198.51.100.%d" % (10 + n) for n in (1, 2)}
        self.cont_ip = {n: "10.%d.0.2" % n for n in (1, 2)}
        self.names = [self.sw, self.hub] + list(self.runner.values()) + list(self.cont.values())

    def _underlay_node(self, ns, ip, port):
        _ns(ns)
        _run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
              "netns", self.sw])
        _batch(self.sw, ["link set dev %s master sw up" % port])
        _batch(ns, ["addr add %s/24 dev eth0" % ip, "link set dev eth0 up"])

    def build(self):
        _ns(self.sw)
        _batch(self.sw, ["link add sw type bridge", "link set dev sw up"])
        self._underlay_node(self.hub, UNDERLAY_HUB, "h")
        _sysctl(self.hub, "net.ipv4.ip_forward", 1)
        for n in (1, 2):
            vni = BASE_VNI + n
            _batch(self.hub, [
                "link add vxkr%d type vxlan id %d local %s remote %s dstport %d nolearning"
                % (n, vni, UNDERLAY_HUB, self.runner_ip[n], PORT),
                "link set vxkr%d mtu %d" % (n, MTU),
                "addr add 10.%d.0.254/16 dev vxkr%d" % (n, n),
                "link set vxkr%d up" % n])
            r = self.runner[n]
            self._underlay_node(r, self.runner_ip[n], "r%d" % n)
            _sysctl(r, "net.ipv4.ip_forward", 1)
            _batch(r, [
                "link add kohaku-overlay mtu %d type bridge" % MTU,
                "addr add 10.%d.0.1/16 dev kohaku-overlay" % n,
                "link add vxlan0 mtu %d type vxlan id %d local %s remote %s dstport %d nolearning"
                % (MTU, vni, self.runner_ip[n], UNDERLAY_HUB, PORT),
                "link set dev vxlan0 master kohaku-overlay up",
                "link set dev kohaku-overlay up",
                "route add 10.0.0.0/8 via 10.%d.0.254 dev kohaku-overlay" % n])
            c = self.cont[n]
            _ns(c)
            _run(["ip", "-n", c, "link", "add", "eth0", "mtu", MTU, "type", "veth", "peer", "name",
                  "veth-c", "netns", r])
            _batch(r, ["link set dev veth-c master kohaku-overlay mtu %d up" % MTU])
            _batch(c, ["addr add %s/16 dev eth0" % self.cont_ip[n], "link set dev eth0 up",
                       "route add default via 10.%d.0.1" % n])
        return self

    def remove(self):
        for ns in self.names:
            subprocess.run(["ip", "netns", "delete", ns], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)


class PlainBridge(object):
    def __init__(self, prefix, letter="p", mtu=1500):
        p = prefix + letter
        self.mtu = mtu
        self.br, self.a, self.b = p + "br", p + "a", p + "b"
        self.ip = {self.a: "10.9.0.2", self.b: "10.9.0.3"}
        self.names = [self.br, self.a, self.b]

    def build(self):
        _ns(self.br)
        _batch(self.br, ["link add br0 type bridge", "link set dev br0 up"])
        for ns, port in ((self.a, "pa"), (self.b, "pb")):
            _ns(ns)
            _run(["ip", "-n", ns, "link", "add", "eth0", "mtu", self.mtu, "type", "veth", "peer",
                  "name", port, "netns", self.br])
            _batch(self.br, ["link set dev %s master br0 mtu %d up" % (port, self.mtu)])
            _batch(ns, ["addr add %s/24 dev eth0" % self.ip[ns], "link set dev eth0 up"])
        return self

    def remove(self):
        for ns in self.names:
            subprocess.run(["ip", "netns", "delete", ns], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
