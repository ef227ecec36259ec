# shellcheck shell=bash
# Scenario commit: output commit of a protected guest's disk and NIC (issue 5, item 4).
# A PVH guest is created paused on host1 with no disk; `kemari replicate --disk` serves its disk
# with Kemari's blkback in the same process as the sender, behind the output gate, and unpauses
# the guest after the initial sync. host2 runs `kemari receive --disk`, applying each checkpoint's
# disk write log to its copy of the image (copied from host1 before the start). In the guest
# (lab.diskwriter) 8 writers write COMMIT_RECORDS numbered, checksummed records with dd
# conv=fsync (a write and a flush each, plus reads), then COMMIT_BULK MiB in one dd.
# With COMMIT_NET=1 (default) the guest also has a NIC on Kemari's netback under output commit
# (`kemari replicate --vif`, its own gate, tap in xenbr0) and, while the disk writer runs, dom0
# sends COMMIT_NET_KIB KiB to the guest's TCP sink (port 7001: the guest's ACKs) and
# COMMIT_NET_LINES lines to its echo service (port 7000), both checked. Checks:
#   - from the commit log (`--commit-log`): every request was released after an ACK with a
#     sequence number >= its epoch (the checkpoint that captured the guest state that made it),
#     at least 1,000 of them; and every frame the guest sent was released after an ACK with a
#     sequence number >= its epoch (figures packets, packets_released_before_ack);
#   - from outside both kemari processes, while the writer runs: dom0 samples the records on
#     host1's image and then on host2's copy, about once a second; every record on host1's
#     image must already be on host2's copy (figures outside_samples,
#     outside_released_before_ack = 0; at least 3 samples while the writer runs);
#   - after a held stop (SIGUSR1: the next checkpoint keeps the guest paused after its ACK) the
#     secondary's disk image equals the primary's (sha1), and its records check out;
#   - the same workload on an unprotected guest (`kemari attach`) in the same run, for the ratio.
# Figures: requests, checkpoints, checkpoints/s, mean/p99 release delay, records/s and bulk
# write MB/s protected vs unprotected.

COMMIT_PORT=${COMMIT_PORT:-7300}
COMMIT_RECORDS=${COMMIT_RECORDS:-600}
COMMIT_BULK=${COMMIT_BULK:-8}
COMMIT_IMG_MIB=16
COMMIT_NET=${COMMIT_NET:-1}
COMMIT_NET_KIB=${COMMIT_NET_KIB:-512}
COMMIT_NET_LINES=${COMMIT_NET_LINES:-50}
# Minimum guest run time between checkpoints (kemari replicate --min-run-ms): with 8 writers and an
# inbound stream output is always held, and without it the guest starves (docs/sync.md).
COMMIT_MIN_RUN_MS=${COMMIT_MIN_RUN_MS:-50}
COMMIT_GUEST_IP=$LAB_NET_PREFIX.160
COMMIT_MAC=00:16:3e:77:00:a0
IMG=/var/lib/lab/commit.img
COPY=/var/lib/lab/commit-copy.img
LOG=/var/lib/kemari/commit.log

lab_step "boot 2 hosts"
lab_boot_hosts 2

lab_step "disk image on host1, copied to host2"
# dom0's /var/lib is a small RAM disk: clear spools of earlier scenarios on reused hosts
lab_run host1 "mkdir -p /var/lib/lab /var/lib/kemari /run/kemari && rm -f $IMG $LOG /var/lib/lab/commit-open.img /var/lib/lab/io.img && dd if=/dev/urandom of=$IMG bs=1M count=2 2>/dev/null && truncate -s ${COMMIT_IMG_MIB}M $IMG && sha1sum $IMG"
lab_copy_out host1 "$IMG" "$LAB_RUN/commit-initial.img"
lab_run host2 "mkdir -p /var/lib/lab /var/lib/kemari && rm -rf /var/lib/kemari/spool-* $COPY"
lab_copy_in host2 "$LAB_RUN/commit-initial.img" "$COPY"
rm -f "$LAB_RUN/commit-initial.img"
lab_run host2 "sha1sum $COPY"

lab_step "protected guest created paused, without a disk"
netopt="" vifopt=""
if [ "$COMMIT_NET" = 1 ]; then
  # no vif in its xl config: kemari replicate --vif serves it
  netopt="ip=$COMMIT_GUEST_IP/24"
  vifopt="--vif bridge=xenbr0,mac=$COMMIT_MAC"
