//! Leader election on a coordination.k8s.io Lease (kube-lease-manager): of all replicas only
//! the leader reconciles and writes; the others stand by and take over when its lease lapses
//! (a replica that has led keeps its watches: controller/watches.rs).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseCreateMode, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a lease stays valid without renewal: a standby takes over at most this long (plus
/// one retry) after the leader dies. kube-controller-manager's default too.
pub const LEASE_SECONDS: u64 = 15;
/// The leader renews this long before its lease would expire: every 3 s, so that a renewal the
/// apiserver answers within 10 s (the term less this interval and `STOP_MARGIN`) keeps the
/// term. With a 10 s lease renewed 5 s before expiry a renewal had 3 s: at load 18 a lone
/// replica lost its own lease every 5-25 s, and each new term relisted every cache (20,000
/// Pods in the busy bench) for 6-13 s before it served a job; the busy steady row fell to
/// 17 Pods/s with a p50 of 80 s (`make bench`, README "In a busy cluster").
const RENEW_MARGIN_SECONDS: u64 = 12;
/// A leader stops leading this long before its term, as the apiserver last confirmed it, runs
/// out, so that nothing of it is still writing when a standby may take over.
const STOP_MARGIN: Duration = Duration::from_secs(2);
/// How often the leader reads its Lease back to confirm its term.
const CONFIRM_EVERY: Duration = Duration::from_secs(1);
/// How long a read of the Lease may take, at most: an apiserver that takes seconds under load
/// still confirms a term. A read is also cut at the end of the term last confirmed, since
/// nothing else is looked at while it runs. With a 1 s bound (the read interval) a busy
/// apiserver's slow answers were thrown away and a lone replica lost its lease 18 times in one
/// burst (`make bench` at load 26, README "In a busy cluster").
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A running campaign: `leading` says whether this process leads now.
pub struct Campaign {
    pub leading: watch::Receiver<bool>,
    /// Resolves when the campaign's thread has given the lease back (or stopped).
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Campaign {
    /// Gives the lease back so a standby takes over at once instead of after `LEASE_SECONDS`.
    /// Every clone of `leading` must be dropped first: the manager releases when none is left.
    pub async fn resign(self) {
        drop(self.leading);
        // The guard holds the manager's channel until it sees ours closed; the manager then
        // releases the lease (given 3 s).
        let _ = tokio::time::timeout(Duration::from_secs(5), self.done).await;
    }
}

/// Joins the election, on a thread of its own with its own runtime and its own apiserver
/// connections: renewing and confirming the lease never waits for a worker thread, nor for a
/// connection, that reconciles keep busy. With both controllers on tasks of their own
/// (controller/tasks.rs) they can occupy every worker of the main runtime. Seen before this
/// change, on a machine at load 23: a lone replica lost its own lease five times in 40 s (`make
/// bench`), and tests/restarts.rs once saw a leader lose and retake its lease without a kill
/// (it passed after). This removes the operator's own share of that; an apiserver that answers
/// the lease read within `READ_TIMEOUT` keeps the term (`guard`).
pub async fn campaign(lease: &str, namespace: &str, identity: &str) -> anyhow::Result<Campaign> {
    let (started_tx, started) = tokio::sync::oneshot::channel::<anyhow::Result<watch::Receiver<bool>>>();
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let (lease, namespace, identity) = (lease.to_string(), namespace.to_string(), identity.to_string());
    std::thread::Builder::new().name("leader-election".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = started_tx.send(Err(e.into()));
                return;
            }
        };
        runtime.block_on(async move {
            match start(&lease, &namespace, &identity).await {
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                }
                Ok((leases, manager_leading, task)) => {
                    let (leading_tx, leading) = watch::channel(false);
                    let _ = started_tx.send(Ok(leading));
                    guard(leases, lease, identity, manager_leading, leading_tx).await;
                    let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
                }
            }
            let _ = done_tx.send(());
        });
    })?;
    let leading = started.await.map_err(|_| anyhow::anyhow!("the leader election thread stopped before it started"))??;
    Ok(Campaign { leading, done })
}

type ManagerTask = tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>;

async fn start(lease: &str, namespace: &str, identity: &str) -> anyhow::Result<(Api<Lease>, watch::Receiver<bool>, ManagerTask)> {
    let client = Client::try_default().await?;
    let manager = LeaseManagerBuilder::new(client.clone(), lease)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(RENEW_MARGIN_SECONDS)
        .with_create_mode(LeaseCreateMode::AutoCreate)
        // One field manager per replica: taking a free lease is a server-side apply of
        // holderIdentity, and only a *different* manager's claim on that field makes a second
        // replica's apply fail with a conflict. With one name for all, two standbys racing for a
        // lapsed lease both succeeded, the later overwriting the earlier, which for a moment
        // believed it led (tests/restarts.rs saw the Lease change hands twice for one kill).
        .with_field_manager(format!("agentgate-leader-election-{identity}"))
        .build()
        .await?;
    let (manager_leading, task) = manager.watch().await;
    Ok((Api::<Lease>::namespaced(client, namespace), manager_leading, task))
}

