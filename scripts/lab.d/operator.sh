# shellcheck shell=bash
# The operator surface in the lab (issue 7, docs/install.md): the `xl kemari` wrapper installed
# as /usr/local/sbin/xl ahead of Xen's xl, kemarid run directly (the lab's dom0s have no
# systemd), `kemari status --json`, and the Python client (python-compat) run inside dom0.
# Sourced by scenarios: failover.sh with FO_VIA=xl.
#
# dom0 has no python3 of its own (a busybox dom0 built from Xen's and the kernel's packages); the
# lab stages the build machine's Debian 12 python3 (the same glibc as dom0's) with a zipped
# standard library into the run's read-only share once (op_python_stage), and op_install copies it
# into dom0's RAM at /opt/kemari-py together with python-compat's `kemari` package.
#
# Functions:
#   op_install HOST...           wrapper -> /usr/local/sbin/xl; python + the kemari package
#   op_xl HOST 'ARGS' [TIMEOUT]  runs `xl ARGS` through the wrapper (PATH as root's on Debian)
#   op_py HOST 'ARGS' [TIMEOUT]  runs dom0's staged python3 with ARGS (e.g. "-m kemari status")
#   op_kemarid_start HOST        starts kemarid directly (setsid, log /var/log/kemarid.log) and
#                                waits until `kemari status` answers; op_kemarid_stop HOST
#   op_status_json HOST [DOM]    `kemari status --json [DOM]` through the wrapper, on stdout

OP_PATH='PATH=/usr/local/sbin:$PATH' # root's PATH on Debian puts /usr/local/sbin first
OP_PY_DIR=/opt/kemari-py             # in dom0
OP_KEMARID_LOG=/var/log/kemarid.log  # in dom0

# op_python_stage: the build machine's python3 (binary, the libraries it needs beyond glibc, the
# standard library as one zip of .pyc files, lib-dynload) into $LAB_RUN/ro/py; built once into
# the cache. Prints nothing; fails with a reason.
op_python_stage() {
  [ -d "$LAB_RUN/ro/py" ] && return 0
  local py ver key cache
  py=$(readlink -f /usr/bin/python3 2>/dev/null) || true
  [ -x "$py" ] || { lab_say "op_python_stage: no /usr/bin/python3 on this machine (apt-get install python3)"; return 1; }
  ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  key=$(sha256sum "$py" | cut -c1-12)
  cache="$LAB_CACHE/py-$ver-$key"
  if [ ! -e "$cache/.done" ]; then
    lab_say "staging python $ver for dom0 into $cache"
    rm -rf "$cache"
    mkdir -p "$cache/bin" "$cache/lib/python$ver"
    cp -L "$py" "$cache/bin/python3"
    # the libraries python needs besides glibc's (dom0 has glibc, not these)
    local lib
    for lib in $(ldd "$py" | awk '/=>/ {print $3}'); do
      case "$(basename "$lib")" in libc.so* | libm.so* | ld-linux*) ;; *) cp -L "$lib" "$cache/lib/" ;; esac
    done
    cp -r "/usr/lib/python$ver/lib-dynload" "$cache/lib/python$ver/"
    "$py" - "/usr/lib/python$ver" "$cache/lib/python${ver/./}.zip" <<'PY' || { lab_say "op_python_stage: zipping the standard library failed"; return 1; }
import os, sys, zipfile
src, out = sys.argv[1], sys.argv[2]
skip = {"test", "tests", "idlelib", "tkinter", "ensurepip", "lib2to3", "distutils",
        "site-packages", "dist-packages", "turtledemo", "pydoc_data", "lib-dynload",
        "__pycache__", "unittest"}
def keep(path):
    return not any(part in skip or part.startswith("config-") for part in path.split(os.sep))
with zipfile.PyZipFile(out, "w", optimize=2) as z:
    for name in sorted(os.listdir(src)):
        p = os.path.join(src, name)
        if not keep(name):
            continue
        if os.path.isdir(p) and os.path.exists(os.path.join(p, "__init__.py")):
            z.writepy(p, filterfunc=keep)
        elif name.endswith(".py"):
            z.writepy(p)
PY
    touch "$cache/.done"
  fi
  mkdir -p "$LAB_RUN/ro/py"
  cp -r "$cache/." "$LAB_RUN/ro/py/"
  rm -f "$LAB_RUN/ro/py/.done"
  # python-compat's package, as it is in this checkout
  [ -f "$LAB_REPO/python-compat/kemari/__init__.py" ] ||
    { lab_say "op_python_stage: no python-compat/kemari package in $LAB_REPO"; return 1; }
  mkdir -p "$LAB_RUN/ro/py/site"
  cp -r "$LAB_REPO/python-compat/kemari" "$LAB_RUN/ro/py/site/"
  find "$LAB_RUN/ro/py/site" -name __pycache__ -prune -exec rm -rf {} +
}