fi
# shellcheck disable=SC2086 # netopt: zero or one option
lab_create_guest host1 pvh commit-pvh mem=128 paused=1 $netopt extra="lab.diskwriter=$COMMIT_RECORDS lab.diskbulk=$COMMIT_BULK"

lab_step "kemari receive --disk on host2, kemari replicate --disk on host1"
lab_run host2 "setsid sh -c 'RUST_LOG=info kemari --json receive --listen 0.0.0.0:$COMMIT_PORT --spool-dir /var/lib/kemari/spool-commit --once --disk $COPY >/var/lib/kemari/receive-commit.json 2>/var/lib/kemari/receive-commit.log' </dev/null >/dev/null 2>&1 &"
sleep 2
t0=$(lab_now)
lab_run host1 "setsid sh -c 'RUST_LOG=info kemari --json replicate commit-pvh $(lab_host_ip host2):$COMMIT_PORT --interval-ms 200 --min-run-ms $COMMIT_MIN_RUN_MS --disk $IMG $vifopt --unpause --commit-log $LOG >/tmp/replicate-commit.json 2>/tmp/replicate-commit.log & echo \$! >/tmp/replicate-commit.pid' </dev/null >/dev/null 2>&1"
commit_logs() {
  lab_run host1 "tail -40 /tmp/replicate-commit.log; cat /tmp/replicate-commit.json" || true
  lab_run host2 "tail -20 /var/lib/kemari/receive-commit.log; cat /var/lib/kemari/receive-commit.json" || true
}
ok=0
for _ in $(seq 300); do
  if lab_run host1 "grep -q 'unpaused' /tmp/replicate-commit.log" 30; then ok=1; break; fi
  lab_run host1 "kill -0 \$(cat /tmp/replicate-commit.pid) 2>/dev/null" 30 || break
  sleep 1
done
[ "$ok" = 1 ] || { commit_logs; lab_fail "initial sync of commit-pvh did not finish"; }
lab_figure initial_sync_s "$(lab_since "$t0")"

lab_step "guest writes $COMMIT_RECORDS records and $COMMIT_BULK MiB under protection"
lab_wait_console host1 commit-pvh 'kemari-disk start' 300 || { commit_logs; lab_fail "the guest's disk writer did not start"; }
t1=$(lab_now)
if [ "$COMMIT_NET" = 1 ]; then
  lab_wait_console host1 commit-pvh 'kemari-guest tcp service' 120 || { commit_logs; lab_fail "the guest's TCP service did not start on its output-committed NIC"; }
  # the guest's ARP replies wait for a checkpoint's ACK like its other frames: resolve first
  lab_run host1 "for i in \$(seq 30); do ping -c 1 -W 10 $COMMIT_GUEST_IP >/dev/null 2>&1 && exit 0; done; exit 1" 400 ||
    { commit_logs; lab_fail "the guest at $COMMIT_GUEST_IP does not answer ping from dom0"; }
  tn=$(lab_now)
  lab_run host1 "rm -f /tmp/commit-net.*; setsid sh -c 'head -c $((COMMIT_NET_KIB * 1024)) /dev/zero | nc -w 120 $COMMIT_GUEST_IP 7001 >/tmp/commit-net.sink 2>&1; (i=0; while [ \$i -lt $COMMIT_NET_LINES ]; do echo commit-line-\$i; i=\$((i + 1)); sleep 0.05; done) | nc -w 60 $COMMIT_GUEST_IP 7000 >/tmp/commit-net.echo 2>&1; echo done >/tmp/commit-net.done' </dev/null >/dev/null 2>&1 &"
