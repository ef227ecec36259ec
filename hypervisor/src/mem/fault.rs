//! Fault injection for the in-memory implementation: fail any call at any step.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::{DomId, Errno, GrantRef, Method, Port};

use super::lock;

/// When a [`FaultPlan`] rule fails a call. Call numbers count the calls of the rule's method
/// made *after the rule was installed*, from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Only the `n`th call.
    Nth(u64),
    /// Every call.
    Always,
    /// Every call after the first `n` (which succeed).
    After(u64),
    /// `count` calls starting with the `first`th.
    Range {
        /// First failing call.
        first: u64,
        /// How many consecutive calls fail.
        count: u64,
    },
}

impl Trigger {
    fn fires(self, n: u64) -> bool {
        match self {
            Trigger::Nth(k) => n == k,
            Trigger::Always => true,
            Trigger::After(k) => n > k,
            Trigger::Range { first, count } => n >= first && n - first < count,
        }
    }
}

/// What a call was about, as recorded in the [`FaultPlan`]'s call log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Nothing in particular (opening a handle, listing domains, starting a transaction).
    None,
    /// A domain.
    Domain(DomId),
    /// A local event channel port.
    Port(Port),
    /// A grant reference of a domain.
    Grant(DomId, GrantRef),
    /// A xenstore path (or watch path).
    Path(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::None => f.write_str("-"),
            Target::Domain(d) => write!(f, "dom{d}"),
            Target::Port(p) => write!(f, "port {p}"),
            Target::Grant(d, g) => write!(f, "dom{d} gref {g}"),
            Target::Path(p) => write!(f, "{p}"),
        }
    }
}

/// One call seen by the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// Position among all calls of all methods (from 1).
    pub seq: u64,
    /// The method.
    pub method: Method,
    /// Position among the calls of this method (from 1).
    pub nth: u64,
    /// What the call was about.
    pub target: Target,
    /// The errno injected, if the plan failed the call (the call then did nothing).
    pub injected: Option<Errno>,
}

#[derive(Debug, Clone)]
struct Rule {
    method: Method,
    trigger: Trigger,
    errno: Errno,
    /// Calls of `method` already made when the rule was installed.
    base: u64,
}

#[derive(Debug, Default)]
struct Inner {
    rules: Vec<Rule>,
    counts: HashMap<Method, u64>,
    injected: HashMap<Method, u64>,
    log: Vec<CallRecord>,
    seq: u64,
}

/// A shared, thread-safe plan of failures and a log of calls, consulted by every trait method
/// of the in-memory implementation ([`MemXen`](super::MemXen) and the handles it opens) with
/// its own [`Method`], before the method does anything: an injected failure has no side
/// effect and is returned as the same error variant a real failure of that call would be.
///
/// Clones share the plan: a test keeps one, gives the [`MemXen`](super::MemXen) to the code
/// under test, installs rules at any time and asserts on the log afterwards.
///
/// ```
/// use hypervisor::mem::{FaultPlan, MemXen, DomainConfig};
/// use hypervisor::{DomainControl, Errno, Method};
///
/// let xen = MemXen::new();
/// let dom = xen.create_domain(DomainConfig::hvm(16)).unwrap();
/// let faults: FaultPlan = xen.faults();
/// faults.fail_on(Method::Pause, 2, Errno::EIO);
/// assert!(xen.pause(dom).is_ok());
/// assert_eq!(xen.pause(dom).unwrap_err().errno(), Some(Errno::EIO));
/// assert!(xen.pause(dom).is_ok());
/// assert_eq!(faults.calls(Method::Pause), 3);
/// assert_eq!(faults.injected(Method::Pause), 1);
/// ```
///
/// Several rules may cover the same call: the first installed that fires wins.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    inner: Arc<Mutex<Inner>>,
}

impl FaultPlan {
    /// An empty plan: nothing fails.
    pub fn new() -> FaultPlan {
        FaultPlan::default()
    }

    /// Fails calls of `method` as `trigger` says, with `errno`.
    pub fn fail(&self, method: Method, trigger: Trigger, errno: Errno) -> &FaultPlan {
        let mut inner = lock(&self.inner);
        let base = inner.counts.get(&method).copied().unwrap_or(0);
        inner.rules.push(Rule {
            method,
            trigger,
            errno,
            base,
        });
        self
    }

    /// Fails the `nth` call of `method` from now on (1: the next one).
    pub fn fail_on(&self, method: Method, nth: u64, errno: Errno) -> &FaultPlan {
        self.fail(method, Trigger::Nth(nth), errno)
    }

    /// Fails the next call of `method`.
    pub fn fail_next(&self, method: Method, errno: Errno) -> &FaultPlan {
        self.fail_on(method, 1, errno)
    }

    /// Fails every call of `method` from now on with `EIO`.
    pub fn fail_always(&self, method: Method) -> &FaultPlan {
        self.fail(method, Trigger::Always, Errno::EIO)
    }

    /// Fails every call of `method` from now on with `errno`.
    pub fn fail_always_with(&self, method: Method, errno: Errno) -> &FaultPlan {
        self.fail(method, Trigger::Always, errno)
    }

    /// Lets the next `n` calls of `method` succeed and fails all later ones.
    pub fn fail_after(&self, method: Method, n: u64, errno: Errno) -> &FaultPlan {
        self.fail(method, Trigger::After(n), errno)
    }

