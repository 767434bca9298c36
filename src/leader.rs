//! Leader election on a coordination.k8s.io Lease (kube-lease-manager): of all replicas only
//! the leader watches and writes; the others stand by and take over when its lease lapses.

use kube::Client;
use kube_lease_manager::{LeaseCreateMode, LeaseManagerBuilder};
use tokio::sync::watch;

/// How long a lease stays valid without renewal: a standby takes over at most this long (plus
/// one retry) after the leader dies.
pub const LEASE_SECONDS: u64 = 10;
/// The leader renews this long before its lease would expire.
const RENEW_MARGIN_SECONDS: u64 = 3;

/// A running campaign: `leading` says whether this process leads now.
pub struct Campaign {
    pub leading: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

impl Campaign {
    /// Gives the lease back so a standby takes over at once instead of after `LEASE_SECONDS`.
    /// Every clone of `leading` must be dropped first: the manager releases when none is left.
    pub async fn resign(self) {
        drop(self.leading);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), self.task).await;
    }
}

/// Joins the election.
pub async fn campaign(client: Client, lease: &str, namespace: &str, identity: &str) -> anyhow::Result<Campaign> {
    let manager = LeaseManagerBuilder::new(client, lease)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(RENEW_MARGIN_SECONDS)
        .with_create_mode(LeaseCreateMode::AutoCreate)
        .with_field_manager("agentgate-leader-election")
        .build()
        .await?;
    let (leading, task) = manager.watch().await;
    Ok(Campaign { leading, task })
}

/// This replica's name in the Lease: its Pod name when it has one, else host and pid.
pub fn identity() -> String {
    let host = std::env::var("POD_NAME").or_else(|_| std::env::var("HOSTNAME")).unwrap_or_else(|_| "agentgate".into());
    format!("{host}-{}", std::process::id())
}
