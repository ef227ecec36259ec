# shellcheck shell=bash
# Scenario failover-xl: the failover scenario with protection started through the operator
# surface (issue 7's lab acceptance): kemarid runs directly on both dom0s (no systemd there),
# `xl kemari start GUEST HOST2` through the installed xl wrapper starts protection, the guest is
# observed with `xl kemari status --json`, the Python client and `xl kemari events --json`, and
# `xl list` / `xl -v list` through the wrapper match the real xl; then host1 is killed and the
# guest must run on host2 with 0 acknowledged disk writes lost (scenarios/failover.sh with
# FO_VIA=xl; see scripts/lab.d/operator.sh). The daemon's primary worker serves no NIC yet, so
# the TCP session is left to the `failover` scenario (FO_TCP=0 here).

# hosts linked by UDP sockets (as reprotect and failpoints): the `failover` scenario before this one
# killed host1, and with the default star links a rebooted host1 leaves host2 without a route
# (CI run on 12c1599: 'kemarid on 10.77.0.2 is unreachable: No route to host')
export LAB_NET_MODE=udp
FO_VIA=xl
FO_TCP=0
# shellcheck source=failover.sh
source "$LAB_DIR/scenarios/failover.sh"
