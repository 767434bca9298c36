//! A real node: containerd 2 + runc + CNI bridge + kubelet, and kube-scheduler, registered to a
//! control plane of its own, so agent Pods really run (tests/real_node.rs).
//!
//! Authentication is done as on a real cluster: the harness makes a CA that the apiserver trusts
//! for client certificates (`--client-ca-file`); the kubelet logs in with a certificate for
//! `system:node:<name>` (group `system:nodes`), so the Node authorizer and NodeRestriction apply;
//! the kubelet serves with a certificate from the same CA and authenticates and authorizes every
//! request through the apiserver (webhook, no anonymous access); the apiserver reaches it with its
//! own client certificate (`--kubelet-client-certificate`), bound to `system:kubelet-api-admin`.
//! The scheduler logs in as `system:kube-scheduler`.
//!
//! It needs root and uses fixed host resources: the node IP [`NODE_IP`] on `lo`, the bridge
//! [`BRIDGE`], the Pod network [`POD_CIDR`], the kubelet's ports, the `/kubepods` cgroups and the
//! directories [`STATE_DIR`] and [`RUN_DIR`]. So one real node runs per machine: [`RealNode::start`]
//! takes an exclusive lock on [`LOCK_FILE`] (waiting for another test binary's node to finish),
//! cleans up whatever a killed earlier run left, and dropping the node removes everything it
//! created, also when a test panics. Binaries come from tests/node/build.sh (`make node`).
//!
//! The configuration follows ../shared/notes/real-node.md (cgroup v1 knobs, `restrict_oom_score_adj`
//! because this VM's root lacks CAP_SYS_RESOURCE, a self-built pause image, node IP on `lo`).

use std::{
    fs::{self, File},
    os::unix::io::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::controlplane::{ControlPlane, ControllerManager, Options, Process, log_tail, run_checked};
use super::service_network::{self, ServiceNetwork};

pub const NODE_NAME: &str = "agentgate-node";
/// The node's InternalIP: on `lo` (no dummy interface driver here; the kubelet refuses loopback).
pub const NODE_IP: &str = "10.200.0.1";
pub const BRIDGE: &str = "agw0";
pub const POD_CIDR: &str = "10.244.0.0/24";
pub const KUBELET_PORT: u16 = 20250;
pub const KUBELET_HEALTHZ_PORT: u16 = 20248;
/// Configuration, PKI, containerd's root and the kubelet's root. Fixed, so that a later run can
/// clean up after one that was killed.
pub const STATE_DIR: &str = "/tmp/agentgate-node";
/// containerd's state and socket, runc's state.
pub const RUN_DIR: &str = "/run/agentgate-node";
/// Logs of the last run, kept after teardown for post-mortems.
pub const LOG_DIR: &str = "/tmp/agentgate-node-logs";
pub const LOCK_FILE: &str = "/run/agentgate-node.lock";
/// Name of the CNI network (and of its iptables comments).
const CNI_NETWORK: &str = "agentgate-node";
const STARTUP_TIMEOUT: Duration = Duration::from_mins(2);
/// Images every node has, imported from the build cache (`images/<file>` → name).
pub const PAUSE_IMAGE: &str = "local.test/pause:1.0";
pub const BUSYBOX_IMAGE: &str = "local.test/busybox:1.0";
/// The reference agent (images/reference-agent), built by tests/node/build.sh and `make image`.
pub const REFERENCE_AGENT_IMAGE: &str = concat!("ghcr.io/agentgate/reference-agent:", env!("CARGO_PKG_VERSION"));
/// The ClusterIP of the `kubernetes` Service (the first address of the apiserver's
/// --service-cluster-ip-range), which in-cluster clients reach through KUBERNETES_SERVICE_HOST.
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// The operator image [`RealNode::import_operator_debug_image`] makes from the cargo-built binary.
pub const OPERATOR_DEBUG_REPOSITORY: &str = "local.test/agentgate";
pub const OPERATOR_DEBUG_TAG: &str = concat!("debug-", env!("CARGO_PKG_VERSION"));
/// kube-controller-manager's controllers on an [`NodeOptions::in_cluster`] node: the
/// `kube-root-ca.crt` ConfigMap every ServiceAccount token volume mounts, default
/// ServiceAccounts, Deployments and their ReplicaSets (the chart), EndpointSlices of Services (the
/// metrics Service, scraped as Prometheus does, by endpoint) and the garbage collector (ReplicaSets
/// and Pods of an upgraded or uninstalled release).
pub const IN_CLUSTER_CONTROLLERS: &str = "root-ca-cert-publisher,serviceaccount,deployment,replicaset,endpointslice,garbagecollector";

/// What a [`RealNode`] offers besides running Pods.
#[derive(Clone, Copy, Default)]
pub struct NodeOptions {
    /// Pods can be in-cluster API clients and reach Services by name, as on a real cluster:
    /// kube-apiserver listens on the node IP, kube-proxy routes Services and CoreDNS answers
    /// their names (tests/support/service_network.rs), and kube-controller-manager runs
    /// [`IN_CLUSTER_CONTROLLERS`]. The operator then runs as a Pod installed by the chart
    /// (tests/in_cluster.rs, `make demo`).
    pub in_cluster: bool,
}

/// Why a real node cannot start on this machine, or `None` when it can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (containerd, runc, CNI and the kubelet need it)".into());
    }
    for tool in ["runc", "iptables", "ip", "mount"] {
        if which(tool).is_none() {
            return Some(format!("`{tool}` is not installed (Debian: apt-get install runc iptables iproute2 conntrack)"));
        }
    }
    None
}

