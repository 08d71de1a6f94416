//! Operations as objects: the steps of a multi-step change, their progress, errors and the
//! retry schedule. Pure functions over [`Operation`]; the controller persists operations with
//! their volume and calls these from agent syncs and from its retry timer.
//!
//! Attempts: an operation starts with attempt 1. When the agent that must carry out a step
//! reports an error *after applying the desired state of that attempt*, the attempt has
//! failed: it goes to `retry_history`, the operation becomes `retrying` and `next_retry_unix`
//! is set with exponential backoff (1 s, 2 s, 4 s ... at most [`BACKOFF_MAX_SECS`]). When that
//! time comes the controller starts the next attempt (bumps the node's desired revision so
//! the agent re-applies at once). Operations never give up by themselves.

use tandem_api::{AttemptRecord, Operation, OperationStep};

pub const PENDING: &str = "pending";
pub const RUNNING: &str = "running";
pub const RETRYING: &str = "retrying";
pub const DONE: &str = "done";
pub const FAILED: &str = "failed";
/// Replaced by a newer operation of the same kind (a second resize): finished, not failed.
pub const SUPERSEDED: &str = "superseded";
/// Stopped by the operator (`volume abort`) and undone: finished, not failed.
pub const ABORTED: &str = "aborted";

/// Longest wait between two attempts.
pub const BACKOFF_MAX_SECS: u64 = 60;
/// Failed attempts kept in `retry_history`.
pub const HISTORY_MAX: usize = 10;

/// Seconds to wait after attempt `attempt` (1-based) failed.
pub fn backoff_secs(attempt: u32) -> u64 {
    let exp = attempt.saturating_sub(1).min(16);
    (1u64 << exp).min(BACKOFF_MAX_SECS)
}

/// A step that waits for `node` (or for nothing, when `node` is `None`).
pub fn step(name: impl Into<String>, node: Option<&str>, state: &str) -> OperationStep {
    OperationStep {
        name: name.into(),
        node: node.map(str::to_string),
        state: state.to_string(),
        last_error: None,
    }
}

/// A new operation at attempt 1. Its state follows from the steps' states.
pub fn new(kind: &str, steps: Vec<OperationStep>, now: u64) -> Operation {
    let mut op = Operation {
        kind: kind.to_string(),
        state: RUNNING.to_string(),
        progress: 0.0,
        last_error: None,
        id: uuid::Uuid::new_v4().to_string(),
        steps,
        attempts: 1,
        started_unix: now,
        last_attempt_unix: Some(now),
        next_retry_unix: None,
        finished_unix: None,
        eta_secs: None,
        retry_history: Vec::new(),
    };
    refresh(&mut op, now);
    op
}

/// Recomputes progress, and finishes the operation when every step is done.
fn refresh(op: &mut Operation, now: u64) {
    let total = op.steps.len().max(1);
    let done = op.steps.iter().filter(|s| s.state == DONE).count();
    op.progress = done as f64 / total as f64;
    if done == op.steps.len() {
        op.state = DONE.to_string();
        op.progress = 1.0;
        op.last_error = None;
        op.next_retry_unix = None;
        op.eta_secs = Some(0);
        if op.finished_unix.is_none() {
            op.finished_unix = Some(now);
        }
    }
}

pub fn is_finished(op: &Operation) -> bool {
    op.state == DONE || op.state == FAILED || op.state == SUPERSEDED || op.state == ABORTED
}

/// Ends an unfinished operation that the operator aborted (its changes were undone).
pub fn aborted(op: &mut Operation, why: &str, now: u64) {
    if is_finished(op) {
        return;
    }
    op.state = ABORTED.to_string();
    op.last_error = Some(why.to_string());
    op.next_retry_unix = None;
    op.finished_unix = Some(now);
    op.eta_secs = None;
}

/// Ends an unfinished operation because a newer one of the same kind replaces it (its
/// remaining steps are carried out by the newer one).
pub fn supersede(op: &mut Operation, why: &str, now: u64) {
    if is_finished(op) {
        return;
    }
    op.state = SUPERSEDED.to_string();
    op.last_error = Some(why.to_string());
    op.next_retry_unix = None;
    op.finished_unix = Some(now);
    op.eta_secs = None;
}

/// Index of the first step that waits for `node` and is not done.
pub fn open_step(op: &Operation, node: &str) -> Option<usize> {
    op.steps
        .iter()
        .position(|s| s.state != DONE && s.node.as_deref() == Some(node))
}

/// Step `idx` is done.
pub fn step_done(op: &mut Operation, idx: usize, now: u64) {
    if let Some(s) = op.steps.get_mut(idx) {
        s.state = DONE.to_string();
        s.last_error = None;
    }
    if let Some(next) = op.steps.get_mut(idx + 1)
        && next.state == PENDING
    {
        next.state = RUNNING.to_string();
    }
    if !op.steps.iter().any(|s| s.last_error.is_some()) {
        op.last_error = None;
    }
    refresh(op, now);
}

