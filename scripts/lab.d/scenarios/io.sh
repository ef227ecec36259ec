# shellcheck shell=bash
# Scenario io: a guest's disk served by Kemari's userspace blkback (`kemari attach`, backend type
# kemari-vbd) instead of the kernel's. A PVH guest is created paused with no disk in its config,
# kemari attach creates the device and unpauses it; the guest writes KEMARI_LAB_IO_MIB (64) MiB of
# random data to /dev/xvda, reads it back with the page cache dropped and compares sha1 (guest init
# lab.iotest); dom0 checks the image holds the same bytes. The same test then runs with the
# kernel's blkback (backendtype=phy, loop device) on the same image, with an HVM guest (PV
# drivers) on our blkback, and with our blkback serving a block device (loop; no discard offered).
# Figures: MB/s of each and the ratio ours/kernel (same run, same image). At the end, NICs: PVH
# and HVM guests get a vif on Kemari's netback (kemari attach --vif), see the section below.

MIB=${KEMARI_LAB_IO_MIB:-64}
IMG=/var/lib/lab/io.img

lab_step "boot 1 host"
lab_boot_hosts 1
lab_figure boot_s "$LAB_BOOT_SECONDS"
lab_run host1 "mkdir -p /var/lib/lab && rm -f $IMG && truncate -s $((MIB * 2))M $IMG"

# io_check NAME [DISCARD=ok]: wait for the guest's I/O test, check it (discard=DISCARD: "failed"
# where the backend must not offer discard), and set IO_W_MBS / IO_R_MBS / IO_SHA
io_check() {
  local name=$1 want_discard=${2:-ok} line w r
  lab_wait_console host1 "$name" 'kemari-io (done|write failed|read failed)' 900
  line=$(grep -oE 'kemari-io (done|write failed|read failed).*' "$(lab_guest_console_file host1 "$name")" | tail -1 | tr -d '\r')
  echo "$name: $line"
  case "$line" in *"sha=ok"*) ;; *) lab_fail "$name: I/O test failed: $line" ;; esac
  case "$line" in *"discard=$want_discard"*) ;; *) lab_fail "$name: discard not $want_discard: $line" ;; esac
  w=$(echo "$line" | sed -n 's/.*write_s=\([0-9.]*\).*/\1/p')
  r=$(echo "$line" | sed -n 's/.*read_s=\([0-9.]*\).*/\1/p')
  IO_SHA=$(echo "$line" | awk '{print $NF}')
  IO_W_MBS=$(awk -v m="$MIB" -v s="$w" 'BEGIN { printf "%.2f", (s > 0 ? m * 1.048576 / s : 0) }')
  IO_R_MBS=$(awk -v m="$MIB" -v s="$r" 'BEGIN { printf "%.2f", (s > 0 ? m * 1.048576 / s : 0) }')
  echo "$name: write $IO_W_MBS MB/s, read $IO_R_MBS MB/s"
}

# io_image_matches: the first MIB MiB of the image in dom0 have the guest's sha1
io_image_matches() {
  local sum
  sum=$(lab_run host1 "head -c $((MIB * 1048576)) $IMG | sha1sum" 120 | cut -c1-40)
  [ "$sum" = "$IO_SHA" ] || lab_fail "image in dom0 has sha1 $sum, the guest wrote $IO_SHA"
  echo "image in dom0 holds the guest's data (sha1 $sum)"
}