/// Whether a test needing a real node should run. Prints a loud SKIPPED banner and returns false
/// when [`unavailable`], unless `AGENTGATE_REQUIRE_REAL_NODE` is set (CI sets it: there a missing
/// prerequisite is a failure, never a pass).
pub fn available_or_skip(test: &str) -> bool {
    let Some(why) = unavailable() else { return true };
    if std::env::var_os("AGENTGATE_REQUIRE_REAL_NODE").is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("{test}: a real node is required (AGENTGATE_REQUIRE_REAL_NODE) but cannot start: {why}");
    }
    // Straight to the process's stderr: libtest captures eprintln! of a passing test and would
    // hide this.
    let banner = format!(
        "\n{bar}\nSKIPPED {test}: no real node on this machine: {why}.\nThis test proved nothing. Run it as root with runc \
         installed (`make node`, then `cargo test --test real_node`), as CI does.\n{bar}\n",
        bar = "#".repeat(100)
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), banner.as_bytes());
    false
}

/// containerd + kubelet + kube-scheduler registered to their own control plane. Everything is
/// torn down on drop.
pub struct RealNode {
    bin: PathBuf,
    started_in: Duration,
    scheduler: Option<Process>,
    controller_manager: Option<ControllerManager>,
    service_network: Option<ServiceNetwork>,
    kubelet: Option<Process>,
    containerd: Option<Process>,
    control_plane: Option<ControlPlane>,
    _lock: File,
}

impl RealNode {
    /// Builds (once; cached) and starts the node and its control plane, and waits until the Node
    /// is Ready and schedulable and the scheduler runs. Blocks, possibly for a while: it waits
    /// for the machine's lock first.
    pub fn start() -> Result<RealNode> {
        Self::start_with(NodeOptions::default())
    }

    /// Like [`Self::start`], with [`NodeOptions`].
    pub fn start_with(options: NodeOptions) -> Result<RealNode> {
        let lock = lock_machine()?;
        let bin = node_binaries()?;
        let t0 = Instant::now();
        let mut node = RealNode {
            bin,
            started_in: Duration::ZERO,
            scheduler: None,
            controller_manager: None,
            service_network: None,
            kubelet: None,
            containerd: None,
            control_plane: None,
            _lock: lock,
        };
        // From here on, a failure drops `node`, which tears down whatever has been set up.
        // A run that was killed (SIGKILL, OOM, power) could not clean up; do it now.
        clean_host(&node.bin);
        let dir = Path::new(STATE_DIR);
        let _ = fs::remove_dir_all(dir);
        let _ = fs::remove_dir_all(LOG_DIR);
        for sub in ["etc/cni/net.d", "var/kubelet", "var/log/pods", "var/kubelet-plugins", "var/cni-ipam", "pki"] {
            fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {STATE_DIR}/{sub}"))?;
        }
        fs::create_dir_all(LOG_DIR)?;
        fs::create_dir_all(RUN_DIR)?;
        record_host_state()?;
        prepare_host()?;

        let pki = dir.join("pki");
        make_pki(&pki)?;
        let p = |f: &str| pki.join(f).display().to_string();
        node.control_plane = Some(ControlPlane::start_owned(Options {
            audit: false,
            authorization_mode: "Node,RBAC",
            apiserver_args: vec![
                format!("--client-ca-file={}", p("ca.crt")),
                "--enable-admission-plugins=NodeRestriction".into(),
                format!("--kubelet-client-certificate={}", p("apiserver-kubelet-client.crt")),
                format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
                format!("--kubelet-certificate-authority={}", p("ca.crt")),
                "--kubelet-preferred-address-types=InternalIP".into(),
                // The `kubernetes` Service's endpoint (the advertise address, the node IP), which
                // kube-proxy routes its ClusterIP to; none on loopback (the reconciler refuses it).
                format!("--endpoint-reconciler-type={}", if options.in_cluster { "lease" } else { "none" }),
            ],
            // Pods reach the node IP through the bridge's gateway; loopback only from the host.
            address: if options.in_cluster { NODE_IP } else { "127.0.0.1" },
        })?);
        node.start_components(dir, options)?;
        if options.in_cluster {
            node.serve_in_cluster_clients()?;
        }
        node.started_in = t0.elapsed();
        eprintln!("real node {NODE_NAME} Ready in {:.1?} (including its control plane); logs in {LOG_DIR}", node.started_in);
        Ok(node)
    }

