//! Turns at the database's write lock between the record writer and rollout
//! transitions.
//!
//! SQLite lets one connection write at a time. A connection that finds the
//! lock taken polls for it (`busy_timeout`: sleeps of 1 ms growing to
//! 100 ms), and under load the record writer commits group after group with
//! only moments between them, so a rollback could poll through many of them
//! (and on a saturated machine the writer, at a lowered priority, holds the
//! lock for longer still). The gate gives the transitions the next turn: the
//! writer starts no transaction while one waits, and commits what it has at
//! the next statement boundary (at most 16 records) when one arrives, then
//! carries on with the rest of its batch in the following transaction.
//!
//! Only rollout transitions and gate verdicts take a priority turn; both are
//! rare, so the writer cannot be starved by them. Everything else that
//! writes (feedback, reviews, evals) and other processes (the CLI) still
//! meet the lock through `busy_timeout`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct WriteGate {
    /// Whether the record writer is inside a transaction.
    writer: Mutex<bool>,
    changed: Condvar,
    /// Priority writes waiting or in progress; read by the writer between
    /// statements without taking the mutex, changed only under it (so a
    /// waiter never misses the wake-up).
    wanted: AtomicUsize,
}

impl WriteGate {
    fn lock(&self) -> MutexGuard<'_, bool> {
        // One flag; a panic elsewhere cannot leave it half-written.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the writer's current transaction (which ends early, see
    /// [`WriteGate::wanted`]) and keeps it out until the turn is dropped.
    pub(crate) fn priority(&self) -> PriorityTurn<'_> {
        let mut writer = self.lock();
        self.wanted.fetch_add(1, Ordering::SeqCst);
        while *writer {
            writer = self.changed.wait(writer).unwrap_or_else(|p| p.into_inner());
        }
        PriorityTurn { gate: self }
    }

    /// Waits until no priority write waits or runs; the writer then holds
    /// the turn for one transaction.
    pub(crate) fn writer(&self) -> WriterTurn<'_> {
        let mut writer = self.lock();
        while self.wanted.load(Ordering::SeqCst) > 0 {
            writer = self.changed.wait(writer).unwrap_or_else(|p| p.into_inner());
        }
        *writer = true;
        WriterTurn { gate: self }
    }

    /// Whether a priority write is waiting: the writer commits what it has
    /// and lets it go first.
    pub(crate) fn wanted(&self) -> bool {
        self.wanted.load(Ordering::SeqCst) > 0
    }
}

/// A priority write's turn; see [`WriteGate::priority`].
pub(crate) struct PriorityTurn<'a> {
    gate: &'a WriteGate,
}

impl Drop for PriorityTurn<'_> {
    fn drop(&mut self) {
        let writer = self.gate.lock();
        self.gate.wanted.fetch_sub(1, Ordering::SeqCst);
        drop(writer);
        self.gate.changed.notify_all();
    }
}

/// The writer's turn for one transaction; see [`WriteGate::writer`].
pub(crate) struct WriterTurn<'a> {
    gate: &'a WriteGate,
}

impl Drop for WriterTurn<'_> {
    fn drop(&mut self) {
        *self.gate.lock() = false;
        self.gate.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::WriteGate;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_priority_write_waits_for_the_writers_transaction_and_then_goes_first() {
        let gate = Arc::new(WriteGate::default());
        let writer = gate.writer();
        assert!(!gate.wanted());
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (gate, done) = (gate.clone(), done.clone());
            std::thread::spawn(move || {
                let _turn = gate.priority();
                done.store(true, Ordering::SeqCst);
                // Hold the turn a moment: the writer must not get in.
                std::thread::sleep(Duration::from_millis(50));
            })
        };
        while !gate.wanted() {
            std::thread::yield_now();
        }
        // Waiting, not past the gate while the writer is in.
        std::thread::sleep(Duration::from_millis(20));
        assert!(!done.load(Ordering::SeqCst));
        drop(writer);
        // The writer's next turn comes only after the priority write.
        let _again = gate.writer();
        assert!(done.load(Ordering::SeqCst));
        assert!(!gate.wanted());
        t.join().expect("priority thread");
    }

    #[test]
    fn priority_writes_do_not_wait_for_each_other_at_the_gate() {
        let gate = WriteGate::default();
        let a = gate.priority();
        let b = gate.priority();
        assert!(gate.wanted());
        drop(a);
        assert!(gate.wanted());
        drop(b);
        assert!(!gate.wanted());
        let _w = gate.writer();
    }
}
