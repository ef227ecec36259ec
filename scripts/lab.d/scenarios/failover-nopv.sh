# shellcheck shell=bash
# Scenario failover-nopv: the failover scenario with an HVM guest that uses no PV interface at
# all (issue 6, item 3): no Xen platform device, Linux booted with nopv, its console on the
# emulated UART (QEMU writes it to the console log). Such a guest keeps no state inside Xen
# that a checkpoint could miss, so it is protected with pause checkpoints (a toolstack pause,
# QEMU stopped and saved with each) and resumed on host2 by `xl restore` of the last ACKed
# checkpoint. Memory only: its disk and NIC would be QEMU's emulated devices, which have no
# output-commit tap (docs/failover.md section 3). PASS: the console counter goes on on host2
# from the last ACKed state, through the UART's interrupts.

# UDP links, as failover-xl and reprotect: the scenario before it in scripts/test killed a host
export LAB_NET_MODE=udp
FO_GUEST=hvm-nopv
FO_QUIESCE=pause
FO_METHOD=restore
FO_DISK=0
FO_TCP=0
# shellcheck source=failover.sh
source "$LAB_DIR/scenarios/failover.sh"
