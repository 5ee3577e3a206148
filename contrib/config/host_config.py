"""kohaku-overlay host config (example): copy to /etc/kohakuriver/host_config.py, mode 0600.

Read with `ast`, never executed: the keys below come from plain `NAME: type = literal` lines;
anything else (imports, defs, KohakuRiver's own keys) is passed over, so KohakuRiver's own
generated host_config.py with these lines appended works too.
Every key but HOST_REACHABLE_ADDRESS, OVERLAY_ENABLED and OVERLAY_TOKEN shows its default.
"""

# IMPORTANT: the Host's real address on the underlay, the one runners reach (not 127.0.0.1).
HOST_REACHABLE_ADDRESS: str = "192.168.88.53"  # Change to your Host IP!
HOST_BIND_IP: str = "0.0.0.0"
HOST_PORT: int = 8000                 # the registration API (TCP): open it to the runners

# =============================================================================
# Overlay Network Configuration (VXLAN Hub)
# =============================================================================

OVERLAY_ENABLED: bool = True
OVERLAY_BRIDGE_NAME: str = "kohaku-overlay"
OVERLAY_HOST_IP: str = "10.0.0.1"
OVERLAY_HOST_PREFIX: int = 8
OVERLAY_SUBNET: str = "10.0.0.0/8/8/16"   # BASE/NETWORK_PREFIX/NODE_BITS/SUBNET_BITS
OVERLAY_VXLAN_ID: int = 100           # runner N uses VNI 100 + N
OVERLAY_VXLAN_PORT: int = 4789        # UDP: open it between the Host and every Runner
OVERLAY_MTU: int = 1450               # underlay MTU minus 50
OVERLAY_STATE_FILE: str = "/var/lib/kohakuriver/overlay-state.json"

# The same secret on the Host and every Runner; "" disables authentication (loud warning).
# Make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'
OVERLAY_TOKEN: str = ""

OVERLAY_INACTIVE_AFTER: int = 30      # seconds without a heartbeat until a runner is Inactive
OVERLAY_VXLAN_SOURCE_FILTER: bool = True  # UDP 4789 only from registered runner addresses
# Runner-to-runner traffic straight between runners (vxdirect0), the Host as per-peer fallback:
# needs the VXLAN UDP port open between every pair of runners, not only to the Host.
OVERLAY_DIRECT_ROUTING: bool = False
OVERLAY_REPAIR_INTERVAL: int = 10     # seconds between checks that devices and rules are in place

# Encryption: "wireguard" carries every VXLAN packet between nodes inside WireGuard (interface
# kohaku-wg on every node, keys made on first start beside OVERLAY_STATE_FILE, mode 0600).
# Runners learn it from the Host; set OVERLAY_MTU to underlay MTU - 110 (1390 on a 1500 underlay)
# here and on every runner, and open only UDP OVERLAY_WG_PORT between the nodes.
OVERLAY_ENCRYPTION: str = "none"      # "none" or "wireguard"
OVERLAY_WG_PORT: int = 51820          # UDP, the one port the underlay then carries
OVERLAY_WG_SUBNET: str = "172.16.0.0/23"  # tunnel addresses: Host .0.1, runner N the N-th next
