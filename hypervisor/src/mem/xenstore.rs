//! Xenstore of the in-memory host: a tree with permissions, per-connection watches and
//! optimistic transactions.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use super::{lock, EventQueue, Shared, Target};
use crate::{
    DomId, Errno, HypervisorError, Method, Result, Tx, WatchEvent, XenStore, XsPerm, XsPermKind,
    XS_MAX_PATH, XS_MAX_VALUE,
};

/// Special watch path fired when a domain is created.
pub const INTRODUCE_DOMAIN: &str = "@introduceDomain";
/// Special watch path fired when a domain is destroyed.
pub const RELEASE_DOMAIN: &str = "@releaseDomain";

#[derive(Debug, Clone)]
struct Node {
    value: Vec<u8>,
    perms: Vec<XsPerm>,
    children: BTreeSet<String>,
    /// Bumped on every change of the node (value, permissions, set of children).
    gen: u64,
}

#[derive(Debug, Clone, Default)]
struct Tree {
    nodes: HashMap<String, Node>,
}

/// Which watches a change fires.
#[derive(Debug, Clone)]
struct Fire {
    path: String,
    /// `true`: watches on exactly `path` (a deleted descendant, a special `@` path);
    /// `false`: watches on `path` or any ancestor.
    exact: bool,
    /// Permissions of the node and of its parent, for unprivileged watchers, who get the
    /// event if they can read either (as xenstored's `watch_permitted`); empty: no check.
    perms: Vec<Vec<XsPerm>>,
}

/// A modification recorded in a transaction, replayed at commit.
#[derive(Debug, Clone)]
enum Op {
    Write(String, Vec<u8>),
    Mkdir(String),
    Rm(String),
    SetPerms(String, Vec<XsPerm>),
}

#[derive(Debug)]
struct Txn {
    conn: u64,
    tree: Tree,
    /// Generation of every node the transaction looked at, when it first did (`None`: absent).
    accessed: HashMap<String, Option<u64>>,
    ops: Vec<Op>,
}

#[derive(Debug)]
struct Watch {
    conn: u64,
    domid: DomId,
    path: String,
    token: String,
    queue: Arc<EventQueue<WatchEvent>>,
}

/// The xenstore daemon's state.
#[derive(Debug)]
pub(crate) struct XsState {
    tree: Tree,
    gen: u64,
    txns: HashMap<u32, Txn>,
    next_tx: u32,
    watches: Vec<Watch>,
    next_conn: u64,
}

fn parent_of(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn join(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// `child` is `parent` or below it.
fn is_child(child: &str, parent: &str) -> bool {
    if parent == "/" {
        return child.starts_with('/');
    }
    child == parent
        || (child.starts_with(parent) && child.as_bytes().get(parent.len()) == Some(&b'/'))
}

/// xenstored's rule for node names: absolute, `[A-Za-z0-9_@/-]`, no empty component.
fn valid_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() <= XS_MAX_PATH
        && (path == "/" || (!path.ends_with('/') && !path.contains("//")))
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-/_@".contains(&b))
}

fn rights(perms: &[XsPerm], domid: DomId) -> XsPermKind {
    if domid == 0 {
        return XsPermKind::Both;
    }
    match perms.first() {
        None => XsPermKind::None,
        Some(owner) if owner.domid == domid => XsPermKind::Both,
        Some(owner) => perms[1..]
            .iter()
            .find(|p| p.domid == domid)
            .map_or(owner.kind, |p| p.kind),
    }
}

/// One operation's view: a tree (global or a transaction's), who does it, and the access
/// record of the transaction, if any.
struct Ctx<'a> {
    tree: &'a mut Tree,
    gen: &'a mut u64,
    accessed: Option<&'a mut HashMap<String, Option<u64>>>,
    domid: DomId,
}

