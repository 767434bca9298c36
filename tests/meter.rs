//! The meter with the real OpenAI and Anthropic SDKs as clients: runs the pytest suite in
//! tests/meter/ against the `agentgate` binary this build produced. The SDKs come from PyPI
//! (`pip install openai anthropic pytest`, as .ci/run does); the upstream is a stand-in in the
//! same directory, on loopback.

use std::process::Command;

#[test]
fn the_meter_with_the_real_sdks() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/meter");
    let output = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", dir])
        .env("AGENTGATE_BIN", env!("CARGO_BIN_EXE_agentgate"))
        .env("PYTHONPATH", dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("running python3 (the meter's tests need python3 with openai, anthropic and pytest)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the meter's SDK tests failed (see above); `pip install openai anthropic pytest` if missing");
}
