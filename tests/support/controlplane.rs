//! A real etcd and kube-apiserver on loopback, started once per test binary.
//!
//! Tests run against the genuine API machinery (authentication, RBAC, admission, CRD
//! validation, server-side apply) rather than a mocked client. Nothing else runs: there is no
//! controller-manager, scheduler or kubelet, so tests create what controllers otherwise would
//! (see [`ControlPlane::namespace`]) and pods never start.
//!
//! Linux only: child processes are tied to the test binary with `PR_SET_PDEATHSIG`.

use std::{
    collections::BTreeMap,
    fs::{self, DirBuilder, File},
    io::{self, Read},
    net::TcpListener,
    os::unix::{fs::DirBuilderExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;

/// Users known to the apiserver through `--token-auth-file`, with their groups.
///
/// `admin` is a superuser via `system:masters`, which bypasses RBAC. Everyone else is only
/// authenticated: tests grant exactly the permissions they exercise.
pub const USERS: &[(&str, &[&str])] = &[
    ("admin", &["system:masters"]),
    ("alice", &["agentgate:users", "agentgate:heads"]),
    ("bob", &["agentgate:users", "agentgate:heads"]),
    ("carol", &["agentgate:users", "agentgate:humans"]),
    ("dave", &["agentgate:users"]),
    ("erin", &["agentgate:users"]),
];

/// Upper bound for etcd plus kube-apiserver to become ready; generous because CI machines
/// are small and test binaries may start their control planes in parallel.
const STARTUP_TIMEOUT: Duration = Duration::from_mins(2);

/// Field manager for objects the harness applies, so they are distinguishable from the operator's.
const FIELD_MANAGER: &str = "agentgate-test-harness";

/// A line of an operator's log without its colour codes (the log is written as a terminal's).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A running etcd + kube-apiserver pair and credentials for the [`USERS`].
pub struct ControlPlane {
    dir: PathBuf,
    bin_dir: PathBuf,
    server: String,
    tokens: BTreeMap<&'static str, String>,
    /// Behind locks so that fault-injection tests can restart them through the shared `&'static`.
    etcd: Mutex<Process>,
    apiserver: Mutex<Process>,
}

impl ControlPlane {
    /// The control plane of this test binary, started on first use with the crate's CRDs and
    /// admission policies installed.
    ///
    /// Only synchronous state is kept: each `#[tokio::test]` has its own runtime, and a
    /// `kube::Client` must not outlive the runtime it was created on. Use [`Self::client`].
    ///
    /// Panics if startup fails; the failure is remembered and reported to every later caller
    /// instead of starting yet another control plane.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| ControlPlane::start_with(Options::default()).map_err(|e| format!("{e:?}")))
            .as_ref()
            .unwrap_or_else(|e| panic!("control plane failed to start: {e}"))
    }

    /// Like [`Self::shared`], with the apiserver writing a Metadata-level audit log of every
    /// request to [`Self::audit_log`]. A test binary uses one or the other.
    pub fn shared_with_audit_log() -> &'static ControlPlane {
        static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| ControlPlane::start_with(Options { audit: true, ..Options::default() }).map_err(|e| format!("{e:?}")))
            .as_ref()
            .unwrap_or_else(|e| panic!("control plane failed to start: {e}"))
    }

    /// The audit log (JSON lines, one `audit.k8s.io/v1` Event per request), when enabled.
    pub fn audit_log(&self) -> Option<PathBuf> {
        Some(self.dir.join("audit.log")).filter(|p| p.exists())
    }

    /// `https://<address>:<port>` of the kube-apiserver (loopback unless [`Options::address`]).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Scratch directory holding kubeconfigs and the logs of every process the harness started.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bearer token of one of the [`USERS`].
    pub fn token(&self, user: &str) -> &str {
        &self.tokens[known_user(user)]
    }

    /// Writes a kubeconfig for a bearer token (a ServiceAccount's, say) with a default namespace.
    pub fn token_kubeconfig(&self, name: &str, token: &str, namespace: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let ca = self.dir.join("pki/apiserver.crt");
        fs::write(&path, kubeconfig_yaml(&self.server, &ca, name, &format!("token: {token}"), Some(namespace)))
            .expect("writing a kubeconfig");
        path
    }

    /// Kubeconfig authenticating as one of the [`USERS`].
    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        self.dir.join(format!("{}.kubeconfig", known_user(user)))
    }

    /// A client authenticating as one of the [`USERS`], bound to the calling test's runtime.
    pub async fn client(&self, user: &str) -> Client {
        self.try_client(user).await.unwrap_or_else(|e| panic!("{e:?}"))
    }

    /// Creates namespace `name` and its `default` `ServiceAccount`, which the `ServiceAccount`
    /// admission plugin requires for pods and which only the (absent) controller-manager would
    /// create. Idempotent.
    pub async fn namespace(&self, name: &str) {
        self.try_namespace(name).await.unwrap_or_else(|e| panic!("{e:?}"));
    }

    /// Runs `kubectl <args>` as one of the [`USERS`] and returns its output, successful or not.
    pub fn kubectl(&self, user: &str, args: &[&str]) -> Output {
        self.try_kubectl(user, args).unwrap_or_else(|e| panic!("{e:?}"))
    }

    /// SIGKILLs kube-apiserver, waits `down`, starts it again with the same flags (same port,
    /// same serving certificate) and waits until `/readyz` passes and the admission policies act
    /// on agentgate objects again. Returns how long it was unavailable. Blocks: call it from `spawn_blocking` in async tests.
    ///
    /// Every client of this control plane sees the outage, so only a test binary whose tests
    /// expect it may call this.
    pub fn restart_apiserver(&self, down: Duration) -> Duration {
        self.restart(&self.apiserver, down).unwrap_or_else(|e| panic!("{e:?}"))
    }

    /// Like [`Self::restart_apiserver`] for etcd (same data directory, same ports); the apiserver
    /// keeps running and reconnects.
    pub fn restart_etcd(&self, down: Duration) -> Duration {
        self.restart(&self.etcd, down).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn restart(&self, process: &Mutex<Process>, down: Duration) -> Result<Duration> {
        let killed = Instant::now();
        lock(process).kill();
        thread::sleep(down);
        lock(process).respawn()?;
        self.wait_until_ready()?;
        // /readyz passes a few seconds before the apiserver serves the CRDs again (it answers 503
        // meanwhile, so nothing slips past the admission policies); wait for those too.
        self.wait_for_admission_policies()?;
        Ok(killed.elapsed())
    }

    /// A control plane of its own (not [`Self::shared`]), for the real node of
    /// tests/support/node.rs, which needs other authorization and extra apiserver flags. Its
    /// processes stop when it is dropped. A test binary uses this or the shared one, not both
    /// (they would share a scratch directory).
    pub fn start_owned(options: Options) -> Result<ControlPlane> {
        Self::start_with(options)
    }

    /// Directory holding etcd, kube-apiserver and kubectl.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    fn start_with(options: Options) -> Result<ControlPlane> {
        let audit = options.audit;
        let started = Instant::now();
        let bin_dir = binaries_dir()?;
        let dir = fresh_scratch_dir()?;

        let tokens = USERS.iter().map(|&(user, _)| Ok((user, random_token()?))).collect::<Result<BTreeMap<_, _>>>()?;
        let token_file = dir.join("tokens.csv");
        let token_lines: String =
            USERS.iter().map(|(user, groups)| format!("{},{user},{user},\"{}\"\n", tokens[user], groups.join(","))).collect();
        fs::write(&token_file, token_lines).context("writing the token file")?;

        let service_account_key = dir.join("service-account.key");
        run_checked(Command::new("openssl").arg("genrsa").arg("-out").arg(&service_account_key).arg("2048"))
            .context("generating the service account signing key")?;

        let [etcd_port, etcd_peer_port, apiserver_port] = free_ports()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let mut etcd = Command::new(bin_dir.join("etcd"));
        etcd.arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={etcd_peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={etcd_peer_url}"))
            .arg(format!("--initial-cluster=default={etcd_peer_url}"))
            // Durability is pointless for a throwaway store, and fsync dominates write latency.
            .arg("--unsafe-no-fsync");
        let etcd = Process::spawn("etcd", etcd, dir.join("etcd.log"))?;

        let cert_dir = dir.join("pki");
        let address = options.address;
        let mut apiserver = Command::new(bin_dir.join("kube-apiserver"));
        apiserver
            .arg(format!("--etcd-servers={etcd_url}"))
            // The self-signed serving certificate names this address, and the `kubernetes`
            // Service's ClusterIP (the first of --service-cluster-ip-range).
            .arg(format!("--bind-address={address}"))
            .arg(format!("--advertise-address={address}"))
            // Nothing in-cluster consumes the `kubernetes` Service's endpoints, and the reconciler
            // refuses a loopback advertise address (the in-cluster real node turns it on).
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--secure-port={apiserver_port}"))
            // With no certificates given, kube-apiserver self-signs a CA and serving cert here.
            .arg(format!("--cert-dir={}", cert_dir.display()))
            .arg(format!("--authorization-mode={}", options.authorization_mode))
            .arg(format!("--token-auth-file={}", token_file.display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", service_account_key.display()))
            .arg(format!("--service-account-signing-key-file={}", service_account_key.display()))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .args(&options.apiserver_args);
        if audit {
            let policy = dir.join("audit-policy.yaml");
            fs::write(&policy, "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n")
                .context("writing the audit policy")?;
            apiserver
                .arg(format!("--audit-policy-file={}", policy.display()))
                .arg(format!("--audit-log-path={}", dir.join("audit.log").display()))
                // Written as requests complete, so a test can read its own requests back at once.
                .arg("--audit-log-mode=blocking");
        }
        let apiserver = Process::spawn("kube-apiserver", apiserver, dir.join("kube-apiserver.log"))?;

        let server = format!("https://{address}:{apiserver_port}");
        // The apiserver writes this bundle (serving certificate followed by its CA) at startup;
        // clients read it only when they connect, so naming it before it exists is fine.
        let ca = cert_dir.join("apiserver.crt");
        for (user, token) in &tokens {
            let path = dir.join(format!("{user}.kubeconfig"));
            fs::write(&path, kubeconfig_yaml(&server, &ca, user, &format!("token: {token}"), None))
                .with_context(|| format!("writing {}", path.display()))?;
        }

        let control_plane = ControlPlane { dir, bin_dir, server, tokens, etcd: Mutex::new(etcd), apiserver: Mutex::new(apiserver) };
        control_plane.wait_until_ready()?;
        control_plane.install_manifests()?;
        eprintln!(
            "control plane at {} ready in {:.1?}; logs and kubeconfigs in {}",
            control_plane.server,
            started.elapsed(),
            control_plane.dir.display()
        );
        Ok(control_plane)
    }

    /// Polls `/readyz`, which covers etcd connectivity and the bootstrap post-start hooks
    /// (RBAC roles, priority and fairness, ...), failing early if either process dies.
    fn wait_until_ready(&self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            lock(&self.etcd).ensure_running()?;
            lock(&self.apiserver).ensure_running()?;
            let readyz = self.try_kubectl("admin", &["get", "--raw=/readyz", "--request-timeout=5s"])?;
            if readyz.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after {STARTUP_TIMEOUT:?}: {}\n{}",
                    String::from_utf8_lossy(&readyz.stderr).trim(),
                    log_tail(&lock(&self.apiserver).log)
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Installs `crds/*.yaml`, waits until the API serves them, then applies
    /// `deploy/admission/*.yaml`, whose policies may match the new resources.
    fn install_manifests(&self) -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut crds = Vec::new();
        for file in yaml_files(&root.join("crds"))? {
            let applied = self.apply(&file)?;
            crds.extend(applied.lines().filter(|name| name.starts_with("customresourcedefinition")).map(str::to_owned));
        }
        if !crds.is_empty() {
            let mut wait = vec!["wait", "--for=condition=Established", "--timeout=60s"];
            wait.extend(crds.iter().map(String::as_str));
            self.kubectl_checked(&wait)?;
            // Established can come a moment before the apiserver serves the resource (503 "Resource
            // kind ... not found" on a loaded machine): wait until each one answers a LIST.
            let plurals: Vec<&str> = crds.iter().filter_map(|c| c.strip_prefix("customresourcedefinition.apiextensions.k8s.io/")).collect();
            let list = ["get", &plurals.join(","), "--all-namespaces", "--output=name"];
            let deadline = Instant::now() + Duration::from_secs(30);
            while let Err(e) = self.kubectl_checked(&list) {
                ensure!(Instant::now() < deadline, "the custom resources are not served 30 s after Established: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
        for file in yaml_files(&root.join("deploy/admission"))? {
            self.apply(&file)?;
        }
        self.wait_for_admission_policies()
    }

    /// Waits until the admission policies of deploy/admission act on requests, probing with
    /// server-side dry runs. The apiserver loads policies asynchronously, after creating them and
    /// again after every restart of its own; until then it admits votes and jobs unchecked and
    /// unstamped (a vote without its creator's groups never counts), so tests must not start
    /// before. Returns at once when no policies are installed.
    fn wait_for_admission_policies(&self) -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        if yaml_files(&root.join("deploy/admission"))?.is_empty() {
            return Ok(());
        }
        let probe = |name: &str, object: serde_json::Value| -> Result<PathBuf> {
            let path = self.dir.join(format!("admission-probe-{name}.json"));
            fs::write(&path, object.to_string())?;
            Ok(path)
        };
        let vote = |voter: &str| {
            json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "ApprovalVote", "metadata": {"name": "admission-probe"},
                   "spec": {"jobRef": {"name": "probe", "uid": "probe", "generation": 1}, "voter": voter, "decision": "Approve"}})
        };
        let own_vote = probe("own-vote", vote("admin"))?;
        let forged_vote = probe("forged-vote", vote("alice"))?;
        let job = probe(
            "job",
            json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob", "metadata": {"name": "admission-probe"},
                   "spec": {"category": "probe", "budget": {"maxCostUSD": "1"},
                            "agents": {"primary": {"name": "probe", "image": "probe", "model": "probe"}}}}),
        )?;
        // deploy/admission/limits.yaml: an input nested 40 deep is refused.
        let deep_input = (0..40).fold(json!(1), |v, _| json!({ "a": v }));
        let deep_job = probe(
            "deep-job",
            json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob", "metadata": {"name": "admission-probe"},
                   "spec": {"category": "probe", "budget": {"maxCostUSD": "1"}, "input": deep_input,
                            "agents": {"primary": {"name": "probe", "image": "probe", "model": "probe"}}}}),
        )?;
        let dry_run = |file: &Path| {
            self.try_kubectl("admin", &["create", "--dry-run=server", "-n", "default", "-o", "json", "-f", &file.display().to_string()])
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let stamped = dry_run(&own_vote)?;
            let forged = dry_run(&forged_vote)?;
            let created = dry_run(&job)?;
            let groups_stamped = String::from_utf8_lossy(&stamped.stdout).contains("system:masters");
            let forgery_refused = !forged.status.success() && String::from_utf8_lossy(&forged.stderr).contains("spec.voter");
            let author_stamped = String::from_utf8_lossy(&created.stdout).contains("agentgate.dev/requested-by");
            let deep = dry_run(&deep_job)?;
            let depth_refused = !deep.status.success() && String::from_utf8_lossy(&deep.stderr).contains("nests deeper");
            if groups_stamped && forgery_refused && author_stamped && depth_refused {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "admission policies not in effect after {STARTUP_TIMEOUT:?}: voter groups stamped {groups_stamped}, forged vote \
                 refused {forgery_refused}, job author stamped {author_stamped}, deep input refused {depth_refused}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Server-side applies a manifest file as admin, returning the applied objects' names.
    fn apply(&self, file: &Path) -> Result<String> {
        let file = file.to_str().with_context(|| format!("non-UTF-8 path {}", file.display()))?;
        let field_manager = format!("--field-manager={FIELD_MANAGER}");
        self.kubectl_checked(&["apply", "--server-side", &field_manager, "--output=name", "-f", file])
    }

    /// Runs kubectl as admin, failing with its stderr unless it succeeds.
    fn kubectl_checked(&self, args: &[&str]) -> Result<String> {
        let output = self.try_kubectl("admin", args)?;
        ensure!(
            output.status.success(),
            "kubectl {} failed with {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        String::from_utf8(output.stdout).context("kubectl output is not UTF-8")
    }

    fn try_kubectl(&self, user: &str, args: &[&str]) -> Result<Output> {
        Command::new(self.bin_dir.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig(user).display()))
            .args(args)
            .output()
            .with_context(|| format!("running kubectl {}", args.join(" ")))
    }

    async fn try_client(&self, user: &str) -> Result<Client> {
        let path = self.kubeconfig(user);
        let kubeconfig = Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading {}", path.display()))?;
        Client::try_from(config).with_context(|| format!("building a client for {user}"))
    }

    async fn try_namespace(&self, name: &str) -> Result<()> {
        let client = self.client("admin").await;
        // Server-side apply makes repeated calls for the same namespace harmless.
        let apply = PatchParams::apply(FIELD_MANAGER);
        let namespace = json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name } });
        Api::<Namespace>::all(client.clone())
            .patch(name, &apply, &Patch::Apply(namespace))
            .await
            .with_context(|| format!("applying namespace {name}"))?;
        let service_account = json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": { "name": "default" },
        });
        Api::<ServiceAccount>::namespaced(client, name)
            .patch("default", &apply, &Patch::Apply(service_account))
            .await
            .with_context(|| format!("applying the default service account in {name}"))?;
        Ok(())
    }
}

