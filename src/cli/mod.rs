//! Subcommands of `kubectl agentgate` that live outside the binary: each module fetches what
//! it needs, calls the pure domain logic and renders a report.

pub mod recommend;
