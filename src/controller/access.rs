//! Who is a category head: an RBAC fact, asked of the apiserver with SubjectAccessReviews.
//!
//! A head of category C may `approve` resource `categories`, name C, group agentgate.dev, in the
//! job's namespace or cluster-wide, the same model as approving CSRs for a signer. Answers are
//! cached briefly and dropped whenever any Role, ClusterRole or binding changes, so revoked rights
//! stop counting at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};

const TTL: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Question {
    voter: String,
    groups: Vec<String>,
    namespace: String,
    category: String,
}

/// Whether the voter is a head (`Err` says why not), and when the apiserver said so.
type Answer = (Result<(), String>, Instant);

pub struct HeadChecker {
    client: Client,
    answers: Mutex<HashMap<Question, Answer>>,
    /// One SubjectAccessReview in flight per question: reconciles asking the same question at
    /// once wait for that answer instead of each sending their own. Without it a burst of jobs
    /// voted on by the same two heads sent 2.3 reviews per job (`make bench` on a loaded machine,
    /// each answer taking seconds, up to `--max-concurrent-reconciles` missing the cache together).
    asking: Mutex<HashMap<Question, Arc<tokio::sync::Mutex<()>>>>,
}

/// Beyond this many distinct questions asked since the last RBAC change, the in-flight guards are
/// dropped (a guard left out only means one more review, as before).
const MAX_ASKING: usize = 10_000;

impl HeadChecker {
    pub fn new(client: Client) -> Self {
        HeadChecker { client, answers: Mutex::new(HashMap::new()), asking: Mutex::new(HashMap::new()) }
    }

    fn cached(&self, question: &Question) -> Option<Result<(), String>> {
        let answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        answers.get(question).filter(|(_, at)| at.elapsed() < TTL).map(|(answer, _)| answer.clone())
    }

    /// `Ok(Err(why))` when the voter is not a head; `Err` when the apiserver could not answer.
    pub async fn is_head(
        &self,
        voter: &str,
        groups: &[String],
        namespace: &str,
        category: &str,
    ) -> Result<Result<(), String>, kube::Error> {
        let question = Question { voter: voter.into(), groups: groups.to_vec(), namespace: namespace.into(), category: category.into() };
        if let Some(answer) = self.cached(&question) {
            return Ok(answer);
        }
        let guard = {
            let mut asking = self.asking.lock().unwrap_or_else(PoisonError::into_inner);
            if asking.len() >= MAX_ASKING {
                asking.clear();
            }
            asking.entry(question.clone()).or_default().clone()
        };
        let _asking = guard.lock().await;
        // Answered while this one waited its turn.
        if let Some(answer) = self.cached(&question) {
            return Ok(answer);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(voter.into()),
                groups: Some(groups.to_vec()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(crate::api::GROUP.into()),
                    resource: Some("categories".into()),
                    verb: Some("approve".into()),
                    name: Some(category.into()),
                    namespace: Some(namespace.into()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let answered = Api::<SubjectAccessReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
        let allowed = answered.status.as_ref().is_some_and(|s| s.allowed);
        let answer = if allowed {
            Ok(())
        } else {
            Err(format!(
                "{voter} is not a head of category {category}: RBAC does not allow them to approve categories/{category} in {namespace}"
            ))
        };
        self.answers.lock().unwrap_or_else(PoisonError::into_inner).insert(question, (answer.clone(), Instant::now()));
        Ok(answer)
    }

    pub fn forget_all(&self) {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner).clear();
        self.asking.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}
