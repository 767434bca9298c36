//! helm and the kstatus helper, built from their Go modules by tests/tools/build.sh.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Directory holding `helm` and `kstatus`: `$AGENTGATE_TOOLS_DIR` if set, else the output of
/// tests/tools/build.sh (instant once its cache is populated).
pub fn tools_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("AGENTGATE_TOOLS_DIR") {
            return PathBuf::from(dir);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/build.sh");
        // Progress of a first, slow build goes straight to the terminal.
        let out = Command::new(&script).stderr(Stdio::inherit()).output().unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(out.status.success(), "{} failed with {}", script.display(), out.status);
        let stdout = String::from_utf8(out.stdout).expect("build.sh prints a path");
        PathBuf::from(stdout.lines().last().expect("build.sh printed no directory"))
    })
}

pub fn helm() -> PathBuf {
    tools_dir().join("helm")
}

/// kstatus's verdict on each object: `(kind/name, status, message)`, in input order.
pub fn kstatus(objects: &[serde_json::Value]) -> Vec<(String, String, String)> {
    use std::io::Write;
    let mut child = Command::new(tools_dir().join("kstatus"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kstatus");
    {
        let mut stdin = child.stdin.take().unwrap();
        for o in objects {
            serde_json::to_writer(&mut stdin, o).unwrap();
            stdin.write_all(b"\n").unwrap();
        }
    }
    let out = child.wait_with_output().expect("running kstatus");
    assert!(out.status.success(), "kstatus failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("kstatus prints JSON lines");
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (format!("{}/{}", s("kind"), s("name")), s("status"), s("message"))
        })
        .collect()
}
