//! The xenbus device state machine, as seen from a backend.
//!
//! Xen's `xen/include/public/io/xenbus.h` defines the states a frontend and a backend publish in their
//! xenstore `state` nodes, as decimal strings. Upstream stops at `Reconfigured` (8). Kemari adds one
//! backend-only state, [`BackendState::Attached`]: after a failover the secondary's backend attaches to a
//! ring the guest already has connected, starting from the ring's current producer/consumer indexes,
//! without a handshake. `Attached` is never written to the guest-visible `state` node (the frontend keeps
//! seeing `Connected`); it lives in the backend's private node [`KEMARI_STATE_NODE`], so a guest
//! frontend never reads a value it does not know.

use std::fmt;
use std::str::FromStr;

/// Name of the backend-private xenstore node (under the backend directory) holding [`BackendState`].
pub const KEMARI_STATE_NODE: &str = "kemari-state";

/// Errors of the xenbus state machine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// A `state` node held something that is not a xenbus state number.
    #[error("xenbus state node holds {value:?}, not a state number 0-8")]
    BadStateValue {
        /// The raw value read from xenstore.
        value: String,
    },
    /// A backend-private state node held an unknown name.
    #[error("{node} holds {value:?}, not a known backend state")]
    BadBackendState {
        /// The node read.
        node: &'static str,
        /// The raw value read from xenstore.
        value: String,
    },
    /// A transition the protocol does not allow.
    #[error("backend state transition {from} -> {to} is not allowed")]
    BadTransition {
        /// State before.
        from: BackendState,
        /// State requested.
        to: BackendState,
    },
}

/// The states of `xen/include/public/io/xenbus.h` (`enum xenbus_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum XenbusState {
    /// 0: no state yet (node missing or never written).
    Unknown = 0,
    /// 1: the device is being set up.
    Initialising = 1,
    /// 2: the backend waits for the frontend's details (rings, event channel).
    InitWait = 2,
    /// 3: the frontend published its details.
    Initialised = 3,
    /// 4: both sides are connected.
    Connected = 4,
    /// 5: the device is being closed.
    Closing = 5,
    /// 6: the device is closed.
    Closed = 6,
    /// 7: reconfiguration under way.
    Reconfiguring = 7,
    /// 8: reconfiguration done.
    Reconfigured = 8,
}

impl XenbusState {
    /// Decodes the number stored in a `state` node.
    pub fn from_number(n: u32) -> Option<Self> {
        Some(match n {
            0 => Self::Unknown,
            1 => Self::Initialising,
            2 => Self::InitWait,
            3 => Self::Initialised,
            4 => Self::Connected,
            5 => Self::Closing,
            6 => Self::Closed,
            7 => Self::Reconfiguring,
            8 => Self::Reconfigured,
            _ => return None,
        })
    }

    /// The value to write to a `state` node.
    pub fn as_node_value(self) -> String {
        (self as u8).to_string()
    }
}

impl FromStr for XenbusState {
    type Err = StateError;

    /// Parses a `state` node. xenstore values may carry a trailing NUL or newline from some writers.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim_end_matches(['\0', '\n']).trim();
        t.parse::<u32>()
            .ok()
            .and_then(Self::from_number)
            .ok_or_else(|| StateError::BadStateValue {
                value: s.chars().take(32).collect(),
            })
    }
}

impl fmt::Display for XenbusState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}({})", self, *self as u8)
    }
}

/// A backend's own state: a xenbus state, or Kemari's `Attached`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// A standard state, also published in the guest-visible `state` node.
    Xenbus(XenbusState),
    /// Kemari-only: serving a ring the frontend connected before a failover; the guest-visible `state`
    /// node stays `Connected`.
    Attached,
}

impl BackendState {
    /// What the guest-visible `state` node holds while the backend is in this state.
    pub fn published(self) -> XenbusState {
        match self {
            Self::Xenbus(s) => s,
            Self::Attached => XenbusState::Connected,
        }
    }

