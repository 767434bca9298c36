//! Running `kubectl agentgate` (the plugin binary of this build) as kubectl would.

use std::path::Path;
use std::process::Output;

/// The plugin binary. Cargo names it only to integration tests, not to the demo, which also
/// compiles this module.
fn binary() -> &'static str {
    match option_env!("CARGO_BIN_EXE_kubectl-agentgate") {
        Some(path) => path,
        None => panic!("the kubectl-agentgate binary is known to integration tests only"),
    }
}

/// Runs the plugin with `kubeconfig`, as kubectl would run it for `kubectl agentgate <args>`.
pub async fn run(kubeconfig: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(binary())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("running kubectl-agentgate")
}

/// Status, stdout and stderr of a run, for an assertion's message.
pub fn describe(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
