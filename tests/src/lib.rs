//! Shared harness for hotfleet process-level tests.
