//! `bulkhead serve`: the host daemon.

use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;

pub const DEFAULT_SOCKET: &str = "/run/bulkhead/bulkhead.sock";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The API's Unix socket (root on it needs no token).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Also serve the API on TCP at ADDR (HOST:PORT), with TLS; plain HTTP
    /// only on a loopback address.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// PEM certificate chain for --listen.
    #[arg(long, value_name = "PEM", requires_all = ["listen", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires_all = ["listen", "tls_cert"])]
    tls_key: Option<PathBuf>,
    /// Where VM records, logs, VMM directories and the audit log live.
    #[arg(long, default_value = "/var/lib/bulkhead")]
    state_dir: PathBuf,
    /// A directory whose files VM specs may use as kernels, initrds and
    /// disks (besides <state-dir>/images). Repeat for more.
    #[arg(long, value_name = "DIR")]
    allow_dir: Vec<PathBuf>,
    /// Requests served at once; more are answered 503 (retry) at once.
    #[arg(long, value_name = "N", default_value_t = host::api::DEFAULT_MAX_REQUESTS)]
    max_requests: usize,
    /// This host's PEM certificate for live migration between daemons: the
    /// stream is mutual TLS, and it must carry this host's migration
    /// address. Without it, migrations stay on loopback.
    #[arg(long, value_name = "PEM", requires_all = ["migration_tls_key", "migration_tls_ca"])]
    migration_tls_cert: Option<PathBuf>,
    /// The PEM private key of --migration-tls-cert.
    #[arg(long, value_name = "PEM", requires_all = ["migration_tls_cert", "migration_tls_ca"])]
    migration_tls_key: Option<PathBuf>,
    /// The PEM CA certificate(s) other hosts' migration certificates chain to.
    #[arg(long, value_name = "PEM", requires_all = ["migration_tls_cert", "migration_tls_key"])]
    migration_tls_ca: Option<PathBuf>,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<i32> {
    let config = host::server::ServeConfig {
        socket: args.socket,
        listen: args.listen,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        state_dir: args.state_dir,
        allowed_dirs: args.allow_dir,
        // VMMs are the lean VMM program when it is installed beside this one.
        vmm_binary: match crate::vmm_program() {
            Some(vmm) => vmm,
            None => std::env::current_exe()?,
        },
        max_requests: args.max_requests,
        migration_tls: match (
            args.migration_tls_cert,
            args.migration_tls_key,
            args.migration_tls_ca,
        ) {
            (Some(cert), Some(key), Some(ca)) => {
                Some(host::server::MigrationTlsFiles { cert, key, ca })
            }
            _ => None,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(host::server::serve(config))?;
    Ok(0)
}