impl Ctx<'_> {
    fn touch(&mut self, path: &str) {
        let gen = self.tree.nodes.get(path).map(|n| n.gen);
        if let Some(acc) = self.accessed.as_deref_mut() {
            acc.entry(path.to_owned()).or_insert(gen);
        }
    }

    fn next_gen(&mut self) -> u64 {
        *self.gen += 1;
        *self.gen
    }

    /// The node at `path`, readable by the caller.
    fn readable(&mut self, path: &str) -> std::result::Result<&Node, Errno> {
        self.touch(path);
        let node = self.tree.nodes.get(path).ok_or(Errno::ENOENT)?;
        if !rights(&node.perms, self.domid).can_read() {
            return Err(Errno::EACCES);
        }
        Ok(node)
    }

    /// Checks that the existing node at `path` is writable by the caller.
    fn writable(&mut self, path: &str) -> std::result::Result<(), Errno> {
        self.touch(path);
        let node = self.tree.nodes.get(path).ok_or(Errno::ENOENT)?;
        if !rights(&node.perms, self.domid).can_write() {
            return Err(Errno::EACCES);
        }
        Ok(())
    }

    /// Creates `path` and its missing ancestors; the closest existing ancestor must be
    /// writable. New nodes inherit their parent's permissions, owned by an unprivileged
    /// creator (as xenstored does).
    fn create(&mut self, path: &str, value: &[u8]) -> std::result::Result<(), Errno> {
        let mut missing = vec![path.to_owned()];
        let mut ancestor = parent_of(path).ok_or(Errno::EINVAL)?.to_owned();
        loop {
            self.touch(&ancestor);
            if self.tree.nodes.contains_key(&ancestor) {
                break;
            }
            missing.push(ancestor.clone());
            ancestor = parent_of(&ancestor).ok_or(Errno::EINVAL)?.to_owned();
        }
        self.writable(&ancestor)?;
        for (i, node_path) in missing.iter().enumerate().rev() {
            let parent = parent_of(node_path).ok_or(Errno::EINVAL)?;
            let gen = self.next_gen();
            let parent_node = self.tree.nodes.get_mut(parent).ok_or(Errno::ENOENT)?;
            parent_node.children.insert(base_name(node_path).to_owned());
            parent_node.gen = gen;
            let mut perms = parent_node.perms.clone();
            if self.domid != 0 {
                if let Some(owner) = perms.first_mut() {
                    owner.domid = self.domid;
                }
            }
            let value = if i == 0 { value.to_vec() } else { Vec::new() };
            self.tree.nodes.insert(
                node_path.clone(),
                Node {
                    value,
                    perms,
                    children: BTreeSet::new(),
                    gen,
                },
            );
        }
        Ok(())
    }

    fn read(&mut self, path: &str) -> std::result::Result<Vec<u8>, Errno> {
        Ok(self.readable(path)?.value.clone())
    }

    fn directory(&mut self, path: &str) -> std::result::Result<Vec<String>, Errno> {
        Ok(self.readable(path)?.children.iter().cloned().collect())
    }

    fn get_perms(&mut self, path: &str) -> std::result::Result<Vec<XsPerm>, Errno> {
        Ok(self.readable(path)?.perms.clone())
    }

    fn write(&mut self, path: &str, value: &[u8]) -> std::result::Result<Vec<Fire>, Errno> {
        if value.len() > XS_MAX_VALUE {
            return Err(Errno::E2BIG);
        }
        self.touch(path);
        if self.tree.nodes.contains_key(path) {
            self.writable(path)?;
            let gen = self.next_gen();
            if let Some(node) = self.tree.nodes.get_mut(path) {
                node.value = value.to_vec();
                node.gen = gen;
            }
        } else {
            self.create(path, value)?;
        }
        Ok(vec![self.fire_at(path)])
    }

    fn mkdir(&mut self, path: &str) -> std::result::Result<Vec<Fire>, Errno> {
        self.touch(path);
        if self.tree.nodes.contains_key(path) {
            return Ok(Vec::new());
        }
        self.create(path, &[])?;
        Ok(vec![self.fire_at(path)])
    }

    fn rm(&mut self, path: &str) -> std::result::Result<Vec<Fire>, Errno> {
        let parent = parent_of(path).ok_or(Errno::EINVAL)?.to_owned();
        self.touch(path);
        if !self.tree.nodes.contains_key(path) {
            self.touch(&parent);
            return if self.tree.nodes.contains_key(&parent) {
                Ok(Vec::new())
            } else {
                Err(Errno::ENOENT)
            };
        }
        self.writable(path)?;
        let root_fire = self.fire_at(path);
        // Depth-first removal; deleted descendants fire watches set exactly on them, with the
        // permissions they had.
        let mut fires = Vec::new();
        let mut stack = vec![path.to_owned()];
        let mut removed_perms: HashMap<String, Vec<XsPerm>> = HashMap::new();
        while let Some(p) = stack.pop() {
            self.touch(&p);
            if let Some(node) = self.tree.nodes.remove(&p) {
                for child in &node.children {
                    stack.push(join(&p, child));
                }
                if p != path {
                    let parent_perms = parent_of(&p)
                        .and_then(|parent| removed_perms.get(parent))
                        .cloned()
                        .unwrap_or_default();
                    fires.push(Fire {
                        path: p.clone(),
                        exact: true,
                        perms: vec![node.perms.clone(), parent_perms],
                    });
                }
                removed_perms.insert(p, node.perms);
            }
        }
        self.touch(&parent);
        let gen = self.next_gen();
        if let Some(parent_node) = self.tree.nodes.get_mut(&parent) {
            parent_node.children.remove(base_name(path));
            parent_node.gen = gen;
        }
        fires.push(root_fire);
        Ok(fires)
    }

    fn set_perms(&mut self, path: &str, perms: &[XsPerm]) -> std::result::Result<Vec<Fire>, Errno> {
        let Some(owner) = perms.first() else {
            return Err(Errno::EINVAL);
        };
        self.writable(path)?;
        let gen = self.next_gen();
        let domid = self.domid;
        let node = self.tree.nodes.get_mut(path).ok_or(Errno::ENOENT)?;
        if domid != 0 && node.perms.first().map(|p| p.domid) != Some(owner.domid) {
            return Err(Errno::EPERM);
        }
        node.perms = perms.to_vec();
        node.gen = gen;
        Ok(vec![self.fire_at(path)])
    }

    fn fire_at(&self, path: &str) -> Fire {
        let perms_of = |p: &str| self.tree.nodes.get(p).map(|n| n.perms.clone());
        Fire {
            path: path.to_owned(),
            exact: false,
            perms: [Some(path), parent_of(path)]
                .into_iter()
                .flatten()
                .filter_map(perms_of)
                .collect(),
        }
    }

    fn apply(&mut self, op: &Op) -> std::result::Result<Vec<Fire>, Errno> {
        match op {
            Op::Write(path, value) => self.write(path, value),
            Op::Mkdir(path) => self.mkdir(path),
            Op::Rm(path) => self.rm(path),
            Op::SetPerms(path, perms) => self.set_perms(path, perms),
        }
    }
}