/// Step `idx` reports `error`. `current` tells whether the report reflects the current
/// attempt (the agent applied the desired state of this attempt); only then the attempt
/// counts as failed and a retry is scheduled. Returns true when an attempt failed.
pub fn step_failed(op: &mut Operation, idx: usize, error: &str, current: bool, now: u64) -> bool {
    if let Some(s) = op.steps.get_mut(idx) {
        s.last_error = Some(error.to_string());
        s.state = FAILED.to_string();
    }
    op.last_error = Some(error.to_string());
    if op.state != RUNNING || !current {
        return false;
    }
    op.retry_history.push(AttemptRecord {
        attempt: op.attempts,
        failed_unix: now,
        error: error.to_string(),
    });
    if op.retry_history.len() > HISTORY_MAX {
        let extra = op.retry_history.len() - HISTORY_MAX;
        op.retry_history.drain(..extra);
    }
    op.state = RETRYING.to_string();
    op.next_retry_unix = Some(now + backoff_secs(op.attempts));
    true
}

/// Whether a retry of `op` is due at `now`.
pub fn retry_due(op: &Operation, now: u64) -> bool {
    op.state == RETRYING && op.next_retry_unix.is_none_or(|t| t <= now)
}

/// Starts the next attempt; returns the nodes whose agents must re-apply.
pub fn start_retry(op: &mut Operation, now: u64) -> Vec<String> {
    op.attempts = op.attempts.saturating_add(1);
    op.last_attempt_unix = Some(now);
    op.next_retry_unix = None;
    op.state = RUNNING.to_string();
    let mut nodes = Vec::new();
    for s in op.steps.iter_mut().filter(|s| s.state == FAILED) {
        s.state = RUNNING.to_string();
        if let Some(n) = &s.node {
            nodes.push(n.clone());
        }
    }
    nodes
}

/// Ends an unfinished operation for good (e.g. its volume is being deleted).
pub fn abort(op: &mut Operation, why: &str, now: u64) {
    if is_finished(op) {
        return;
    }
    op.state = FAILED.to_string();
    op.last_error = Some(why.to_string());
    op.next_retry_unix = None;
    op.finished_unix = Some(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create_op() -> Operation {
        new(
            "create",
            vec![
                step("place", None, DONE),
                step("create replica on n1:default", Some("n1"), RUNNING),
            ],
            100,
        )
    }

    #[test]
    fn progress_follows_steps() {
        let mut op = create_op();
        assert_eq!(op.state, RUNNING);
        assert_eq!(op.progress, 0.5);
        assert_eq!(open_step(&op, "n1"), Some(1));
        assert_eq!(open_step(&op, "n2"), None);
        step_done(&mut op, 1, 105);
        assert_eq!((op.state.as_str(), op.progress), (DONE, 1.0));
        assert_eq!(op.finished_unix, Some(105));
    }

    #[test]
    fn failures_back_off_and_retry() {
        let mut op = create_op();
        // A stale report only shows the error.
        assert!(!step_failed(&mut op, 1, "boom", false, 101));
        assert_eq!(op.state, RUNNING);
        assert_eq!(op.last_error.as_deref(), Some("boom"));
        assert!(step_failed(&mut op, 1, "boom", true, 101));
        assert_eq!(op.state, RETRYING);
        assert_eq!(op.next_retry_unix, Some(102));
        assert_eq!(op.retry_history.len(), 1);
        // Further reports during the wait are not new attempts.
        assert!(!step_failed(&mut op, 1, "boom again", true, 101));
        assert_eq!(op.retry_history.len(), 1);
        assert!(!retry_due(&op, 101));
        assert!(retry_due(&op, 102));
        assert_eq!(start_retry(&mut op, 102), vec!["n1".to_string()]);
        assert_eq!((op.state.as_str(), op.attempts), (RUNNING, 2));
        assert!(step_failed(&mut op, 1, "boom", true, 103));
        assert_eq!(op.next_retry_unix, Some(105));
        start_retry(&mut op, 105);
        step_done(&mut op, 1, 106);
        assert_eq!(op.state, DONE);
        assert_eq!(op.last_error, None);
        assert_eq!(op.attempts, 3);
        assert_eq!(op.retry_history.len(), 2);
    }

    #[test]
    fn backoff_is_capped_and_history_bounded() {
        assert_eq!(backoff_secs(1), 1);
        assert_eq!(backoff_secs(3), 4);
        assert_eq!(backoff_secs(100), BACKOFF_MAX_SECS);
        let mut op = create_op();
        for i in 0..30 {
            step_failed(&mut op, 1, "x", true, 100 + i);
            start_retry(&mut op, 100 + i);
        }
        assert_eq!(op.retry_history.len(), HISTORY_MAX);
        assert_eq!(op.attempts, 31);
    }
}
