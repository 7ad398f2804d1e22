//! Exit codes a runbook can branch on, and how failures are printed.

/// Generic failure (bad flags, unreadable file, server error).
pub const FAILED: i32 = 1;
/// The rollout ended rolled back (or aborted).
#[allow(dead_code)]
pub const ROLLED_BACK: i32 = 3;
/// The request was refused: invalid input, bad signature, conflict, frozen fleet.
pub const REFUSED: i32 = 4;
/// The coordinator could not be reached.
pub const UNREACHABLE: i32 = 5;

/// A failure with its exit code; printed once, at the top.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn refused(error: impl Into<anyhow::Error>) -> Self {
        Self { code: REFUSED, error: error.into() }
    }

    /// Prints the error chain and returns the exit code.
    pub fn report(&self) -> i32 {
        eprintln!("error: {:#}", self.error);
        self.code
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self { code: FAILED, error }
    }
}

pub type CliResult = Result<(), Failure>;
