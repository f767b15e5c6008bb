//! Bulkhead's host layer: a daemon that runs many sandboxed VMs on one
//! machine, each in its own VMM process, behind a REST API.
//!
//! - [`spec`], [`model`]: what a VM is asked to be and what is recorded about it.
//! - [`store`]: the embedded database (redb) the records live in.
//! - [`manager`]: lifecycle operations; [`vmm_process`] and [`cgroup`]: the
//!   VMM processes, their sandbox arguments and limits.
//! - [`auth`], [`audit`], [`events`]: tokens and roles, the audit log, the
//!   event stream.
//! - [`api`]: the HTTP API; [`server`]: its listeners; [`client`]: the
//!   client the CLI uses.

pub mod api;
pub mod audit;
pub mod auth;
pub mod cgroup;
pub mod client;
pub mod events;
pub mod manager;
pub mod migration_tls;
pub mod model;
pub mod resources;
pub mod server;
pub mod spec;
pub mod store;
pub mod vmm_process;
