//! Failure detection: a heartbeat between the primary and the secondary, separate from the
//! checkpoint stream.
//!
//! Why UDP and not a second TCP connection: a heartbeat must say "the peer is alive *now*". A
//! TCP connection to a host that lost power neither fails nor answers: writes are buffered and
//! retransmitted for minutes, so its only signal is the same silence a datagram gives, with
//! head-of-line blocking and retransmission added. Datagrams carry no state to rebuild, a lost
//! one is simply a miss, and a busy checkpoint stream (megabytes in the socket buffers) cannot
//! delay them.
//!
//! The protocol: the primary (`Role::Pinger`) sends a [`Beat`] `Ping` every period to the
//! secondary's heartbeat address; the secondary (`Role::Responder`) answers each valid ping
//! with a `Pong` to its source address. Each side feeds what it hears into a [`Monitor`]: the
//! pure state machine below, driven by a [`Clock`] so that tests run on a deterministic clock.
//! A primary that ends protection on purpose sends `Bye`, so the secondary knows not to fail
//! over.
//!
//! ```text
//!   Connecting --heard--> Alive --(1 missed)--> Suspect --(N missed)--> Dead
//!       |                   ^                      |
//!       |                   +-------heard----------+    (heard again: Alive, unless the
//!       +--(connect timeout)--> Dead                      data stream was lost)
//!   any --Bye--> Ended            Dead and Ended are final
//! ```
//!
//! A heartbeat counts as missed once it is half a period overdue: silent for `s` since the
//! last one heard, `missed = (s - period/2) / period`. With the defaults (100 ms, 5 misses) a
//! dead peer is declared 550 ms after its last heartbeat.
//!
//! A data-stream error counts as a loss too: after [`Monitor::stream_lost`] the peer is never
//! `Alive` again, and a single missed heartbeat is enough for `Dead`. The heartbeat is still
//! required to agree, which is the split-brain guard: a primary whose stream broke but which
//! still answers is alive, and the secondary must not start a second copy of its guest.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Errors of the heartbeat.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// The configuration cannot work.
    #[error("heartbeat configuration: {0}")]
    Config(String),
    /// A socket operation failed.
    #[error("heartbeat socket: {what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A datagram is not a heartbeat.
    #[error("not a heartbeat datagram ({len} bytes): {why}")]
    Malformed {
        /// Its length.
        len: usize,
        /// What is wrong.
        why: &'static str,
    },
}

/// A monotonic clock: time since an arbitrary origin.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> Duration;
}

/// The real monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> SystemClock {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct FakeClock {
    now: Mutex<Duration>,
}

impl FakeClock {
    /// A clock at `start`.
    pub fn new(start: Duration) -> FakeClock {
        FakeClock {
            now: Mutex::new(start),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Duration> {
        self.now.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut now = self.lock();
        *now = now.saturating_add(d);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Duration {
        *self.lock()
    }
}

/// Heartbeat timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// One heartbeat per period.
    pub period: Duration,
    /// The peer is dead after this many missed heartbeats.
    pub misses: u32,
    /// Before the first heartbeat is heard: give up after this long (`None`: wait forever).
    pub connect_timeout: Option<Duration>,
}

impl Default for HeartbeatConfig {
    /// 100 ms x 5: a dead peer is declared 550 ms after its last heartbeat.
    fn default() -> Self {
        HeartbeatConfig {
            period: Duration::from_millis(100),
            misses: 5,
            connect_timeout: None,
        }
    }
}

impl HeartbeatConfig {
    /// Checks that the configuration can work.
    pub fn validate(&self) -> Result<(), HeartbeatError> {
        if self.period < Duration::from_millis(1) {
            return Err(HeartbeatError::Config(format!(
                "period {:?} is below 1 ms",
                self.period
            )));
        }
        if self.period > Duration::from_secs(3600) {
            return Err(HeartbeatError::Config(format!(
                "period {:?} is above one hour",
                self.period
            )));
        }
        if self.misses == 0 {
            return Err(HeartbeatError::Config(
                "misses must be at least 1".to_string(),
            ));
        }
        Ok(())
    }

    /// How long after the last heartbeat heard the peer is declared dead.
    pub fn detection_time(&self) -> Duration {
        self.period
            .saturating_mul(self.misses)
            .saturating_add(self.period / 2)
    }
}

/// Why the peer is considered dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathCause {
    /// Its heartbeats stopped.
    Missed {
        /// Heartbeats missed.
        missed: u32,
        /// Silence since the last one heard.
        silent: Duration,
        /// The data stream had been lost before.
        stream_lost: bool,
    },
    /// Nothing was ever heard within the connect timeout.
    NeverHeard {
        /// How long we waited.
        waited: Duration,
    },
}

/// What we know about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Nothing heard yet.
    Connecting,
    /// Heard within the last period (and half).
    Alive,
    /// Heartbeats missed (fewer than the limit), or the data stream was lost.
    Suspect {
        /// Heartbeats missed.
        missed: u32,
        /// The data stream was lost.
        stream_lost: bool,
    },
    /// The peer is gone (final).
    Dead(DeathCause),
    /// The peer said goodbye: it ended protection on purpose (final).
    Ended,
}

