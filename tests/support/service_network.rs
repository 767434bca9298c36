//! Services on an in-cluster real node (tests/support/node.rs) as a real cluster has them, by the
//! components a real cluster runs, built by tests/node/build.sh:
//! - kube-proxy (iptables mode) routes every Service's ClusterIP to its ready endpoints, the
//!   `kubernetes` Service's included (the apiserver publishes its endpoint itself);
//! - CoreDNS (tests/node/coredns: a minimal build with the kubernetes plugin) answers
//!   `<service>.<namespace>.svc.cluster.local` from the apiserver. It runs as a host process on the
//!   node IP; the selectorless `kube-dns` Service in kube-system, at the ClusterIP the kubelet's
//!   `clusterDNS` names, leads there through kube-proxy, so a Pod's resolver uses the same path as
//!   on a cluster whose CoreDNS runs as Pods.
//!
//! Both log in with client certificates of the node's CA: kube-proxy as `system:kube-proxy`
//! (bound to `system:node-proxier` by the apiserver's bootstrap policy), CoreDNS as
//! `system:coredns` with the read-only ClusterRole its upstream manifests grant.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::controlplane::{ControlPlane, Process, log_tail};
use super::node::{LOG_DIR, NODE_IP, NODE_NAME, POD_CIDR};

/// ClusterIP of the `kube-dns` Service: what the kubelet writes into every Pod's resolv.conf.
pub const CLUSTER_DNS_IP: &str = "10.96.0.10";
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// CoreDNS's port on the node IP: the `kube-dns` Service's endpoint (53 may be the host's own).
const COREDNS_PORT: u16 = 20053;
/// CoreDNS's `ready` plugin: 200 once the kubernetes plugin has synced with the apiserver.
const COREDNS_READY_PORT: u16 = 20181;
const KUBE_PROXY_HEALTHZ_PORT: u16 = 20256;
const KUBE_PROXY_METRICS_PORT: u16 = 20249;
const STARTUP_TIMEOUT: Duration = Duration::from_mins(1);

/// kube-proxy and CoreDNS; killed when dropped (the rules kube-proxy wrote are removed by
/// [`clean`], which the node's teardown runs).
pub struct ServiceNetwork {
    kube_proxy: Process,
    coredns: Process,
}

