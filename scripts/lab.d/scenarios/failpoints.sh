# shellcheck shell=bash
# Scenario failpoints: the failover scenario once per kill point, in one lab session.
#
# Each point runs scenarios/failover.sh (the guest with its disk under output commit, protected
# from host1 to host2) with FO_KILL_AT=POINT: kemari replicate holds that point open
# (KEMARI_DEBUG_FAILPOINT) and host1 dies inside the window (docs/failover.md, kill points):
#   replicate                only host1's kemari replicate is SIGKILLed (host1 lives): its fence
#                            guard stops the guest before host2 declares the primary dead, host2
#                            resumes it (FO_KILL=replicate)
#   initial-sync             host1 dies during the initial sync: host2 refuses (no consistent
#                            replica), starts nothing; the guest is lost with host1
#   mid-checkpoint           checkpoint N staged, guest stopped, frame not sent: host2 resumes N-1
#   between-ack-and-release  N ACKed, its output not released yet: host2 resumes N
#   idle                     between checkpoints: host2 resumes the last ACK
# and for each but initial-sync: the guest goes on on host2 and every disk write the guest saw
# acknowledged on host1 is on host2's disk (0 lost). The hosts are linked by UDP sockets
# (LAB_NET_MODE=udp) so that only host1 boots again after a kill.
#
# Knobs: FP_POINTS (default: all five, in the order above), FP_KILL_SEQ (checkpoint at which
# the window opens, default 6). One line per point: "failpoint POINT: PASS|FAIL ... figures".

export LAB_NET_MODE=udp
FP_POINTS=${FP_POINTS:-replicate initial-sync mid-checkpoint between-ack-and-release idle}
FP_KILL_SEQ=${FP_KILL_SEQ:-6}
fp_lines=() fp_failed=0
mv -f "$LAB_RUN/.figures" "$LAB_RUN/.figures.failpoints" 2>/dev/null || true
for fp in $FP_POINTS; do
  lab_say "==== failpoint $fp"
  t_fp=$(lab_now)
  rm -f "$LAB_RUN/.figures" "$LAB_RUN/.why"
  # what an earlier point left running on a surviving host (its ports, its guard)
  for h in host1 host2; do
    lab_host_alive "$h" || continue
    # shellcheck disable=SC2016 # expanded in dom0
    lab_run "$h" 'for f in /var/lib/kemari/receive-fo.pid /tmp/replicate-fo.pid; do [ -s $f ] && kill -KILL $(cat $f) 2>/dev/null; rm -f $f; done; true' 30 || true
  done
  case "$fp" in
    replicate) kill=replicate at=random ;;
    initial-sync | mid-checkpoint | between-ack-and-release | idle) kill=host1 at=$fp ;;
    *) lab_fail "FP_POINTS: unknown point '$fp'" ;;
  esac
  set +e
  (
    set -e
    FO_KILL=$kill FO_KILL_AT=$at FO_KILL_SEQ=$FP_KILL_SEQ FO_PROTECT_S=8 FO_DISK=1 FO_TCP=0
    # shellcheck source=failover.sh
    source "$LAB_DIR/scenarios/failover.sh"
  )
  rc=$?
  set -e
  figs=$(tr '\n' ' ' <"$LAB_RUN/.figures" 2>/dev/null || true)
  why=$(cat "$LAB_RUN/.why" 2>/dev/null || true)
  if [ "$rc" = 0 ]; then
    line="failpoint $fp: PASS ${figs}seconds=$(lab_since "$t_fp")"
  else
    fp_failed=$((fp_failed + 1))
    line="failpoint $fp: FAIL${why:+ ($why)} ${figs}seconds=$(lab_since "$t_fp")"
  fi
  fp_lines+=("$line")
  echo "$line" | tee -a "$LAB_RUN/failpoints.txt" >&2
done
rm -f "$LAB_RUN/.figures" "$LAB_RUN/.why"
mv -f "$LAB_RUN/.figures.failpoints" "$LAB_RUN/.figures" 2>/dev/null || true
lab_step "summary"
printf '%s\n' "${fp_lines[@]}" >&2
lab_figure points "$(echo "$FP_POINTS" | wc -w)"
lab_figure failed "$fp_failed"
[ "$fp_failed" = 0 ] || lab_fail "$fp_failed of the kill points failed (see failpoints.txt)"