impl PeerState {
    /// Final states: nothing heard later changes them.
    pub fn is_final(&self) -> bool {
        matches!(self, PeerState::Dead(_) | PeerState::Ended)
    }
}

/// The failure detector: a pure state machine over events and times (see the module docs).
#[derive(Debug, Clone)]
pub struct Monitor {
    cfg: HeartbeatConfig,
    started: Duration,
    last_heard: Option<Duration>,
    stream_lost: bool,
    state: PeerState,
}

impl Monitor {
    /// A monitor started at `now`.
    pub fn new(cfg: HeartbeatConfig, now: Duration) -> Result<Monitor, HeartbeatError> {
        cfg.validate()?;
        Ok(Monitor {
            cfg,
            started: now,
            last_heard: None,
            stream_lost: false,
            state: PeerState::Connecting,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HeartbeatConfig {
        &self.cfg
    }

    /// The state as of the last event or poll.
    pub fn state(&self) -> PeerState {
        self.state
    }

    /// When the last heartbeat was heard.
    pub fn last_heard(&self) -> Option<Duration> {
        self.last_heard
    }

    /// A valid heartbeat arrived at `now`.
    pub fn heard(&mut self, now: Duration) -> PeerState {
        if !self.state.is_final() {
            // Clocks never go back, but keep the latest time if events arrive out of order.
            self.last_heard = Some(self.last_heard.map_or(now, |l| l.max(now)));
        }
        self.poll(now)
    }

    /// The peer said goodbye.
    pub fn bye(&mut self) -> PeerState {
        if !self.state.is_final() {
            self.state = PeerState::Ended;
        }
        self.state
    }

    /// The data stream to the peer failed at `now`.
    pub fn stream_lost(&mut self, now: Duration) -> PeerState {
        self.stream_lost = true;
        self.poll(now)
    }

    /// Re-evaluates the state at `now`.
    pub fn poll(&mut self, now: Duration) -> PeerState {
        if self.state.is_final() {
            return self.state;
        }
        let limit = if self.stream_lost { 1 } else { self.cfg.misses };
        self.state = match self.last_heard {
            None => {
                let waited = now.saturating_sub(self.started);
                match self.cfg.connect_timeout {
                    Some(t) if waited >= t => PeerState::Dead(DeathCause::NeverHeard { waited }),
                    _ if self.stream_lost => PeerState::Suspect {
                        missed: 0,
                        stream_lost: true,
                    },
                    _ => PeerState::Connecting,
                }
            }
            Some(last) => {
                let silent = now.saturating_sub(last);
                let overdue = silent.saturating_sub(self.cfg.period / 2);
                let missed = u32::try_from(overdue.as_nanos() / self.cfg.period.as_nanos())
                    .unwrap_or(u32::MAX);
                if missed >= limit {
                    PeerState::Dead(DeathCause::Missed {
                        missed,
                        silent,
                        stream_lost: self.stream_lost,
                    })
                } else if missed > 0 || self.stream_lost {
                    PeerState::Suspect {
                        missed,
                        stream_lost: self.stream_lost,
                    }
                } else {
                    PeerState::Alive
                }
            }
        };
        self.state
    }
}

/// Kinds of heartbeat datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeatKind {
    /// Primary -> secondary, every period.
    Ping,
    /// Secondary -> primary, the answer to a ping.
    Pong,
    /// Primary -> secondary: protection ended on purpose, do not fail over.
    Bye,
}

/// One heartbeat datagram: `"KMHB"`, version 1, kind, 2 zero bytes, u64 LE sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// Its kind.
    pub kind: BeatKind,
    /// Sequence number (a pong echoes its ping's).
    pub seq: u64,
}

/// Size of an encoded [`Beat`].
pub const BEAT_LEN: usize = 16;
const MAGIC: &[u8; 4] = b"KMHB";
const VERSION: u8 = 1;

impl Beat {
    /// Encodes the datagram.
    pub fn encode(&self) -> [u8; BEAT_LEN] {
        let mut b = [0u8; BEAT_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4] = VERSION;
        b[5] = match self.kind {
            BeatKind::Ping => 1,
            BeatKind::Pong => 2,
            BeatKind::Bye => 3,
        };
        b[8..].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// Decodes a datagram; anything else than exactly one valid beat is refused.
    pub fn decode(data: &[u8]) -> Result<Beat, HeartbeatError> {
        let bad = |why| HeartbeatError::Malformed {
            len: data.len(),
            why,
        };
        let b: &[u8; BEAT_LEN] = data.try_into().map_err(|_| bad("wrong length"))?;
        if &b[..4] != MAGIC {
            return Err(bad("wrong magic"));
        }
        if b[4] != VERSION {
            return Err(bad("unknown version"));
        }
        if b[6] != 0 || b[7] != 0 {
            return Err(bad("reserved bytes not zero"));
        }
        let kind = match b[5] {
            1 => BeatKind::Ping,
            2 => BeatKind::Pong,
            3 => BeatKind::Bye,
            _ => return Err(bad("unknown kind")),
        };
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[8..]);
        Ok(Beat {
            kind,
            seq: u64::from_le_bytes(seq),
        })
    }
}

/// Which end of the heartbeat this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The primary: pings `peer` every period, hears pongs.
    Pinger {
        /// The secondary's heartbeat address.
        peer: SocketAddr,
    },
    /// The secondary: hears pings and answers each with a pong.
    Responder,
}