impl XsState {
    pub(crate) fn new() -> XsState {
        let mut tree = Tree::default();
        tree.nodes.insert(
            String::from("/"),
            Node {
                value: Vec::new(),
                perms: vec![XsPerm::new(0, XsPermKind::None)],
                children: BTreeSet::new(),
                gen: 0,
            },
        );
        let mut state = XsState {
            tree,
            gen: 0,
            txns: HashMap::new(),
            next_tx: 1,
            watches: Vec::new(),
            next_conn: 1,
        };
        for path in ["/local/domain", "/tool"] {
            if let Err(errno) = state.global(0).mkdir(path) {
                log::warn!("in-memory xenstore: cannot create {path}: {errno}");
            }
        }
        state
    }

    fn global(&mut self, domid: DomId) -> Ctx<'_> {
        Ctx {
            tree: &mut self.tree,
            gen: &mut self.gen,
            accessed: None,
            domid,
        }
    }

    fn fire(&self, fires: &[Fire]) {
        for fire in fires {
            for watch in &self.watches {
                let matches = if fire.exact || watch.path.starts_with('@') {
                    watch.path == fire.path
                } else {
                    is_child(&fire.path, &watch.path)
                };
                let allowed = fire.perms.is_empty()
                    || fire
                        .perms
                        .iter()
                        .any(|perms| rights(perms, watch.domid).can_read());
                if matches && allowed {
                    watch.queue.push(WatchEvent {
                        path: fire.path.clone(),
                        token: watch.token.clone(),
                    });
                }
            }
        }
    }
}

