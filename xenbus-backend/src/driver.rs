//! The xenbus device lifecycle every backend shares: one driver for [`crate::blkback`] and
//! [`crate::netback`].
//!
//! A backend keeps its xenbus side in a [`Bus`] (xenstore and event channel handles, the
//! device's paths, its [`BackendState`], the failure and gone flags, the watch token and the
//! bad-request log) and implements [`Backend`] for what differs per device: connecting to the
//! frontend's nodes, serving the rings, disconnecting, and how its errors are built. The
//! driver's provided methods own the rest: the frontend watch, checked state transitions,
//! the reaction to the frontend's state ([`crate::state::react`]), the event dispatch of a
//! poll, the run loop, the failure path (logged once, published in `kemari-error`,
//! `Closing`/`Closed`) and the removal of the device's nodes at shutdown.
//!
//! Guest requests a backend refuses go through [`Bus::bad_request`], which counts nothing
//! itself and rate-limits the log ([`crate::device::BadRequestLog`]): a guest cannot flood
//! dom0's logs.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hypervisor::{EventChannels, HypervisorError, Port, XenStore};

use crate::device::{self, BadRequestLog, DeviceError, DevicePaths};
use crate::state::{react, BackendState, Reaction, XenbusState};

/// How often [`Backend::run_until`] checks its stop flag.
pub const RUN_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The xenbus side of one backend device.
pub struct Bus {
    pub(crate) xs: Box<dyn XenStore>,
    pub(crate) evtchn: Box<dyn EventChannels>,
    pub(crate) paths: DevicePaths,
    pub(crate) state: BackendState,
    /// Why the device was ended by a protocol error.
    pub(crate) failure: Option<String>,
    /// The frontend's directory is gone.
    pub(crate) gone: bool,
    token: String,
    bad_log: BadRequestLog,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("paths", &self.paths)
            .field("state", &self.state)
            .field("failure", &self.failure)
            .field("gone", &self.gone)
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// A device in state `Unknown`, its watch token `<backend_type>/<domid>/<devid>`.
    pub(crate) fn new(
        xs: Box<dyn XenStore>,
        evtchn: Box<dyn EventChannels>,
        paths: DevicePaths,
        backend_type: &str,
    ) -> Bus {
        let token = format!("{backend_type}/{}/{}", paths.domid, paths.devid);
        Bus {
            xs,
            evtchn,
            paths,
            state: BackendState::Xenbus(XenbusState::Unknown),
            failure: None,
            gone: false,
            token,
            bad_log: BadRequestLog::default(),
        }
    }

    /// The one path for a guest request a backend refuses or fails: the answer is the
    /// backend's, the log line goes through the device's rate limit (`kind` names the device
    /// in the line that says further ones go to debug level). True if logged at warn level.
    pub(crate) fn bad_request(&mut self, kind: &str, msg: std::fmt::Arguments<'_>) -> bool {
        self.bad_log.log(&self.paths.backend, kind, msg)
    }

    /// Waits up to `timeout` (`None`: forever) for the xenstore or event channel fd, or one
    /// of `extra`; returns, per `extra` fd, whether it has events. An interrupted wait is a
    /// wake-up with nothing ready.
    pub(crate) fn wait(
        &self,
        extra: &[BorrowedFd<'_>],
        timeout: Option<Duration>,
    ) -> Result<Vec<bool>, nix::Error> {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        let t = match timeout {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = vec![
            PollFd::new(self.xs.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.evtchn.as_fd(), PollFlags::POLLIN),
        ];
        fds.extend(
            extra
                .iter()
                .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN)),
        );
        match nix::poll::poll(&mut fds, t) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(e),
        }
        Ok(fds
            .iter()
            .skip(2)
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect())
    }
}

/// What differs per device kind; the provided methods are the shared lifecycle.
pub(crate) trait Backend {
    /// The device's error type.
    type Error: From<DeviceError> + std::fmt::Display;
    /// Names the device in log lines ("device", "vif").
    const KIND: &'static str;