fi
# The output rule checked from outside both kemari processes, while the writer runs: a write
# reaches the primary's image only after the ACK of its checkpoint, and the secondary applied
# that checkpoint's writes to its copy before ACKing it, so every record dom0 finds in host1's
# image must already be in host2's copy, read just after. Each sample reads host1's image first,
# then host2's copy (no clocks compared); a record on host1 missing on host2 is a write released
# before the secondary had it (figure outside_released_before_ack).
commit_records() { # HOST IMAGE: the numbers of the records found in the image's record sectors
  lab_run "$1" "dd if=$2 bs=512 count=$COMMIT_RECORDS 2>/dev/null | tr -d '\\000' | grep -ao 'kemari-rec [0-9]* [0-9a-f]\\{40\\}' | cut -d' ' -f2 | sort -n | tr '\\n' ' '" 60
}
console=$(lab_guest_console_file host1 commit-pvh)
samples=0 midway=0 early=0 early_first=
until grep -q 'kemari-disk done' "$console" 2>/dev/null; do
  if awk -v a="$(lab_since "$t1")" 'BEGIN { exit !(a > 900) }'; then
    commit_logs; lab_fail "the guest's disk writer did not finish under protection"
  fi
  lab_host_alive host1 || lab_fail "host1 died during the protected workload"
  onp=$(commit_records host1 "$IMG") || onp=
  ons=$(commit_records host2 "$COPY") || ons=
  res=$(python3 -c 'import sys; p=set(sys.argv[1].split()); s=set(sys.argv[2].split()); m=sorted(p-s, key=int); print(len(p), len(m), ",".join(m[:8]))' "$onp" "$ons")
  # shellcheck disable=SC2086 # split on purpose: count, missing, first missing
  set -- $res
  samples=$((samples + 1))
  [ "$1" -gt 0 ] && [ "$1" -lt "$COMMIT_RECORDS" ] && midway=$((midway + 1))
  if [ "$2" -gt 0 ]; then
    early=$((early + $2))
    [ -n "$early_first" ] || early_first="sample $samples: records ${3:-} on host1's image, not on host2's copy"
  fi
  sleep 1
done
lab_figure protected_workload_s "$(lab_since "$t1")"
echo "outside check: $samples samples ($midway during the writer), $early records on host1 before host2 had them ${early_first:+($early_first)}"
lab_figure outside_samples "$samples"
lab_figure outside_released_before_ack "$early"
[ "$early" = 0 ] || { commit_logs; lab_fail "$early records reached host1's image before host2's copy: $early_first"; }
[ "$midway" -ge 3 ] || lab_fail "only $midway samples of the images while the writer ran (need >= 3): the outside check saw too little"
pline=$(grep -oE 'kemari-disk done.*' "$console" | tail -1 | tr -d '\r')
echo "commit-pvh: $pline"
case "$pline" in *"failed=0"*) ;; *) lab_fail "writes failed in the protected guest: $pline" ;; esac
if lab_run host1 "grep -q 'SECONDARY LOST' /tmp/replicate-commit.log" 30; then
  commit_logs
  lab_fail "protection ended during the workload (see the logs above)"
fi
if [ "$COMMIT_NET" = 1 ]; then
  lab_step "dom0 <-> guest TCP under output commit"
  ok=0
  for _ in $(seq 120); do
    lab_run host1 "test -s /tmp/commit-net.done" 30 && { ok=1; break; }
    sleep 1
  done
  lab_figure net_workload_s "$(lab_since "$tn")"
  sink=$(lab_run host1 "cat /tmp/commit-net.sink" 30 | tr -d '[:space:]') || true
  echoes=$(lab_run host1 "grep -c '^commit-line-' /tmp/commit-net.echo" 30) || echoes=0
  lab_run host1 "head -2 /tmp/commit-net.echo; tail -1 /tmp/commit-net.echo" || true
  echo "guest's sink counted '$sink' bytes of $((COMMIT_NET_KIB * 1024)); $echoes of $COMMIT_NET_LINES lines echoed"
  [ "$ok" = 1 ] || { commit_logs; lab_fail "the TCP workload with the guest did not finish in 120 s after the disk writer"; }
  [ "$sink" = "$((COMMIT_NET_KIB * 1024))" ] || lab_fail "the guest's TCP sink counted '$sink' bytes, not $((COMMIT_NET_KIB * 1024))"
  [ "$echoes" = "$COMMIT_NET_LINES" ] || lab_fail "$echoes of $COMMIT_NET_LINES lines echoed by the guest"
fi

lab_step "held stop (SIGUSR1): the guest stays paused at the last ACK"
lab_run host1 'kill -USR1 "$(cat /tmp/replicate-commit.pid)"'
gone=0
for _ in $(seq 120); do
  if ! lab_run host1 'kill -0 "$(cat /tmp/replicate-commit.pid)" 2>/dev/null' 30; then gone=1; break; fi
  sleep 0.5