    /// The value of the backend-private [`KEMARI_STATE_NODE`].
    pub fn as_private_value(self) -> &'static str {
        match self {
            Self::Attached => "attached",
            Self::Xenbus(XenbusState::Unknown) => "unknown",
            Self::Xenbus(XenbusState::Initialising) => "initialising",
            Self::Xenbus(XenbusState::InitWait) => "initwait",
            Self::Xenbus(XenbusState::Initialised) => "initialised",
            Self::Xenbus(XenbusState::Connected) => "connected",
            Self::Xenbus(XenbusState::Closing) => "closing",
            Self::Xenbus(XenbusState::Closed) => "closed",
            Self::Xenbus(XenbusState::Reconfiguring) => "reconfiguring",
            Self::Xenbus(XenbusState::Reconfigured) => "reconfigured",
        }
    }

    /// Parses the backend-private [`KEMARI_STATE_NODE`].
    pub fn from_private_value(v: &str) -> Result<Self, StateError> {
        const ALL: [BackendState; 10] = [
            BackendState::Attached,
            BackendState::Xenbus(XenbusState::Unknown),
            BackendState::Xenbus(XenbusState::Initialising),
            BackendState::Xenbus(XenbusState::InitWait),
            BackendState::Xenbus(XenbusState::Initialised),
            BackendState::Xenbus(XenbusState::Connected),
            BackendState::Xenbus(XenbusState::Closing),
            BackendState::Xenbus(XenbusState::Closed),
            BackendState::Xenbus(XenbusState::Reconfiguring),
            BackendState::Xenbus(XenbusState::Reconfigured),
        ];
        let t = v.trim_end_matches(['\0', '\n']);
        ALL.into_iter()
            .find(|s| s.as_private_value() == t)
            .ok_or_else(|| StateError::BadBackendState {
                node: KEMARI_STATE_NODE,
                value: v.chars().take(32).collect(),
            })
    }

    /// Checks a backend-initiated transition. `Attached` is entered only from `Unknown` (a backend
    /// created on the secondary at failover) and left for `Connected` (ring verified, normal service)
    /// or `Closing`.
    pub fn check_transition(self, to: BackendState) -> Result<(), StateError> {
        use XenbusState as S;
        let ok = match (self, to) {
            (Self::Xenbus(S::Unknown), Self::Attached) => true,
            (Self::Attached, Self::Xenbus(S::Connected | S::Closing | S::Closed)) => true,
            (_, Self::Attached) | (Self::Attached, _) => false,
            (Self::Xenbus(a), Self::Xenbus(b)) => matches!(
                (a, b),
                (S::Unknown, S::Initialising)
                    | (S::Initialising, S::InitWait)
                    | (S::InitWait, S::Connected)
                    | (S::Initialised, S::Connected)
                    | (S::Connected, S::Reconfiguring)
                    | (S::Reconfiguring, S::Reconfigured)
                    | (S::Reconfigured, S::Connected)
                    | (S::Closed, S::InitWait)
                    | (S::Closed, S::Initialising)
                    | (_, S::Closing)
                    | (S::Closing, S::Closed)
            ),
        };
        if ok {
            Ok(())
        } else {
            Err(StateError::BadTransition { from: self, to })
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Xenbus(s) => s.fmt(f),
            Self::Attached => f.write_str("Attached(kemari)"),
        }
    }
}

/// What a backend does when its frontend's `state` node changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaction {
    /// Nothing to do.
    None,
    /// Map the rings and bind the event channel the frontend published, then become `Connected`.
    Connect,
    /// Stop serving, unmap, then publish `Closing` and `Closed`.
    Close,
    /// The frontend went back to `Initialising` after a close (e.g. module reload): publish `InitWait`
    /// again.
    Reinitialise,
}