/// How [`ControlPlane::start_owned`] sets up the apiserver; the default is the shared one's.
pub struct Options {
    /// Metadata-level audit log of every request (see [`ControlPlane::audit_log`]).
    pub audit: bool,
    /// `--authorization-mode`: `RBAC`, or `Node,RBAC` when a real kubelet connects.
    pub authorization_mode: &'static str,
    /// More kube-apiserver flags (client CA, kubelet client certificate, admission plugins, ...).
    pub apiserver_args: Vec<String>,
    /// Where kube-apiserver listens: loopback, or the real node's IP so that Pods reach it
    /// (tests/support/node.rs). The address must exist on this host.
    pub address: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options { audit: false, authorization_mode: "RBAC", apiserver_args: Vec::new(), address: "127.0.0.1" }
    }
}

/// kube-controller-manager running only the given controllers (e.g. `garbagecollector`), for
/// tests of behaviour that real clusters get from it. Killed when dropped.
pub struct ControllerManager(Process);

impl ControllerManager {
    pub fn start(control_plane: &ControlPlane, controllers: &str) -> ControllerManager {
        let binary = control_plane.bin_dir.join("kube-controller-manager");
        let mut command = Command::new(binary);
        command.args([
            &format!("--kubeconfig={}", control_plane.kubeconfig("admin").display()),
            &format!("--controllers={controllers}"),
            "--leader-elect=false",
            "--secure-port=0",
            "--use-service-account-credentials=false",
        ]);
        let log = control_plane.dir.join(format!("kube-controller-manager-{}.log", controllers.replace(',', "-")));
        ControllerManager(Process::spawn("kube-controller-manager", command, log).unwrap_or_else(|e| panic!("{e:?}")))
    }
}

