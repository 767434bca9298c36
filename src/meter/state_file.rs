//! The meter's state file: what lets a restarted meter process carry on its Pod's session.
//!
//! Why: the kubelet keeps the termination messages of a container's last two processes only
//! (`state.terminated`, `lastState.terminated`). A meter restarted three times or more (crashed,
//! OOM-killed) while cut off from the operator (a tenant's NetworkPolicy) would otherwise leave
//! the usage of its earlier processes nowhere the operator can read: an under-report
//! (README "The meter's second channel").
//!
//! So the meter keeps its session (id, last sequence number), the budget the operator granted it
//! and its cumulative usage in a small file on a volume of its own (an `emptyDir` only the
//! meter's container mounts: it survives container restarts, and the agent container, which
//! mounts no volume of the meter's, cannot read or write it; domain/meter_sidecar.rs). A new
//! meter process of the Pod resumes the session from it: the same session id, later sequence
//! numbers, the earlier processes' usage as its starting totals (meter/budget.rs
//! [`Ledger::carry`]). Its reports and its termination message are then cumulative for the whole
//! Pod under one session, and the operator, which takes per session the larger of the meter
//! API's figure and the messages' (domain/meter_message.rs `measure_attempt`), counts every
//! process once and the latest figure of the session, never a sum of two processes' figures.
//!
//! Why resume the session rather than carry usage into a new one: a new session's message
//! holding earlier sessions' usage would be counted again beside those sessions' own figures in
//! the meter API (double counting), and telling them apart would need the message to list every
//! earlier session, which a meter restarted many times cannot fit in 4 KiB.
//!
//! What keeps the figures right:
//! - The file is written before any figure leaves through the meter API: [`StateFile::write`]
//!   before each step is sent (grant_client.rs), with a ledger snapshot taken after the step's.
//!   So what the operator heard of the session is never more than the file holds, and a resumed
//!   process never reports less than the operator already has (which it would refuse as usage
//!   going down), nor reuses a sequence number (which it would take for a retry).
//! - Written in place, in one write at offset 0 padded with spaces to the longest written before
//!   (JSON ignores them), while it fits one page: the kernel copies a page whole, so a process
//!   killed mid-write leaves the previous file or the new one, never a mix. That costs ~8 µs;
//!   writing aside and renaming cost ~1.2 ms on ext4 (which flushes a file renamed over
//!   another), too much before every call. A longer file (many models) is written aside and
//!   renamed. Never synced to disk: a container restart keeps the node's page cache; a node that
//!   loses it loses the Pod and its emptyDir too.
//! - A session whose last step (settle) was sent is never resumed: the operator may have settled
//!   it, released what it did not spend to other meters, and refuses further steps. `settling` is
//!   written before that step goes out; a later process opens a new session from zero (the
//!   settled session's final usage is in the meter API).
//! - A file that cannot be written is removed, and no more written: a restart then opens a new
//!   session (as meters did before the file), never resumes from a stale figure.
//! - A call is on disk before it goes upstream (proxy.rs `admit`): the file holds the figures as
//!   if every call in flight ended now, charged its reservation ([`Ledger::carried_if_stopped_now`]),
//!   so a process killed mid-call (the provider may have billed the call) leaves it charged, and
//!   the next process cannot spend its reservation again. The killed process's own message
//!   holds its settled calls only: the operator keeps the grant of a meter that was killed or
//!   restarted held (domain/meter_message.rs `PodMeter::exited_cleanly`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::budget::{Carried, Ledger};
use crate::domain::money::MicroUsd;

const VERSION: u32 = 1;

/// What the file holds.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Stored {
    #[serde(rename = "agentgateMeterState")]
    version: u32,
    /// The session id itself (secret): the file is the meter's alone.
    session: String,
    /// The last sequence number used (or about to be sent).
    sequence: i64,
    /// The session's last step has been (or is being) sent: not to be resumed.
    #[serde(default)]
    settling: bool,
    /// What the operator has granted the session in all (grants only).
    #[serde(rename = "grantedUSD", default, skip_serializing_if = "Option::is_none")]
    granted_usd: Option<String>,
    carried: Carried,
}

/// A session resumed from the file.
#[derive(Clone, Debug, PartialEq)]
pub struct Resumed {
    pub session: String,
    pub sequence: i64,
    pub granted: Option<MicroUsd>,
    pub carried: Carried,
}

struct Progress {
    sequence: i64,
    settling: bool,
    granted: Option<MicroUsd>,
    /// A write failed: the file was removed and is not written again.
    broken: bool,
    /// The longest file written so far: a shorter one is padded to it.
    written: usize,
}

/// What one write at offset 0 replaces whole (a page).
const IN_PLACE_BYTES: usize = 4096;