    fn start_components(&mut self, dir: &Path, options: NodeOptions) -> Result<()> {
        let cp = self.control_plane.as_ref().expect("control plane runs until drop");
        let server = cp.server().to_owned();
        let pki = dir.join("pki");
        // The apiserver's serving bundle (self-signed from --cert-dir) is what clients trust.
        let apiserver_ca = cp.dir().join("pki/apiserver.crt");
        write_cert_kubeconfig(&dir.join("kubelet.kubeconfig"), &server, &apiserver_ca, &pki, "node")?;
        write_cert_kubeconfig(&dir.join("scheduler.kubeconfig"), &server, &apiserver_ca, &pki, "scheduler")?;
        write_cert_kubeconfig(&dir.join("kube-proxy.kubeconfig"), &server, &apiserver_ca, &pki, "kube-proxy")?;
        write_cert_kubeconfig(&dir.join("coredns.kubeconfig"), &server, &apiserver_ca, &pki, "coredns")?;
        // The apiserver calls the kubelet (logs, exec, proxy) as this user; the kubelet asks the
        // apiserver whether it may (webhook authorization).
        apply(
            cp,
            "apiserver-kubelet-rbac",
            r#"{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": "agentgate-test:apiserver-kubelet-client"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:kubelet-api-admin"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "kube-apiserver-kubelet-client"}]}"#,
        )?;

        // containerd
        let config = dir.join("etc/containerd.toml");
        fs::write(&config, containerd_config(&self.bin))?;
        fs::write(dir.join("etc/cni/net.d/10-agentgate-node.conflist"), cni_config())?;
        let mut containerd = Command::new(self.bin.join("bin/containerd"));
        containerd.arg(format!("--config={}", config.display())).env("PATH", path_with(&self.bin.join("bin")));
        self.containerd = Some(Process::spawn("containerd", containerd, Path::new(LOG_DIR).join("containerd.log"))?);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while !self.ctr(&["version"]).map(|o| o.status.success()).unwrap_or(false) {
            self.containerd.as_mut().unwrap().ensure_running()?;
            ensure!(Instant::now() < deadline, "containerd did not answer within {STARTUP_TIMEOUT:?}");
            thread::sleep(Duration::from_millis(50));
        }
        for (file, name) in [("pause.tar", PAUSE_IMAGE), ("busybox.tar", BUSYBOX_IMAGE), ("reference-agent.tar", REFERENCE_AGENT_IMAGE)] {
            self.import_image(&self.bin.join("images").join(file), name)?;
        }

        // kubelet
        let kubelet_config = dir.join("etc/kubelet-config.yaml");
        let dns = if options.in_cluster { service_network::kubelet_dns_config() } else { String::new() };
        fs::write(&kubelet_config, kubelet_config_yaml(&pki) + &dns)?;
        let mut kubelet = Command::new(self.bin.join("bin/kubelet"));
        kubelet
            .arg(format!("--config={}", kubelet_config.display()))
            .arg(format!("--kubeconfig={}", dir.join("kubelet.kubeconfig").display()))
            .arg(format!("--root-dir={}", dir.join("var/kubelet").display()))
            .arg(format!("--cert-dir={}", dir.join("var/kubelet/pki").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={NODE_IP}"))
            .arg("--v=2")
            .env("PATH", path_with(&self.bin.join("bin")));
        self.kubelet = Some(Process::spawn("kubelet", kubelet, Path::new(LOG_DIR).join("kubelet.log"))?);

        // kube-scheduler: Pods without spec.nodeName are bound as on a real cluster.
        let mut scheduler = Command::new(self.bin.join("bin/kube-scheduler"));
        scheduler
            .arg(format!("--kubeconfig={}", dir.join("scheduler.kubeconfig").display()))
            .arg("--leader-elect=false")
            .arg("--secure-port=0");
        self.scheduler = Some(Process::spawn("kube-scheduler", scheduler, Path::new(LOG_DIR).join("kube-scheduler.log"))?);

        // Ready, then schedulable: the TaintNodesByCondition admission plugin taints a new Node
        // not-ready, and only the node lifecycle controller of kube-controller-manager (not run
        // here) lifts that taint once the kubelet reports Ready. The harness does its part.
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let ready = r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#;
        loop {
            for process in [&mut self.kubelet, &mut self.containerd, &mut self.scheduler] {
                process.as_mut().unwrap().ensure_running()?;
            }
            let out = cp.kubectl("admin", &["get", "node", NODE_NAME, "-o", ready]);
            if out.status.success() && out.stdout == b"True" {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {NODE_NAME} not Ready after {STARTUP_TIMEOUT:?}\n{}", log_tail(&Path::new(LOG_DIR).join("kubelet.log")));
            }
            thread::sleep(Duration::from_millis(100));
        }
        let untaint = cp.kubectl("admin", &["taint", "node", NODE_NAME, "node.kubernetes.io/not-ready:NoSchedule-"]);
        ensure!(
            untaint.status.success() || String::from_utf8_lossy(&untaint.stderr).contains("not found"),
            "removing the not-ready taint: {}",
            String::from_utf8_lossy(&untaint.stderr)
        );
        Ok(())
    }

    /// What a real cluster gives in-cluster API clients and the chart's Deployment, which the
    /// harness does not otherwise run (see [`NodeOptions::in_cluster`]).
    fn serve_in_cluster_clients(&mut self) -> Result<()> {
        let cp = self.control_plane.as_ref().expect("control plane runs until drop");
        self.service_network = Some(ServiceNetwork::start(cp, &self.bin, Path::new(STATE_DIR))?);
        // The bundle the apiserver serves with (certificate and its self-signed CA): what the
        // root-CA publisher puts in every namespace's kube-root-ca.crt, so that Pods trust it.
        let root_ca = format!("--root-ca-file={}", cp.dir().join("pki/apiserver.crt").display());
        self.controller_manager = Some(ControllerManager::start_with_args(cp, IN_CLUSTER_CONTROLLERS, &[&root_ca]));
        Ok(())
    }

    /// Makes the operator image from the binary cargo built for this test (or `$AGENTGATE_BIN`,
    /// else target/debug/agentgate) with deploy/images/debug-image.sh, imports it into the node's
    /// containerd, and returns its reference (`OPERATOR_DEBUG_REPOSITORY:OPERATOR_DEBUG_TAG`).
    /// Seconds, where the release image (`make image`) takes half an hour cold.
    pub fn import_operator_debug_image(&self) -> Result<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let binary = std::env::var_os("AGENTGATE_BIN")
            .map(PathBuf::from)
            .or_else(|| option_env!("CARGO_BIN_EXE_agentgate").map(PathBuf::from))
            .unwrap_or_else(|| root.join("target/debug/agentgate"));
        ensure!(binary.is_file(), "{} is missing (cargo build --bin agentgate)", binary.display());
        let image = format!("{OPERATOR_DEBUG_REPOSITORY}:{OPERATOR_DEBUG_TAG}");
        let tarball = Path::new(STATE_DIR).join("agentgate-debug-image.tar");
        run_checked(
            Command::new(root.join("deploy/images/debug-image.sh")).arg(self.bin.join("bin/crane")).arg(&binary).arg(&tarball).arg(&image),
        )
        .context("making the operator's debug image")?;
        self.import_image(&tarball, &image)?;
        let _ = fs::remove_file(&tarball);
        Ok(image)
    }

    /// The control plane the node is registered to.
    pub fn control_plane(&self) -> &ControlPlane {
        self.control_plane.as_ref().expect("control plane runs until drop")
    }

    /// From taking the lock to the Node being Ready and schedulable (control plane included).
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// Directory of the cached node binaries (`bin/`, `cni/bin/`, `images/`).
    pub fn binaries(&self) -> &Path {
        &self.bin
    }

    /// Runs `kubectl` with the node's own credentials (`system:node:<name>`).
    pub fn kubectl_as_node(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.control_plane().bin_dir().join("kubectl"))
            .arg(format!("--kubeconfig={}/kubelet.kubeconfig", STATE_DIR))
            .args(args)
            .output()
            .expect("running kubectl")
    }