impl ControllerManager {
    /// Like [`Self::start`], with extra flags such as `--kube-api-qps=1000`; each start gets its
    /// own log file.
    pub fn start_with_args(control_plane: &ControlPlane, controllers: &str, extra_args: &[&str]) -> ControllerManager {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let binary = control_plane.bin_dir.join("kube-controller-manager");
        let mut command = Command::new(binary);
        command
            .args([
                &format!("--kubeconfig={}", control_plane.kubeconfig("admin").display()),
                &format!("--controllers={controllers}"),
                "--leader-elect=false",
                "--secure-port=0",
                "--use-service-account-credentials=false",
            ])
            .args(extra_args);
        let log = control_plane.dir.join(format!(
            "kube-controller-manager-{}-{}.log",
            controllers.replace(',', "-"),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        ControllerManager(Process::spawn("kube-controller-manager", command, log).unwrap_or_else(|e| panic!("{e:?}")))
    }

    /// Process id, e.g. to read its resource usage from `/proc`.
    pub fn pid(&self) -> u32 {
        self.0.child.id()
    }

    /// File receiving its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.0.log
    }
}

/// The operator binary running as `agentgate run <args>` with admin credentials.
///
/// Killed when dropped, and in any case when the test binary exits.
pub struct OperatorProcess(Process);

impl OperatorProcess {
    /// Starts the operator from `$AGENTGATE_BIN`, else the binary cargo built for this test,
    /// else `target/debug/agentgate`. Its output goes to [`Self::log_path`].
    pub fn start(control_plane: &ControlPlane, args: &[&str]) -> OperatorProcess {
        Self::start_with_env(control_plane, args, &control_plane.kubeconfig("admin"))
    }