pub struct StateFile {
    path: PathBuf,
    session: String,
    /// Held for the whole write, so writes go one at a time and the last one carries the latest
    /// figure (as the termination message, message.rs).
    progress: Mutex<Progress>,
}

/// Reads the file a previous meter process of the Pod left: the session to resume, or None
/// (no file: the Pod's first meter process; a settled session; a file that does not read, which
/// is logged). Never fails: a meter that cannot resume still meters, in a new session.
pub fn resume(path: &Path) -> Option<Resumed> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::error!(error = %e, path = %path.display(), "reading the meter's state file: starting a new session");
            return None;
        }
    };
    match parse(&text) {
        Ok(resumed) => resumed,
        Err(why) => {
            tracing::error!(why, path = %path.display(), "the meter's state file does not read: starting a new session");
            None
        }
    }
}

fn parse(text: &str) -> Result<Option<Resumed>, String> {
    let stored: Stored = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if stored.version != VERSION {
        return Err(format!("version {} unknown", stored.version));
    }
    if stored.settling {
        return Ok(None);
    }
    // The same rules as the meter API's (domain/grants.rs SyncBody::request).
    if stored.session.is_empty() || stored.session.len() > 64 || !stored.session.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err("session is not a session id".into());
    }
    if stored.sequence < 0 {
        return Err("sequence is negative".into());
    }
    crate::domain::grants::check_usage(&stored.carried.usage).map_err(|e| e.to_string())?;
    let granted = match &stored.granted_usd {
        None => None,
        Some(text) => Some(MicroUsd::parse(text).ok_or("grantedUSD is not a USD amount")?),
    };
    Ok(Some(Resumed { session: stored.session, sequence: stored.sequence, granted, carried: stored.carried }))
}

impl StateFile {
    /// The file of `session`, continued from `sequence`.
    pub fn new(path: PathBuf, session: &str, sequence: i64) -> StateFile {
        // A longer file left by the previous process: padded over, never left with its tail.
        let written = std::fs::metadata(&path).map_or(0, |m| usize::try_from(m.len()).unwrap_or(usize::MAX));
        StateFile {
            path,
            session: session.to_string(),
            progress: Mutex::new(Progress { sequence, settling: false, granted: None, broken: false, written }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that the step numbered `sequence` is about to be sent (the last one if `last`),
    /// and writes the file with the ledger's figures now. Blocking.
    pub fn before_step(&self, ledger: &Ledger, sequence: i64, last: bool) -> std::io::Result<()> {
        self.update(ledger, |p| {
            p.sequence = p.sequence.max(sequence);
            p.settling |= last;
        })
    }

    /// Records what the operator has granted the session in all. Not written until the next
    /// write: a process restarted before holds less than it was granted, never more.
    pub fn granted(&self, total: MicroUsd) {
        let mut progress = self.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        progress.granted = Some(progress.granted.map_or(total, |g| g.max(total)));
    }

    /// Writes the file with the ledger's figures now. Blocking.
    pub fn write(&self, ledger: &Ledger) -> std::io::Result<()> {
        self.update(ledger, |_| {})
    }

    fn update(&self, ledger: &Ledger, change: impl FnOnce(&mut Progress)) -> std::io::Result<()> {
        let mut progress = self.progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        change(&mut progress);
        if progress.broken {
            return Ok(());
        }
        // Read under the lock: a write never replaces a later figure with an earlier one.
        let carried = ledger.carried_if_stopped_now();
        let stored = Stored {
            version: VERSION,
            session: self.session.clone(),
            sequence: progress.sequence,
            settling: progress.settling,
            granted_usd: progress.granted.map(|g| g.to_string()),
            carried,
        };
        let written = serde_json::to_vec(&stored).map_err(std::io::Error::other).and_then(|mut bytes| {
            if bytes.len() < progress.written {
                bytes.resize(progress.written, b' ');
            }
            if bytes.len() <= IN_PLACE_BYTES {
                use std::os::unix::fs::FileExt;
                let file = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&self.path)?;
                file.write_all_at(&bytes, 0)?;
            } else {
                let aside = self.path.with_extension("tmp");
                std::fs::write(&aside, &bytes)?;
                std::fs::rename(&aside, &self.path)?;
            }
            Ok(bytes.len())
        });
        match written {
            Ok(len) => {
                progress.written = len;
                Ok(())
            }
            Err(e) => {
                // A stale file must not be resumed from: gone, a restart opens a new session.
                progress.broken = true;
                let removed = std::fs::remove_file(&self.path);
                tracing::error!(error = %e, path = %self.path.display(), removed = removed.is_ok(),
                "writing the meter's state file: a restarted meter will open a new session");
                Err(e)
            }
        }
    }
}

#[cfg(test)]
#[path = "state_file_tests.rs"]
mod tests;
