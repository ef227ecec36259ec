# shellcheck shell=bash
# Library of the Kemari Xen lab: booting hosts, running commands in dom0, guests, scenarios.
# Sourced by scripts/lab; scenario files (scripts/lab.d/scenarios/NAME.sh) use the lab_* functions.
#
# State of a run lives on disk under $LAB_RUN (lab-results/<timestamp>/), one folder per host:
#   hostN/console.log   Xen (com1) + dom0 (hvc0) serial console
#   hostN/qemu.log      QEMU's own stderr
#   hostN/qemu.pid      QEMU's pid (removed when the host is killed)
#   hostN/share/        virtio-9p share mounted at /share in dom0:
#       cmd/ run/ out/  agent command queue and results (out/ID.out, .err, .rc)
#       xenlog/         dom0's /var/log/xen (xl, qemu-dm logs; console/guest-NAME.log)
#       agent.log in/ guests/
#   ro/                 read-only share mounted at /lab in every dom0: kemari, kemarid, vmlinuz, guest.cpio

LAB_NET_PREFIX=10.77.0
LAB_MEM_HOST=${KEMARI_LAB_HOST_MEM:-2048}
LAB_BOOT_TIMEOUT=${KEMARI_LAB_BOOT_TIMEOUT:-180}

lab_say() { printf 'lab: %s\n' "$*" >&2; }
lab_die() { printf 'lab: ERROR: %s\n' "$*" >&2; exit 1; }
lab_now() { date +%s.%N | cut -c1-14; }
lab_since() { awk -v a="$1" -v b="$(lab_now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---- run folder ----

lab_new_run() { # creates $LAB_RUN
  local ts
  ts=$(date -u +%Y%m%d-%H%M%S)-$$
  LAB_RUN="$LAB_RESULTS/$ts"
  mkdir -p "$LAB_RUN/ro"
  ln -sfn "$ts" "$LAB_RESULTS/latest"
  export LAB_RUN
  # what every dom0 sees at /lab: the project's binaries and the guest images
  local f
  for f in "$LAB_REPO/target/release/kemari" "$LAB_REPO/target/release/kemarid" \
      "$LAB_IMAGES/vmlinuz" "$LAB_IMAGES/guest.cpio"; do
    [ -e "$f" ] || lab_die "missing $f (run scripts/lab prepare)"
    cp -L "$f" "$LAB_RUN/ro/"
  done
  # dom0 copies the binaries into its RAM root, which also holds /var/lib (xl save images, spools):
  # without their debug info (release has debug = 1) they take ~10 MB instead of ~90 MB
  for f in kemari kemarid; do
    strip "$LAB_RUN/ro/$f" 2>/dev/null || lab_say "strip $f failed: dom0 gets the unstripped binary"
  done
  # the hostile frontend as an initramfs to append to guest.cpio (scenario hostile): a guest
  # booted from `cat guest.cpio hostile.cpio` has /usr/local/bin/kemari-hostile
  if [ -x "$LAB_REPO/${LAB_HOSTILE_BIN:-}" ] && [ -n "${LAB_HOSTILE_BIN:-}" ]; then
    local st="$LAB_RUN/.hostile.d"
    rm -rf "$st" && mkdir -p "$st/usr/local/bin"
    strip -o "$st/usr/local/bin/kemari-hostile" "$LAB_REPO/$LAB_HOSTILE_BIN" 2>/dev/null ||
      cp "$LAB_REPO/$LAB_HOSTILE_BIN" "$st/usr/local/bin/kemari-hostile"
    chmod 755 "$st/usr/local/bin/kemari-hostile"
    (cd "$st" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) \
      >"$LAB_RUN/ro/hostile.cpio" || lab_die "building hostile.cpio failed"
    rm -rf "$st"
  fi
}

lab_host_dir() { echo "$LAB_RUN/$1"; }
lab_host_index() { # host1 -> 1
  case "$1" in host[0-9]*) echo "${1#host}" ;; *) lab_die "bad host name '$1' (want host1, host2, ...)" ;; esac
}
lab_host_ip() { echo "$LAB_NET_PREFIX.$(lab_host_index "$1")"; }

