//! Fault injection for the crash-safety tests: kill the process, or fail an
//! operation, at the n-th time a named point is reached.
//!
//! Driven by two environment variables, read once per process:
//! - `APOLLO_SYNC_CRASH_AT=<point>:<n>` sends the process `SIGKILL` just before
//!   the n-th operation at `<point>` (1-based) would run;
//! - `APOLLO_SYNC_FAIL_AT=<point>:<n>:<errno>` makes that operation fail with
//!   the OS error `<errno>` (e.g. 28 for `ENOSPC`, 5 for `EIO`) instead.
//!
//! Points: `log` (appending a record to a generation's log), `barrier`
//! (making the log durable before in-place writes), `write` (an in-place write
//! of changed blocks), `commit` (appending the commit record), `flush` (making
//! the shards durable, in a sync without a log while it goes on, or after a
//! logged sync's commit), `fsync` (making a written shard durable at the end
//! of a sync without a log, of a recovery or of a rollback), `apply` (writing
//! one unit or run in recovery or a rollback), `committed` (after the commit
//! record, before the state file), `state` (replacing `state.json`), `prune`
//! (removing a pruned log), `recover` (removing a rolled-back log). The
//! Python package adds its own for the group protocol (`prepared`,
//! `group-commit`, ...). Unset, each point costs one relaxed atomic load.
//!
//! Compiled in only with the `faults` cargo feature (the development build
//! `make install` makes, which the crash tests need); without it `reached`
//! is an empty inline function and release wheels read no environment.

/// Called just before an operation at `point`: without the `faults` feature,
/// nothing.
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub fn reached(_point: &'static str) -> std::io::Result<()> {
    Ok(())
}

/// Whether this build can inject faults.
pub const ENABLED: bool = cfg!(feature = "faults");

#[cfg(feature = "faults")]
pub use armed::reached;

#[cfg(feature = "faults")]
mod armed {
    use std::collections::HashMap;
    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, OnceLock};

    struct Plan {
        crash: Option<(String, u64)>,
        fail: Option<(String, u64, i32)>,
        counts: Mutex<HashMap<&'static str, u64>>,
    }

    static ARMED: AtomicBool = AtomicBool::new(true);
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();

    fn parse(var: &str) -> Option<Vec<String>> {
        let v = std::env::var(var).ok()?;
        Some(v.split(':').map(str::to_owned).collect())
    }

    fn plan() -> Option<&'static Plan> {
        PLAN.get_or_init(|| {
            let crash = parse("APOLLO_SYNC_CRASH_AT").and_then(|p| match p.as_slice() {
                [point, n] => Some((point.clone(), n.parse().ok()?)),
                _ => None,
            });
            let fail = parse("APOLLO_SYNC_FAIL_AT").and_then(|p| match p.as_slice() {
                [point, n, errno] => Some((point.clone(), n.parse().ok()?, errno.parse().ok()?)),
                _ => None,
            });
            if crash.is_none() && fail.is_none() {
                ARMED.store(false, Ordering::Relaxed);
                return None;
            }
            Some(Plan {
                crash,
                fail,
                counts: Mutex::new(HashMap::new()),
            })
        })
        .as_ref()
    }

    /// Called just before an operation at `point`: kills the process or returns
    /// the injected error when the environment asks for it here.
    pub fn reached(point: &'static str) -> io::Result<()> {
        if !ARMED.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some(plan) = plan() else { return Ok(()) };
        let n = {
            let mut counts = plan.counts.lock().unwrap_or_else(|e| e.into_inner());
            let c = counts.entry(point).or_insert(0);
            *c += 1;
            *c
        };
        if let Some((p, at)) = &plan.crash {
            if p == point && *at == n {
                // SAFETY: plain syscalls; SIGKILL cannot be caught, so nothing runs after.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
        }
        if let Some((p, at, errno)) = &plan.fail {
            if p == point && *at == n {
                return Err(io::Error::from_raw_os_error(*errno));
            }
        }
        Ok(())
    }
}