/// Called once when the peer becomes dead.
pub type OnDead = Box<dyn FnOnce(PeerState) + Send>;

/// Called after each ping a pinger sends.
pub type OnPing = Box<dyn Fn() + Send>;

struct Shared {
    monitor: Mutex<Monitor>,
    clock: Arc<dyn Clock>,
    stop: AtomicBool,
}

impl Shared {
    fn monitor(&self) -> MutexGuard<'_, Monitor> {
        self.monitor.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running heartbeat (one thread).
pub struct Heartbeat {
    shared: Arc<Shared>,
    socket: UdpSocket,
    role: Role,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("role", &self.role)
            .field("state", &self.state())
            .finish()
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HeartbeatError {
    let what = what.into();
    move |source| HeartbeatError::Io { what, source }
}

impl Heartbeat {
    /// Starts the heartbeat on `socket` (bound by the caller). `on_dead` runs once, on the
    /// heartbeat's thread, when the peer is declared dead.
    pub fn spawn(
        socket: UdpSocket,
        role: Role,
        cfg: HeartbeatConfig,
        clock: Arc<dyn Clock>,
        on_dead: OnDead,
    ) -> Result<Heartbeat, HeartbeatError> {
        Heartbeat::spawn_with_ping_hook(socket, role, cfg, clock, on_dead, None)
    }

    /// As [`spawn`](Self::spawn), calling `on_ping` on the heartbeat's thread right after each
    /// ping is sent (the fencing guard's tick: its guardian hears the primary exactly as long
    /// as the secondary does).
    pub fn spawn_with_ping_hook(
        socket: UdpSocket,
        role: Role,
        cfg: HeartbeatConfig,
        clock: Arc<dyn Clock>,
        on_dead: OnDead,
        on_ping: Option<OnPing>,
    ) -> Result<Heartbeat, HeartbeatError> {
        let monitor = Monitor::new(cfg, clock.now())?;
        // Wake up four times per period: a miss is noticed within a quarter period.
        let tick = (cfg.period / 4).max(Duration::from_millis(1));
        socket
            .set_read_timeout(Some(tick))
            .map_err(io_err("setting the receive timeout"))?;
        let shared = Arc::new(Shared {
            monitor: Mutex::new(monitor),
            clock,
            stop: AtomicBool::new(false),
        });
        let thread_socket = socket.try_clone().map_err(io_err("cloning the socket"))?;
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || run(thread_socket, role, cfg, thread_shared, on_dead, on_ping))
            .map_err(io_err("starting the heartbeat thread"))?;
        Ok(Heartbeat {
            shared,
            socket,
            role,
            thread: Some(thread),
        })
    }

    /// The peer's state now.
    pub fn state(&self) -> PeerState {
        let now = self.shared.clock.now();
        self.shared.monitor().poll(now)
    }