# lab_pid_running PID: the process exists and is not a zombie
lab_pid_running() {
  [ -e "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}
# lab_pid_wait_gone PID: wait (up to 10 s) until PID has ended
lab_pid_wait_gone() {
  local i=0
  while lab_pid_running "$1" && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
}

lab_host_alive() {
  local d pid
  d=$(lab_host_dir "$1")
  [ -s "$d/qemu.pid" ] || return 1
  pid=$(cat "$d/qemu.pid")
  lab_pid_running "$pid"
}

# ---- ports ----

lab_port_free() { [ -z "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]; }
lab_pick_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 40000))
    lab_port_free "$p" && { echo "$p"; return 0; }
  done
  lab_die "no free TCP port found on 127.0.0.1"
}

# ---- booting ----

# Network: a star around host1. Host k (k >= 2) has one NIC whose socket connects to host1's
# listening port P_k; host1 has one NIC per other host. dom0 bridges all NICs into xenbr0.
# With LAB_NET_MODE=udp (set before lab_boot_hosts) each link is a pair of UDP sockets instead
# (QEMU's socket netdev, udp=/localaddr=): connectionless, so host1 can be killed and booted
# again (lab_boot_host host1) while host2 keeps its network (a TCP link from host2 would be
# closed for good). Ports in LAB_UPORT[k] = "P Q" (host1's end P, host k's end Q).
lab_start_qemu() { # HOST  (ports in LAB_PORT[k] or LAB_UPORT[k])
  local h=$1 k d img args=() nic=0
  k=$(lab_host_index "$h")
  d=$(lab_host_dir "$h")
  img="$LAB_IMAGES"
  mkdir -p "$d/share/cmd" "$d/share/run" "$d/share/out" "$d/share/in" "$d/share/guests" "$d/share/xenlog/console"
  rm -f "$d/share/ready" "$d/serial.sock" "$d/monitor.sock"
  if [ "$(cat "$LAB_RUN/.netmode" 2>/dev/null || echo tcp)" = udp ]; then
    local j p q
    if [ "$k" = 1 ]; then
      for j in $(seq 2 "$LAB_NHOSTS"); do
        read -r p q <<<"${LAB_UPORT[$j]}"
        nic=$((nic + 1))
        args+=(-netdev "socket,id=n$nic,udp=127.0.0.1:$q,localaddr=127.0.0.1:$p"
          -device "virtio-net-pci,netdev=n$nic,mac=52:54:00:77:$(printf %02x "$k"):$(printf %02x "$nic")")
      done
    else
      read -r p q <<<"${LAB_UPORT[$k]}"
      args+=(-netdev "socket,id=n1,udp=127.0.0.1:$p,localaddr=127.0.0.1:$q"
        -device "virtio-net-pci,netdev=n1,mac=52:54:00:77:$(printf %02x "$k"):01")
    fi
  elif [ "$k" = 1 ]; then
    local j
    for j in $(seq 2 "$LAB_NHOSTS"); do
      nic=$((nic + 1))
      args+=(-netdev "socket,id=n$nic,listen=127.0.0.1:${LAB_PORT[$j]}"
        -device "virtio-net-pci,netdev=n$nic,mac=52:54:00:77:$(printf %02x "$k"):$(printf %02x "$nic")")
    done
  else
    args+=(-netdev "socket,id=n1,connect=127.0.0.1:${LAB_PORT[$k]}"
      -device "virtio-net-pci,netdev=n1,mac=52:54:00:77:$(printf %02x "$k"):01")
  fi
  local xen_cmdline="console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=1 noreboot"
  local dom0_cmdline
  dom0_cmdline="console=hvc0 earlyprintk=xen loglevel=4 lab.host=$k lab.ip=$(lab_host_ip "$h")/24"
  echo "$(date -u +%T) starting $h" >>"$d/qemu.log"
  setsid qemu-system-x86_64 -accel tcg -machine pc -cpu qemu64,+svm,+npt -m "$LAB_MEM_HOST" -smp 1 \
    -nodefaults -no-user-config -display none -vga none \
    -kernel "$img/xen.elf" -append "$xen_cmdline ${KEMARI_LAB_XEN_ARGS:-}" \
    -initrd "$img/vmlinuz $dom0_cmdline ${KEMARI_LAB_DOM0_ARGS:-},$img/dom0.cpio" \
    -chardev "socket,id=ser0,path=$d/serial.sock,server=on,wait=off,logfile=$d/console.log,logappend=on" \
    -serial chardev:ser0 \
    -monitor "unix:$d/monitor.sock,server=on,wait=off" \
    -fsdev "local,id=fs0,path=$d/share,security_model=none" -device virtio-9p-pci,fsdev=fs0,mount_tag=lab \
    -fsdev "local,id=fs1,path=$LAB_RUN/ro,security_model=none,readonly=on" \
    -device virtio-9p-pci,fsdev=fs1,mount_tag=labro \
    "${args[@]}" \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    </dev/null >>"$d/qemu.log" 2>&1 &
  echo $! >"$d/qemu.pid"
  echo "$!" >>"$LAB_RUN/.pids"
}

lab_wait_ready() { # HOST [TIMEOUT]
  local h=$1 t=${2:-$LAB_BOOT_TIMEOUT} d t0=$SECONDS
  d=$(lab_host_dir "$h")
  while [ ! -e "$d/share/ready" ]; do
    if ! lab_host_alive "$h"; then
      lab_say "$h: QEMU exited during boot; last lines of $d/qemu.log and console.log:"
      tail -5 "$d/qemu.log" >&2; tail -20 "$d/console.log" >&2 2>/dev/null
      return 1
    fi
    if [ $((SECONDS - t0)) -ge "$t" ]; then
      lab_say "$h: dom0 not ready after $t s; last console lines ($d/console.log):"
      tail -20 "$d/console.log" >&2 2>/dev/null
      return 1
    fi
    sleep 0.5
  done
}

# lab_boot_hosts N: boot host1..hostN (or reuse the ones already running in this run; guests on
# reused hosts are destroyed; if the run has more than N hosts, all of them stay up).
# Sets LAB_BOOT_SECONDS (0 when all were reused).
lab_boot_hosts() {
  local n=${1:-2} k h t0 need=()
  [ -n "${LAB_RUN:-}" ] || lab_die "lab_boot_hosts: no run folder (call via scripts/lab)"
  t0=$(lab_now)
  # hosts booted with the other kind of links (LAB_NET_MODE) are restarted
  local mode=${LAB_NET_MODE:-tcp}
  if [ -s "$LAB_RUN/.nhosts" ] && [ "$(cat "$LAB_RUN/.netmode" 2>/dev/null || echo tcp)" != "$mode" ]; then
    lab_say "links change to $mode: stopping all hosts"
    lab_stop_all
  fi
  echo "$mode" >"$LAB_RUN/.netmode"
  # host1's NICs are made for the run's host count: asking for fewer hosts reuses the first n,
  # asking for more restarts everything with a bigger network
  if [ -s "$LAB_RUN/.nhosts" ]; then
    local have
    have=$(cat "$LAB_RUN/.nhosts")
    if [ "$have" -lt "$n" ]; then
      lab_say "host count grows from $have to $n: stopping all hosts"
      lab_stop_all
      rm -f "$LAB_RUN/.ports"
    else
      n=$have
    fi
  fi
  LAB_NHOSTS=$n
  echo "$n" >"$LAB_RUN/.nhosts"
  # ports are fixed for the whole run (a rebooted host reconnects to the same one)
  if [ ! -s "$LAB_RUN/.ports" ]; then
    for k in $(seq 2 "$n"); do echo "$k $(lab_pick_port)"; done >"$LAB_RUN/.ports"
  fi
  declare -gA LAB_PORT=()
  while read -r k p; do LAB_PORT[$k]=$p; done <"$LAB_RUN/.ports"
  lab_load_uports "$n"
  for k in $(seq 1 "$n"); do
    h=host$k
    if lab_host_alive "$h" && [ -e "$(lab_host_dir "$h")/share/ready" ]; then
      # shellcheck disable=SC2016 # expanded in dom0
      lab_run "$h" 'for d in $(xl list | awk "NR>2 {print \$1}"); do xl destroy "$d"; done; ip neigh flush all' 60 >/dev/null 2>&1 ||
        lab_say "$h: could not destroy old guests"
      continue
    fi
    need+=("$h")
  done
  [ "${#need[@]}" = 0 ] && { LAB_BOOT_SECONDS=0; return 0; }
  # host1 listens; start it first and wait for its sockets before starting the others.
  # host1 is (re)started alone only if it is among the hosts to boot; the others reconnect.
  for h in "${need[@]}"; do
    [ "$h" = host1 ] || continue
    lab_start_qemu host1
    local _
    [ "$mode" = udp ] && continue # nothing listens: host k's datagrams wait for no one
    for _ in $(seq 1 100); do
      local ok=1
      for k in $(seq 2 "$n"); do lab_port_free "${LAB_PORT[$k]}" && ok=0; done
      [ $ok = 1 ] && break
      lab_host_alive host1 || break
      sleep 0.1
    done
  done
  for h in "${need[@]}"; do
    [ "$h" = host1 ] || lab_start_qemu "$h"
  done
  for h in "${need[@]}"; do
    lab_wait_ready "$h" || { lab_say "boot of $h failed"; return 1; }
  done
  LAB_BOOT_SECONDS=$(lab_since "$t0")
  lab_say "booted ${need[*]} in $LAB_BOOT_SECONDS s"
}

# lab_kill HOST: power loss (SIGKILL of its QEMU).
lab_kill() {
  local d pid
  d=$(lab_host_dir "$1")
  [ -s "$d/qemu.pid" ] || { lab_say "lab_kill $1: not running"; return 0; }
  pid=$(cat "$d/qemu.pid")
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true # reap it (if ours) without bash's "Killed" notice
  lab_pid_wait_gone "$pid"
  rm -f "$d/qemu.pid" "$d/share/ready"
  echo "$(date -u +%T) killed (SIGKILL)" >>"$d/qemu.log"
  lab_say "$1 killed (SIGKILL of QEMU $pid)"
}

# lab_boot_host HOST: (re)boot one host of the current run (e.g. after lab_kill).
lab_boot_host() {
  local h=$1
  lab_host_alive "$h" && return 0
  declare -gA LAB_PORT=()
  while read -r k p; do LAB_PORT[$k]=$p; done <"$LAB_RUN/.ports"
  LAB_NHOSTS=$(cat "$LAB_RUN/.nhosts")
  lab_load_uports "$LAB_NHOSTS"
  lab_start_qemu "$h"
  lab_wait_ready "$h"
}

# lab_load_uports N: the UDP link ports of the run (LAB_UPORT[k] = "P Q", k = 2..N), picked
# once per run ($LAB_RUN/.uports) among ports free for UDP on 127.0.0.1.
lab_load_uports() {
  local n=$1 k p q
  if [ ! -s "$LAB_RUN/.uports" ] || [ "$(wc -l <"$LAB_RUN/.uports")" -lt $((n - 1)) ]; then
    : >"$LAB_RUN/.uports"
    for k in $(seq 2 "$n"); do
      p=""
      for _ in P Q; do
        for _ in $(seq 1 200); do
          q=$((20000 + RANDOM % 40000))
          [ -z "$(ss -Huan "( sport = :$q )" 2>/dev/null)" ] && [ "$q" != "$p" ] &&
            ! grep -qw "$q" "$LAB_RUN/.uports" && break
        done
        p="$p${p:+ }$q"
      done
      echo "$k $p" >>"$LAB_RUN/.uports"
    done
  fi
  declare -gA LAB_UPORT=()
  while read -r k p q; do LAB_UPORT[$k]="$p $q"; done <"$LAB_RUN/.uports"
}

lab_stop_all() {
  local d pid
  for d in "$LAB_RUN"/host*; do
    [ -s "$d/qemu.pid" ] || continue
    pid=$(cat "$d/qemu.pid")
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    lab_pid_wait_gone "$pid"
    rm -f "$d/qemu.pid" "$d/share/ready"
  done
  rm -f "$LAB_RUN/.nhosts"
}

# Kill every QEMU this run started (pids recorded in $LAB_RUN/.pids; each QEMU leads its own
# session/process group, so the group is killed too). Called from the EXIT/INT/TERM trap.
lab_cleanup() {
  set +e # runs from the EXIT trap: a failing kill must not end it early
  local pid
  [ -n "${LAB_RUN:-}" ] || return 0
  # a scenario still running (its subshells, recorded by lab_run_scenario)
  if [ -e "$LAB_RUN/.scenario_pids" ]; then
    while read -r pid; do kill -TERM "$pid" 2>/dev/null; done <"$LAB_RUN/.scenario_pids"
    rm -f "$LAB_RUN/.scenario_pids"
  fi
  [ -e "$LAB_RUN/.pids" ] || return 0
  while read -r pid; do
    kill -KILL -- "-$pid" 2>/dev/null
    kill -KILL "$pid" 2>/dev/null
  done <"$LAB_RUN/.pids"
  while read -r pid; do
    wait "$pid" 2>/dev/null
    lab_pid_wait_gone "$pid"
  done <"$LAB_RUN/.pids"
  rm -f "$LAB_RUN"/host*/qemu.pid "$LAB_RUN"/host*/share/ready "$LAB_RUN"/host*/*.sock "$LAB_RUN/.pids"
  rm -rf "$LAB_RUN/ro"
}

# ---- running commands in dom0 ----

# lab_run HOST 'CMD' [TIMEOUT=300]: run CMD with sh in HOST's dom0; its stdout/stderr appear on
# ours, its exit status is ours (124 on timeout, 125 if the host died).
lab_run() {
  local h=$1 cmd=$2 t=${3:-300} d id deadline rc
  d=$(lab_host_dir "$h")
  lab_host_alive "$h" || { lab_say "lab_run $h: host is not running"; return 125; }
  id=$(date +%s%N)-$RANDOM
  printf '# timeout=%s\n%s\n' "$t" "$cmd" >"$d/share/cmd/.$id.tmp"
  mv "$d/share/cmd/.$id.tmp" "$d/share/cmd/$id.sh"
  deadline=$((SECONDS + t + 15))
  while [ ! -e "$d/share/out/$id.rc" ]; do
    if ! lab_host_alive "$h"; then lab_say "lab_run $h: host died while running: $cmd"; return 125; fi
    if [ $SECONDS -ge $deadline ]; then lab_say "lab_run $h: timeout ($t s): $cmd"; return 124; fi
    sleep 0.1
  done
  cat "$d/share/out/$id.out"
  cat "$d/share/out/$id.err" >&2
  rc=$(cat "$d/share/out/$id.rc")
  [ "$rc" = 137 ] && lab_say "lab_run $h: killed after $t s: $cmd"
  return "$rc"
}

# lab_copy_in HOST SRC DST: copy a file from this machine to DST in HOST's dom0 (via the share).
lab_copy_in() {
  local h=$1 src=$2 dst=$3 d name
  d=$(lab_host_dir "$h")
  name=$(date +%s%N)-$(basename "$src")
  cp "$src" "$d/share/in/$name" || return 1
  lab_run "$h" "mkdir -p \"\$(dirname '$dst')\" && cp '/share/in/$name' '$dst' && rm -f '/share/in/$name'" 120
}

# lab_copy_out HOST SRC DST: copy a file from HOST's dom0 to this machine.
lab_copy_out() {
  local h=$1 src=$2 dst=$3 d name
  d=$(lab_host_dir "$h")
  name=out-$(date +%s%N)
  lab_run "$h" "mkdir -p /share/in && cp '$src' '/share/in/$name'" 120 || return 1
  mv "$d/share/in/$name" "$dst"
}

# ---- guests ----

# lab_create_guest HOST TYPE NAME [options]: write an xl config and `xl create` it.
#   TYPE: pvh | hvm | hvm-nopv (HVM, no Xen platform device, Linux booted with nopv: no PV interface, console on the
#   emulated serial port, which QEMU writes to the same console log file).  Options: mem=MiB (default 128), disk=MiB (qdisk-backed raw file in dom0
#   /var/lib/lab/NAME.img), net=1 (vif on xenbr0; guest address lab.ip=10.77.0.(100+n)), ip=A.B.C.D/24,
#   extra='kernel args', paused=1 (xl create -p: the guest stays paused, e.g. for kemari attach),
#   diskspec='xl disk spec' (a disk line of its own instead of disk=MiB's qdisk), ramdisk=PATH
#   (in dom0; default /lab/guest.cpio). Sets
#   LAB_CREATE_SECONDS.
lab_create_guest() {
  local h=$1 type=$2 name=$3 mem=128 disk=0 net=0 gip="" extra="" paused=0 diskspec="" ramdisk=/lab/guest.cpio o
  shift 3
  for o in "$@"; do
    case "$o" in
      mem=*) mem=${o#mem=} ;;
      disk=*) disk=${o#disk=} ;;
      net=*) net=${o#net=} ;;
      ip=*) gip=${o#ip=} ;;
      extra=*) extra=${o#extra=} ;;
      paused=*) paused=${o#paused=} ;;
      diskspec=*) diskspec=${o#diskspec=} ;;
      ramdisk=*) ramdisk=${o#ramdisk=} ;;
      *) lab_say "lab_create_guest: unknown option '$o'"; return 2 ;;
    esac
  done
  local d cfg console t0
  d=$(lab_host_dir "$h")
  cfg="$d/share/guests/$name.cfg"
  case "$type" in
    pvh) console=hvc0 ;;
    hvm) console="ttyS0 console=hvc0" ;; # xenconsoled logs the PV console (hvc0), not the serial
    hvm-nopv) console="ttyS0 nopv" ;; # nopv: Linux >= 5.3's name for xen_nopv
    *) lab_say "lab_create_guest: type must be pvh, hvm or hvm-nopv, not '$type'"; return 2 ;;
  esac
  [ "$net" = 1 ] && [ -z "$gip" ] && gip="$LAB_NET_PREFIX.$((100 + $(lab_host_index "$h") * 10 + RANDOM % 10))/24"
  {
    echo "name = \"$name\""
    echo "type = \"${type%-nopv}\""
    echo "memory = $mem"
    echo "vcpus = 1"
    echo "kernel = \"/lab/vmlinuz\""
    echo "ramdisk = \"$ramdisk\""
    echo "cmdline = \"console=$console loglevel=4 lab.name=$name${gip:+ lab.ip=$gip} $extra\""
    echo "on_crash = \"preserve\""
    echo "on_poweroff = \"destroy\""
    if [ "$type" != pvh ]; then
      if [ "$type" = hvm-nopv ]; then
        # no PV console for xenconsoled to log: QEMU writes the emulated serial port to the log
        # file lab_wait_console reads (the same path on the host an image is restored on)
        echo "serial = \"file:/var/log/xen/console/guest-$name.log\""
        echo 'xen_platform_pci = 0'
      else
        echo 'serial = "pty"'
      fi
      echo 'vga = "none"'
      echo 'vnc = 0'
      echo 'nographic = 1'
    fi
    [ "$disk" = 0 ] || echo "disk = [ 'format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=/var/lib/lab/$name.img' ]"
    [ -z "$diskspec" ] || echo "disk = [ '$diskspec' ]"
    # MAC derived from the guest's name: a guest re-created under the same name (and address)
    # keeps its MAC, so neighbours' ARP caches stay right
    local c
    c=$(printf '%s' "$name" | cksum | cut -d' ' -f1)
    [ "$net" != 1 ] || echo "vif = [ 'bridge=xenbr0, mac=00:16:3e:$(printf '%02x:%02x:%02x' $((c >> 16 & 127)) $((c >> 8 & 255)) $((c & 255)))' ]"
  } >"$cfg"
  local pre=""
  [ "$disk" != 0 ] && pre="mkdir -p /var/lib/lab && rm -f /var/lib/lab/$name.img && truncate -s ${disk}M /var/lib/lab/$name.img && "
  # a guest of the same name earlier in this run (hosts are reused across scenarios): keep its
  # console log under another name so that lab_wait_console only sees the new guest's lines
  local clog
  clog=$(lab_guest_console_file "$h" "$name")
  [ -e "$clog" ] && mv "$clog" "${clog%.log}.$(date +%H%M%S).log"
  t0=$(lab_now)
  local xlopt=""
  [ "$paused" = 1 ] && xlopt="-p "
  lab_run "$h" "${pre}xl create $xlopt/share/guests/$name.cfg" 300 || { lab_say "xl create $name ($type) on $h failed"; return 1; }
  LAB_CREATE_SECONDS=$(lab_since "$t0")
  lab_say "$h: created $type guest $name in $LAB_CREATE_SECONDS s"
}

lab_guest_console_file() { echo "$(lab_host_dir "$1")/share/xenlog/console/guest-$2.log"; }

# lab_wait_console HOST NAME 'PATTERN' [TIMEOUT=120]: wait until the guest's console log (written by
# xenconsoled in dom0, straight into the results folder) matches the grep -E PATTERN.
# Sets LAB_WAIT_SECONDS.
lab_wait_console() {
  local h=$1 name=$2 pat=$3 t=${4:-120} f t0 start=$SECONDS
  f=$(lab_guest_console_file "$h" "$name")
  t0=$(lab_now)
  until [ -e "$f" ] && grep -qE "$pat" "$f"; do
    if [ $((SECONDS - start)) -ge "$t" ]; then
      lab_say "$h/$name: no console line matching '$pat' after $t s; last lines of $f:"
      tail -5 "$f" >&2 2>/dev/null
      return 1
    fi
    lab_host_alive "$h" || { lab_say "$h died while waiting for $name's console"; return 125; }
    sleep 0.5
  done
  # shellcheck disable=SC2034 # for scenarios
  LAB_WAIT_SECONDS=$(lab_since "$t0")
}

# lab_guest_state HOST NAME: print xl list's state column (e.g. "r-----", "-b----"), fail if absent.
lab_guest_state() {
  lab_run "$1" "xl list '$2' | awk 'NR==2 {print \$5}'" 30
}

# lab_guest_live HOST NAME: succeed if the guest exists and is running, blocked or runnable
# ("------": waiting for the one CPU), i.e. not paused, shut down, crashed or dying.
lab_guest_live() {
  local st
  st=$(lab_guest_state "$1" "$2") || return 1
  case "$st" in
    ??????) case "$st" in *p* | *s* | *c* | *d*) lab_say "$1/$2 is in state $st"; return 1 ;; esac ;;
    *) lab_say "$1/$2: no such guest (xl list: '$st')"; return 1 ;;
  esac
}

# lab_check_disk HOST NAME: check the disk writer's records on guest NAME's disk image (created
# with disk=MiB): every record's checksum is right, none is missing, and every write the guest
# reported done on its console ("kemari-disk wrote N", read first) is on the disk.
# Prints the check's line; sets LAB_DISK_LAST (highest record on disk).
lab_check_disk() {
  local h=$1 name=$2 done_n line
  done_n=$(grep -o 'kemari-disk wrote [0-9]*' "$(lab_guest_console_file "$h" "$name")" 2>/dev/null |
    tail -1 | awk '{print $3}')
  line=$(lab_run "$h" "lab-diskcheck /var/lib/lab/$name.img" 120) || {
    lab_say "$h/$name: disk records damaged: $line"
    return 1
  }
  echo "$name: $line; console reported ${done_n:-no} completed writes"
  LAB_DISK_LAST=$(echo "$line" | sed -n 's/.*last=\(-*[0-9]*\).*/\1/p')
  if [ -n "$done_n" ] && [ "$LAB_DISK_LAST" -lt "$done_n" ]; then
    lab_say "$h/$name: console reported write $done_n done, but the disk's last record is $LAB_DISK_LAST"
    return 1
  fi
}

# ---- scenarios ----

# lab_step 'what': name the step a scenario is in (shown when the scenario fails).
# Each step's start is also written, with the seconds since the scenario began, to
# steps-NAME.txt in the run folder: where a scenario's time goes.
lab_step() {
  echo "$*" >"$LAB_RUN/.step"
  if [ -n "${LAB_SCENARIO_T0:-}" ]; then
    printf '%s %s\n' "$(lab_since "$LAB_SCENARIO_T0")" "$*" >>"$LAB_RUN/steps-${LAB_SCENARIO:-x}.txt"
  fi
  lab_say "-- $*"
}
# lab_figure NAME VALUE: a figure shown on the scenario's final line.
lab_figure() { echo "$1=$2" >>"$LAB_RUN/.figures"; }
# lab_fail 'why': fail the scenario now.
lab_fail() { lab_say "FAIL: $*"; echo "$*" >"$LAB_RUN/.why"; exit 1; }

# Run one scenario file in a subshell with errexit; returns its status.
lab_run_scenario() {
  local name=$1 file="$LAB_DIR/scenarios/$1.sh" rc t0
  [ -f "$file" ] || { echo "scenario $name: FAIL no such scenario ($file)"; return 1; }
  rm -f "$LAB_RUN/.step" "$LAB_RUN/.figures" "$LAB_RUN/.why"
  t0=$(lab_now)
  LAB_SCENARIO=$name LAB_SCENARIO_T0=$t0
  rm -f "$LAB_RUN/.rc" "$LAB_RUN/.scenario_pids"
  # In the background + `wait`: a signal sent to scripts/lab alone (kill -INT/-TERM PID, not only
  # Ctrl-C to the whole terminal group) then runs its trap at once instead of after the scenario.
  {
    echo "$BASHPID" >>"$LAB_RUN/.scenario_pids"
    (
      echo "$BASHPID" >>"$LAB_RUN/.scenario_pids"
      set -eE -o pipefail
      trap 'lab_say "command failed (status $?) at ${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR
      # shellcheck disable=SC1090
      source "$file"
    )
    echo $? >"$LAB_RUN/.rc"
  } 2>&1 | tee "$LAB_RUN/scenario-$name.log" >&2 &
  wait $!
  rc=$(cat "$LAB_RUN/.rc" 2>/dev/null || echo 1)
  local figs step why
  figs=""
  if [ -f "$LAB_RUN/.figures" ]; then figs=$(tr '\n' ' ' <"$LAB_RUN/.figures"); fi
  figs="${figs}total_s=$(lab_since "$t0")"
  if [ "$rc" = 0 ]; then
    echo "scenario $name: PASS $figs" | tee -a "$LAB_RUN/summary.txt"
  else
    step=$(cat "$LAB_RUN/.step" 2>/dev/null || echo "?")
    why=$(cat "$LAB_RUN/.why" 2>/dev/null || true)
    echo "scenario $name: FAIL at step '$step'${why:+ ($why)} $figs" | tee -a "$LAB_RUN/summary.txt"
  fi
  return "$rc"
}