done
lab_run host1 "tail -30 /tmp/replicate-commit.log; cat /tmp/replicate-commit.json"
[ "$gone" = 1 ] || { commit_logs; lab_fail "kemari replicate still running 60 s after SIGUSR1"; }
rjson=$(lab_run host1 "head -1 /tmp/replicate-commit.json")
djson=$(lab_run host1 "sed -n 2p /tmp/replicate-commit.json")
vjson='{}'
[ "$COMMIT_NET" = 1 ] && vjson=$(lab_run host1 "sed -n 3p /tmp/replicate-commit.json")
st=$(lab_guest_state host1 commit-pvh)
case "$st" in *p*) ;; *) lab_fail "commit-pvh is not paused after the held stop (state '$st')" ;; esac
recv=
for _ in $(seq 60); do
  recv=$(lab_run host2 "cat /var/lib/kemari/receive-commit.json" 30) || true
  [ -n "$recv" ] && break
  sleep 1
done
lab_run host2 "tail -5 /var/lib/kemari/receive-commit.log"
echo "$rjson" >"$LAB_RUN/commit-replicate.json"
echo "$djson" >"$LAB_RUN/commit-disk.json"
echo "$recv" >"$LAB_RUN/commit-receive.json"
echo "$vjson" >"$LAB_RUN/commit-vif.json"
python3 - "$rjson" "$djson" "$recv" "$vjson" <<'PY' || lab_fail "replicate/receive results do not match (see above)"
import json, sys
r, d, v, n = (json.loads(x) for x in sys.argv[1:5])
print(f"replicate: last_seq={r['last_seq']} held_paused={r['held_paused']} checkpoints={r['checkpoints']['checkpoints']}", file=sys.stderr)
print(f"disk: {d}", file=sys.stderr)
print(f"receive: acked={v['acked']} checkpoints={v['checkpoints']} disk_entries={v['disk_entries']} error={v['error']}", file=sys.stderr)
assert r["held_paused"], "not held"
assert v["error"] is None, v["error"]
assert v["acked"] == r["last_seq"], (v["acked"], r["last_seq"])
assert d["last_ack"] == r["last_seq"], (d["last_ack"], r["last_seq"])
assert d["errors"] == 0, d
if n:
    print(f"vif: {n}", file=sys.stderr)
    assert n["device"] == "vif" and n["last_ack"] == r["last_seq"], n
    assert n["tx_errors"] == 0 and n["tx_held"] > 0 and n["connects"] == 1, n
PY

lab_step "every request and frame released after an ACK with seq >= its epoch"
lab_copy_out host1 "$LOG" "$LAB_RUN/commit.log"
cstats=$(python3 - "$LAB_RUN/commit.log" "$rjson" <<'PY'
import json, sys
# each line ends in gate=disk or gate=net: the disk and the NIC have a gate (and ACK lines) each
acked = {}; n = 0; bad = []; delays = []; ops = {}; acks = 0; ships = 0; shipped = 0
pk = 0; pbad = []
for line in open(sys.argv[1]):
    f = line.split()
    kv = dict(x.split("=", 1) for x in f[2:] if "=" in x)
    gate = kv.get("gate", "disk")
    if f[1] == "ack":
        seq = int(kv["seq"])
        # (under --suspend the disk's gate hears each seq twice: at the suspend and the ACK)
        if seq < acked.get(gate, 0):
            bad.append(f"{gate}: ACK {seq} after {acked[gate]}")
        acked[gate] = seq
        acks += gate == "disk"
    elif f[1] == "ship":
        ships += gate == "disk"; shipped += int(kv["entries"])
    elif f[1] == "release":
        epoch = int(kv["epoch"])
        a = acked.get(gate, 0)
        wrong = kv["acked"] == "end" or int(kv["acked"]) < epoch or a < epoch or int(kv["acked"]) > a
        if gate == "net":
            pk += 1
            if wrong or kv["op"] != "tx":
                pbad.append(line.strip())
            continue
        n += 1
        ops[kv["op"]] = ops.get(kv["op"], 0) + 1
        delays.append(int(kv["delay_us"]) / 1000)
        if wrong:
            bad.append(line.strip())
r = json.loads(sys.argv[2])
secs = r["protect_s"]
delays.sort()
mean = sum(delays) / len(delays) if delays else 0
p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))] if delays else 0
print(f"requests={n} ops={ops} acks={acks} ships={ships} log_entries={shipped} bad={len(bad)} first_bad={bad[:3]}", file=sys.stderr)
print(f"packets={pk} bad={len(pbad)} first_bad={pbad[:3]}", file=sys.stderr)
print(n, len(bad), f"{mean:.1f}", f"{p99:.1f}", acks, f"{r['checkpoints']['checkpoints'] / secs if secs else 0:.2f}", shipped, pk, len(pbad))
PY
)
# shellcheck disable=SC2086 # split on purpose
set -- $cstats
lab_figure requests "$1"
lab_figure released_before_ack "$2"
lab_figure release_delay_mean_ms "$3"
lab_figure release_delay_p99_ms "$4"
lab_figure checkpoints "$5"
lab_figure checkpoints_per_s "$6"
lab_figure disk_log_entries "$7"
[ "$2" = 0 ] || lab_fail "$2 requests were released before an ACK of their epoch"
[ "$1" -ge 1000 ] || lab_fail "only $1 requests in the run (need >= 1000)"
if [ "$COMMIT_NET" = 1 ]; then
  lab_figure packets "$8"
  lab_figure packets_released_before_ack "$9"
  [ "$9" = 0 ] || lab_fail "$9 frames of the guest were released before an ACK of their epoch"
  [ "$8" -ge 100 ] || lab_fail "only $8 frames from the guest in the run (need >= 100)"
