//! Shared support code for integration tests and demos.
//!
//! Every test binary compiles this module separately and uses a different subset of it,
//! so unused-item warnings here are noise rather than signal.
#![allow(dead_code)]

pub mod cluster;
pub mod controlplane;
pub mod http;
pub mod node;
pub mod plugin;
pub mod provider;
pub mod review;
pub mod service_network;
pub mod slow_link;
pub mod storm;
pub mod tools;
