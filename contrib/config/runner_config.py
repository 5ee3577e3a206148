"""kohaku-overlay runner config (example): copy to /etc/kohakuriver/runner_config.py, mode 0600.

Read with `ast`, never executed: the keys below come from plain `NAME: type = literal` lines;
anything else (imports, defs, KohakuRiver's own keys) is passed over, so KohakuRiver's own
generated runner_config.py with these lines appended works too.
Every key but HOST_ADDRESS, OVERLAY_ENABLED and OVERLAY_TOKEN shows its default.
"""

HOST_ADDRESS: str = "192.168.88.53"   # the Host's HOST_REACHABLE_ADDRESS
HOST_PORT: int = 8000
RUNNER_NAME: str = ""                 # "" = this machine's hostname
RUNNER_ADDRESS: str = ""              # "" = the source address of the route to HOST_ADDRESS

# =============================================================================
# Overlay Network Configuration (VXLAN Hub)
# =============================================================================

OVERLAY_ENABLED: bool = True
OVERLAY_NETWORK_NAME: str = "kohakuriver-overlay"
OVERLAY_BRIDGE_NAME: str = "kohaku-overlay"
OVERLAY_VXLAN_ID: int = 100           # must equal the Host's
OVERLAY_VXLAN_PORT: int = 4789        # must equal the Host's
OVERLAY_MTU: int = 1450               # must equal the Host's
OVERLAY_TOKEN: str = ""               # the Host's OVERLAY_TOKEN
HEARTBEAT_INTERVAL: int = 5           # seconds; unset: KohakuRiver's HEARTBEAT_INTERVAL_SECONDS
OVERLAY_STATE_FILE: str = "/var/lib/kohakuriver/overlay-runner.json"  # last allocation
# node_exporter textfile collector: heartbeat, repairs, vxlan0/bridge counters, rewritten every
# heartbeat; "" = off. E.g. "/var/lib/prometheus/node-exporter/kohaku-overlay.prom" (Debian).
OVERLAY_METRICS_FILE: str = ""

# The network containers use when the overlay is disabled or could not be built.
DOCKER_NETWORK_NAME: str = "kohakuriver-net"
DOCKER_NETWORK_SUBNET: str = "172.30.0.0/16"
DOCKER_NETWORK_GATEWAY: str = "172.30.0.1"