/// This replica leads while the lease manager says it holds the lease *and* the Lease, as the
/// apiserver last showed it, names this replica in a term that has not run out.
///
/// The manager alone is not enough: while it cannot reach the apiserver it keeps saying
/// "leading" (its renewals fail and it backs off, for up to 30 s), but a standby that reaches the
/// apiserver after the lease expired takes it over: two replicas writing at once, for as long as
/// the old leader's backoff lasts (tests/restarts.rs, two replicas through an apiserver outage).
async fn guard(leases: Api<Lease>, name: String, identity: String, mut manager: watch::Receiver<bool>, leading: watch::Sender<bool>) {
    let mut term_ends: Option<Instant> = None;
    let mut next_read = Instant::now();
    loop {
        let manager_leads = *manager.borrow();
        let leads = manager_leads && term_ends.is_some_and(|end| Instant::now() < end);
        leading.send_if_modified(|current| std::mem::replace(current, leads) != leads);
        let lapse = async {
            match term_ends {
                Some(end) if leads => tokio::time::sleep_until(end).await,
                _ => std::future::pending().await,
            }
        };
        // Only a replica the manager calls leader reads the Lease back; standbys send nothing.
        let read = async { if manager_leads { tokio::time::sleep_until(next_read).await } else { std::future::pending().await } };
        tokio::select! {
            () = leading.closed() => return,
            changed = manager.changed() => {
                if changed.is_err() {
                    leading.send_replace(false);
                    return;
                }
                // A new term: confirm it right away.
                next_read = Instant::now();
            }
            () = read => {
                // Unreachable or slow apiserver: the last confirmed term stands until it runs out.
                // The term is computed from the renewal time the Lease shows, not from when the
                // answer came, so a slow answer is as good as a fast one.
                let budget = match term_ends {
                    Some(end) if leads => end.saturating_duration_since(Instant::now()).min(READ_TIMEOUT),
                    _ => READ_TIMEOUT,
                };
                if let Ok(Ok(lease)) = tokio::time::timeout(budget, leases.get_opt(&name)).await {
                    term_ends = lease.and_then(|lease| term_of(&lease, &identity));
                }
                next_read = Instant::now() + CONFIRM_EVERY;
            }
            () = lapse => {}
        }
    }
}

/// When it stops being safe for `identity` to act on the term the Lease shows: its last renewal
/// plus the lease duration, less `STOP_MARGIN`. None unless the Lease names `identity`.
fn term_of(lease: &Lease, identity: &str) -> Option<Instant> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref()?.0;
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds?).ok()?);
    // This replica wrote renewTime with its own clock: comparing it with that clock is exact.
    let since_renewal = k8s_openapi::jiff::Timestamp::now().duration_since(renewed).as_secs_f64();
    let left = duration.saturating_sub(STOP_MARGIN).as_secs_f64() - since_renewal;
    Some(Instant::now() + Duration::from_secs_f64(left.max(0.0)))
}

/// This process's name in the Lease: its Pod name (else host name) and a suffix drawn fresh at
/// every start, as client-go does with a uuid, e.g. `agentgate-7d9f8-x2k4q-3f9a2c1b`.
///
/// The suffix was the pid once, but in a container the operator is always pid 1: a container
/// restarted after a crash came back under its old identity, and the lease manager, finding the
/// Lease held by "itself", led at once while the lease it had not renewed could already have
/// been taken over (tests/leader.rs, a restart with the same POD_NAME). Call once per process.
pub fn identity() -> String {
    let host = std::env::var("POD_NAME").or_else(|_| std::env::var("HOSTNAME")).unwrap_or_else(|_| "agentgate".into());
    identity_of(&host, start_suffix())
}

/// `<host>-<suffix>`: the Pod name stays a readable prefix in `kubectl get lease`.
fn identity_of(host: &str, suffix: u32) -> String {
    format!("{host}-{suffix:08x}")
}

/// 32 random bits: std's `RandomState` is keyed from the OS's randomness for each process (and
/// each new state differs); the clock and pid are mixed in for good measure.
fn start_suffix() -> u32 {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let hash = std::hash::RandomState::new().hash_one((nanos, std::process::id()));
    (hash ^ (hash >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    fn lease(holder: &str, renewed_ago: Duration) -> Lease {
        let renewed = Timestamp::now() - SignedDuration::try_from(renewed_ago).unwrap();
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(LEASE_SECONDS as i32),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn each_start_gets_its_own_identity_under_one_pod_name() {
        // Two starts of one container: same POD_NAME, same pid 1. Only the suffix tells them apart.
        let (first, second) = (identity_of("agentgate-0", start_suffix()), identity_of("agentgate-0", start_suffix()));
        assert_ne!(first, second);
        for id in [&first, &second] {
            let (host, suffix) = id.rsplit_once('-').expect("host-suffix");
            assert_eq!(host, "agentgate-0");
            assert_eq!(suffix.len(), 8, "{id}");
        }
        assert_eq!(identity_of("agentgate-0", 0xab), "agentgate-0-000000ab");
    }

    #[test]
    fn a_term_ends_a_margin_before_the_lease_would_expire() {
        let end = term_of(&lease("me", Duration::from_secs(3)), "me").expect("my term");
        let left = end - Instant::now();
        // Renewed 3 s ago, less the 2 s margin.
        let expected = Duration::from_secs(LEASE_SECONDS - 3) - STOP_MARGIN;
        assert!(left > expected - Duration::from_millis(200) && left <= expected, "{left:?}");
    }

    #[test]
    fn a_lease_renewed_too_long_ago_or_held_by_another_is_no_term() {
        let lapsed = term_of(&lease("me", Duration::from_secs(LEASE_SECONDS - 1)), "me").expect("a lapsed term of mine");
        assert!(lapsed <= Instant::now());
        assert_eq!(term_of(&lease("other", Duration::ZERO), "me"), None);
        assert_eq!(term_of(&Lease::default(), "me"), None);
    }
}
