//! Casting ApprovalVotes as yourself: by hand with the `kubectl agentgate` plugin, or by policy
//! with `agentgate review`, a reviewer loop that runs as a category head's ServiceAccount.
//!
//! Both ask the apiserver who they are (a SelfSubjectReview) instead of taking a name from the
//! user, so `spec.voter` always matches the identity the admission policy sees. Both create the
//! vote through [`cast_vote`], named `<job>-<user>-g<generation>` and bound to the job's current
//! uid and generation.
//!
//! The pure parts (naming, the review policy and its [`evaluate`], the `votes` table) are unit
//! tested here; the Kubernetes parts are covered by `tests/plugin_and_review.rs`.
//!
//! Layout: [`vote`] asks who we are and casts votes (shared by both); [`table`] renders the
//! plugin's `votes` table; [`policy`] is the reviewer's pure policy and [`evaluate`];
//! [`judge`] asks a model for a judgement within the policy's limits (pure: prompt, answer,
//! combination) and [`model`] makes that call through the agent meter; [`reviewer`] is the
//! `agentgate review` loop.

mod judge;
mod model;
mod policy;
mod reviewer;
mod table;
mod vote;

#[cfg(test)]
mod fixtures;

pub use judge::{Judgement, ModelSettings, OnFailure, Opinion, combine, read_answer};
pub use policy::{Evaluation, Policy, Verdict, evaluate, image_allowed};
pub use reviewer::{ReviewArgs, run};
pub use table::{VoteRow, render_votes, vote_rows};
pub use vote::{Ballot, VoteError, cast_vote, existing_vote, get_job, sanitize_username, vote_name, votes_on, whoami};
