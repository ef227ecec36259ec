//! In-memory xenstore: nodes, permissions, watches, transactions.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use hypervisor::mem::{DomainConfig, MemXen, MemXenStore};
use hypervisor::{
    with_transaction, Errno, Hypervisor, HypervisorError, Method, Tx, WatchEvent, XenStore, XsPerm,
    XsPermKind,
};

const NONE: Tx = Tx::NONE;
const POLL: Option<Duration> = Some(Duration::ZERO);

fn readable(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let n = poll(&mut fds, PollTimeout::ZERO).expect("poll");
    n == 1
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
}

fn errno<T: std::fmt::Debug>(r: Result<T, HypervisorError>) -> Errno {
    r.expect_err("the call should fail")
        .errno()
        .expect("error with errno")
}

fn ev(path: &str, token: &str) -> WatchEvent {
    WatchEvent {
        path: path.to_owned(),
        token: token.to_owned(),
    }
}

/// All events queued now.
fn drain(xs: &dyn XenStore) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    while let Some(e) = xs.read_watch(POLL).expect("test setup") {
        out.push(e);
    }
    out
}

#[test]
fn nodes_read_write_mkdir_rm_directory() {
    let xen = MemXen::new();
    let xs = xen.open_xenstore().unwrap();
    xs.write(NONE, "/a/b/c", b"v1").unwrap();
    assert_eq!(xs.read(NONE, "/a/b/c").unwrap(), b"v1");
    assert_eq!(xs.read(NONE, "/a/b").unwrap(), b"", "parents created empty");
    xs.write(NONE, "/a/b/c", b"v2").unwrap();
    assert_eq!(xs.read(NONE, "/a/b/c").unwrap(), b"v2");
    xs.mkdir(NONE, "/a/d").unwrap();
    xs.mkdir(NONE, "/a/d").unwrap();
    xs.write(NONE, "/a/b/e", b"").unwrap();
    assert_eq!(xs.directory(NONE, "/a").unwrap(), vec!["b", "d"]);
    assert_eq!(xs.directory(NONE, "/a/b").unwrap(), vec!["c", "e"]);

    xs.rm(NONE, "/a/b").unwrap();
    assert_eq!(
        xs.read(NONE, "/a/b/c").unwrap_err(),
        HypervisorError::XenStore {
            op: Method::XsRead,
            path: String::from("/a/b/c"),
            errno: Errno::ENOENT
        }
    );
    assert_eq!(xs.directory(NONE, "/a").unwrap(), vec!["d"]);
    xs.rm(NONE, "/a/b").unwrap(); // absent, parent exists: no-op
    assert_eq!(errno(xs.rm(NONE, "/x/y")), Errno::ENOENT);
    assert_eq!(errno(xs.rm(NONE, "/")), Errno::EINVAL);
    assert_eq!(errno(xs.read(NONE, "relative")), Errno::EINVAL);
    assert_eq!(errno(xs.write(NONE, "/bad/", b"")), Errno::EINVAL);
    assert_eq!(errno(xs.write(NONE, "/big", &[0u8; 5000])), Errno::E2BIG);
    assert_eq!(xs.get_domain_path(7).unwrap(), "/local/domain/7");
}

#[test]
fn domains_get_a_home() {
    let xen = MemXen::new();
    let d = xen
        .create_domain(DomainConfig::hvm(4).with_name("vm1"))
        .unwrap();
    let xs = xen.open_xenstore().unwrap();
    let home = xs.get_domain_path(d).unwrap();
    assert_eq!(xs.read(NONE, &format!("{home}/name")).unwrap(), b"vm1");
    assert_eq!(
        xs.read(NONE, &format!("{home}/domid")).unwrap(),
        d.to_string().as_bytes()
    );
    assert_eq!(
        xs.get_permissions(NONE, &home).unwrap(),
        vec![
            XsPerm::new(0, XsPermKind::None),
            XsPerm::new(d, XsPermKind::Read)
        ]
    );
    xen.destroy_domain(d).unwrap();
    assert_eq!(errno(xs.read(NONE, &home)), Errno::ENOENT);
}

