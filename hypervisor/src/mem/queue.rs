//! A level-triggered event queue with a pollable file descriptor, standing in for the
//! evtchn device and the xenstore socket.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::lock;

/// A FIFO whose file descriptor polls readable exactly while the FIFO is non-empty: one byte
/// sits in a socket pair while there are items (written on empty → non-empty, drained on
/// non-empty → empty, both under the queue's lock).
#[derive(Debug)]
pub(crate) struct EventQueue<T> {
    items: Mutex<VecDeque<T>>,
    cond: Condvar,
    reader: UnixStream,
    writer: UnixStream,
}

impl<T> EventQueue<T> {
    pub(crate) fn new() -> std::io::Result<EventQueue<T>> {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        Ok(EventQueue {
            items: Mutex::new(VecDeque::new()),
            cond: Condvar::new(),
            reader,
            writer,
        })
    }

    pub(crate) fn push(&self, item: T) {
        let mut items = lock(&self.items);
        if items.is_empty() {
            if let Err(err) = (&self.writer).write(&[1]) {
                log::warn!("in-memory event queue: cannot signal readiness: {err}");
            }
        }
        items.push_back(item);
        self.cond.notify_all();
    }

    /// Removes the items `pred` selects (e.g. the ports of an unbound channel).
    pub(crate) fn retain(&self, mut pred: impl FnMut(&T) -> bool) {
        let mut items = lock(&self.items);
        let was_empty = items.is_empty();
        items.retain(|i| pred(i));
        if !was_empty && items.is_empty() {
            self.drain_signal();
        }
    }

    fn drain_signal(&self) {
        let mut byte = [0u8; 1];
        match (&self.reader).read(&mut byte) {
            Ok(_) => {}
            Err(err) if err.kind() == ErrorKind::WouldBlock => {}
            Err(err) => log::warn!("in-memory event queue: cannot clear readiness: {err}"),
        }
    }

    /// Takes the next item, waiting up to `timeout` (`None`: forever).
    pub(crate) fn pop(&self, timeout: Option<Duration>) -> Option<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut items = lock(&self.items);
        loop {
            if let Some(item) = items.pop_front() {
                if items.is_empty() {
                    self.drain_signal();
                }
                return Some(item);
            }
            match deadline {
                None => {
                    items = self
                        .cond
                        .wait(items)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    items = self
                        .cond
                        .wait_timeout(items, deadline - now)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.items).len()
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.reader.as_fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Whether the readiness byte is in the socket (what makes the fd poll readable), checked
    /// by reading it and putting it back.
    fn readable<T>(q: &EventQueue<T>) -> bool {
        let mut bytes = [0u8; 2];
        match (&q.reader).read(&mut bytes) {
            Ok(n) => {
                (&q.writer).write_all(&bytes[..n]).unwrap();
                assert!(n <= 1, "{n} readiness bytes");
                n == 1
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn fd_is_readable_exactly_while_non_empty() {
        let q = EventQueue::new().unwrap();
        assert!(!readable(&q));
        q.push(1);
        q.push(2);
        assert!(readable(&q));
        assert_eq!(q.pop(Some(Duration::ZERO)), Some(1));
        assert!(readable(&q));
        assert_eq!(q.pop(Some(Duration::ZERO)), Some(2));
        assert!(!readable(&q));
        assert_eq!(q.pop(Some(Duration::from_millis(10))), None);
        q.push(3);
        q.retain(|i| *i != 3);
        assert!(!readable(&q));
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn pop_blocks_until_push() {
        let q = std::sync::Arc::new(EventQueue::new().unwrap());
        let q2 = q.clone();
        let t = std::thread::spawn(move || q2.pop(None));
        std::thread::sleep(Duration::from_millis(20));
        q.push(7u32);
        assert_eq!(t.join().unwrap(), Some(7));
    }
}