    /// `ctr -n k8s.io <args>` against the node's containerd.
    pub fn ctr(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(self.bin.join("bin/ctr"))
            .arg(format!("--address={RUN_DIR}/containerd.sock"))
            .args(["--namespace", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")
    }

    /// Imports a docker-archive or OCI tarball into the node's containerd (as `crane` wrote it)
    /// and checks it is there as `name`.
    pub fn import_image(&self, tarball: &Path, name: &str) -> Result<()> {
        let tarball = tarball.to_str().context("non-UTF-8 image path")?;
        let out = self.ctr(&["images", "import", "--platform", "linux/amd64", tarball])?;
        ensure!(out.status.success(), "ctr images import {tarball}: {}", String::from_utf8_lossy(&out.stderr));
        let listed = self.ctr(&["images", "ls", "-q"])?;
        ensure!(
            String::from_utf8_lossy(&listed.stdout).lines().any(|l| l == name || l == format!("docker.io/{name}")),
            "{tarball} did not provide image {name}; containerd has:\n{}",
            String::from_utf8_lossy(&listed.stdout)
        );
        Ok(())
    }

    /// Imports the `agentgate` binary this build made (a debug build, dynamically linked) as image
    /// `name`, in seconds instead of `make image`'s release build: one layer with the binary and
    /// exactly the shared libraries `ldd` names, at their paths, /etc/passwd with nonroot (65532),
    /// the host's CA certificates and the release image's entrypoint (deploy/images/build.sh). For the meter sidecar
    /// (`--meter-image`); not for a registry.
    pub fn import_debug_agentgate_image(&self, binary: &Path, name: &str) -> Result<()> {
        let work = tempfile_dir("agentgate-debug-image")?;
        let rootfs = work.join("rootfs");
        for dir in ["usr/local/bin", "etc", "tmp", "home/nonroot"] {
            fs::create_dir_all(rootfs.join(dir))?;
        }
        run_checked(Command::new("objcopy").arg("--strip-debug").arg(binary).arg(rootfs.join("usr/local/bin/agentgate")))?;
        let ldd = run_checked(Command::new("ldd").arg(binary))?;
        // `name => /path (addr)` and the loader itself, `/path (addr)`.
        let libs: Vec<&str> = ldd
            .lines()
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                match words.as_slice() {
                    [_, "=>", path, ..] if path.starts_with('/') => Some(*path),
                    [path, ..] if path.starts_with('/') => Some(*path),
                    _ => None,
                }
            })
            .collect();
        ensure!(!libs.is_empty(), "ldd found no shared libraries in {}: {ldd}", binary.display());
        for lib in libs {
            // Debian's /lib and /lib64 are links into /usr: copy to the resolved path, link the other.
            let real = fs::canonicalize(lib)?;
            let target = rootfs.join(real.strip_prefix("/")?);
            fs::create_dir_all(target.parent().unwrap())?;
            fs::copy(&real, &target)?;
            let named = rootfs.join(Path::new(lib).strip_prefix("/")?);
            if !named.exists() {
                fs::create_dir_all(named.parent().unwrap())?;
                std::os::unix::fs::symlink(&real, &named)?;
            }
        }
        fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        )?;
        fs::write(rootfs.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n")?;
        // The meter loads the system's roots at start (for https upstreams).
        fs::create_dir_all(rootfs.join("etc/ssl/certs"))?;
        fs::copy("/etc/ssl/certs/ca-certificates.crt", rootfs.join("etc/ssl/certs/ca-certificates.crt"))
            .context("the host's CA certificates (Debian: ca-certificates)")?;
        let tarball = work.join("image.tar");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/images/crane-image.sh");
        run_checked(Command::new(script).arg(self.bin.join("bin/crane")).arg(&tarball).arg(name).arg(&rootfs).args([
            "--entrypoint=/usr/local/bin/agentgate",
            "--cmd=run",
            "--user=65532:65532",
        ]))?;
        let imported = self.import_image(&tarball, name);
        let _ = fs::remove_dir_all(&work);
        imported
    }