# op_install HOST...: the wrapper as /usr/local/sbin/xl, python and the kemari package.
op_install() {
  local h
  op_python_stage || return 1
  for h in "$@"; do
    lab_copy_in "$h" "$LAB_REPO/scripts/xl-kemari" /usr/local/sbin/xl || return 1
    lab_run "$h" "chmod 755 /usr/local/sbin/xl && rm -rf $OP_PY_DIR && mkdir -p \"\$(dirname $OP_PY_DIR)\" && cp -r /lab/py $OP_PY_DIR" 120 || return 1
    # the wrapper is what `xl` means now, and it finds the real one behind it
    local which
    which=$(lab_run "$h" "$OP_PATH; command -v xl") || return 1
    [ "$which" = /usr/local/sbin/xl ] || { lab_say "$h: xl is $which, not the wrapper"; return 1; }
    lab_say "$h: xl kemari wrapper at /usr/local/sbin/xl, python at $OP_PY_DIR"
  done
}

# op_xl HOST 'ARGS' [TIMEOUT]: `xl ARGS` through the wrapper.
op_xl() { lab_run "$1" "$OP_PATH; xl $2" "${3:-300}"; }

# op_py HOST 'ARGS' [TIMEOUT]: dom0's staged python3 with the kemari package on its path.
op_py() {
  lab_run "$1" "PYTHONHOME=$OP_PY_DIR PYTHONPATH=$OP_PY_DIR/site LD_LIBRARY_PATH=$OP_PY_DIR/lib:\$LD_LIBRARY_PATH $OP_PY_DIR/bin/python3 -S $2" "${3:-120}"
}

# op_kemarid_start HOST ['ENV=VALUE ...']: kemarid run directly (no systemd in the lab's dom0),
# with ENV in its environment (its workers inherit it), then wait until its control socket
# answers `kemari status`. A kemarid left running on a reused host is stopped first, and the
# state of earlier runs (/run/kemari, the spool) is removed.
op_kemarid_start() {
  local h=$1 env=${2:-} i
  op_kemarid_stop "$h" || return 1
  lab_run "$h" "rm -rf /run/kemari /var/lib/kemari/spool; mkdir -p /var/log && setsid sh -c '$env RUST_LOG=info kemarid >>$OP_KEMARID_LOG 2>&1 & echo \$! >/run/kemarid.pid' </dev/null >/dev/null 2>&1" || return 1
  for i in $(seq 60); do
    if lab_run "$h" "kemari status >/dev/null 2>&1" 30; then
      lab_say "$h: kemarid (pid $(lab_run "$h" 'cat /run/kemarid.pid')) answers after ${i} s"
      return 0
    fi
    lab_run "$h" 'kill -0 "$(cat /run/kemarid.pid)" 2>/dev/null' 30 || break
    sleep 1
  done
  lab_say "$h: kemarid did not come up; its log:"
  lab_run "$h" "tail -30 $OP_KEMARID_LOG" >&2 || true
  return 1
}

# op_kemarid_stop HOST: SIGTERM, wait for the exit.
op_kemarid_stop() {
  lab_run "$1" 'p=$(cat /run/kemarid.pid 2>/dev/null) || exit 0; kill -TERM "$p" 2>/dev/null; for i in $(seq 100); do kill -0 "$p" 2>/dev/null || exit 0; sleep 0.1; done; echo "kemarid $p still running 10 s after SIGTERM" >&2; exit 1' 60
}

# op_status_json HOST [DOM]: `xl kemari status --json [DOM]` (stdout: the JSON).
op_status_json() { op_xl "$1" "kemari status --json ${2:-}" 60; }

# ---- the failover scenario with FO_VIA=xl ----
#
# failover.sh starts protection with op_fo_start instead of running `kemari receive` and
# `kemari replicate` itself, and calls op_fo_observe_protected once the initial sync is done and
# op_fo_observe_failover after host2 ran the guest. The scenario's knobs become kemarid.conf
# sections for the guest ([guest.NAME]: interval, suspend and its timeout, heartbeat, disk, disk
# copy, unpause);
# `xl kemari start NAME HOST2` asks host1's kemarid, which asks host2's, and each runs a worker
# process (`kemari replicate` / `kemari receive`, docs/api.md). So that the scenario's own checks
# (worker logs, its pid, receive's JSON lines) read the same evidence as with FO_VIA=direct, the
# workers' files are linked where the foreground commands' are: host1 /tmp/replicate-fo.{log,pid},
# host2 /var/lib/kemari/receive-fo.{log,pid,json} (.json: the JSON lines of the worker's log,
# refreshed every 0.5 s by a loop in dom0).