    /// How long ago the last heartbeat was heard (`None`: never).
    pub fn silent_for(&self) -> Option<Duration> {
        let now = self.shared.clock.now();
        self.shared
            .monitor()
            .last_heard()
            .map(|l| now.saturating_sub(l))
    }

    /// The data stream failed: the peer is dead as soon as one heartbeat is missed.
    pub fn stream_lost(&self) -> PeerState {
        let now = self.shared.clock.now();
        self.shared.monitor().stream_lost(now)
    }

    /// Waits until the state is final or `timeout` passed; returns the state.
    pub fn wait_final(&self, timeout: Duration) -> PeerState {
        let start = Instant::now();
        loop {
            let s = self.state();
            if s.is_final() || start.elapsed() >= timeout {
                return s;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the heartbeat; a pinger first tells the peer goodbye (protection ended on
    /// purpose), so it does not fail over.
    pub fn stop(mut self, bye: bool) {
        if let (true, Role::Pinger { peer }) = (bye, self.role) {
            let beat = Beat {
                kind: BeatKind::Bye,
                seq: u64::MAX,
            };
            // Datagrams get lost: say it three times.
            for _ in 0..3 {
                if let Err(e) = self.socket.send_to(&beat.encode(), peer) {
                    log::warn!("heartbeat: cannot send goodbye to {peer}: {e}");
                    break;
                }
            }
        }
        self.halt();
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("heartbeat thread panicked");
            }
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(
    socket: UdpSocket,
    role: Role,
    cfg: HeartbeatConfig,
    shared: Arc<Shared>,
    on_dead: OnDead,
    on_ping: Option<OnPing>,
) {
    let mut on_dead = Some(on_dead);
    let mut next_ping = shared.clock.now();
    let mut seq = 0u64;
    let mut malformed = 0u64;
    let mut buf = [0u8; 64];
    while !shared.stop.load(Ordering::SeqCst) {
        let now = shared.clock.now();
        if let Role::Pinger { peer } = role {
            if now >= next_ping {
                seq += 1;
                let beat = Beat {
                    kind: BeatKind::Ping,
                    seq,
                };
                if let Err(e) = socket.send_to(&beat.encode(), peer) {
                    // Unreachable peers show up as misses; say it once per burst only.
                    log::debug!("heartbeat: sending ping {seq} to {peer}: {e}");
                }
                if let Some(f) = &on_ping {
                    f();
                }
                next_ping = now.saturating_add(cfg.period);
            }
        }
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => match Beat::decode(buf.get(..n).unwrap_or(&[])) {
                Ok(beat) => handle(&socket, role, &shared, beat, from),
                Err(e) => {
                    malformed += 1;
                    // Anyone can send datagrams: log the first, then every 1000th.
                    if malformed == 1 || malformed % 1000 == 0 {
                        log::warn!("heartbeat: {e} from {from} ({malformed} so far), ignored");
                    }
                }
            },
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            // ECONNREFUSED after a ping to a closed port: the peer is not there, a miss.
            Err(e) => {
                log::debug!("heartbeat: receive: {e}");
                std::thread::sleep((cfg.period / 4).max(Duration::from_millis(1)));
            }
        }
        let state = shared.monitor().poll(shared.clock.now());
        if state.is_final() {
            if let (PeerState::Dead(_), Some(f)) = (state, on_dead.take()) {
                f(state);
            }
            break;
        }
    }
}

fn handle(socket: &UdpSocket, role: Role, shared: &Shared, beat: Beat, from: SocketAddr) {
    let now = shared.clock.now();
    match (role, beat.kind) {
        (Role::Responder, BeatKind::Ping) => {
            shared.monitor().heard(now);
            let pong = Beat {
                kind: BeatKind::Pong,
                seq: beat.seq,
            };
            if let Err(e) = socket.send_to(&pong.encode(), from) {
                log::debug!("heartbeat: answering ping {} from {from}: {e}", beat.seq);
            }
        }
        (Role::Responder, BeatKind::Bye) => {
            shared.monitor().bye();
        }
        (Role::Pinger { peer }, BeatKind::Pong) if from == peer => {
            shared.monitor().heard(now);
        }
        (_, kind) => log::debug!("heartbeat: unexpected {kind:?} from {from}, ignored"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg(period_ms: u64, misses: u32) -> HeartbeatConfig {
        HeartbeatConfig {
            period: MS * period_ms as u32,
            misses,
            connect_timeout: None,
        }
    }

    fn dead(s: PeerState) -> bool {
        matches!(s, PeerState::Dead(_))
    }

    #[test]
    fn alive_peer_stays_alive_with_jitter() {
        let clock = FakeClock::new(Duration::from_secs(7));
        let mut m = Monitor::new(cfg(100, 5), clock.now()).unwrap();
        assert_eq!(m.poll(clock.now()), PeerState::Connecting);
        // Heartbeats every 100 ms, each up to 40 ms late or early.
        for i in 0..200u32 {
            clock.advance(MS * if i % 2 == 0 { 140 } else { 60 });
            assert_eq!(m.heard(clock.now()), PeerState::Alive, "beat {i}");
            clock.advance(MS * 20);
            assert_eq!(m.poll(clock.now()), PeerState::Alive);
        }
    }

    #[test]
    fn dead_after_n_misses_exactly() {
        let clock = FakeClock::new(Duration::ZERO);
        let c = cfg(100, 5);
        let mut m = Monitor::new(c, clock.now()).unwrap();
        m.heard(clock.now());
        clock.advance(MS * 149);
        assert_eq!(m.poll(clock.now()), PeerState::Alive);
        clock.advance(MS);
        assert_eq!(
            m.poll(clock.now()),
            PeerState::Suspect {
                missed: 1,
                stream_lost: false
            }
        );
        clock.advance(MS * 300);
        assert_eq!(
            m.poll(clock.now()),
            PeerState::Suspect {
                missed: 4,
                stream_lost: false
            }
        );
        clock.advance(MS * 99);
        assert!(!dead(m.poll(clock.now())));
        clock.advance(MS);
        assert_eq!(c.detection_time(), MS * 550);
        assert_eq!(
            m.poll(clock.now()),
            PeerState::Dead(DeathCause::Missed {
                missed: 5,
                silent: MS * 550,
                stream_lost: false
            })
        );
    }

    #[test]
    fn suspect_recovers_but_dead_is_final() {
        let clock = FakeClock::new(Duration::ZERO);
        let mut m = Monitor::new(cfg(10, 3), clock.now()).unwrap();
        m.heard(clock.now());
        clock.advance(MS * 25);
        assert!(matches!(
            m.poll(clock.now()),
            PeerState::Suspect { missed: 2, .. }
        ));
        assert_eq!(m.heard(clock.now()), PeerState::Alive);
        clock.advance(MS * 35);
        assert!(dead(m.poll(clock.now())));
        // A late heartbeat does not bring a dead peer back: failover may have begun.
        assert!(dead(m.heard(clock.now())));
        assert!(dead(m.bye()));
        assert_eq!(m.last_heard(), Some(MS * 25));
    }

    #[test]
    fn connecting_waits_forever_or_until_the_connect_timeout() {
        let clock = FakeClock::new(Duration::ZERO);
        let mut m = Monitor::new(cfg(100, 5), clock.now()).unwrap();
        clock.advance(Duration::from_secs(3600));
        assert_eq!(m.poll(clock.now()), PeerState::Connecting);

        let mut c = cfg(100, 5);
        c.connect_timeout = Some(Duration::from_secs(2));
        let mut m = Monitor::new(c, clock.now()).unwrap();
        clock.advance(MS * 1999);
        assert_eq!(m.poll(clock.now()), PeerState::Connecting);
        clock.advance(MS);
        assert_eq!(
            m.poll(clock.now()),
            PeerState::Dead(DeathCause::NeverHeard {
                waited: Duration::from_secs(2)
            })
        );
    }

    #[test]
    fn stream_loss_needs_one_missed_heartbeat() {
        let clock = FakeClock::new(Duration::ZERO);
        let mut m = Monitor::new(cfg(100, 5), clock.now()).unwrap();
        m.heard(clock.now());
        clock.advance(MS * 20);
        // The peer still answers: suspect, never dead (split-brain guard), never alive again.
        assert_eq!(
            m.stream_lost(clock.now()),
            PeerState::Suspect {
                missed: 0,
                stream_lost: true
            }
        );
        for _ in 0..50 {
            clock.advance(MS * 100);
            assert_eq!(
                m.heard(clock.now()),
                PeerState::Suspect {
                    missed: 0,
                    stream_lost: true
                }
            );
        }
        clock.advance(MS * 149);
        assert!(!dead(m.poll(clock.now())));
        clock.advance(MS);
        assert_eq!(
            m.poll(clock.now()),
            PeerState::Dead(DeathCause::Missed {
                missed: 1,
                silent: MS * 150,
                stream_lost: true
            })
        );
    }

    #[test]
    fn stream_loss_before_any_heartbeat_is_not_death() {
        let clock = FakeClock::new(Duration::ZERO);
        let mut m = Monitor::new(cfg(100, 5), clock.now()).unwrap();
        clock.advance(Duration::from_secs(10));
        assert_eq!(
            m.stream_lost(clock.now()),
            PeerState::Suspect {
                missed: 0,
                stream_lost: true
            }
        );
    }

    #[test]
    fn bye_ends_without_death() {
        let clock = FakeClock::new(Duration::ZERO);
        let mut m = Monitor::new(cfg(100, 5), clock.now()).unwrap();
        m.heard(clock.now());
        assert_eq!(m.bye(), PeerState::Ended);
        clock.advance(Duration::from_secs(60));
        assert_eq!(m.poll(clock.now()), PeerState::Ended);
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(Monitor::new(cfg(0, 5), Duration::ZERO).is_err());
        assert!(Monitor::new(cfg(100, 0), Duration::ZERO).is_err());
        assert!(HeartbeatConfig::default().validate().is_ok());
        assert_eq!(HeartbeatConfig::default().detection_time(), MS * 550);
    }

    #[test]
    fn beat_round_trip_and_garbage() {
        for kind in [BeatKind::Ping, BeatKind::Pong, BeatKind::Bye] {
            let b = Beat {
                kind,
                seq: 0x0102_0304_0506_0708,
            };
            assert_eq!(Beat::decode(&b.encode()).unwrap(), b);
        }
        let good = Beat {
            kind: BeatKind::Ping,
            seq: 1,
        }
        .encode();
        assert!(Beat::decode(&good[..15]).is_err());
        let mut long = good.to_vec();
        long.push(0);
        assert!(Beat::decode(&long).is_err());
        for (i, v) in [(0, b'X'), (4, 2), (5, 0), (5, 4), (6, 1), (7, 1)] {
            let mut b = good;
            b[i] = v;
            assert!(Beat::decode(&b).is_err(), "byte {i} = {v}");
        }
    }

    /// The threads over loopback UDP, on the real clock with generous periods: the pinger and
    /// responder see each other alive; when the pinger stops without goodbye, the responder
    /// declares it dead and runs its callback once; with goodbye, it ends without death.
    #[test]
    fn udp_pinger_and_responder() {
        let c = cfg(20, 10);
        for bye in [false, true] {
            let rs = UdpSocket::bind("127.0.0.1:0").unwrap();
            let raddr = rs.local_addr().unwrap();
            let deaths = Arc::new(Mutex::new(Vec::new()));
            let d = deaths.clone();
            let responder = Heartbeat::spawn(
                rs,
                Role::Responder,
                c,
                Arc::new(SystemClock::new()),
                Box::new(move |s| d.lock().unwrap().push(s)),
            )
            .unwrap();
            let pings = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let p = pings.clone();
            let pinger = Heartbeat::spawn_with_ping_hook(
                UdpSocket::bind("127.0.0.1:0").unwrap(),
                Role::Pinger { peer: raddr },
                c,
                Arc::new(SystemClock::new()),
                Box::new(|_| {}),
                Some(Box::new(move || {
                    p.fetch_add(1, Ordering::SeqCst);
                })),
            )
            .unwrap();
            let start = Instant::now();
            while (pinger.state() != PeerState::Alive || responder.state() != PeerState::Alive)
                && start.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(MS * 5);
            }
            assert_eq!(pinger.state(), PeerState::Alive);
            assert_eq!(responder.state(), PeerState::Alive);
            // Garbage is ignored.
            UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .send_to(b"hello", raddr)
                .unwrap();
            // the ping hook ran once per ping sent, and stops with the pinger
            assert!(pings.load(Ordering::SeqCst) >= 1);
            pinger.stop(bye);
            let after_stop = pings.load(Ordering::SeqCst);
            let end = responder.wait_final(Duration::from_secs(10));
            assert_eq!(pings.load(Ordering::SeqCst), after_stop);
            if bye {
                assert_eq!(end, PeerState::Ended);
                std::thread::sleep(MS * 50);
                assert!(deaths.lock().unwrap().is_empty());
            } else {
                assert!(dead(end), "{end:?}");
                let start = Instant::now();
                while deaths.lock().unwrap().is_empty() && start.elapsed() < Duration::from_secs(5)
                {
                    std::thread::sleep(MS * 5);
                }
                assert_eq!(deaths.lock().unwrap().len(), 1);
                assert!(responder.silent_for().unwrap() >= c.detection_time());
            }
        }
    }
}