    /// The cgroup v1 directory of a Pod's container in hierarchy `controller` (e.g. `memory`),
    /// as the kubelet's cgroupfs driver lays it out.
    pub fn container_cgroup(&self, controller: &str, qos: &str, pod_uid: &str, container_id: &str) -> PathBuf {
        let pod = format!("pod{pod_uid}");
        let mut path = PathBuf::from("/sys/fs/cgroup").join(controller).join("kubepods");
        if qos != "Guaranteed" {
            path.push(qos.to_ascii_lowercase());
        }
        path.join(pod).join(container_id)
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        let t0 = Instant::now();
        // 1. the scheduler and kubelet first, so nothing recreates what is removed below
        for process in [&mut self.scheduler, &mut self.kubelet].into_iter().flatten() {
            process.kill();
        }
        self.controller_manager.take();
        self.service_network.take();
        // 2. every sandbox through containerd, which runs CNI DEL and stops the shims
        if self.containerd.is_some() {
            let crictl = self.bin.join("bin/crictl");
            let _ = Command::new(&crictl)
                .args(["--runtime-endpoint", &format!("unix://{RUN_DIR}/containerd.sock"), "--timeout", "20s", "rmp", "-fa"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(containerd) = self.containerd.as_mut() {
            containerd.kill();
        }
        // 3. shims, mounts, network, cgroups, iptables, paths the kubelet hard-codes
        clean_host(&self.bin);
        // 4. the control plane (its processes are killed when dropped), then the lock (a field)
        self.control_plane.take();
        let _ = fs::remove_dir_all(STATE_DIR);
        let _ = fs::remove_dir_all(RUN_DIR);
        eprintln!("real node torn down in {:.1?}", t0.elapsed());
    }
}

/// Waits for and takes the machine-wide lock on the real node's fixed resources. Released when
/// the returned file is closed, also if the process dies.
fn lock_machine() -> Result<File> {
    let file = File::options().create(true).truncate(false).write(true).open(LOCK_FILE).with_context(|| format!("opening {LOCK_FILE}"))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("another real node runs on this machine ({LOCK_FILE} is locked); waiting for it");
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("locking {LOCK_FILE}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// `$AGENTGATE_NODE_DIR` if set (prebuilt), else the output of tests/node/build.sh (instant once
/// its cache is filled; builds kubelet, containerd, ... otherwise).
fn node_binaries() -> Result<PathBuf> {
    let dir = match std::env::var_os("AGENTGATE_NODE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/build.sh");
            let stdout = run_checked(Command::new(&script).stderr(Stdio::inherit()))?;
            PathBuf::from(stdout.lines().last().context("tests/node/build.sh printed no directory")?)
        }
    };
    for file in [
        "bin/kubelet",
        "bin/kube-scheduler",
        "bin/containerd",
        "bin/containerd-shim-runc-v2",
        "bin/ctr",
        "bin/crictl",
        "bin/kube-proxy",
        "bin/coredns",
        "cni/bin/bridge",
        "cni/bin/host-local",
        "cni/bin/loopback",
        "images/pause.tar",
        "images/busybox.tar",
        "images/reference-agent.tar",
    ] {
        ensure!(dir.join(file).is_file(), "{file} is missing from {} (run `make node`)", dir.display());
    }
    Ok(dir)
}

/// Host settings the node changes, recorded before changing them so teardown (possibly by a
/// later run) restores them: `ip_forward`, and whether the paths the kubelet hard-codes existed.
fn record_host_state() -> Result<()> {
    let forward = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_else(|_| "0".into());
    let mut state = format!("ip_forward={}\n", forward.trim());
    for path in ["/var/lib/kubelet", "/var/log/containers"] {
        if !Path::new(path).exists() {
            state.push_str(&format!("created={path}\n"));
        }
    }
    // Outside STATE_DIR and RUN_DIR, which a later run's start removes before clean_host reads it.
    fs::write(format!("{RUN_DIR}.host-state"), state)?;
    Ok(())
}

fn prepare_host() -> Result<()> {
    fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling net.ipv4.ip_forward")?;
    let addr = format!("{NODE_IP}/32");
    let shown = run_checked(Command::new("ip").args(["-4", "addr", "show", "dev", "lo"]))?;
    if !shown.contains(&addr) {
        run_checked(Command::new("ip").args(["addr", "add", &addr, "dev", "lo"]))?;
    }
    Ok(())
}

/// Removes everything a real node may have left on the host; each step is harmless when there is
/// nothing to remove. Processes of this run are already killed; shims outlive containerd.
fn clean_host(bin: &Path) {
    let quiet = |cmd: &mut Command| {
        let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
    };
    // shims, by the pid files in our containerd state directory
    let mut shims = Vec::new();
    if let Ok(namespaces) = fs::read_dir(format!("{RUN_DIR}/io.containerd.runtime.v2.task")) {
        for ns in namespaces.flatten() {
            for task in fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                if let Some(pid) = fs::read_to_string(task.path().join("shim.pid")).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                    // SAFETY: sending a signal to a pid has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    shims.push(pid);
                }
            }
        }
    }
    // and any shim of our containerd whose pid file is gone (a bundle being deleted when a run
    // was killed): they name our socket on their command line
    let our_socket = format!("{RUN_DIR}/containerd.sock");
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_our_shim = args.first().is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"))
            && args.windows(2).any(|w| w[0] == b"-address" && w[1] == our_socket.as_bytes());
        if is_our_shim && !shims.contains(&pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            shims.push(pid);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: signal 0 only checks for existence.
    while shims.iter().any(|&pid| unsafe { libc::kill(pid, 0) } == 0) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    // Processes left in the Pods' cgroups (containers whose shim is gone).
    for tasks in ["/sys/fs/cgroup/pids/kubepods", "/sys/fs/cgroup/memory/kubepods"] {
        if Path::new(tasks).exists() {
            quiet(Command::new("sh").args(["-c", &format!("find {tasks} -name cgroup.procs -exec cat {{}} + | xargs -r kill -9")]));
        }
    }
    // mounts under our directories (rootfs overlays, shm, netns), deepest first
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut ours: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(STATE_DIR) || m.starts_with(RUN_DIR) || m.starts_with("/run/netns/cni-"))
        .collect();
    ours.sort_unstable_by(|a, b| b.cmp(a));
    for m in ours {
        quiet(Command::new("umount").args(["-l", m]));
    }
    if let Ok(netns) = fs::read_dir("/run/netns") {
        for entry in netns.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("cni-")) {
            let _ = fs::remove_file(entry.path());
        }
    }
    // network: the bridge (veths die with their netns), CNI masquerade rules, the node IP
    quiet(Command::new("ip").args(["link", "del", BRIDGE]));
    remove_cni_nat_rules();
    service_network::clean(bin);
    quiet(Command::new("ip").args(["addr", "del", &format!("{NODE_IP}/32"), "dev", "lo"]));
    // cgroups the kubelet made (cgroupfs driver): /kubepods in every hierarchy, deepest first
    for hierarchy in fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        let kubepods = hierarchy.path().join("kubepods");
        if kubepods.is_dir() {
            quiet(Command::new("find").arg(&kubepods).args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"]));
        }
    }
    // iptables chains the kubelet creates
    for ipt in ["iptables", "ip6tables"] {
        for chain_in in ["INPUT", "OUTPUT"] {
            quiet(Command::new(ipt).args(["-D", chain_in, "-j", "KUBE-FIREWALL"]));
        }
        for table in ["filter", "nat", "mangle"] {
            for chain in ["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"] {
                quiet(Command::new(ipt).args(["-t", table, "-F", chain]));
                quiet(Command::new(ipt).args(["-t", table, "-X", chain]));
            }
        }
    }
    // host settings and paths recorded before the run that changed them
    let state_file = format!("{RUN_DIR}.host-state");
    if let Ok(state) = fs::read_to_string(&state_file) {
        for line in state.lines() {
            if let Some(v) = line.strip_prefix("ip_forward=") {
                let _ = fs::write("/proc/sys/net/ipv4/ip_forward", v);
            } else if let Some(path) = line.strip_prefix("created=") {
                let _ = fs::remove_dir_all(path);
            }
        }
        let _ = fs::remove_file(&state_file);
    }
}