#[test]
fn guests_are_held_to_permissions() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(4)).unwrap();
    let other = xen.create_domain(DomainConfig::hvm(4)).unwrap();
    let dom0 = xen.open_xenstore().unwrap();
    let guest = xen.guest(d).xenstore().unwrap();
    let home = format!("/local/domain/{d}");

    // Its home is readable, not writable; dom0's is neither.
    guest.read(NONE, &home).unwrap();
    assert_eq!(
        errno(guest.write(NONE, &format!("{home}/x"), b"1")),
        Errno::EACCES
    );
    assert_eq!(errno(guest.read(NONE, "/local/domain/0")), Errno::EACCES);
    assert_eq!(
        errno(guest.read(NONE, &format!("/local/domain/{other}/name"))),
        Errno::EACCES
    );

    // What it creates in its device directory, it owns.
    let fe = format!("{home}/device/vbd/768");
    guest.write(NONE, &format!("{fe}/state"), b"1").unwrap();
    assert_eq!(
        dom0.get_permissions(NONE, &format!("{fe}/state")).unwrap(),
        vec![XsPerm::new(d, XsPermKind::None)]
    );

    // A backend directory dom0 owns and lets the guest read.
    let be = format!("/local/domain/0/backend/vbd/{d}/768");
    dom0.write(NONE, &format!("{be}/state"), b"2").unwrap();
    dom0.set_permissions(
        NONE,
        &be,
        &[
            XsPerm::new(0, XsPermKind::None),
            XsPerm::new(d, XsPermKind::Read),
        ],
    )
    .unwrap();
    guest.read(NONE, &be).unwrap();
    assert_eq!(errno(guest.write(NONE, &be, b"x")), Errno::EACCES);
    assert_eq!(
        errno(guest.read(NONE, &format!("{be}/state"))),
        Errno::EACCES,
        "children keep the permissions they were created with"
    );
    // A guest may not give its node away.
    assert_eq!(
        errno(guest.set_permissions(NONE, &fe, &[XsPerm::new(0, XsPermKind::Both)])),
        Errno::EPERM
    );
    guest
        .set_permissions(
            NONE,
            &fe,
            &[
                XsPerm::new(d, XsPermKind::None),
                XsPerm::new(0, XsPermKind::Read),
            ],
        )
        .unwrap();
    assert_eq!(errno(dom0.set_permissions(NONE, &fe, &[])), Errno::EINVAL);
}

#[test]
fn watches_fire_at_registration_and_for_descendants() {
    let xen = MemXen::new();
    let xs = xen.open_xenstore().unwrap();
    xs.watch("/be", "tok").unwrap();
    assert_eq!(drain(&*xs), vec![ev("/be", "tok")], "fires once when set");

    xs.write(NONE, "/be/vbd/1/state", b"1").unwrap();
    xs.write(NONE, "/bex", b"no").unwrap(); // a sibling sharing the prefix
    xs.write(NONE, "/be", b"").unwrap();
    assert_eq!(
        drain(&*xs),
        vec![ev("/be/vbd/1/state", "tok"), ev("/be", "tok")]
    );
    assert_eq!(errno(xs.watch("/be", "tok")), Errno::EEXIST);

    // Several watches, one connection: each fires with its own token.
    xs.watch("/be/vbd", "vbd").unwrap();
    drain(&*xs);
    xs.write(NONE, "/be/vbd/1/x", b"").unwrap();
    let mut got = drain(&*xs);
    got.sort_by(|a, b| a.token.cmp(&b.token));
    assert_eq!(
        got,
        vec![ev("/be/vbd/1/x", "tok"), ev("/be/vbd/1/x", "vbd")]
    );

    xs.unwatch("/be", "tok").unwrap();
    assert_eq!(errno(xs.unwatch("/be", "tok")), Errno::ENOENT);
    xs.write(NONE, "/be/y", b"").unwrap();
    assert!(drain(&*xs).is_empty());
}

#[test]
fn removal_fires_the_removed_subtree() {
    let xen = MemXen::new();
    let xs = xen.open_xenstore().unwrap();
    xs.write(NONE, "/d/fe/state", b"4").unwrap();
    xs.watch("/d", "parent").unwrap();
    xs.watch("/d/fe/state", "exact").unwrap();
    xs.watch("/d/fe/missing", "never").unwrap();
    drain(&*xs);
    xs.rm(NONE, "/d/fe").unwrap();
    let mut got = drain(&*xs);
    got.sort_by(|a, b| a.token.cmp(&b.token));
    assert_eq!(
        got,
        vec![ev("/d/fe/state", "exact"), ev("/d/fe", "parent")],
        "descendant watches fire with their path, ancestors with the removed path"
    );
}

#[test]
fn watch_fd_and_blocking_read() {
    let xen = MemXen::new();
    let xs = xen.open_xenstore().unwrap();
    let writer = xen.open_xenstore().unwrap();
    assert!(!readable(xs.as_fd()));
    xs.watch("/w", "t").unwrap();
    assert!(readable(xs.as_fd()));
    drain(&*xs);
    assert!(!readable(xs.as_fd()));
    assert_eq!(
        xs.read_watch(Some(Duration::from_millis(20))).unwrap(),
        None
    );
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        writer.write(NONE, "/w/k", b"v").unwrap();
    });
    assert_eq!(xs.read_watch(None).unwrap(), Some(ev("/w/k", "t")));
    t.join().unwrap();
}

