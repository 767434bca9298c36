//! The stand-in model provider (tests/meter/upstream.py run standalone) for agents on the real
//! node: no provider is reachable from here, so the meters' upstream is this process on the
//! node IP. It speaks the OpenAI and Anthropic wire formats, decides each call's usage from the
//! request and records every call as a JSON line, to compare with what the meters measured.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::controlplane::{Process, log_tail};

pub struct StandInProvider {
    _process: Process,
    host: String,
    port: u16,
    record: PathBuf,
}

impl StandInProvider {
    /// Starts it on `host` (a free port), its log and record in `dir`; killed when dropped.
    pub fn start(host: &str, dir: &Path) -> Result<StandInProvider> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/meter/upstream.py");
        let record = dir.join("stand-in-provider-calls.jsonl");
        let log = dir.join("stand-in-provider.log");
        let mut command = Command::new("python3");
        command.arg(&script).args(["--host", host, "--record"]).arg(&record);
        let mut process = Process::spawn("stand-in provider", command, log.clone())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            process.ensure_running()?;
            if let Some(port) = fs::read_to_string(&log).ok().and_then(|l| l.lines().next().and_then(|p| p.trim().parse::<u16>().ok())) {
                break port;
            }
            if Instant::now() > deadline {
                bail!("the stand-in provider printed no port within 30 s\n{}", log_tail(&log));
            }
            thread::sleep(Duration::from_millis(50));
        };
        Ok(StandInProvider { _process: process, host: host.to_owned(), port, record })
    }

    /// The OpenAI-compatible base URL (ending in /v1) for the keys Secret's upstream annotation.
    pub fn openai_upstream(&self) -> String {
        format!("http://{}:{}/v1", self.host, self.port)
    }

    /// Every call so far: `path`, `status`, `authorization` and `usage` (`input` excluding
    /// cached, `cached`, `output`, `model`), in order.
    pub fn calls(&self) -> Result<Vec<Value>> {
        let text = fs::read_to_string(&self.record)
            .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(String::new()) } else { Err(e) })?;
        text.lines().map(|l| serde_json::from_str(l).with_context(|| format!("a call record: {l}"))).collect()
    }
}