    /// The xenbus side.
    fn bus(&self) -> &Bus;
    /// The xenbus side, mutable.
    fn bus_mut(&mut self) -> &mut Bus;
    /// A hypervisor call of this device failed while doing `what`.
    fn hv_err(paths: &DevicePaths, what: String, source: HypervisorError) -> Self::Error;
    /// A dom0-side failure while connecting (returned to the caller) rather than a frontend
    /// the device cannot serve (which ends the device).
    fn is_dom0_failure(e: &Self::Error) -> bool;
    /// Maps the rings and binds the event channel the frontend published.
    fn connect_frontend(&mut self) -> Result<(), Self::Error>;
    /// Logs the connection just made.
    fn log_connected(&self);
    /// Stops serving: unbinds, unmaps, drops per-connection state. Idempotent.
    fn disconnect(&mut self);
    /// Serves whatever the rings hold; a protocol error ends the device via [`Self::fail`].
    fn serve(&mut self) -> Result<(), Self::Error>;
    /// The local event channel port while connected.
    fn local_port(&self) -> Option<Port>;
    /// One wait for events and their handling (the backend's `poll`).
    fn poll_once(&mut self, timeout: Option<Duration>) -> Result<(), Self::Error>;

    /// Watches the frontend's `state` node.
    fn start_watch(&mut self) -> Result<(), Self::Error> {
        let bus = self.bus();
        let path = bus.paths.frontend_state();
        bus.xs
            .watch(&path, &bus.token)
            .map_err(|source| Self::hv_err(&bus.paths, format!("watching {path}"), source))
    }

    /// A checked state change, published.
    fn set_state(&mut self, to: BackendState) -> Result<(), Self::Error> {
        let bus = self.bus_mut();
        device::publish_state(bus.xs.as_ref(), &bus.paths, bus.state, to)?;
        log::debug!("{}: {} -> {}", bus.paths.backend, bus.state, to);
        bus.state = to;
        Ok(())
    }

    /// Takes the pending xenstore watch events and kicks: reacts to the frontend, serves the
    /// ring, unmasks the port and serves again (RING_FINAL_CHECK after unmask). True if a
    /// kick was served.
    fn dispatch(&mut self) -> Result<bool, Self::Error> {
        loop {
            let bus = self.bus();
            let ev = bus
                .xs
                .read_watch(Some(Duration::ZERO))
                .map_err(|e| Self::hv_err(&bus.paths, "reading xenstore watches".into(), e))?;
            let Some(ev) = ev else { break };
            if ev.token == self.bus().token {
                self.frontend_changed()?;
            }
        }
        let mut served = false;
        loop {
            let bus = self.bus();
            let port = bus
                .evtchn
                .pending()
                .map_err(|e| Self::hv_err(&bus.paths, "taking a pending event".into(), e))?;
            let Some(port) = port else { break };
            if self.local_port() == Some(port) {
                self.serve()?;
                served = true;
            }
            // the port may have been unbound by a protocol error meanwhile
            if self.local_port() == Some(port) {
                let bus = self.bus();
                bus.evtchn
                    .unmask(port)
                    .map_err(|e| Self::hv_err(&bus.paths, format!("unmasking port {port}"), e))?;
                // RING_FINAL_CHECK after unmask: a kick latched before it is not lost
                self.serve()?;
            }
        }
        Ok(served)
    }

    /// Polls until the guest is gone or `stop` is set (checked every
    /// [`RUN_POLL_INTERVAL`]).
    fn run_until(&mut self, stop: &AtomicBool) -> Result<(), Self::Error> {
        while !stop.load(Ordering::Relaxed) {
            self.poll_once(Some(RUN_POLL_INTERVAL))?;
            // a failed device's guest may be gone too: its status stays Failed
            if self.bus().gone {
                break;
            }
        }
        Ok(())
    }