/// The bridge plugin's masquerade rules (POSTROUTING → CNI-<hash> chains), when CNI DEL never ran.
fn remove_cni_nat_rules() {
    let Ok(out) = Command::new("iptables").args(["-t", "nat", "-S", "POSTROUTING"]).output() else { return };
    let marker = format!("name: \\\"{CNI_NETWORK}\\\"");
    let chains: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&marker) || l.contains(&format!("name: \"{CNI_NETWORK}\"")))
        .filter_map(|l| l.split(" -j ").nth(1).map(|c| c.split_whitespace().next().unwrap_or_default().to_owned()))
        .collect();
    if chains.is_empty() {
        return;
    }
    // delete by rule number, highest first, so earlier numbers stay valid
    let listed = Command::new("iptables").args(["-t", "nat", "-L", "POSTROUTING", "-n", "--line-numbers"]).output();
    let listed = listed.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let mut numbers: Vec<u32> = listed
        .lines()
        .filter(|l| l.contains(&format!("name: \"{CNI_NETWORK}\"")))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    numbers.sort_unstable_by(|a, b| b.cmp(a));
    for n in numbers {
        let _ = Command::new("iptables").args(["-t", "nat", "-D", "POSTROUTING", &n.to_string()]).status();
    }
    for chain in chains.iter().filter(|c| c.starts_with("CNI-")) {
        let _ = Command::new("iptables").args(["-t", "nat", "-F", chain]).status();
        let _ = Command::new("iptables").args(["-t", "nat", "-X", chain]).status();
    }
}