# op_fo_conf NAME 'FLAGS' ROLE: kemarid.conf for guest NAME from the scenario's knobs and its
# replicate (ROLE=primary) or receive (ROLE=secondary) flags (--disk X, --unpause).
op_fo_conf() {
  local name=$1 role=$2 f disk="" unpause=false
  # shellcheck disable=SC2086 # FLAGS: words
  set -- $3
  while [ $# -gt 0 ]; do
    case $1 in
      --disk) disk=$2; shift 2 ;;
      --unpause) unpause=true; shift ;;
      *) lab_fail "FO_VIA=xl: no kemarid.conf key for the worker flag '$1'" ;;
    esac
  done
  f="[daemon]
hostname = \"$([ "$role" = primary ] && echo host1 || echo host2)\"

[guest.$name]
interval_ms = $FO_INTERVAL_MS
suspend = $([ "$FO_QUIESCE" = suspend ] && echo true || echo false)
heartbeat_ms = $FO_HB_MS
heartbeat_misses = $FO_HB_MISSES"
  if [ "$role" = primary ]; then
    # as FO_VIA=direct's --suspend-timeout-s 120: with --unpause the first checkpoint's suspend
    # request meets a guest that has only begun to boot (replicate's default 10 s, and 30 s,
    # failed in runs 20261201-040440-32518 and -041422-6358)
    [ "$FO_QUIESCE" = suspend ] && f="$f
suspend_timeout_s = 120"
    [ -n "$disk" ] && f="$f
disk = \"$disk\""
    f="$f
unpause = $unpause"
  else
    [ -n "$disk" ] && f="$f
disk_copy = \"$disk\""
  fi
  printf '%s\n' "$f"
}

# op_fo_start NAME 'RECEIVE_FLAGS' 'REPLICATE_FLAGS' ['ENV of host1's kemarid']
op_fo_start() {
  local name=$1 rflags=$2 pflags=$3 env1=${4:-} h t0 out pid
  [ "${FO_TCP:-0}" = 1 ] && lab_fail "FO_VIA=xl with FO_TCP=1: kemarid's primary worker does not serve the guest's NIC (no replicate --vif); use FO_VIA=direct"
  [ "${FO_METHOD:-restore}" = restore ] || lab_fail "FO_VIA=xl: kemarid's workers resume by restore only, not FO_METHOD=$FO_METHOD"
  lab_step "operator surface on host1 and host2: xl wrapper, python client, kemarid.conf"
  op_install host1 host2
  op_fo_conf "$name" primary "$pflags" >"$LAB_RUN/kemarid-host1.conf"
  op_fo_conf "$name" secondary "$rflags" >"$LAB_RUN/kemarid-host2.conf"
  for h in host1 host2; do
    lab_copy_in "$h" "$LAB_RUN/kemarid-$h.conf" /etc/kemari/kemarid.conf
    lab_run "$h" "mkdir -p /var/lib/kemari && rm -f /var/lib/kemari/receive-fo.* /tmp/replicate-fo.*"
  done
  lab_say "host1 /etc/kemari/kemarid.conf:"
  sed 's/^/  /' "$LAB_RUN/kemarid-host1.conf" >&2
  lab_step "kemarid on host2 and host1, run directly (no systemd in the lab's dom0)"
  op_kemarid_start host2
  op_kemarid_start host1 "$env1"
  # `kemari start` waits for the initial sync to complete; not when host1 is to die inside it
  local nowait=""
  [ "${FO_KILL_AT:-random}" = random ] || nowait=" --no-wait"
  lab_step "xl kemari start $name $(lab_host_ip host2)$nowait"
  t0=$(lab_now)
  out=$(op_xl host1 "kemari start $name $(lab_host_ip host2)$nowait" 600) || {
    echo "$out"
    for h in host1 host2; do
      lab_say "$h: kemarid's log, and the worker's"
      lab_run "$h" "tail -20 $OP_KEMARID_LOG; tail -30 /run/kemari/guests/$name/worker.log" || true
    done
    lab_fail "xl kemari start $name failed"
  }
  echo "$out"
  lab_figure xl_kemari_start_s "$(lab_since "$t0")" # incl. the initial sync
  # the workers' pids (kemari status --json) and files where the scenario looks for them
  for h in host1 host2; do
    pid=
    for _ in $(seq 60); do
      pid=$(op_status_json "$h" "$name" | op_json_field worker_pid) || true
      [ -n "$pid" ] && [ "$pid" != None ] && break
      sleep 1
    done
    [ -n "$pid" ] && [ "$pid" != None ] || lab_fail "$h: kemari status --json $name shows no worker"
    lab_say "$h: worker of $name is pid $pid"
  done
  pid=$(op_status_json host1 "$name" | op_json_field worker_pid)
  lab_run host1 "echo $pid >/tmp/replicate-fo.pid && ln -sf /run/kemari/guests/$name/worker.log /tmp/replicate-fo.log"
  pid=$(op_status_json host2 "$name" | op_json_field worker_pid)
  lab_run host2 "echo $pid >/var/lib/kemari/receive-fo.pid && ln -sf /run/kemari/guests/$name/worker.log /var/lib/kemari/receive-fo.log"
  lab_run host2 "setsid sh -c 'w=/run/kemari/guests/$name/worker.log j=/var/lib/kemari/receive-fo.json; i=0; while [ \$i -lt 3600 ]; do grep \"^{\" \$w >\$j.tmp 2>/dev/null && mv \$j.tmp \$j; i=\$((i + 1)); sleep 0.5; done' </dev/null >/dev/null 2>&1 &"
  # an events follower on host2, through the wrapper: the failover must show up in it
  lab_run host2 "setsid sh -c 'echo \$\$ >/var/lib/kemari/events-fo.pid; $OP_PATH; exec xl kemari events --json $name' </dev/null >/var/lib/kemari/events-fo.json 2>/var/lib/kemari/events-fo.err &"
}