/// Creates a domain's xenstore home and fires `@introduceDomain`.
pub(crate) fn introduce_domain(shared: &Shared, domid: DomId, name: &str) {
    let mut xs = lock(&shared.xs);
    let home = format!("/local/domain/{domid}");
    let mut home_perms = vec![XsPerm::new(0, XsPermKind::None)];
    if domid != 0 {
        home_perms.push(XsPerm::new(domid, XsPermKind::Read));
    }
    let own = [XsPerm::new(domid, XsPermKind::None)];
    let steps: Vec<(String, Op)> = vec![
        (home.clone(), Op::Mkdir(home.clone())),
        (home.clone(), Op::SetPerms(home.clone(), home_perms)),
        (
            format!("{home}/name"),
            Op::Write(format!("{home}/name"), name.as_bytes().to_vec()),
        ),
        (
            format!("{home}/domid"),
            Op::Write(format!("{home}/domid"), domid.to_string().into_bytes()),
        ),
        (
            format!("{home}/device"),
            Op::Mkdir(format!("{home}/device")),
        ),
        (
            format!("{home}/device"),
            Op::SetPerms(format!("{home}/device"), own.to_vec()),
        ),
        (format!("{home}/data"), Op::Mkdir(format!("{home}/data"))),
        (
            format!("{home}/data"),
            Op::SetPerms(format!("{home}/data"), own.to_vec()),
        ),
    ];
    let mut fires = Vec::new();
    for (path, op) in steps {
        match xs.global(0).apply(&op) {
            Ok(f) => fires.extend(f),
            Err(errno) => log::warn!("in-memory xenstore: setting up {path}: {errno}"),
        }
    }
    fires.push(Fire {
        path: String::from(INTRODUCE_DOMAIN),
        exact: true,
        perms: Vec::new(),
    });
    xs.fire(&fires);
}

/// Removes a domain's xenstore home and fires `@releaseDomain`.
pub(crate) fn release_domain(shared: &Shared, domid: DomId) {
    let mut xs = lock(&shared.xs);
    let mut fires = match xs.global(0).rm(&format!("/local/domain/{domid}")) {
        Ok(f) => f,
        Err(errno) => {
            log::warn!("in-memory xenstore: removing domain {domid}'s home: {errno}");
            Vec::new()
        }
    };
    fires.push(Fire {
        path: String::from(RELEASE_DOMAIN),
        exact: true,
        perms: Vec::new(),
    });
    xs.fire(&fires);
}

/// A xenstore connection on a [`MemXen`](super::MemXen), as dom0
/// ([`Hypervisor::open_xenstore`](crate::Hypervisor::open_xenstore)) or as a guest
/// ([`MemGuest::xenstore`](super::MemGuest::xenstore)).
///
/// Permissions are enforced for guests (dom0 bypasses them). Transactions work on a private
/// copy of the tree and record the generation of every node they read or write (including
/// parents whose child lists they change); the commit fails with `EAGAIN` if any of those
/// nodes changed since, otherwise replays the transaction's changes and fires their watches.
/// Watch paths are absolute or `@introduceDomain` / `@releaseDomain`; a guest connection
/// gets an event if it may read the changed node or its parent. Dropping the
/// connection removes its watches and abandons its transactions.
#[derive(Debug)]
pub struct MemXenStore {
    shared: Arc<Shared>,
    conn: u64,
    domid: DomId,
    queue: Arc<EventQueue<WatchEvent>>,
}

impl MemXenStore {
    pub(crate) fn connect(shared: Arc<Shared>, domid: DomId) -> Result<MemXenStore> {
        let op = Method::XsOpen;
        shared
            .fault(op, Target::Domain(domid))
            .map_err(|errno| HypervisorError::Call { op, errno })?;
        let queue = Arc::new(EventQueue::new().map_err(|err| HypervisorError::Call {
            op,
            errno: Errno::from_io(&err),
        })?);
        let conn = {
            let mut xs = lock(&shared.xs);
            let conn = xs.next_conn;
            xs.next_conn += 1;
            conn
        };
        Ok(MemXenStore {
            shared,
            conn,
            domid,
            queue,
        })
    }

    /// The domain this connection acts as.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Watch events queued and not yet read.
    pub fn queued_events(&self) -> usize {
        self.queue.len()
    }

    fn err(op: Method, path: &str, errno: Errno) -> HypervisorError {
        HypervisorError::XenStore {
            op,
            path: path.to_owned(),
            errno,
        }
    }

