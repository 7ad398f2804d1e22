//! Exit codes a runbook can branch on, and how failures are printed.

use crate::output::Output;

/// Generic failure (bad flags, unreadable file, server error).
pub const FAILED: i32 = 1;
/// The rollout ended rolled back (or aborted).
#[allow(dead_code)]
pub const ROLLED_BACK: i32 = 3;
/// The request was refused: invalid input, bad signature, conflict, frozen fleet.
pub const REFUSED: i32 = 4;
/// The coordinator could not be reached.
pub const UNREACHABLE: i32 = 5;

/// The exit code's meaning, as the runbook's table words it (one word a script matches).
pub fn meaning(code: i32) -> &'static str {
    match code {
        ROLLED_BACK => "rolled-back",
        REFUSED => "refused",
        UNREACHABLE => "unreachable",
        _ => "failed",
    }
}

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

    /// Prints the error chain and returns the exit code: a line of text, or
    /// under `-o json|yaml` an object a script can read (`kind: Error`).
    pub fn report(&self, output: Output) -> i32 {
        if output.structured() {
            let error = serde_json::json!({
                "apiVersion": crate::output::API_VERSION,
                "kind": "Error",
                "message": format!("{:#}", self.error),
                "exitCode": self.code,
                "reason": meaning(self.code),
            });
            let text = match output {
                Output::Yaml => crate::output::to_yaml(&error),
                _ => error.to_string(),
            };
            eprintln!("{text}");
        } else {
            eprintln!("error: {:#}", self.error);
        }
        self.code
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self { code: FAILED, error }
    }
}

pub type CliResult = Result<(), Failure>;