impl ServiceNetwork {
    /// Starts both with kubeconfigs `kube-proxy.kubeconfig` and `coredns.kubeconfig` in `dir`, and
    /// waits until kube-proxy has written the rules of the `kubernetes` and `kube-dns` Services
    /// and CoreDNS is ready.
    pub fn start(cp: &ControlPlane, bin: &Path, dir: &Path) -> Result<ServiceNetwork> {
        apply_dns_objects(cp)?;
        let config = dir.join("etc/kube-proxy.yaml");
        fs::write(&config, kube_proxy_config(&dir.join("kube-proxy.kubeconfig")))?;
        let mut kube_proxy = Command::new(bin.join("bin/kube-proxy"));
        kube_proxy.arg(format!("--config={}", config.display())).arg("--v=2");
        let kube_proxy = Process::spawn("kube-proxy", kube_proxy, Path::new(LOG_DIR).join("kube-proxy.log"))?;

        let corefile = dir.join("etc/Corefile");
        fs::write(&corefile, corefile_text(&dir.join("coredns.kubeconfig")))?;
        let mut coredns = Command::new(bin.join("bin/coredns"));
        coredns.arg("-conf").arg(&corefile);
        let coredns = Process::spawn("coredns", coredns, Path::new(LOG_DIR).join("coredns.log"))?;
        let mut network = ServiceNetwork { kube_proxy, coredns };

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let kubernetes = format!("{}/32", super::node::KUBERNETES_SERVICE_IP);
        let kube_dns = format!("{CLUSTER_DNS_IP}/32");
        loop {
            network.kube_proxy.ensure_running()?;
            network.coredns.ensure_running()?;
            let rules = Command::new("iptables").args(["-t", "nat", "-S", "KUBE-SERVICES"]).stderr(Stdio::null()).output()?;
            let rules = String::from_utf8_lossy(&rules.stdout);
            let routed = rules.contains(&kubernetes) && rules.contains(&kube_dns);
            if routed && coredns_ready() {
                return Ok(network);
            }
            if Instant::now() > deadline {
                bail!(
                    "Services not routed (kube-proxy: {routed}) or CoreDNS not ready after {STARTUP_TIMEOUT:?}\n{}\n{}",
                    log_tail(&Path::new(LOG_DIR).join("kube-proxy.log")),
                    log_tail(&Path::new(LOG_DIR).join("coredns.log"))
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The kubelet's DNS settings for Pods (KubeletConfiguration).
pub fn kubelet_dns_config() -> String {
    format!("clusterDNS: [{CLUSTER_DNS_IP}]\n")
}

/// Removes what kube-proxy wrote into the host's iptables (its own `--cleanup`), also after a run
/// that was killed. Harmless when there is nothing.
pub fn clean(bin: &Path) {
    let kube_proxy = bin.join("bin/kube-proxy");
    if kube_proxy.is_file() {
        let _ = Command::new(kube_proxy).arg("--cleanup").stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

fn coredns_ready() -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", COREDNS_READY_PORT)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /ready HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}

/// CoreDNS's read access (its upstream ClusterRole `system:coredns`), the `kube-dns` Service and
/// its one endpoint, CoreDNS on the node IP.
fn apply_dns_objects(cp: &ControlPlane) -> Result<()> {
    let objects = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["services", "namespaces"], "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:coredns"}]},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system",
            "labels": {"k8s-app": "kube-dns"}},
         "spec": {"clusterIP": CLUSTER_DNS_IP, "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": COREDNS_PORT},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": COREDNS_PORT}]}},
        // Selectorless: the EndpointSlice controller leaves a slice with its own manager alone.
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "kube-dns-node", "namespace": "kube-system",
            "labels": {"kubernetes.io/service-name": "kube-dns", "endpointslice.kubernetes.io/managed-by": "agentgate-test-harness"}},
         "addressType": "IPv4",
         "ports": [{"name": "dns", "port": COREDNS_PORT, "protocol": "UDP"}, {"name": "dns-tcp", "port": COREDNS_PORT, "protocol": "TCP"}],
         "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": true}, "nodeName": NODE_NAME}]},
    ]});
    let file = cp.dir().join("service-network.json");
    fs::write(&file, objects.to_string())?;
    let out = cp.kubectl("admin", &["apply", "--server-side", "--field-manager=agentgate-test-harness", "-f", &file.display().to_string()]);
    if !out.status.success() {
        bail!("applying the kube-dns Service and CoreDNS's RBAC: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn kube_proxy_config(kubeconfig: &Path) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
clusterCIDR: {POD_CIDR}
healthzBindAddress: 127.0.0.1:{KUBE_PROXY_HEALTHZ_PORT}
metricsBindAddress: 127.0.0.1:{KUBE_PROXY_METRICS_PORT}
# NodePorts only on the node IP, never on the host's own addresses.
nodePortAddresses: ["{NODE_IP}/32"]
# Root here lacks CAP_SYS_RESOURCE; and the host's sysctls are not the node's to change: 0 leaves
# conntrack's table size and timeouts as they are, and no NodePort on 127.0.0.1 needs
# route_localnet.
oomScoreAdj: 0
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  localhostNodePorts: false
  minSyncPeriod: 200ms
"#,
        kubeconfig = kubeconfig.display()
    )
}

fn corefile_text(kubeconfig: &Path) -> String {
    format!(
        r#".:{COREDNS_PORT} {{
    bind {NODE_IP}
    ready 127.0.0.1:{COREDNS_READY_PORT}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
    }}
}}
"#,
        kubeconfig = kubeconfig.display()
    )
}
