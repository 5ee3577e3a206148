#!/usr/bin/env python3
"""The benchmark's client side, run INSIDE a lab namespace (`ip netns exec NS python3 agent.py`).

The bench process itself stays in the machine's own namespace and never sends traffic from
there; everything that talks to the host API runs through this file in a lab namespace.

Subcommands (all print one JSON object on stdout; times are time.monotonic(), which is one
clock for every process of the machine, so the bench can compare them with its own):

    register --url http://IP:PORT --token T --plan FILE
        FILE: JSON list of [runner_name, source_ip]. One thread per registration, all released
        at once by a barrier; each request's socket is bound to its own source address (the
        host insists that physical_ip is the TCP peer). -> {"t0", "t1", "results": [...]}
    wait-status --url ... --token T --total N [--devices N] [--timeout S]
        Polls GET /api/overlay/status every 5 ms until total == N (and, with --devices, until
        N vxkr* links of this namespace are up, read from /sys without spawning anything).
        -> {"t_status", "t_devices", "polls"}
"""

import argparse
import http.client
import json
import os
import sys
import threading
import time

VXLAN_SETTINGS = {"vxlan_id": 100, "vxlan_port": 4789, "mtu": 1450}


def _headers(token, body=None):
    h = {"Content-Type": "application/json", "Content-Length": str(len(body or b""))}
    if token:
        h["Authorization"] = "Bearer " + token
    return h


def register_one(host, port, token, name, source, settings, timeout=30.0):
    body = dict(settings, runner_name=name, physical_ip=source)
    raw = json.dumps(body).encode()
    t = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("POST", "/api/overlay/register", body=raw, headers=_headers(token, raw))
        resp = conn.getresponse()
        data = resp.read()
        status = resp.status
    except (OSError, http.client.HTTPException) as exc:
        return {"name": name, "source": source, "status": 0, "error": str(exc),
                "start": t, "end": time.monotonic()}
    finally:
        conn.close()
    end = time.monotonic()
    try:
        answer = json.loads(data.decode())
    except ValueError:
        answer = {"error": data[:200].decode(errors="replace")}
    return {"name": name, "source": source, "status": status, "start": t, "end": end,
            "runner_id": answer.get("runner_id"), "error": answer.get("error")}


def cmd_register(args):
    host, port = _split(args.url)
    with open(args.plan) as fh:
        plan = json.load(fh)
    settings = dict(VXLAN_SETTINGS)
    results = [None] * len(plan)
    barrier = threading.Barrier(len(plan) + 1)

    def worker(i, name, source):
        barrier.wait()
        results[i] = register_one(host, port, args.token, name, source, settings)

    threads = [threading.Thread(target=worker, args=(i, n, s)) for i, (n, s) in enumerate(plan)]
    for t in threads:
        t.start()
    time.sleep(0.2)          # every thread is parked on the barrier
    t0 = time.monotonic()
    barrier.wait()
    for t in threads:
        t.join()
    t1 = max(r["end"] for r in results) if results else t0
    json.dump({"t0": t0, "t1": t1, "results": results}, sys.stdout)
    return 0


def _split(url):
    hostport = url.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.partition(":")
    return host, int(port or 80)


def _status(host, port, token):
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/api/overlay/status", headers=_headers(token))
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            return None
        return json.loads(data.decode())
    finally:
        conn.close()


def _devices_up():
    n = 0
    for name in os.listdir("/sys/class/net"):
        if not name.startswith("vxkr"):
            continue
        try:
            with open("/sys/class/net/%s/flags" % name) as fh:
                if int(fh.read(), 16) & 1:
                    n += 1
        except (OSError, ValueError):
            pass
    return n


def cmd_wait_status(args):
    host, port = _split(args.url)
    deadline = time.monotonic() + args.timeout
    t_status = t_devices = None
    polls = 0
    last = None
    while time.monotonic() < deadline and (t_status is None or
                                           (args.devices and t_devices is None)):
        if args.devices and t_devices is None and _devices_up() >= args.devices:
            t_devices = time.monotonic()
        if t_status is None:
            polls += 1
            try:
                st = _status(host, port, args.token)
            except (OSError, http.client.HTTPException, ValueError):
                st = None
            if st is not None:
                last = st.get("total")
                if st.get("total") == args.total:
                    t_status = time.monotonic()
                    continue
        time.sleep(0.005)
    json.dump({"t_status": t_status, "t_devices": t_devices, "polls": polls,
               "last_total": last, "devices_up": _devices_up()}, sys.stdout)
    return 0 if t_status is not None else 1


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench/agent.py")
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("register")
    w = sub.add_parser("wait-status")
    for p in (r, w):
        p.add_argument("--url", required=True)
        p.add_argument("--token", default="")
    r.add_argument("--plan", required=True)
    w.add_argument("--total", type=int, required=True)
    w.add_argument("--devices", type=int, default=0)
    w.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args(argv)
    if args.cmd == "register":
        return cmd_register(args)
    if args.cmd == "wait-status":
        return cmd_wait_status(args)
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
