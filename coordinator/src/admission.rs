//! Registration admission control: a registration storm (a data centre's
//! agents restarting together, a coordinator fail-over) is served at the rate
//! the coordinator can take, not queued without bound.
//!
//! At most `limit` registrations are served at once. One more is refused at
//! once with a time to come back (see [`hotfleet_proto::pushback`]), and each
//! refusal gets its own later slot: the slots are spaced by how long a
//! registration has been taking divided by `limit`, so the hint grows with
//! the backlog and the refused agents come back spread over the time the
//! coordinator needs to serve them, not all together.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The shortest wait a refusal asks for.
const MIN_WAIT: Duration = Duration::from_millis(100);
/// The longest: an agent told to wait longer would look lost for no reason.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// What one registration is assumed to take before any has been measured.
const FIRST_GUESS: Duration = Duration::from_millis(20);

/// A refusal: come back in `wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    pub wait: Duration,
    pub in_flight: usize,
    /// Refused callers told to come back before this one.
    pub ahead: usize,
}

impl Busy {
    pub fn message(&self) -> String {
        format!(
            "coordinator busy: {} registrations in progress and {} agents told to come back first; register again in {} ms",
            self.in_flight,
            self.ahead,
            self.wait.as_millis()
        )
    }
}

#[derive(Debug)]
struct State {
    in_flight: usize,
    /// Moving average of how long one admitted registration took.
    service: Duration,
    /// When the next refused caller is told to come back.
    next_slot: Instant,
}

/// The admission gate of registrations (one per coordinator).
#[derive(Debug)]
pub struct Admission {
    limit: usize,
    state: Mutex<State>,
}

/// One admitted registration; dropping it frees its place and records how
/// long it took.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    started: Instant,
}

impl Admission {
    /// `limit`: registrations served at once (at least 1).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            state: Mutex::new(State { in_flight: 0, service: FIRST_GUESS, next_slot: Instant::now() }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a few plain assignments: a poisoned lock is whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits one registration now, or says when to come back.
    pub fn enter(self: &Arc<Self>) -> Result<Ticket, Busy> {
        self.enter_at(Instant::now())
    }

    fn enter_at(self: &Arc<Self>, now: Instant) -> Result<Ticket, Busy> {
        let mut state = self.state();
        if state.in_flight < self.limit {
            state.in_flight += 1;
            return Ok(Ticket { admission: self.clone(), started: now });
        }
        // At full speed one registration ends every `spacing`.
        let spacing = (state.service / self.limit as u32).max(Duration::from_micros(100));
        let earliest = now + MIN_WAIT.max(state.service);
        let slot = state.next_slot.max(earliest);
        let ahead = (slot.saturating_duration_since(earliest).as_nanos() / spacing.as_nanos().max(1)) as usize;
        state.next_slot = slot + spacing;
        Err(Busy { wait: (slot - now).min(MAX_WAIT), in_flight: state.in_flight, ahead })
    }

    fn leave(&self, took: Duration) {
        let mut state = self.state();
        state.in_flight = state.in_flight.saturating_sub(1);
        state.service = state.service.mul_f64(0.9) + took.mul_f64(0.1);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.leave(self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_to_the_limit_is_admitted_and_each_refusal_is_told_to_wait_longer() {
        let gate = Admission::new(2);
        let now = Instant::now();
        let a = gate.enter_at(now).expect("first");
        let _b = gate.enter_at(now).expect("second");
        let waits: Vec<Busy> = (0..50).map(|_| gate.enter_at(now).expect_err("over the limit")).collect();
        assert_eq!(waits[0].wait, MIN_WAIT, "the first refused comes back after the shortest wait");
        assert_eq!(waits[0].ahead, 0);
        assert!(waits.windows(2).all(|w| w[1].wait > w[0].wait), "the hint grows with the backlog");
        assert_eq!(waits[49].ahead, 49);
        // 20 ms a registration, 2 at once: one slot every 10 ms.
        assert_eq!(waits[49].wait, MIN_WAIT + Duration::from_millis(490));
        assert!(waits[0].message().contains("register again in 100 ms"), "{}", waits[0].message());
        drop(a);
        assert!(gate.enter().is_ok(), "a freed place is taken at once");
    }

    #[test]
    fn the_hint_follows_the_measured_pace_and_shrinks_as_the_slots_pass() {
        let gate = Admission::new(1);
        // Registrations that take 200 ms pull the average up.
        for _ in 0..40 {
            gate.state().in_flight += 1;
            gate.leave(Duration::from_millis(200));
        }
        assert_eq!(gate.state().in_flight, 0);
        let service = gate.state().service;
        assert!(service > Duration::from_millis(150), "average {service:?}");
        let now = Instant::now();
        let _held = gate.enter_at(now).expect("free");
        let first = gate.enter_at(now).expect_err("full");
        let second = gate.enter_at(now).expect_err("full");
        assert_eq!(first.wait, service, "never before one registration's time");
        assert_eq!(second.wait - first.wait, service, "one slot per registration's time");
        // Long after every slot has passed, a refusal is back to the shortest wait.
        let later = now + Duration::from_secs(60);
        assert_eq!(gate.enter_at(later).expect_err("still full").wait, service);
    }

    #[test]
    fn a_wait_never_exceeds_the_maximum() {
        let gate = Admission::new(1);
        let now = Instant::now();
        let _held = gate.enter_at(now).expect("free");
        let mut last = gate.enter_at(now).expect_err("full");
        for _ in 0..10_000 {
            last = gate.enter_at(now).expect_err("full");
        }
        assert_eq!(last.wait, MAX_WAIT);
        assert_eq!(last.in_flight, 1);
    }
}