fi

lab_step "the secondary's disk equals the primary's at the last ACK"
p=$(lab_run host1 "sha1sum $IMG" | cut -c1-40)
s=$(lab_run host2 "sha1sum $COPY" | cut -c1-40)
echo "primary $p, secondary $s"
[ "$p" = "$s" ] || lab_fail "disk images differ: primary $p, secondary $s"
lab_run host2 "lab-diskcheck $COPY" 300 | tee "$LAB_RUN/commit-diskcheck.txt"
grep -q "records=$COMMIT_RECORDS " "$LAB_RUN/commit-diskcheck.txt" || lab_fail "the secondary's copy does not hold the $COMMIT_RECORDS records"
# the receiver keeps the last applied checkpoint's log, checksummed (kemari debug disk-log reads it)
last=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["last_seq"])' "$rjson")
lab_run host2 "kemari debug disk-log /var/lib/kemari/spool-commit/disklog.kemari | head -3" | tee "$LAB_RUN/commit-disklog.txt"
grep -q "checkpoint $last," "$LAB_RUN/commit-disklog.txt" || lab_fail "the kept disk log is not checkpoint $last's"
lab_run host1 "xl destroy commit-pvh"

# mb/s and records/s from a "kemari-disk done" line
commit_rates() {
  echo "$1" | awk -v mib="$COMMIT_BULK" '{
    for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    printf "%.2f %.2f\n", (v["records_s"] > 0 ? v["records"] / v["records_s"] : 0), (v["bulk_s"] > 0 ? mib * 1.048576 / v["bulk_s"] : 0)
  }'
}
# shellcheck disable=SC2046
set -- $(commit_rates "$pline")
prec=$1 pmbs=$2

lab_step "the same workload unprotected (kemari attach), same run"
lab_run host1 "rm -f /var/lib/lab/commit-open.img && truncate -s ${COMMIT_IMG_MIB}M /var/lib/lab/commit-open.img"
lab_create_guest host1 pvh commit-open mem=128 paused=1 extra="lab.diskwriter=$COMMIT_RECORDS lab.diskbulk=$COMMIT_BULK"
lab_run host1 "setsid kemari attach commit-open --disk /var/lib/lab/commit-open.img --unpause >/var/log/kemari-attach-commit-open.log 2>&1 </dev/null &
  for i in \$(seq 1 100); do grep -q 'kemari attach: domain' /var/log/kemari-attach-commit-open.log && break; sleep 0.2; done
  cat /var/log/kemari-attach-commit-open.log"
lab_wait_console host1 commit-open 'kemari-disk done' 900 || lab_fail "the unprotected guest's disk writer did not finish"
uline=$(grep -oE 'kemari-disk done.*' "$(lab_guest_console_file host1 commit-open)" | tail -1 | tr -d '\r')
echo "commit-open: $uline"
lab_run host1 "xl destroy commit-open"
# shellcheck disable=SC2046
set -- $(commit_rates "$uline")
urec=$1 umbs=$2
lab_figure protected_records_per_s "$prec"
lab_figure unprotected_records_per_s "$urec"
lab_figure records_ratio "$(awk -v a="$prec" -v b="$urec" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
lab_figure protected_bulk_write_mbs "$pmbs"
lab_figure unprotected_bulk_write_mbs "$umbs"
lab_figure bulk_write_ratio "$(awk -v a="$pmbs" -v b="$umbs" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
