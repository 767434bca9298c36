//! The meter's termination message file (domain/meter_message.rs has what it holds and why).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::budget::Ledger;

pub struct TerminationMessage {
    path: PathBuf,
    /// The session's digest, never its id: the message ends up in the Pod's status.
    session: String,
    /// The longest message written so far: a shorter one is padded to it (see [`Self::write`]).
    /// Held for the whole write, so writes go one at a time and the last one carries the latest
    /// figure.
    written: Mutex<usize>,
}

impl TerminationMessage {
    pub fn new(path: PathBuf, session_id: &str) -> TerminationMessage {
        TerminationMessage { path, session: crate::domain::grants::session_key(session_id), written: Mutex::new(0) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the ledger's cumulative usage in place, in one write at offset 0, padded with spaces
    /// to the longest message written before (JSON ignores them): the file is the kubelet's
    /// bind mount, so it cannot be replaced by a rename, and truncating first would leave it empty
    /// should the meter be killed between the two. Blocking.
    pub fn write(&self, ledger: &Ledger) -> std::io::Result<()> {
        let mut written = self.written.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Read under the lock: a write never replaces a later figure with an earlier one.
        let snapshot = ledger.snapshot();
        let refusals = i64::try_from(snapshot.budget_refusals).unwrap_or(i64::MAX);
        let text = crate::domain::meter_message::encode(&self.session, &snapshot.usage, refusals);
        let mut bytes = text.into_bytes();
        if bytes.len() < *written {
            bytes.resize(*written, b' ');
        }
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&self.path)?;
        file.write_all_at(&bytes, 0)?;
        *written = bytes.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::money::MicroUsd;

    #[test]
    fn the_message_is_rewritten_in_place_and_always_reads_as_the_latest_figure() {
        let dir = std::env::temp_dir().join(format!("agentgate-meter-message-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("termination-log");
        let ledger = Ledger::new(None);
        let message = TerminationMessage::new(path.clone(), "session-1");
        message.write(&ledger).unwrap();
        let first = crate::domain::meter_message::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            (first.session.as_str(), first.usage.cost_usd.as_str()),
            (crate::domain::grants::session_key("session-1").as_str(), MicroUsd(0).to_string().as_str())
        );
        assert!(!std::fs::read_to_string(&path).unwrap().contains("session-1\""), "the id never shows");
        // A call settles: the message holds it.
        let price = *crate::domain::pricing::PriceTable::builtin().get("gpt-4o-mini").unwrap();
        let (reservation, _) =
            ledger.reserve("gpt-4o-mini", price, |_| Ok(crate::meter::budget::Plan { reserve: MicroUsd(50), inject_cap: None })).unwrap();
        reservation.settle(crate::meter::budget::Outcome::Measured(crate::domain::pricing::TokenCounts {
            input: 1000,
            output: 10,
            ..Default::default()
        }));
        message.write(&ledger).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let later = crate::domain::meter_message::parse(&text).unwrap();
        assert_eq!(later.usage.input_tokens, 1000);
        assert!(MicroUsd::parse(&later.usage.cost_usd).unwrap() > MicroUsd(0));
        // Shorter than a message written before (models folded): padded, never truncated first.
        *message.written.lock().unwrap() = text.len() + 100;
        message.write(&ledger).unwrap();
        let padded = std::fs::read_to_string(&path).unwrap();
        assert_eq!(padded.len(), text.len() + 100);
        assert_eq!(crate::domain::meter_message::parse(&padded).unwrap(), later);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