#[test]
fn guest_watchers_only_see_what_they_may_read() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(4)).unwrap();
    let dom0 = xen.open_xenstore().unwrap();
    let guest = xen.guest(d).xenstore().unwrap();
    guest.watch("/local/domain/0", "spy").unwrap();
    drain(&guest);
    dom0.write(NONE, "/local/domain/0/secret", b"x").unwrap();
    assert!(drain(&guest).is_empty());

    // An unreadable node under a readable parent still fires (xenstored's watch_permitted):
    // that is how a frontend sees its backend's private keys come and go.
    let be = format!("/local/domain/0/backend/vbd/{d}");
    dom0.mkdir(NONE, &be).unwrap();
    dom0.set_permissions(
        NONE,
        &be,
        &[
            XsPerm::new(0, XsPermKind::None),
            XsPerm::new(d, XsPermKind::Read),
        ],
    )
    .unwrap();
    guest.unwatch("/local/domain/0", "spy").unwrap();
    guest.watch(&be, "be").unwrap();
    drain(&guest);
    dom0.write(NONE, &format!("{be}/private"), b"1").unwrap();
    dom0.set_permissions(
        NONE,
        &format!("{be}/private"),
        &[XsPerm::new(0, XsPermKind::None)],
    )
    .unwrap();
    assert_eq!(
        errno(guest.read(NONE, &format!("{be}/private"))),
        Errno::EACCES
    );
    dom0.write(NONE, &format!("{be}/private"), b"2").unwrap();
    assert_eq!(drain(&guest), vec![ev(&format!("{be}/private"), "be"); 3]);
    dom0.rm(NONE, &format!("{be}/private")).unwrap();
    assert_eq!(drain(&guest), vec![ev(&format!("{be}/private"), "be")]);
}

#[test]
fn domain_introduction_and_release_fire_special_watches() {
    let xen = MemXen::new();
    let xs = xen.open_xenstore().unwrap();
    xs.watch("@introduceDomain", "in").unwrap();
    xs.watch("@releaseDomain", "out").unwrap();
    drain(&*xs);
    let d = xen.create_domain(DomainConfig::hvm(4)).unwrap();
    assert_eq!(drain(&*xs), vec![ev("@introduceDomain", "in")]);
    xen.destroy_domain(d).unwrap();
    assert_eq!(drain(&*xs), vec![ev("@releaseDomain", "out")]);
}

#[test]
fn transactions_are_isolated_until_commit() {
    let xen = MemXen::new();
    let xs = xen.open_xenstore().unwrap();
    let other = xen.open_xenstore().unwrap();
    other.watch("/t", "w").unwrap();
    drain(&*other);
    xs.write(NONE, "/t/old", b"1").unwrap();
    assert_eq!(drain(&*other), vec![ev("/t/old", "w")]);

    let tx = xs.transaction_start().unwrap();
    xs.write(tx, "/t/new", b"2").unwrap();
    xs.rm(tx, "/t/old").unwrap();
    assert_eq!(
        xs.read(tx, "/t/new").unwrap(),
        b"2",
        "own writes visible inside"
    );
    assert_eq!(errno(xs.read(tx, "/t/old")), Errno::ENOENT);
    assert_eq!(
        errno(xs.read(NONE, "/t/new")),
        Errno::ENOENT,
        "invisible outside"
    );
    assert_eq!(other.read(NONE, "/t/old").unwrap(), b"1");
    assert!(drain(&*other).is_empty(), "no events before commit");
    assert_eq!(
        errno(other.read(tx, "/t/new")),
        Errno::ENOENT,
        "not its transaction"
    );

    xs.transaction_end(tx, false).unwrap();
    assert_eq!(other.read(NONE, "/t/new").unwrap(), b"2");
    assert_eq!(errno(other.read(NONE, "/t/old")), Errno::ENOENT);
    assert_eq!(drain(&*other), vec![ev("/t/new", "w"), ev("/t/old", "w")]);
    assert_eq!(
        errno(xs.transaction_end(tx, false)),
        Errno::ENOENT,
        "already ended"
    );

    let tx = xs.transaction_start().unwrap();
    xs.write(tx, "/t/aborted", b"x").unwrap();
    xs.transaction_end(tx, true).unwrap();
    assert_eq!(errno(xs.read(NONE, "/t/aborted")), Errno::ENOENT);
}