# op_json_field KEY [KEY2]: from a status --json reply on stdin (the guest itself, or a status
# with a guests list), print the guest's field KEY (KEY2 inside it); "None" when absent.
op_json_field() {
  python3 -c '
import json, sys
d = json.load(sys.stdin)
g = d
if isinstance(d, dict) and "guests" in d:
    g = d["guests"][0] if d["guests"] else {}
v = g.get(sys.argv[1]) if isinstance(g, dict) else None
if len(sys.argv) > 2 and isinstance(v, dict):
    v = v.get(sys.argv[2])
print(v)
' "$@"
}

# op_show_status HOST NAME: `xl kemari status --json NAME` (printed), and the fields the
# operator watches in one line.
op_show_status() {
  local j
  j=$(op_status_json "$1" "$2") || { lab_say "$1: xl kemari status --json $2 failed"; return 1; }
  echo "$j" >"$LAB_RUN/status-$1-$2-$(date +%H%M%S).json"
  echo "$j" | python3 -c '
import json, sys
d = json.load(sys.stdin)
g = d["guests"][0] if "guests" in d else d
hb = g.get("heartbeat") or {}
lag = g.get("replication_lag_ms")
print("%s: %s %s, %s, peer %s: %s checkpoints (%.1f/s), last ACK %s, pause p50/p99 %.1f/%.1f ms, dirty pages/checkpoint %.0f, lag %s ms, link %.0f B/s, heartbeat %s" % (
    sys.argv[1], g["dom"], g["role"], g["state"], g["peer"], g["checkpoints"], g["checkpoints_per_s"],
    g.get("last_acked_seq"), g["pause_ms"]["p50"], g["pause_ms"]["p99"],
    g["dirty_pages_per_checkpoint"], "-" if lag is None else "%.0f" % lag, g["link_bytes_per_s"], hb.get("peer")))
' "$1"
}

# op_fo_wait_state HOST NAME STATE [TIMEOUT=60]: poll `xl kemari status --json NAME` until the
# guest is in STATE; fails (printing the last status) otherwise.
op_fo_wait_state() {
  local h=$1 name=$2 want=$3 t=${4:-60} st="" j=""
  for _ in $(seq "$t"); do
    j=$(op_status_json "$h" "$name") || true
    st=$(echo "$j" | op_json_field state 2>/dev/null) || st=""
    [ "$st" = "$want" ] && return 0
    # a final state other than the one awaited: no use waiting (the status says why)
    case "$st" in stopped | failed | failed-over) break ;; esac
    sleep 1
  done
  lab_say "$h: $name is '$st', not '$want', after $t s: $j"
  return 1
}

# op_py_guest HOST NAME: the Python client's view of guest NAME on HOST's kemarid, one line
# "dom role state checkpoints last_acked_seq domid".
op_py_guest() {
  op_py "$1" "-c 'import kemari; g = kemari.Client().guest(\"$2\"); print(g.dom, g.role, g.state, g.checkpoints, g.last_acked_seq, g.domid)'"
}