/// A CA the apiserver trusts for client certificates and the kubelet for its callers, and the
/// certificates signed by it (ECDSA P-256, valid 2 days).
fn make_pki(pki: &Path) -> Result<()> {
    let openssl = |args: &[&str]| run_checked(Command::new("openssl").current_dir(pki).args(args));
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec[..],
            &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=agentgate-test-node-ca"][..],
        ]
        .concat(),
    )
    .context("making the node CA")?;
    // name, subject, extensions
    let certs: [(&str, String, String); 6] = [
        ("node", format!("/O=system:nodes/CN=system:node:{NODE_NAME}"), "extendedKeyUsage=clientAuth".into()),
        ("apiserver-kubelet-client", "/O=agentgate:test/CN=kube-apiserver-kubelet-client".into(), "extendedKeyUsage=clientAuth".into()),
        ("scheduler", "/CN=system:kube-scheduler".into(), "extendedKeyUsage=clientAuth".into()),
        ("kube-proxy", "/CN=system:kube-proxy".into(), "extendedKeyUsage=clientAuth".into()),
        ("coredns", "/CN=system:coredns".into(), "extendedKeyUsage=clientAuth".into()),
        (
            "kubelet-serving",
            format!("/O=system:nodes/CN=system:node:{NODE_NAME}"),
            format!("extendedKeyUsage=serverAuth\nsubjectAltName=IP:{NODE_IP},DNS:{NODE_NAME}"),
        ),
    ];
    for (name, subject, ext) in certs {
        let (key, csr, crt, extfile) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        fs::write(pki.join(&extfile), format!("{ext}\n"))?;
        openssl(&[&["req", "-new"][..], &ec[..], &["-keyout", key.as_str(), "-out", &csr, "-subj", &subject][..]].concat())
            .with_context(|| format!("making the {name} key"))?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ])
        .with_context(|| format!("signing the {name} certificate"))?;
    }
    Ok(())
}