#[test]
fn commit_conflicts_when_a_touched_node_changed() {
    let xen = MemXen::new();
    let xs = xen.open_xenstore().unwrap();
    let other = xen.open_xenstore().unwrap();
    xs.write(NONE, "/c/a", b"1").unwrap();
    xs.write(NONE, "/c/b", b"1").unwrap();

    // Read A, someone else writes A: conflict, and nothing of ours lands.
    let tx = xs.transaction_start().unwrap();
    assert_eq!(xs.read(tx, "/c/a").unwrap(), b"1");
    xs.write(tx, "/c/mine", b"x").unwrap();
    other.write(NONE, "/c/a", b"2").unwrap();
    let err = xs.transaction_end(tx, false).unwrap_err();
    assert!(err.is_transaction_conflict(), "{err:?}");
    assert_eq!(err.errno(), Some(Errno::EAGAIN));
    assert_eq!(errno(xs.read(NONE, "/c/mine")), Errno::ENOENT);

    // A change to a node the transaction never touched does not conflict.
    let tx = xs.transaction_start().unwrap();
    xs.read(tx, "/c/a").unwrap();
    xs.write(tx, "/c/a", b"3").unwrap();
    other.write(NONE, "/c/b", b"2").unwrap();
    xs.transaction_end(tx, false).unwrap();
    assert_eq!(xs.read(NONE, "/c/a").unwrap(), b"3");

    // Listing a directory then someone adding a child: conflict.
    let tx = xs.transaction_start().unwrap();
    assert_eq!(xs.directory(tx, "/c").unwrap(), vec!["a", "b"]);
    other.write(NONE, "/c/z", b"").unwrap();
    assert!(xs
        .transaction_end(tx, false)
        .unwrap_err()
        .is_transaction_conflict());

    // Creating a node that someone else created meanwhile: conflict.
    let tx = xs.transaction_start().unwrap();
    xs.write(tx, "/c/new", b"mine").unwrap();
    other.write(NONE, "/c/new", b"theirs").unwrap();
    assert!(xs
        .transaction_end(tx, false)
        .unwrap_err()
        .is_transaction_conflict());
    assert_eq!(xs.read(NONE, "/c/new").unwrap(), b"theirs");

    // Two transactions writing the same node: the second commit loses.
    let t1 = xs.transaction_start().unwrap();
    let t2 = other.transaction_start().unwrap();
    xs.write(t1, "/c/a", b"t1").unwrap();
    other.write(t2, "/c/a", b"t2").unwrap();
    xs.transaction_end(t1, false).unwrap();
    assert!(other
        .transaction_end(t2, false)
        .unwrap_err()
        .is_transaction_conflict());
    assert_eq!(xs.read(NONE, "/c/a").unwrap(), b"t1");
}

#[test]
fn with_transaction_retries_conflicts() {
    let xen = MemXen::new();
    let xs = xen.open_xenstore().unwrap();
    let other = xen.open_xenstore().unwrap();
    xs.write(NONE, "/n", b"0").unwrap();

    // The first attempt races with another writer; the second one wins.
    let mut attempts = 0;
    let value = with_transaction(&*xs, 5, |tx| {
        attempts += 1;
        let n: u32 = String::from_utf8(xs.read(tx, "/n")?)
            .unwrap()
            .parse()
            .unwrap();
        if attempts == 1 {
            other.write(NONE, "/n", b"10").unwrap();
        }
        xs.write(tx, "/n", (n + 1).to_string().as_bytes())?;
        Ok(n + 1)
    })
    .unwrap();
    assert_eq!((attempts, value), (2, 11));
    assert_eq!(xs.read(NONE, "/n").unwrap(), b"11");

    // Always racing: gives up after the limit.
    let mut attempts = 0;
    let err = with_transaction(&*xs, 3, |tx| {
        attempts += 1;
        xs.read(tx, "/n")?;
        other
            .write(NONE, "/n", attempts.to_string().as_bytes())
            .unwrap();
        xs.write(tx, "/n", b"never")
    })
    .unwrap_err();
    assert_eq!(
        err,
        HypervisorError::TransactionRetriesExhausted { attempts: 3 }
    );
    assert_eq!(attempts, 3);

    // A failing body aborts and is not retried.
    let mut attempts = 0;
    let err = with_transaction(&*xs, 3, |tx| {
        attempts += 1;
        xs.write(tx, "/partial", b"x")?;
        xs.read(tx, "/absent")
    })
    .unwrap_err();
    assert_eq!(err.errno(), Some(Errno::ENOENT));
    assert_eq!(attempts, 1);
    assert_eq!(errno(xs.read(NONE, "/partial")), Errno::ENOENT, "aborted");
}

#[test]
fn dropping_a_connection_drops_its_watches_and_transactions() {
    let xen = MemXen::new();
    let writer = xen.open_xenstore().unwrap();
    {
        let xs: MemXenStore = xen.open_xenstore_as(0).unwrap();
        xs.watch("/gone", "t").unwrap();
        let tx = xs.transaction_start().unwrap();
        xs.write(tx, "/gone/pending", b"x").unwrap();
        assert_eq!(xs.queued_events(), 1);
    }
    writer.write(NONE, "/gone/x", b"1").unwrap();
    assert_eq!(errno(writer.read(NONE, "/gone/pending")), Errno::ENOENT);
}