    fn start_with_env(control_plane: &ControlPlane, args: &[&str], kubeconfig: &Path) -> OperatorProcess {
        Self::start_wrapped(control_plane, args, kubeconfig, &[], &[])
    }

    /// Like [`Self::start`], as a container runs it: pid 1 of a new pid namespace (`unshare`,
    /// which needs root) with `POD_NAME` set. Killing it kills the namespace.
    pub fn start_as_container(control_plane: &ControlPlane, args: &[&str], pod_name: &str) -> OperatorProcess {
        let wrapper = ["unshare", "--pid", "--fork", "--kill-child", "--"];
        Self::start_wrapped(control_plane, args, &control_plane.kubeconfig("admin"), &wrapper, &[("POD_NAME", pod_name)])
    }

    fn start_wrapped(
        control_plane: &ControlPlane,
        args: &[&str],
        kubeconfig: &Path,
        wrapper: &[&str],
        env: &[(&str, &str)],
    ) -> OperatorProcess {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let log = control_plane.dir.join(format!("operator-{}.log", STARTED.fetch_add(1, Ordering::Relaxed)));
        let binary = std::env::var_os("AGENTGATE_BIN")
            .map(PathBuf::from)
            .or_else(|| option_env!("CARGO_BIN_EXE_agentgate").map(PathBuf::from))
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/agentgate"));
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .envs(env.iter().copied())
            .arg("run")
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            // Operators of parallel tests would all take the meter API's default port 8444; a
            // test that calls the meter API passes its own --meter-api-listen, which wins.
            .env("AGENTGATE_METER_API_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", std::env::var("AGENTGATE_OPERATOR_LOG").unwrap_or_else(|_| "info,agentgate=debug".into()));
        OperatorProcess(Process::spawn("agentgate", command, log).unwrap_or_else(|e| panic!("{e:?}")))
    }

