//! Completions delivered as a group.
//!
//! A device with asynchronous writes may complete many of them at once: a replicated volume
//! completes every write a batch of its peers' acknowledgements covers in one run of its
//! engine. It runs those [`crate::WriteDone`] callbacks inside [`group`]. A front end whose
//! callback answers a client (the NBD server) may then hold the answer with [`after_group`]
//! and send everything it held when the group ends: one `sendmsg` and one wake-up of the
//! client for the group instead of one per write.
//!
//! Groups are per thread. A callback run outside any group is told so ([`after_group`] gives
//! its hook back) and answers at once. A group inside a group is part of the outer one.

use std::cell::RefCell;

/// Work to run when the current group ends.
pub type Hook = Box<dyn FnOnce()>;

thread_local! {
    /// `Some` while this thread runs a group: the hooks to run at its end.
    static HOOKS: RefCell<Option<Vec<Hook>>> = const { RefCell::new(None) };
}

/// Runs `f` as a group: hooks registered with [`after_group`] during `f` run after it, on
/// this thread, in the order they were registered (also when `f` panics).
pub fn group<R>(f: impl FnOnce() -> R) -> R {
    let outer = HOOKS.with(|h| {
        let mut h = h.borrow_mut();
        if h.is_some() {
            return true;
        }
        *h = Some(Vec::new());
        false
    });
    if outer {
        return f();
    }
    let _end = End;
    f()
}

/// [`group`] when `cond`, else just `f` (a caller that expects a single completion spares
/// the replies the wait for the group's end).
pub fn group_if<R>(cond: bool, f: impl FnOnce() -> R) -> R {
    if cond { group(f) } else { f() }
}

/// Ends the group when dropped: the group is closed first (a hook that completes more work
/// runs it outside any group), then the hooks run.
struct End;

impl Drop for End {
    fn drop(&mut self) {
        let hooks = HOOKS.with(|h| h.borrow_mut().take()).unwrap_or_default();
        for hook in hooks {
            hook();
        }
    }
}

/// Registers `hook` to run when the current group of this thread ends. `Err` gives it back
/// when this thread runs no group (the caller then does the work itself, now).
pub fn after_group(hook: Hook) -> Result<(), Hook> {
    HOOKS.with(|h| match h.borrow_mut().as_mut() {
        Some(hooks) => {
            hooks.push(hook);
            Ok(())
        }
        None => Err(hook),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn push(log: &Rc<RefCell<Vec<&'static str>>>, what: &'static str) -> Hook {
        let log = log.clone();
        Box::new(move || log.borrow_mut().push(what))
    }

    #[test]
    fn hooks_run_after_the_group_in_order() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let r = group(|| {
            after_group(push(&log, "a")).ok().unwrap();
            after_group(push(&log, "b")).ok().unwrap();
            log.borrow_mut().push("body");
            7
        });
        assert_eq!(r, 7);
        assert_eq!(*log.borrow(), ["body", "a", "b"]);
    }

    #[test]
    fn outside_a_group_the_hook_comes_back() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let hook = after_group(push(&log, "a")).expect_err("no group runs");
        hook();
        assert_eq!(*log.borrow(), ["a"]);
    }

    #[test]
    fn a_nested_group_is_part_of_the_outer_one() {
        let log = Rc::new(RefCell::new(Vec::new()));
        group(|| {
            group(|| after_group(push(&log, "inner")).ok().unwrap());
            log.borrow_mut().push("outer body");
        });
        assert_eq!(*log.borrow(), ["outer body", "inner"]);
    }

    #[test]
    fn hooks_run_when_the_group_panics_and_the_next_group_starts_clean() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let l = log.clone();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            group(|| {
                after_group(push(&l, "held")).ok().unwrap();
                panic!("engine bug");
            })
        }));
        assert!(r.is_err());
        assert_eq!(*log.borrow(), ["held"]);
        assert!(after_group(push(&log, "x")).is_err(), "the group ended");
    }

    #[test]
    fn a_hook_runs_outside_the_group() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let l = log.clone();
        group(|| {
            after_group(Box::new(move || {
                let again = after_group(push(&l, "late")).expect_err("the group ended");
                again();
            }))
            .ok()
            .unwrap();
        });
        assert_eq!(*log.borrow(), ["late"]);
    }
}
