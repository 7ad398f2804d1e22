//! "Come back later" between a busy coordinator and its agents.
//!
//! A coordinator that cannot take another registration now answers
//! `RESOURCE_EXHAUSTED` with how long to wait in the `grpc-retry-pushback-ms`
//! metadata (the name gRPC's retry design gives a server's pushback). The
//! agent waits that long, spread by ±25 % so a storm of refused agents does
//! not come back in step, and asks the same coordinator again.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    time::Duration,
};

use tonic::{Code, Status};

/// The metadata key that carries the wait, in whole milliseconds.
pub const HEADER: &str = "grpc-retry-pushback-ms";

/// A `RESOURCE_EXHAUSTED` answer telling the caller to come back in `wait`.
pub fn busy(message: impl Into<String>, wait: Duration) -> Status {
    let mut status = Status::resource_exhausted(message);
    let millis = wait.as_millis().max(1).to_string();
    if let Ok(value) = millis.parse() {
        status.metadata_mut().insert(HEADER, value);
    }
    status
}

/// The wait a busy answer asks for; `None` for any other answer (a refusal
/// without a valid pushback is an ordinary error).
pub fn wait_of(status: &Status) -> Option<Duration> {
    if status.code() != Code::ResourceExhausted {
        return None;
    }
    let millis: u64 = status.metadata().get(HEADER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_millis(millis))
}

/// `wait` spread uniformly over ±25 %.
pub fn jittered(wait: Duration) -> Duration {
    // A fresh `RandomState` is randomly keyed: enough randomness for a
    // jitter, without a dependency.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(wait.as_nanos() as u64);
    let unit = (hasher.finish() % 10_001) as f64 / 10_000.0;
    wait.mul_f64(0.75 + unit / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_answer_carries_its_wait_and_nothing_else_does() {
        let status = busy("busy", Duration::from_millis(1_250));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(wait_of(&status), Some(Duration::from_millis(1_250)));
        // Operator load shedding refuses without a pushback: not a wait.
        assert_eq!(wait_of(&Status::resource_exhausted("too many")), None);
        let mut other = Status::unavailable("down");
        other.metadata_mut().insert(HEADER, "5".parse().expect("ascii"));
        assert_eq!(wait_of(&other), None, "only RESOURCE_EXHAUSTED is a pushback");
        let mut garbage = Status::resource_exhausted("x");
        garbage.metadata_mut().insert(HEADER, "soon".parse().expect("ascii"));
        assert_eq!(wait_of(&garbage), None);
    }

    #[test]
    fn jitter_stays_within_a_quarter_and_spreads() {
        let wait = Duration::from_millis(1_000);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(wait)).collect();
        assert!(waits.iter().all(|w| *w >= Duration::from_millis(750) && *w <= Duration::from_millis(1_250)));
        let distinct: std::collections::HashSet<_> = waits.iter().map(|w| w.as_millis()).collect();
        assert!(distinct.len() > 50, "200 jittered waits took only {} values", distinct.len());
    }
}