# op_xl_list_check HOST NAME: `xl list NAME` and `xl -v list` through the wrapper agree with the
# real xl (name, id, memory, vCPUs), and a failing `xl list` keeps the real xl's exit status.
op_xl_list_check() {
  local h=$1 name=$2 w r rw rr
  w=$(op_xl "$h" "list $name" | awk 'NR == 2 {print $1, $2, $3, $4}')
  r=$(lab_run "$h" "/usr/lib/xen-4.17/bin/xl list $name" | awk 'NR == 2 {print $1, $2, $3, $4}')
  [ -n "$w" ] && [ "$w" = "$r" ] || { lab_say "$h: xl list $name through the wrapper: '$w', real xl: '$r'"; return 1; }
  op_xl "$h" "-v list" >/dev/null || { lab_say "$h: xl -v list through the wrapper failed"; return 1; }
  rw=0 rr=0
  op_xl "$h" "list no-such-domain-$$" >/dev/null 2>&1 || rw=$?
  lab_run "$h" "/usr/lib/xen-4.17/bin/xl list no-such-domain-$$" >/dev/null 2>&1 || rr=$?
  [ "$rw" = "$rr" ] && [ "$rr" != 0 ] || { lab_say "$h: xl list of a missing domain: status $rw through the wrapper, $rr from the real xl"; return 1; }
  lab_say "$h: xl list through the wrapper = the real xl ($w; a missing domain: status $rw from both)"
}

# op_fo_observe_protected NAME: after the initial sync: both daemons report the guest protected
# (kemari status --json through `xl kemari`, and the Python client in dom0); xl list still works
# through the wrapper.
op_fo_observe_protected() {
  local name=$1 h py
  lab_step "observe protection: xl kemari status --json, the Python client, xl list through the wrapper"
  op_fo_wait_state host1 "$name" protected 60 || lab_fail "host1's kemarid does not report $name protected"
  op_fo_wait_state host2 "$name" protected 60 || lab_fail "host2's kemarid does not report $name protected"
  for h in host1 host2; do
    op_show_status "$h" "$name" || lab_fail "$h: kemari status --json $name"
  done
  [ "$(op_status_json host1 "$name" | op_json_field role)" = primary ] || lab_fail "host1 is not $name's primary"
  [ "$(op_status_json host2 "$name" | op_json_field role)" = secondary ] || lab_fail "host2 is not $name's secondary"
  for h in host1 host2; do
    py=$(op_py_guest "$h" "$name") || lab_fail "$h: the Python client could not read $name's status"
    lab_say "$h: python client: $py"
    case "$py" in "$name primary protected "* | "$name secondary protected "*) ;; *) lab_fail "$h: the Python client sees '$py'" ;; esac
  done
  lab_figure py_client_protected yes
  op_xl_list_check host1 "$name" || lab_fail "xl list through the wrapper differs from the real xl on host1"
  lab_figure xl_list_via_wrapper ok
}

# op_fo_observe_failover NAME: host2's kemarid reports the guest failed over and running there
# (status --json and the Python client agree with xl), and the events follower saw it.
op_fo_observe_failover() {
  local name=$1 domid py
  lab_step "observe the failover: xl kemari status --json, the Python client, xl kemari events"
  op_fo_wait_state host2 "$name" failed-over 60 || lab_fail "host2's kemarid does not report $name failed over"
  op_show_status host2 "$name" || true
  domid=$(op_xl host2 "domid $name")
  [ "$(op_status_json host2 "$name" | op_json_field domid)" = "$domid" ] ||
    lab_fail "host2's kemarid names another domain than xl's $domid for $name"
  py=$(op_py_guest host2 "$name") || lab_fail "host2: the Python client could not read $name's status"
  lab_say "host2: python client: $py"
  case "$py" in "$name secondary failed-over "*" $domid") ;; *) lab_fail "host2: the Python client sees '$py' (xl: domid $domid)" ;; esac
  lab_run host2 "cat /var/lib/kemari/events-fo.err; grep -c . /var/lib/kemari/events-fo.json; grep failed-over /var/lib/kemari/events-fo.json | head -3" || true
  lab_run host2 "grep -q '\"failed-over\"' /var/lib/kemari/events-fo.json" ||
    lab_fail "xl kemari events --json on host2 did not report the failover"
  # the follower's process group (setsid: its pid), wrapper and kemari
  lab_run host2 'kill -TERM -- "-$(cat /var/lib/kemari/events-fo.pid)" 2>/dev/null; true' || true
  lab_figure kemarid_state_after failed-over
  lab_figure py_client_failed_over yes
  op_xl_list_check host2 "$name" || lab_fail "xl list through the wrapper differs from the real xl on host2"
}