    /// Removes the rules of `method`.
    pub fn clear(&self, method: Method) {
        lock(&self.inner).rules.retain(|r| r.method != method);
    }

    /// Removes every rule (the call log stays).
    pub fn clear_all(&self) {
        lock(&self.inner).rules.clear();
    }

    /// Calls of `method` so far (failed ones included).
    pub fn calls(&self, method: Method) -> u64 {
        lock(&self.inner).counts.get(&method).copied().unwrap_or(0)
    }

    /// Calls of `method` the plan failed so far.
    pub fn injected(&self, method: Method) -> u64 {
        lock(&self.inner)
            .injected
            .get(&method)
            .copied()
            .unwrap_or(0)
    }

    /// Calls of all methods so far.
    pub fn total_calls(&self) -> u64 {
        lock(&self.inner).seq
    }

    /// The calls so far, in order.
    pub fn log(&self) -> Vec<CallRecord> {
        lock(&self.inner).log.clone()
    }

    /// The methods called so far, in order (for asserting sequences such as
    /// pause → clean → read → unpause).
    pub fn method_sequence(&self) -> Vec<Method> {
        lock(&self.inner).log.iter().map(|c| c.method).collect()
    }

    /// Forgets the log and the counters (rules stay; their call numbers restart from 1).
    pub fn reset_calls(&self) {
        let mut inner = lock(&self.inner);
        inner.log.clear();
        inner.counts.clear();
        inner.injected.clear();
        inner.seq = 0;
        for rule in &mut inner.rules {
            rule.base = 0;
        }
    }

    /// Records a call of `method` about `target`; returns the errno to fail it with, if the
    /// plan says so. Called first thing by every in-memory trait method.
    pub fn check(&self, method: Method, target: Target) -> Option<Errno> {
        let mut inner = lock(&self.inner);
        inner.seq += 1;
        let seq = inner.seq;
        let count = inner.counts.entry(method).or_insert(0);
        *count += 1;
        let nth = *count;
        let injected = inner
            .rules
            .iter()
            .find(|r| r.method == method && r.trigger.fires(nth - r.base))
            .map(|r| r.errno);
        if injected.is_some() {
            *inner.injected.entry(method).or_insert(0) += 1;
        }
        inner.log.push(CallRecord {
            seq,
            method,
            nth,
            target,
            injected,
        });
        injected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(plan: &FaultPlan, method: Method, n: u64) -> Vec<bool> {
        (0..n)
            .map(|_| plan.check(method, Target::None).is_some())
            .collect()
    }

    #[test]
    fn nth_after_range_always() {
        let plan = FaultPlan::new();
        plan.fail_on(Method::Pause, 3, Errno::EIO);
        assert_eq!(
            run(&plan, Method::Pause, 5),
            [false, false, true, false, false]
        );
        plan.fail_after(Method::Unpause, 2, Errno::EBUSY);
        assert_eq!(run(&plan, Method::Unpause, 4), [false, false, true, true]);
        plan.fail(
            Method::XsRead,
            Trigger::Range { first: 2, count: 2 },
            Errno::EIO,
        );
        assert_eq!(
            run(&plan, Method::XsRead, 5),
            [false, true, true, false, false]
        );
        plan.fail_always(Method::LogDirtyClean);
        assert_eq!(run(&plan, Method::LogDirtyClean, 3), [true, true, true]);
        assert_eq!(plan.injected(Method::LogDirtyClean), 3);
        plan.clear(Method::LogDirtyClean);
        assert_eq!(run(&plan, Method::LogDirtyClean, 1), [false]);
        // Other methods are unaffected.
        assert_eq!(run(&plan, Method::ReadPages, 3), [false, false, false]);
    }

    #[test]
    fn rules_count_from_installation() {
        let plan = FaultPlan::new();
        run(&plan, Method::Pause, 4);
        plan.fail_next(Method::Pause, Errno::EINVAL);
        assert_eq!(
            plan.check(Method::Pause, Target::Domain(3)),
            Some(Errno::EINVAL)
        );
        assert_eq!(plan.check(Method::Pause, Target::Domain(3)), None);
        assert_eq!(plan.calls(Method::Pause), 6);
        let log = plan.log();
        assert_eq!(log.len(), 6);
        assert_eq!(log[4].nth, 5);
        assert_eq!(log[4].injected, Some(Errno::EINVAL));
        assert_eq!(log[4].target, Target::Domain(3));
        plan.reset_calls();
        assert_eq!(plan.total_calls(), 0);
        assert!(plan.log().is_empty());
    }

    #[test]
    fn first_installed_rule_wins_and_clones_share() {
        let plan = FaultPlan::new();
        let other = plan.clone();
        other.fail_on(Method::Pause, 1, Errno::EIO);
        plan.fail_always_with(Method::Pause, Errno::EBUSY);
        assert_eq!(plan.check(Method::Pause, Target::None), Some(Errno::EIO));
        assert_eq!(plan.check(Method::Pause, Target::None), Some(Errno::EBUSY));
        other.clear_all();
        assert_eq!(plan.check(Method::Pause, Target::None), None);
        assert_eq!(other.method_sequence(), vec![Method::Pause; 3]);
    }
}