    /// Disconnects, stops watching and removes the device's xenstore nodes.
    fn remove(&mut self) -> Result<(), Self::Error> {
        self.disconnect();
        let bus = self.bus();
        if let Err(e) = bus.xs.unwatch(&bus.paths.frontend_state(), &bus.token) {
            log::debug!("{}: unwatch: {e}", bus.paths.backend);
        }
        device::remove_nodes(bus.xs.as_ref(), &bus.paths)?;
        Ok(())
    }

    /// Follows the frontend's state (see [`react`]).
    fn frontend_changed(&mut self) -> Result<(), Self::Error> {
        let bus = self.bus();
        let front = match device::frontend_state(bus.xs.as_ref(), &bus.paths) {
            Ok(Some(s)) => s,
            Ok(None) => {
                if !bus.gone {
                    log::info!(
                        "{}: frontend {} is gone",
                        bus.paths.backend,
                        bus.paths.frontend
                    );
                }
                self.disconnect();
                self.bus_mut().gone = true;
                return Ok(());
            }
            Err(DeviceError::State(e)) => {
                self.fail(format!("frontend state: {e}"));
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if bus.failure.is_some() || bus.gone {
            return Ok(());
        }
        let state = bus.state;
        match react(state, front) {
            Reaction::None => {}
            Reaction::Connect => match self.connect_frontend() {
                Ok(()) => {
                    self.set_state(BackendState::Xenbus(XenbusState::Connected))?;
                    self.log_connected();
                    self.serve()?;
                }
                Err(e) if Self::is_dom0_failure(&e) => return Err(e),
                Err(e) => self.fail(format!("connecting: {e}")),
            },
            Reaction::Close => {
                self.disconnect();
                let closing = BackendState::Xenbus(XenbusState::Closing);
                let closed = BackendState::Xenbus(XenbusState::Closed);
                if self.bus().state != closing && self.bus().state != closed {
                    self.set_state(closing)?;
                }
                if front == XenbusState::Closed && self.bus().state == closing {
                    self.set_state(closed)?;
                }
            }
            Reaction::Reinitialise => {
                let initwait = BackendState::Xenbus(XenbusState::InitWait);
                if self.bus().state.check_transition(initwait).is_ok() {
                    self.set_state(initwait)?;
                }
            }
        }
        Ok(())
    }

    /// Ends the device after a protocol error: logged once, published in `kemari-error`,
    /// rings unmapped, `Closing` then `Closed`.
    fn fail(&mut self, why: String) {
        let bus = self.bus();
        if bus.failure.is_some() {
            return;
        }
        log::warn!(
            "{}: guest {} broke the protocol, {} closed: {why}",
            bus.paths.backend,
            bus.paths.domid,
            Self::KIND
        );
        self.disconnect();
        let bus = self.bus();
        if let Err(e) = device::write_back(bus.xs.as_ref(), &bus.paths, ERROR_NODE, &why) {
            log::warn!("{}: {e}", bus.paths.backend);
        }
        for to in [XenbusState::Closing, XenbusState::Closed] {
            let to = BackendState::Xenbus(to);
            if self.bus().state != to {
                if let Err(e) = self.set_state(to) {
                    log::warn!("{}: {e}", self.bus().paths.backend);
                }
            }
        }
        self.bus_mut().failure = Some(why);
    }
}

/// Node where the reason a device failed is published.
pub const ERROR_NODE: &str = "kemari-error";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::device::LOGGED_BAD_REQUESTS;
    use hypervisor::mem::{DomainConfig, MemXen};
    use hypervisor::{DomId, Hypervisor, Tx};

    /// Errors of the fake device.
    #[derive(Debug, thiserror::Error)]
    enum FakeError {
        #[error(transparent)]
        Device(#[from] DeviceError),
        #[error("fake {what}: {source}")]
        Hypervisor {
            what: String,
            source: HypervisorError,
        },
        #[error("frontend asks for {0}")]
        Unsupported(&'static str),
        #[error("poll: {0}")]
        Poll(nix::Error),
    }

    /// A device kind with no rings: counts what the driver asks of it.
    struct Fake {
        bus: Bus,
        refuse: bool,
        connected: bool,
        connects: u32,
        disconnects: u32,
        serves: u32,
    }

    impl Backend for Fake {
        type Error = FakeError;
        const KIND: &'static str = "fake";

        fn bus(&self) -> &Bus {
            &self.bus
        }
        fn bus_mut(&mut self) -> &mut Bus {
            &mut self.bus
        }
        fn hv_err(_: &DevicePaths, what: String, source: HypervisorError) -> FakeError {
            FakeError::Hypervisor { what, source }
        }
        fn is_dom0_failure(e: &FakeError) -> bool {
            matches!(e, FakeError::Device(DeviceError::Xenstore { .. }))
        }
        fn connect_frontend(&mut self) -> Result<(), FakeError> {
            if self.refuse {
                return Err(FakeError::Unsupported("ring-page-order 9"));
            }
            self.connects += 1;
            self.connected = true;
            Ok(())
        }
        fn log_connected(&self) {}
        fn disconnect(&mut self) {
            self.disconnects += 1;
            self.connected = false;
        }
        fn serve(&mut self) -> Result<(), FakeError> {
            self.serves += 1;
            Ok(())
        }
        fn local_port(&self) -> Option<Port> {
            None
        }
        fn poll_once(&mut self, timeout: Option<Duration>) -> Result<(), FakeError> {
            self.bus.wait(&[], timeout).map_err(FakeError::Poll)?;
            self.dispatch()?;
            Ok(())
        }
    }

    struct Setup {
        host: MemXen,
        domid: DomId,
    }

    fn setup() -> Setup {
        let host = MemXen::new();
        let domid = host.create_domain(DomainConfig::pvh(64)).unwrap();
        Setup { host, domid }
    }

    /// A device published as `create` does: nodes, `Initialising`, watch, `InitWait`.
    fn fake(s: &Setup, refuse: bool) -> Fake {
        let xs = s.host.open_xenstore().unwrap();
        let paths = DevicePaths::new(xs.as_ref(), s.domid, 7, 0, "fake", "kemari-fake").unwrap();
        device::create_nodes(xs.as_ref(), &paths, &[], &[]).unwrap();
        let evtchn = s.host.open_event_channels().unwrap();
        let mut f = Fake {
            bus: Bus::new(xs, evtchn, paths, "kemari-fake"),
            refuse,
            connected: false,
            connects: 0,
            disconnects: 0,
            serves: 0,
        };
        f.bus.state = BackendState::Xenbus(XenbusState::Initialising);
        f.start_watch().unwrap();
        f.set_state(BackendState::Xenbus(XenbusState::InitWait))
            .unwrap();
        f
    }

    fn front_writes(s: &Setup, f: &Fake, value: &str) {
        let gxs = s.host.guest(s.domid).xenstore().unwrap();
        gxs.write(Tx::NONE, &f.bus.paths.frontend_state(), value.as_bytes())
            .unwrap();
    }

    fn back_node(f: &Fake, node: &str) -> String {
        let v = f.bus.xs.read(Tx::NONE, &f.bus.paths.back(node)).unwrap();
        String::from_utf8_lossy(&v).into_owned()
    }

    fn poll(f: &mut Fake) {
        f.poll_once(Some(Duration::from_millis(20))).unwrap();
    }

    #[test]
    fn the_driver_follows_the_frontend_through_the_handshake() {
        let s = setup();
        let mut f = fake(&s, false);
        assert_eq!(back_node(&f, "state"), "2");
        front_writes(&s, &f, "3");
        poll(&mut f);
        assert_eq!(f.bus.state, BackendState::Xenbus(XenbusState::Connected));
        assert_eq!((f.connects, f.serves), (1, 1));
        assert_eq!(back_node(&f, "state"), "4");
        assert_eq!(back_node(&f, crate::state::KEMARI_STATE_NODE), "connected");
        front_writes(&s, &f, "5");
        poll(&mut f);
        assert_eq!(f.bus.state, BackendState::Xenbus(XenbusState::Closing));
        assert!(!f.connected);
        front_writes(&s, &f, "6");
        poll(&mut f);
        assert_eq!(f.bus.state, BackendState::Xenbus(XenbusState::Closed));
        assert_eq!(back_node(&f, "state"), "6");
        // a frontend restarting (module reload) gets InitWait again, then a new connection
        front_writes(&s, &f, "1");
        poll(&mut f);
        assert_eq!(f.bus.state, BackendState::Xenbus(XenbusState::InitWait));
        front_writes(&s, &f, "4");
        poll(&mut f);
        assert_eq!(f.bus.state, BackendState::Xenbus(XenbusState::Connected));
        assert_eq!(f.connects, 2);
        assert!(f.bus.failure.is_none() && !f.bus.gone);
        f.remove().unwrap();
        assert!(f.bus.xs.read(Tx::NONE, &f.bus.paths.back("state")).is_err());
    }

    #[test]
    fn a_frontend_the_device_cannot_serve_ends_it_once_published() {
        let s = setup();
        let mut f = fake(&s, true);
        front_writes(&s, &f, "3");
        poll(&mut f);
        let why = "connecting: frontend asks for ring-page-order 9";
        assert_eq!(f.bus.failure.as_deref(), Some(why));
        assert_eq!(f.bus.state, BackendState::Xenbus(XenbusState::Closed));
        assert_eq!(back_node(&f, ERROR_NODE), why);
        assert_eq!(back_node(&f, "state"), "6");
        // a second failure changes nothing; the frontend is no longer followed
        f.fail("later".into());
        assert_eq!(f.bus.failure.as_deref(), Some(why));
        assert_eq!(back_node(&f, ERROR_NODE), why);
        front_writes(&s, &f, "1");
        poll(&mut f);
        assert_eq!(f.bus.state, BackendState::Xenbus(XenbusState::Closed));
        assert_eq!(f.connects, 0);
    }

    #[test]
    fn a_garbage_frontend_state_fails_the_device() {
        let s = setup();
        let mut f = fake(&s, false);
        front_writes(&s, &f, "connected");
        poll(&mut f);
        let why = f.bus.failure.clone().unwrap();
        assert!(why.starts_with("frontend state: "), "{why}");
        assert_eq!(back_node(&f, ERROR_NODE), why);
        assert_eq!(back_node(&f, "state"), "6");
    }

    #[test]
    fn a_gone_frontend_disconnects_and_ends_the_run() {
        let s = setup();
        let mut f = fake(&s, false);
        front_writes(&s, &f, "4");
        poll(&mut f);
        assert!(f.connected);
        let gxs = s.host.guest(s.domid).xenstore().unwrap();
        let _ = gxs.rm(Tx::NONE, &f.bus.paths.frontend);
        // run_until returns once the frontend is gone, without a stop
        f.run_until(&AtomicBool::new(false)).unwrap();
        assert!(f.bus.gone && !f.connected);
        assert!(f.bus.failure.is_none());
        // a stop ends it at once too
        let mut g = fake(&s, false);
        g.run_until(&AtomicBool::new(true)).unwrap();
        assert!(!g.bus.gone);
    }

    #[test]
    fn refused_requests_share_one_rate_limited_log() {
        let s = setup();
        let mut f = fake(&s, false);
        for i in 0..LOGGED_BAD_REQUESTS {
            assert!(f
                .bus
                .bad_request(Fake::KIND, format_args!("request {i} refused")));
        }
        assert!(!f.bus.bad_request(Fake::KIND, format_args!("one too many")));
    }
}