/// The standard backend reaction to a frontend state change (the protocol Linux's blkback and
/// netback follow). In `Attached`, the frontend's view is already `Connected`: the only events that
/// matter are a close or a restart.
pub fn react(backend: BackendState, frontend: XenbusState) -> Reaction {
    use XenbusState as S;
    match (backend, frontend) {
        (BackendState::Attached, S::Closing | S::Closed) => Reaction::Close,
        (BackendState::Attached, S::Initialising) => Reaction::Reinitialise,
        (BackendState::Attached, _) => Reaction::None,
        (BackendState::Xenbus(S::InitWait), S::Initialised | S::Connected) => Reaction::Connect,
        (BackendState::Xenbus(S::Connected), S::Closing | S::Closed) => Reaction::Close,
        (BackendState::Xenbus(S::InitWait | S::Initialising), S::Closing) => Reaction::Close,
        // the frontend finished closing after we published Closing: publish Closed
        (BackendState::Xenbus(S::Closing), S::Closed) => Reaction::Close,
        (BackendState::Xenbus(S::Closed), S::Initialising) => Reaction::Reinitialise,
        _ => Reaction::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use XenbusState as S;

    #[test]
    fn state_numbers_round_trip_and_match_xenbus_h() {
        for n in 0..=8u32 {
            let s = S::from_number(n).unwrap();
            assert_eq!(s as u32, n);
            assert_eq!(s.as_node_value().parse::<S>().unwrap(), s);
        }
        assert_eq!(S::Connected as u8, 4);
        assert_eq!(S::Reconfigured as u8, 8);
        assert_eq!(S::from_number(9), None);
    }

    #[test]
    fn parse_tolerates_nul_and_newline_but_rejects_garbage() {
        assert_eq!("4\0".parse::<S>().unwrap(), S::Connected);
        assert_eq!("6\n".parse::<S>().unwrap(), S::Closed);
        for bad in ["", "9", "-1", "four", "4x", "99999999999"] {
            let e = bad.parse::<S>().unwrap_err();
            assert!(matches!(e, StateError::BadStateValue { .. }), "{bad:?}");
        }
        let long = "x".repeat(1000);
        match long.parse::<S>().unwrap_err() {
            StateError::BadStateValue { value } => assert_eq!(value.len(), 32),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn attached_publishes_connected_and_round_trips_privately() {
        assert_eq!(BackendState::Attached.published(), S::Connected);
        for s in [
            BackendState::Attached,
            BackendState::Xenbus(S::InitWait),
            BackendState::Xenbus(S::Closed),
        ] {
            assert_eq!(
                BackendState::from_private_value(s.as_private_value()).unwrap(),
                s
            );
        }
        assert!(BackendState::from_private_value("detached").is_err());
    }

    #[test]
    fn standard_handshake_is_allowed() {
        let path = [
            S::Unknown,
            S::Initialising,
            S::InitWait,
            S::Connected,
            S::Closing,
            S::Closed,
            S::InitWait,
        ];
        for w in path.windows(2) {
            BackendState::Xenbus(w[0])
                .check_transition(BackendState::Xenbus(w[1]))
                .unwrap();
        }
    }

    #[test]
    fn attached_only_from_unknown_and_only_to_connected_or_close() {
        let unknown = BackendState::Xenbus(S::Unknown);
        unknown.check_transition(BackendState::Attached).unwrap();
        for from in [S::InitWait, S::Connected, S::Closed] {
            assert!(BackendState::Xenbus(from)
                .check_transition(BackendState::Attached)
                .is_err());
        }
        BackendState::Attached
            .check_transition(BackendState::Xenbus(S::Connected))
            .unwrap();
        assert_eq!(
            BackendState::Attached.check_transition(BackendState::Xenbus(S::InitWait)),
            Err(StateError::BadTransition {
                from: BackendState::Attached,
                to: BackendState::Xenbus(S::InitWait)
            })
        );
    }

    #[test]
    fn skipping_initwait_is_refused() {
        assert!(BackendState::Xenbus(S::Initialising)
            .check_transition(BackendState::Xenbus(S::Connected))
            .is_err());
    }

    #[test]
    fn reactions_follow_the_frontend() {
        let b = BackendState::Xenbus;
        assert_eq!(react(b(S::InitWait), S::Initialised), Reaction::Connect);
        assert_eq!(react(b(S::InitWait), S::Initialising), Reaction::None);
        assert_eq!(react(b(S::Connected), S::Closing), Reaction::Close);
        assert_eq!(react(b(S::Closed), S::Initialising), Reaction::Reinitialise);
        assert_eq!(react(b(S::Closing), S::Closed), Reaction::Close);
        assert_eq!(react(b(S::Closing), S::Closing), Reaction::None);
        assert_eq!(react(BackendState::Attached, S::Connected), Reaction::None);
        assert_eq!(react(BackendState::Attached, S::Closed), Reaction::Close);
    }
}
