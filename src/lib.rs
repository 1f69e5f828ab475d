//! dunnage: a Docker volume plugin serving thin block volumes from userspace.
//!
//! Modules follow the data path, in order:
//! [`plugin`] (Docker's socket) → [`registry`] (supervisor actor) →
//! [`volume`] (one actor per volume) → [`engine`] (thin image) →
//! [`export`] (FUSE + loop to the kernel). [`catalog`] persists what exists,
//! [`control`] and [`cli`] are the operator's side, [`sys`] holds every
//! unsafe syscall.

pub mod catalog;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod engine;
pub mod export;
pub mod keys;
pub mod plugin;
pub mod registry;
pub mod replication;
pub mod schedule;
pub mod serve;
pub mod spec;
pub mod sys;
pub mod volume;