# io_kemari NAME TYPE [DISK=$IMG]: guest created paused without a disk, served by kemari attach
# from DISK (a file: discard offered; a block device: not)
io_kemari() {
  local name=$1 type=$2 disk=${3:-$IMG} domid discards='[1-9][0-9]*' want_discard=ok
  case "$disk" in /dev/*) discards=0 want_discard=failed ;; esac
  lab_create_guest host1 "$type" "$name" mem=256 paused=1 extra="lab.iotest=$MIB"
  lab_run host1 "RUST_LOG=info setsid kemari attach $name --disk $disk --unpause >/var/log/kemari-attach-$name.log 2>&1 </dev/null &
    for i in \$(seq 1 100); do grep -q 'kemari attach: domain' /var/log/kemari-attach-$name.log && break; sleep 0.2; done
    cat /var/log/kemari-attach-$name.log"
  domid=$(lab_run host1 "xl domid $name")
  lab_wait_console host1 "$name" 'kemari-io start' 300
  lab_figure "${name//-/_}_boot_s" "$LAB_WAIT_SECONDS"
  # the disk is ours: a kemari-vbd backend connected, no kernel/qdisk backend for this guest
  lab_run host1 "xenstore-read /local/domain/0/backend/kemari-vbd/$domid/51712/state; xenstore-read /local/domain/$domid/device/vbd/51712/backend; xenstore-ls /local/domain/0/backend/vbd/$domid 2>/dev/null && exit 1; xenstore-ls /local/domain/0/backend/qdisk/$domid 2>/dev/null && exit 1; true" |
    tee "$LAB_RUN/io-$name-xenstore.txt"
  grep -qx 4 "$LAB_RUN/io-$name-xenstore.txt" || lab_fail "$name: kemari-vbd backend is not Connected"
  io_check "$name" "$want_discard"
  lab_run host1 "xl destroy $name"
  # kemari attach sees the guest go, removes its nodes and prints its counters
  lab_run host1 "for i in \$(seq 1 50); do grep -q 'Gone after' /var/log/kemari-attach-$name.log && break; sleep 0.2; done; cat /var/log/kemari-attach-$name.log; grep -q 'Gone after.* $discards discards, 0 errors' /var/log/kemari-attach-$name.log && ! xenstore-ls /local/domain/0/backend/kemari-vbd/$domid 2>/dev/null"
}

lab_step "PVH guest on kemari's blkback"
io_kemari io-pvh pvh
io_image_matches
lab_figure pvh_kemari_write_mbs "$IO_W_MBS"
lab_figure pvh_kemari_read_mbs "$IO_R_MBS"
KW=$IO_W_MBS KR=$IO_R_MBS

lab_step "PVH guest on the kernel's blkback (same image)"
# Xen's block hotplug script locks with flock(1), which the lab's busybox dom0 lacks: a minimal
# script of our own sets up the loop device the kernel's blkback serves (what `block` does for a
# file) and reports it to libxl
lab_run host1 'cat >/var/lib/lab/block-loop <<"EOS"
#!/bin/sh
case "$1" in
  add)
    f=$(xenstore-read "$XENBUS_PATH/params") && dev=$(losetup -f) && losetup "$dev" "$f" || {
      xenstore-write "$XENBUS_PATH/hotplug-error" "losetup of $f failed" "$XENBUS_PATH/hotplug-status" error
      exit 1
    }
    xenstore-write "$XENBUS_PATH/physical-device" "$(stat -L -c %t:%T "$dev")" \
      "$XENBUS_PATH/physical-device-path" "$dev" "$XENBUS_PATH/hotplug-status" connected ;;
  remove)
    dev=$(xenstore-read "$XENBUS_PATH/physical-device-path") && losetup -d "$dev" ;;
esac
EOS
chmod 755 /var/lib/lab/block-loop'
lab_create_guest host1 pvh io-pvh-kernel mem=256 extra="lab.iotest=$MIB" \
  diskspec="format=raw, vdev=xvda, access=rw, backendtype=phy, script=/var/lib/lab/block-loop, target=$IMG"
io_check io-pvh-kernel
io_image_matches
lab_run host1 "xl destroy io-pvh-kernel"
lab_figure pvh_kernel_write_mbs "$IO_W_MBS"
lab_figure pvh_kernel_read_mbs "$IO_R_MBS"
lab_figure write_ratio_kemari_vs_kernel "$(awk -v a="$KW" -v b="$IO_W_MBS" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
lab_figure read_ratio_kemari_vs_kernel "$(awk -v a="$KR" -v b="$IO_R_MBS" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"

lab_step "HVM guest (PV drivers) on kemari's blkback"
io_kemari io-hvm hvm
io_image_matches
lab_figure hvm_kemari_write_mbs "$IO_W_MBS"
lab_figure hvm_kemari_read_mbs "$IO_R_MBS"

lab_step "PVH guest on kemari's blkback from a block device (loop)"
loopdev=$(lab_run host1 "d=\$(losetup -f) && losetup \$d $IMG && echo \$d")
io_kemari io-pvh-blk pvh "$loopdev"
lab_run host1 "losetup -d $loopdev"
io_image_matches
lab_figure pvh_kemari_blockdev_write_mbs "$IO_W_MBS"
lab_figure pvh_kemari_blockdev_read_mbs "$IO_R_MBS"

lab_step "kemari attach killed (SIGKILL) while the guest does I/O, a new one takes over (Attached)"
name=io-pvh-takeover
lab_create_guest host1 pvh "$name" mem=256 paused=1 extra="lab.iotest=$MIB"
lab_run host1 "RUST_LOG=info setsid kemari attach $name --disk $IMG --unpause >/var/log/kemari-attach-$name.1.log 2>&1 </dev/null &
  echo \$! >/run/kemari-attach-$name.pid"
domid=$(lab_run host1 "xl domid $name")
lab_wait_console host1 "$name" 'kemari-io start' 300
sleep 6
# a crash: no cleanup, the device's nodes and the guest's ring stay as they are
lab_run host1 "p=\$(cat /run/kemari-attach-$name.pid); grep -q attach /proc/\$p/cmdline && kill -KILL \$p; cat /var/log/kemari-attach-$name.1.log"
lab_run host1 "RUST_LOG=info setsid kemari attach $name --disk $IMG --takeover >/var/log/kemari-attach-$name.2.log 2>&1 </dev/null &
  for i in \$(seq 1 100); do grep -q 'kemari attach: domain' /var/log/kemari-attach-$name.2.log && break; sleep 0.2; done
  cat /var/log/kemari-attach-$name.2.log
  test \$(xenstore-read /local/domain/0/backend/kemari-vbd/$domid/51712/kemari-state) = attached
  test \$(xenstore-read /local/domain/0/backend/kemari-vbd/$domid/51712/state) = 4"
io_check "$name"
io_image_matches
lab_run host1 "xl destroy $name"
lab_run host1 "for i in \$(seq 1 50); do grep -q 'Gone after' /var/log/kemari-attach-$name.2.log && break; sleep 0.2; done; cat /var/log/kemari-attach-$name.2.log; grep -q 'Gone after.* [1-9][0-9]* requests, .* 0 errors' /var/log/kemari-attach-$name.2.log"
lab_figure takeover_write_mbs "$IO_W_MBS"

# ---- NICs on Kemari's netback ----
# PVH and HVM (PV drivers) guests created paused with no vif; `kemari attach --vif bridge=xenbr0`
# gives each a NIC on our netback (tap kvif<domid>.0 in xenbr0, where dom0 has its address). From
# dom0: the guest's TCP service (port 7000) answers and echoes our lines, ping gives the round
# trip, and KEMARI_LAB_NET_MIB (8) MiB go through nc each way (ports 7001/7002 of guest init). The
# same bulk test on a PVH guest with a vif on the kernel's netback gives the ratio.
NETMIB=${KEMARI_LAB_NET_MIB:-8}

# net_tcp NAME IP: talk to the guest's services from dom0; sets NET_PING_MS, NET_TO_MBS (dom0 ->
# guest) and NET_FROM_MBS (guest -> dom0)
net_tcp() {
  local name=$1 ip=$2 out="" i line bytes
  lab_wait_console host1 "$name" 'kemari-guest tcp service' 300 || lab_fail "$name: no TCP service (no eth0?)"
  lab_figure "${name//-/_}_boot_s" "$LAB_WAIT_SECONDS"
  for i in $(seq 1 15); do
    out=$(lab_run host1 "printf 'kemari-line-1\nkemari-line-2\nkemari-line-3\n' | nc -w 10 $ip 7000" 60 2>/dev/null) || true
    case "$out" in *kemari-count*) break ;; esac
    sleep 2
  done
  echo "$name: answer from $ip:7000: $(echo "$out" | tr '\n' ' ')"
  case "$out" in *kemari-count*kemari-line-1*kemari-line-2*kemari-line-3*) ;; *) lab_fail "$name: unexpected answer from $ip:7000: '$out'" ;; esac
  NET_PING_MS=$(lab_run host1 "ping -c 5 $ip | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p'" 60)
  [ -n "$NET_PING_MS" ] || lab_fail "$name: no ping answer from $ip"
  # dom0 -> guest: the guest counts what it read
  line=$(lab_run host1 "a=\$(cut -d' ' -f1 /proc/uptime); n=\$(head -c $((NETMIB * 1048576)) /dev/zero | nc -w 60 $ip 7001); b=\$(cut -d' ' -f1 /proc/uptime); echo \$n \$a \$b" 600)
  bytes=$(echo "$line" | awk '{print $1}')
  [ "$bytes" = $((NETMIB * 1048576)) ] || lab_fail "$name: the guest read '$bytes' bytes of $((NETMIB * 1048576)) ($line)"
  NET_TO_MBS=$(echo "$line" | awk -v m="$NETMIB" '{ s = $3 - $2; printf "%.2f", (s > 0 ? m * 1.048576 / s : 0) }')
  # guest -> dom0
  line=$(lab_run host1 "a=\$(cut -d' ' -f1 /proc/uptime); n=\$(nc -w 60 $ip 7002 </dev/null | wc -c); b=\$(cut -d' ' -f1 /proc/uptime); echo \$n \$a \$b" 600)
  bytes=$(echo "$line" | awk '{print $1}')
  [ "$bytes" = $((NETMIB * 1048576)) ] || lab_fail "$name: dom0 read '$bytes' bytes of $((NETMIB * 1048576)) ($line)"
  NET_FROM_MBS=$(echo "$line" | awk -v m="$NETMIB" '{ s = $3 - $2; printf "%.2f", (s > 0 ? m * 1.048576 / s : 0) }')
  echo "$name: ping $NET_PING_MS ms, dom0->guest $NET_TO_MBS MB/s, guest->dom0 $NET_FROM_MBS MB/s ($NETMIB MiB)"
}

# net_kemari NAME TYPE IP: guest created paused without a NIC, its vif served by kemari attach
net_kemari() {
  local name=$1 type=$2 ip=$3 domid
  lab_create_guest host1 "$type" "$name" mem=256 paused=1 ip="$ip/24" extra="lab.netmib=$NETMIB"
  lab_run host1 "RUST_LOG=info setsid kemari attach $name --vif bridge=xenbr0 --unpause >/var/log/kemari-attach-$name.log 2>&1 </dev/null &
    for i in \$(seq 1 100); do grep -q 'kemari attach: domain' /var/log/kemari-attach-$name.log && break; sleep 0.2; done
    cat /var/log/kemari-attach-$name.log"
  domid=$(lab_run host1 "xl domid $name")
  net_tcp "$name" "$ip"
  # the NIC is ours: a kemari-vif backend connected, its tap in the bridge, no kernel vif backend
  lab_run host1 "xenstore-read /local/domain/0/backend/kemari-vif/$domid/0/state; xenstore-read /local/domain/$domid/device/vif/0/backend; [ -e /sys/class/net/xenbr0/brif/kvif$domid.0 ] || exit 1; xenstore-ls /local/domain/0/backend/vif/$domid 2>/dev/null && exit 1; true" |
    tee "$LAB_RUN/io-$name-xenstore.txt"
  grep -qx 4 "$LAB_RUN/io-$name-xenstore.txt" || lab_fail "$name: kemari-vif backend is not Connected"
  lab_run host1 "xl destroy $name"
  # kemari attach sees the guest go, removes its nodes and the tap, prints its counters
  lab_run host1 "for i in \$(seq 1 50); do grep -q 'vif 0: Gone after' /var/log/kemari-attach-$name.log && break; sleep 0.2; done; cat /var/log/kemari-attach-$name.log; grep -q 'vif 0: Gone after.*, 0 tx errors, .* 0 rx errors' /var/log/kemari-attach-$name.log && ! xenstore-ls /local/domain/0/backend/kemari-vif/$domid 2>/dev/null && ! ip link show kvif$domid.0 2>/dev/null"
}

lab_step "PVH guest's NIC on kemari's netback"
net_kemari io-net-pvh pvh "$LAB_NET_PREFIX.120"
lab_figure net_pvh_tcp ok
lab_figure net_pvh_ping_ms "$NET_PING_MS"
lab_figure net_pvh_kemari_to_guest_mbs "$NET_TO_MBS"
lab_figure net_pvh_kemari_from_guest_mbs "$NET_FROM_MBS"
NTO=$NET_TO_MBS NFROM=$NET_FROM_MBS

lab_step "HVM guest's (PV drivers) NIC on kemari's netback"
net_kemari io-net-hvm hvm "$LAB_NET_PREFIX.121"
lab_figure net_hvm_tcp ok
lab_figure net_hvm_ping_ms "$NET_PING_MS"
lab_figure net_hvm_kemari_to_guest_mbs "$NET_TO_MBS"
lab_figure net_hvm_kemari_from_guest_mbs "$NET_FROM_MBS"

lab_step "PVH guest's NIC on the kernel's netback (same bulk test)"
lab_create_guest host1 pvh io-net-kernel mem=256 net=1 ip="$LAB_NET_PREFIX.122/24" extra="lab.netmib=$NETMIB"
net_tcp io-net-kernel "$LAB_NET_PREFIX.122"
lab_run host1 "xl destroy io-net-kernel"
lab_figure net_pvh_kernel_ping_ms "$NET_PING_MS"
lab_figure net_pvh_kernel_to_guest_mbs "$NET_TO_MBS"
lab_figure net_pvh_kernel_from_guest_mbs "$NET_FROM_MBS"
lab_figure net_to_guest_ratio_kemari_vs_kernel "$(awk -v a="$NTO" -v b="$NET_TO_MBS" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
lab_figure net_from_guest_ratio_kemari_vs_kernel "$(awk -v a="$NFROM" -v b="$NET_FROM_MBS" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