    /// Like [`Self::start`], authenticating with `kubeconfig` (a ServiceAccount's, say) instead
    /// of as admin.
    pub fn start_as(control_plane: &ControlPlane, kubeconfig: &Path, args: &[&str]) -> OperatorProcess {
        Self::start_with_env(control_plane, args, kubeconfig)
    }

    /// Kills the operator with SIGKILL (no graceful shutdown) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        self.0.kill();
    }

    /// File receiving the operator's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.0.log
    }

    /// How the operator exited, or None while it runs.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.0.child.try_wait().ok().flatten()
    }

    /// Process id, e.g. to read its resource usage from `/proc`.
    pub fn pid(&self) -> u32 {
        self.0.child.id()
    }
}

/// A child process with its output in a log file, killed on drop or when the test binary exits.
pub struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// Program, arguments and environment, to start it again the same way.
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    envs: Vec<(std::ffi::OsString, std::ffi::OsString)>,
}

impl Process {
    pub fn spawn(name: &'static str, command: Command, log: PathBuf) -> Result<Process> {
        let program = PathBuf::from(command.get_program());
        let args = command.get_args().map(ToOwned::to_owned).collect();
        let envs = command.get_envs().filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))).collect();
        let output = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Self::start(name, command, output)?;
        Ok(Process { name, child, log, program, args, envs })
    }

    fn start(name: &str, mut command: Command, output: File) -> Result<Child> {
        command.stdin(Stdio::null()).stdout(output.try_clone()?).stderr(output);
        spawn_tied_to_process(command).with_context(|| format!("starting {name}"))
    }

    /// Kills the process if it still runs and starts it again, appending to the same log.
    fn respawn(&mut self) -> Result<()> {
        self.kill();
        let mut command = Command::new(&self.program);
        command.args(&self.args).envs(self.envs.iter().map(|(k, v)| (k, v)));
        let output = File::options().append(true).open(&self.log).with_context(|| format!("opening {}", self.log.display()))?;
        self.child = Self::start(self.name, command, output)?;
        Ok(())
    }

    /// Turns a crashed process into an error carrying its log, rather than a readiness timeout.
    pub fn ensure_running(&mut self) -> Result<()> {
        let exited = self.child.try_wait().with_context(|| format!("checking on {}", self.name))?;
        if let Some(status) = exited {
            bail!("{} exited with {status}\n{}", self.name, log_tail(&self.log));
        }
        Ok(())
    }

    pub fn kill(&mut self) {
        // Either call only fails once the child is already reaped, which is the goal anyway.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A poisoned lock only means another test panicked while restarting; the process handle is
/// still usable.
fn lock(process: &Mutex<Process>) -> std::sync::MutexGuard<'_, Process> {
    process.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Spawns `command` such that the kernel SIGKILLs the child when the test binary exits.
///
/// The shared control plane lives in a `static`, which is never dropped, so `Drop` cannot stop
/// it. `PR_SET_PDEATHSIG` can, but it fires when the *thread* that forked the child exits,
/// and test threads come and go. Hence every child is forked by one thread that lives as long
/// as the process.
fn spawn_tied_to_process(mut command: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("child-spawner".to_owned())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    // The requester is blocked on the reply; it can only be gone if it panicked.
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("starting the child spawner thread");
        requests
    });
    // SAFETY: the closure runs between fork and exec and only makes an async-signal-safe syscall.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (reply, response) = mpsc::channel();
    spawner.send((command, reply)).expect("the child spawner thread never exits");
    response.recv().expect("the child spawner thread always replies")
}