    /// Consults the fault plan, validates `path` and runs `f` in the global tree or the
    /// transaction `tx`; modifications outside a transaction fire their watches at once,
    /// inside one they are recorded for the commit.
    fn run<T>(
        &self,
        op: Method,
        tx: Tx,
        path: &str,
        record: Option<Op>,
        f: impl FnOnce(&mut Ctx<'_>) -> std::result::Result<(T, Vec<Fire>), Errno>,
    ) -> Result<T> {
        self.shared
            .fault(op, Target::Path(path.to_owned()))
            .map_err(|errno| Self::err(op, path, errno))?;
        if !valid_path(path) {
            return Err(Self::err(op, path, Errno::EINVAL));
        }
        let mut guard = lock(&self.shared.xs);
        let xs = &mut *guard;
        if tx == Tx::NONE {
            let mut ctx = Ctx {
                tree: &mut xs.tree,
                gen: &mut xs.gen,
                accessed: None,
                domid: self.domid,
            };
            let (value, fires) = f(&mut ctx).map_err(|errno| Self::err(op, path, errno))?;
            xs.fire(&fires);
            Ok(value)
        } else {
            let txn = match xs.txns.get_mut(&tx.0) {
                Some(txn) if txn.conn == self.conn => txn,
                _ => return Err(Self::err(op, path, Errno::ENOENT)),
            };
            let mut ctx = Ctx {
                tree: &mut txn.tree,
                gen: &mut xs.gen,
                accessed: Some(&mut txn.accessed),
                domid: self.domid,
            };
            let (value, _fires) = f(&mut ctx).map_err(|errno| Self::err(op, path, errno))?;
            if let Some(record) = record {
                txn.ops.push(record);
            }
            Ok(value)
        }
    }
}

impl XenStore for MemXenStore {
    fn read(&self, tx: Tx, path: &str) -> Result<Vec<u8>> {
        self.run(Method::XsRead, tx, path, None, |c| {
            Ok((c.read(path)?, Vec::new()))
        })
    }

    fn write(&self, tx: Tx, path: &str, value: &[u8]) -> Result<()> {
        let record = Op::Write(path.to_owned(), value.to_vec());
        self.run(Method::XsWrite, tx, path, Some(record), |c| {
            Ok(((), c.write(path, value)?))
        })
    }

    fn mkdir(&self, tx: Tx, path: &str) -> Result<()> {
        let record = Op::Mkdir(path.to_owned());
        self.run(Method::XsMkdir, tx, path, Some(record), |c| {
            Ok(((), c.mkdir(path)?))
        })
    }

    fn rm(&self, tx: Tx, path: &str) -> Result<()> {
        let record = Op::Rm(path.to_owned());
        self.run(Method::XsRm, tx, path, Some(record), |c| {
            Ok(((), c.rm(path)?))
        })
    }

    fn directory(&self, tx: Tx, path: &str) -> Result<Vec<String>> {
        self.run(Method::XsDirectory, tx, path, None, |c| {
            Ok((c.directory(path)?, Vec::new()))
        })
    }

    fn get_permissions(&self, tx: Tx, path: &str) -> Result<Vec<XsPerm>> {
        self.run(Method::XsGetPermissions, tx, path, None, |c| {
            Ok((c.get_perms(path)?, Vec::new()))
        })
    }

    fn set_permissions(&self, tx: Tx, path: &str, perms: &[XsPerm]) -> Result<()> {
        let record = Op::SetPerms(path.to_owned(), perms.to_vec());
        self.run(Method::XsSetPermissions, tx, path, Some(record), |c| {
            Ok(((), c.set_perms(path, perms)?))
        })
    }

    fn transaction_start(&self) -> Result<Tx> {
        let op = Method::XsTransactionStart;
        self.shared
            .fault(op, Target::None)
            .map_err(|errno| Self::err(op, "", errno))?;
        let mut xs = lock(&self.shared.xs);
        let id = xs.next_tx;
        xs.next_tx = xs.next_tx.checked_add(1).unwrap_or(1);
        let txn = Txn {
            conn: self.conn,
            tree: xs.tree.clone(),
            accessed: HashMap::new(),
            ops: Vec::new(),
        };
        xs.txns.insert(id, txn);
        Ok(Tx(id))
    }

    fn transaction_end(&self, tx: Tx, abort: bool) -> Result<()> {
        let op = Method::XsTransactionEnd;
        self.shared
            .fault(op, Target::None)
            .map_err(|errno| Self::err(op, "", errno))?;
        let mut xs = lock(&self.shared.xs);
        let txn = match xs.txns.remove(&tx.0) {
            Some(txn) if txn.conn == self.conn => txn,
            Some(other) => {
                xs.txns.insert(tx.0, other);
                return Err(Self::err(op, "", Errno::ENOENT));
            }
            None => return Err(Self::err(op, "", Errno::ENOENT)),
        };
        if abort {
            return Ok(());
        }
        let conflict = txn
            .accessed
            .iter()
            .find(|(path, gen)| xs.tree.nodes.get(path.as_str()).map(|n| n.gen) != **gen);
        if let Some((path, _)) = conflict {
            log::debug!("in-memory xenstore {tx}: {path} changed since the transaction started");
            return Err(Self::err(op, "", Errno::EAGAIN));
        }
        let mut fires = Vec::new();
        for change in &txn.ops {
            match xs.global(self.domid).apply(change) {
                Ok(f) => fires.extend(f),
                Err(errno) => {
                    log::warn!("in-memory xenstore {tx}: replaying {change:?}: {errno}");
                }
            }
        }
        xs.fire(&fires);
        Ok(())
    }