fn write_cert_kubeconfig(path: &Path, server: &str, ca: &Path, pki: &Path, name: &str) -> Result<()> {
    let pki = pki.display();
    let credentials = format!("client-certificate: {pki}/{name}.crt\n    client-key: {pki}/{name}.key");
    let yaml = super::controlplane::kubeconfig_yaml(server, ca, name, &credentials, None);
    fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))
}

fn apply(cp: &ControlPlane, name: &str, json: &str) -> Result<()> {
    let file = cp.dir().join(format!("{name}.json"));
    fs::write(&file, json)?;
    let out = cp.kubectl("admin", &["apply", "--server-side", "--field-manager=agentgate-test-harness", "-f", &file.display().to_string()]);
    ensure!(out.status.success(), "applying {name}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn containerd_config(bin: &Path) -> String {
    let runc = which("runc").unwrap_or_else(|| PathBuf::from("/usr/sbin/runc"));
    format!(
        r#"version = 4
root = '{STATE_DIR}/var/containerd'
state = '{RUN_DIR}'

[plugins]
  [plugins.'io.containerd.server.v1.grpc']
    address = '{RUN_DIR}/containerd.sock'
  [plugins.'io.containerd.server.v1.ttrpc']
    address = '{RUN_DIR}/containerd.sock.ttrpc'
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{PAUSE_IMAGE}'
  [plugins.'io.containerd.cri.v1.runtime']
    # Root here lacks CAP_SYS_RESOURCE, so nobody may set a negative oom_score_adj: clamp to
    # containerd's own (0) instead of failing every sandbox.
    restrict_oom_score_adj = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '{runc}'
          Root = '{RUN_DIR}/runc'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['{cni}']
      conf_dir = '{STATE_DIR}/etc/cni/net.d'
      max_conf_num = 1
"#,
        runc = runc.display(),
        cni = bin.join("cni/bin").display()
    )
}

fn cni_config() -> String {
    format!(
        r#"{{
  "cniVersion": "1.0.0",
  "name": "{CNI_NETWORK}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{BRIDGE}",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{ "subnet": "{POD_CIDR}" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}],
        "dataDir": "{STATE_DIR}/var/cni-ipam"
      }}
    }}
  ]
}}
"#
    )
}

fn kubelet_config_yaml(pki: &Path) -> String {
    let cgroup_v1 = !Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 (hybrid) hosts need failCgroupV1: false; no systemd here, so the cgroupfs driver.
failCgroupV1: {fail_v1}
cgroupDriver: cgroupfs
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
# root lacks CAP_SYS_RESOURCE: the kubelet cannot give itself a negative oom_score_adj
oomScoreAdj: 0
containerRuntimeEndpoint: unix://{RUN_DIR}/containerd.sock
imageServiceEndpoint: unix://{RUN_DIR}/containerd.sock
podLogsDir: {STATE_DIR}/var/log/pods
volumePluginDir: {STATE_DIR}/var/kubelet-plugins
serializeImagePulls: false
# Serving: a certificate from the test CA; every caller is authenticated (client certificate from
# the same CA, or a bearer token checked by the apiserver) and authorized by the apiserver.
address: {NODE_IP}
port: {KUBELET_PORT}
readOnlyPort: 0
tlsCertFile: {pki}/kubelet-serving.crt
tlsPrivateKeyFile: {pki}/kubelet-serving.key
healthzBindAddress: 127.0.0.1
healthzPort: {KUBELET_HEALTHZ_PORT}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true, cacheTTL: 10s}}
  x509: {{clientCAFile: {pki}/ca.crt}}
authorization:
  mode: Webhook
  webhook: {{cacheAuthorizedTTL: 10s, cacheUnauthorizedTTL: 5s}}
staticPodPath: ""
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
nodeStatusReportFrequency: 10s
nodeStatusUpdateFrequency: 2s
syncFrequency: 10s
# Absolute, small thresholds: the node shares the host's disk with build trees, and a percentage
# evicted agent Pods when the host filled up (tests/real_node.rs saw gpu-2a "Evicted" at 99% use).
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "100Mi"
  imagefs.available: "100Mi"
  nodefs.inodesFree: "1%"
featureGates:
  EventedPLEG: true
"#,
        fail_v1 = !cgroup_v1,
        pki = pki.display()
    )
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

fn path_with(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    paths.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    std::env::join_paths(paths).expect("PATH entries without ':'")
}

/// A fresh directory under the system's temporary directory.
fn tempfile_dir(prefix: &str) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