/// Returns `user` after checking that it is one of the [`USERS`], so that a typo fails loudly
/// rather than as an authentication error.
fn known_user(user: &str) -> &str {
    assert!(USERS.iter().any(|&(known, _)| known == user), "unknown user {user:?}; known users: {USERS:?}");
    user
}

/// Directory with `etcd`, `kube-apiserver` and `kubectl`: `$AGENTGATE_CONTROLPLANE_DIR` if set
/// (prebuilt binaries, no Go toolchain needed), else the output of `tests/controlplane/build.sh`,
/// which is instant once its cache is populated.
fn binaries_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("AGENTGATE_CONTROLPLANE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/controlplane/build.sh");
            // Progress of a first, slow build goes straight to the terminal.
            let stdout = run_checked(Command::new(&script).stderr(Stdio::inherit()))?;
            let last_line = stdout.lines().last().context("build.sh printed no directory")?;
            PathBuf::from(last_line)
        }
    };
    for binary in ["etcd", "kube-apiserver", "kubectl"] {
        ensure!(dir.join(binary).is_file(), "{binary} is missing from {}", dir.display());
    }
    Ok(dir)
}

/// Creates `$TMPDIR/agentgate-cp-<pid>`, private to the current user because it holds bearer
/// tokens.
///
/// The directory is never removed by its own process (the control plane lives until exit), so
/// this first removes those whose process is gone, including one left by an earlier process
/// with our pid.
fn fresh_scratch_dir() -> Result<PathBuf> {
    let tmp = std::env::temp_dir();
    let own_pid = std::process::id().to_string();
    for entry in fs::read_dir(&tmp).with_context(|| format!("listing {}", tmp.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| name.strip_prefix("agentgate-cp-")) else {
            continue;
        };
        if pid == own_pid || (pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists()) {
            // Best effort: another test binary may be removing the same directory right now, and
            // a failure to remove our own shows up as an error when creating it below.
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let dir = tmp.join(format!("agentgate-cp-{own_pid}"));
    DirBuilder::new().mode(0o700).create(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Reserves `N` distinct loopback ports. All listeners stay open until every port is chosen so
/// that the kernel cannot hand out one port twice; the servers bind them right after.
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<io::Result<Vec<_>>>().context("reserving loopback ports")?;
    let ports = listeners.iter().map(|listener| Ok(listener.local_addr()?.port())).collect::<Result<Vec<_>>>()?;
    Ok(ports.try_into().expect("one port per listener"))
}

/// A fresh bearer token, so that nobody else on the machine can guess the admin credentials
/// of this loopback apiserver.
fn random_token() -> Result<String> {
    let mut bytes = [0; 16];
    File::open("/dev/urandom").and_then(|mut urandom| urandom.read_exact(&mut bytes)).context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// A kubeconfig for `user` of the test apiserver; `credentials` are the lines under `user:`
/// (`token: …`, or `client-certificate: …` and `client-key: …` indented by four spaces).
pub fn kubeconfig_yaml(server: &str, ca: &Path, user: &str, credentials: &str, namespace: Option<&str>) -> String {
    let namespace = namespace.map(|ns| format!("\n    namespace: {ns}")).unwrap_or_default();
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: agentgate-test
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    {credentials}
contexts:
- name: {user}
  context:
    cluster: agentgate-test
    user: {user}{namespace}
current-context: {user}
",
        ca = ca.display()
    )
}

/// `*.yaml` files in `dir`, sorted so that installation order is deterministic; none if `dir`
/// does not exist.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut files = entries.map(|entry| Ok(entry?.path())).collect::<io::Result<Vec<_>>>()?;
    files.retain(|path| path.extension().is_some_and(|extension| extension == "yaml"));
    files.sort();
    Ok(files)
}

/// Runs a short-lived helper command, failing with its stderr unless it succeeds.
pub fn run_checked(command: &mut Command) -> Result<String> {
    let output = command.output().with_context(|| format!("running {command:?}"))?;
    ensure!(output.status.success(), "{command:?} failed with {}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    String::from_utf8(output.stdout).with_context(|| format!("{command:?} printed non-UTF-8 output"))
}

/// The end of a log file, to explain in an error why a process failed.
pub fn log_tail(path: &Path) -> String {
    const LINES: usize = 40;
    match fs::read(path) {
        Ok(log) => {
            let log = String::from_utf8_lossy(&log);
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LINES)..];
            format!("last {} lines of {}:\n{}", tail.len(), path.display(), tail.join("\n"))
        }
        Err(e) => format!("cannot read {}: {e}", path.display()),
    }
}