    fn watch(&self, path: &str, token: &str) -> Result<()> {
        let op = Method::XsWatch;
        self.shared
            .fault(op, Target::Path(path.to_owned()))
            .map_err(|errno| Self::err(op, path, errno))?;
        let special = path == INTRODUCE_DOMAIN || path == RELEASE_DOMAIN;
        if !special && !valid_path(path) {
            return Err(Self::err(op, path, Errno::EINVAL));
        }
        let mut xs = lock(&self.shared.xs);
        if xs
            .watches
            .iter()
            .any(|w| w.conn == self.conn && w.path == path && w.token == token)
        {
            return Err(Self::err(op, path, Errno::EEXIST));
        }
        xs.watches.push(Watch {
            conn: self.conn,
            domid: self.domid,
            path: path.to_owned(),
            token: token.to_owned(),
            queue: self.queue.clone(),
        });
        // xenstored fires every new watch once, whether or not the path exists.
        self.queue.push(WatchEvent {
            path: path.to_owned(),
            token: token.to_owned(),
        });
        Ok(())
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<()> {
        let op = Method::XsUnwatch;
        self.shared
            .fault(op, Target::Path(path.to_owned()))
            .map_err(|errno| Self::err(op, path, errno))?;
        let mut xs = lock(&self.shared.xs);
        let before = xs.watches.len();
        xs.watches
            .retain(|w| !(w.conn == self.conn && w.path == path && w.token == token));
        if xs.watches.len() == before {
            return Err(Self::err(op, path, Errno::ENOENT));
        }
        drop(xs);
        // Events of the removed watch that were not read yet are dropped with it.
        self.queue
            .retain(|e| !(e.token == token && is_child(&e.path, path)));
        Ok(())
    }

    fn read_watch(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>> {
        let op = Method::XsReadWatch;
        self.shared
            .fault(op, Target::None)
            .map_err(|errno| Self::err(op, "", errno))?;
        Ok(self.queue.pop(timeout))
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        self.queue.fd()
    }

    fn get_domain_path(&self, domid: DomId) -> Result<String> {
        let op = Method::XsGetDomainPath;
        self.shared
            .fault(op, Target::Domain(domid))
            .map_err(|errno| Self::err(op, "", errno))?;
        Ok(format!("/local/domain/{domid}"))
    }
}

impl Drop for MemXenStore {
    fn drop(&mut self) {
        let mut xs = lock(&self.shared.xs);
        xs.watches.retain(|w| w.conn != self.conn);
        xs.txns.retain(|_, t| t.conn != self.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_helpers() {
        assert!(is_child("/a/b", "/a"));
        assert!(is_child("/a", "/a"));
        assert!(!is_child("/ab", "/a"));
        assert!(is_child("/x", "/"));
        assert_eq!(parent_of("/a/b"), Some("/a"));
        assert_eq!(parent_of("/a"), Some("/"));
        assert_eq!(parent_of("/"), None);
        assert!(valid_path("/local/domain/1/device/vbd/768"));
        assert!(valid_path("/"));
        for bad in ["", "a", "/a/", "/a//b", "/a b", "/a.b"] {
            assert!(!valid_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn rights_follow_xenstored() {
        let perms = [
            XsPerm::new(3, XsPermKind::None),
            XsPerm::new(5, XsPermKind::Read),
        ];
        assert_eq!(rights(&perms, 0), XsPermKind::Both);
        assert_eq!(rights(&perms, 3), XsPermKind::Both);
        assert_eq!(rights(&perms, 5), XsPermKind::Read);
        assert_eq!(rights(&perms, 7), XsPermKind::None);
        let open = [XsPerm::new(0, XsPermKind::Read)];
        assert_eq!(rights(&open, 9), XsPermKind::Read);
    }
}
