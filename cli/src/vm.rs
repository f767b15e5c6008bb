//! `bulkhead vm ...` and `bulkhead token ...`: clients of the host daemon.

use crate::OutputFormat;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use host::client::{Client, Endpoint};
use host::spec::VmSpec;
use hyper::Method;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// The daemon's Unix socket, https://HOST:PORT (with --ca), or
    /// http://HOST:PORT (loopback only).
    #[arg(long, env = "BULKHEAD_SOCKET", default_value = crate::serve::DEFAULT_SOCKET, global = true)]
    socket: String,
    /// For https: the PEM CA certificate the daemon's certificate chains to.
    #[arg(long, env = "BULKHEAD_CA", value_name = "PEM", global = true)]
    ca: Option<PathBuf>,
    /// API token (root on the Unix socket needs none).
    #[arg(long, env = "BULKHEAD_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Human tables or JSON for programs.
    #[arg(long, value_enum, default_value_t, global = true)]
    output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct VmArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    #[command(subcommand)]
    action: VmAction,
}

#[derive(Subcommand, Debug)]
enum VmAction {
    /// Define a VM (and with --start, start it).
    Create(CreateArgs),
    /// List VMs.
    Ls,
    /// Describe one VM, with what its VMM reports while it runs.
    Show {
        vm: String,
    },
    Start {
        vm: String,
    },
    /// Ask the guest to shut down (the ACPI power button when it listens to
    /// it, else Ctrl-Alt-Del); after --timeout the VMM stops the VM itself.
    Stop {
        vm: String,
        /// Kill the VMM at once.
        #[arg(long)]
        force: bool,
        /// Seconds the guest gets to shut down.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    Pause {
        vm: String,
    },
    Resume {
        vm: String,
    },
    /// Write a snapshot into the VM's snapshots directory.
    Snapshot {
        vm: String,
        name: String,
    },
    /// Delete a VM (--force kills it if it runs).
    Rm {
        vm: String,
        #[arg(long)]
        force: bool,
    },
    /// Attach to the serial console (read-only unless --write). Ctrl-] detaches.
    Console {
        vm: String,
        #[arg(long)]
        write: bool,
    },
}

#[derive(Args, Debug)]
struct CreateArgs {
    name: String,
    #[command(flatten)]
    machine: crate::machine_flags::MachineFlags,
    /// Project to create it in (for the host's administrator; tokens have one).
    #[arg(long)]
    project: Option<String>,
    /// Start it once defined.
    #[arg(long)]
    start: bool,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(flatten)]
    daemon: DaemonArgs,
    #[command(subcommand)]
    action: TokenAction,
}

#[derive(Subcommand, Debug)]
enum TokenAction {
    /// Make a token; its secret is printed once.
    Create {
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        #[arg(long)]
        project: Option<String>,
    },
    Ls,
    /// Revoke a token.
    Rm {
        id: String,
    },
}

/// The file a path given here names, as the daemon wants it: absolute, with
/// links and `..` resolved here, in the user's own view (the daemon follows
/// neither). A path that does not exist is sent as given, for the daemon to refuse.
fn host_path(path: impl AsRef<std::path::Path>) -> std::io::Result<std::path::PathBuf> {
    let path = path.as_ref();
    path.canonicalize().or_else(|_| std::path::absolute(path))
}

/// The spec `vm create` sends: the same device options as `bulkhead run`,
/// parsed by the same code, as the API's typed VM spec.
fn create_spec(create: &CreateArgs) -> anyhow::Result<VmSpec> {
    let mut spec = create.machine.spec(&create.name)?;
    let absolute = |path: &mut Option<PathBuf>| -> std::io::Result<()> {
        if let Some(given) = path {
            *given = host_path(&*given)?;
        }
        Ok(())
    };
    absolute(&mut spec.kernel)?;
    absolute(&mut spec.initrd)?;
    for disk in &mut spec.disks {
        disk.path = host_path(&disk.path)?;
    }
    Ok(spec)
}

fn client(args: &DaemonArgs) -> anyhow::Result<Client> {
    Ok(Client {
        endpoint: Endpoint::parse(&args.socket, args.ca.as_deref())?,
        token: args.token.clone(),
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The id of `vm`, given as an id or a name.
async fn resolve(client: &Client, vm: &str) -> anyhow::Result<String> {
    if vm.len() == 16 && vm.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(vm.to_string());
    }
    let list = client.expect(Method::GET, "/v1/vms", None).await?;
    let matches: Vec<&Value> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["spec"]["name"] == vm)
        .collect();
    match matches.as_slice() {
        [one] => Ok(one["id"].as_str().unwrap_or_default().to_string()),
        [] => bail!("no VM named {vm}"),
        _ => bail!("several VMs are named {vm} (in different projects): use the id"),
    }
}

fn print_vms(vms: &[Value]) {
    println!(
        "{:<16}  {:<20}  {:<12}  {:<9}  {:>4}  {:>7}  LAST EXIT",
        "ID", "NAME", "PROJECT", "STATE", "CPUS", "MEMORY"
    );
    for vm in vms {
        println!(
            "{:<16}  {:<20}  {:<12}  {:<9}  {:>4}  {:>4}MiB  {}",
            vm["id"].as_str().unwrap_or(""),
            vm["spec"]["name"].as_str().unwrap_or(""),
            vm["project"].as_str().unwrap_or(""),
            vm["state"].as_str().unwrap_or(""),
            vm["spec"]["cpus"],
            vm["spec"]["memory_mib"],
            vm["last_exit"].as_str().unwrap_or("")
        );
    }
}

fn print(value: &Value, output: OutputFormat) -> anyhow::Result<()> {
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(value)?),
        OutputFormat::Text => match value {
            Value::Array(vms) => print_vms(vms),
            Value::Object(_) if value.get("spec").is_some() => {
                print_vms(std::slice::from_ref(value));
                if let Some(live) = value.get("live") {
                    println!("\n{}", serde_json::to_string_pretty(live)?);
                }
            }
            Value::Null => {}
            other => println!("{}", serde_json::to_string_pretty(other)?),
        },
    }
    Ok(())
}

pub fn vm(args: VmArgs) -> anyhow::Result<i32> {
    let client = client(&args.daemon)?;
    let output = args.daemon.output;
    runtime()?.block_on(async move {
        let value = match args.action {
            VmAction::Create(create) => {
                let spec = serde_json::to_value(create_spec(&create)?)?;
                let path = match &create.project {
                    Some(project) => format!("/v1/vms?project={project}"),
                    None => "/v1/vms".to_string(),
                };
                let created = client.expect(Method::POST, &path, Some(&spec)).await?;
                if create.start {
                    let id = created["id"].as_str().unwrap_or_default();
                    client
                        .expect(Method::POST, &format!("/v1/vms/{id}/start"), None)
                        .await?
                } else {
                    created
                }
            }
            VmAction::Ls => client.expect(Method::GET, "/v1/vms", None).await?,
            VmAction::Show { vm } => {
                let id = resolve(&client, &vm).await?;
                client
                    .expect(Method::GET, &format!("/v1/vms/{id}"), None)
                    .await?
            }
            VmAction::Start { vm } => action(&client, &vm, "start", None).await?,
            VmAction::Pause { vm } => action(&client, &vm, "pause", None).await?,
            VmAction::Resume { vm } => action(&client, &vm, "resume", None).await?,
            VmAction::Stop { vm, force, timeout } => {
                let body = json!({ "force": force, "timeout_secs": timeout });
                action(&client, &vm, "stop", Some(&body)).await?
            }
            VmAction::Snapshot { vm, name } => {
                action(&client, &vm, "snapshot", Some(&json!({ "name": name }))).await?
            }
            VmAction::Rm { vm, force } => {
                let id = resolve(&client, &vm).await?;
                client
                    .expect(Method::DELETE, &format!("/v1/vms/{id}?force={force}"), None)
                    .await?;
                Value::Null
            }
            VmAction::Console { vm, write } => {
                let id = resolve(&client, &vm).await?;
                return console(&client, &id, write).await;
            }
        };
        print(&value, output)?;
        Ok(0)
    })
}

async fn action(
    client: &Client,
    vm: &str,
    name: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let id = resolve(client, vm).await?;
    client
        .expect(Method::POST, &format!("/v1/vms/{id}/{name}"), body)
        .await
        .with_context(|| format!("cannot {name} {vm}"))
}

/// Ctrl-] leaves the console (as in telnet and virsh).
const DETACH: u8 = 0x1d;

async fn console(client: &Client, id: &str, write: bool) -> anyhow::Result<i32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = client.console(id, write).await?;
    let (mut from_vm, mut to_vm) = tokio::io::split(stream);
    let terminal = crate::console::RawTerminal::stdin();
    if terminal.is_some() {
        eprintln!("bulkhead: attached to {id} (Ctrl-] detaches)\r");
    }
    let output = async {
        let mut stdout = tokio::io::stdout();
        let _ = tokio::io::copy(&mut from_vm, &mut stdout).await;
    };
    let input = async {
        let mut stdin = tokio::io::stdin();
        let mut buffer = [0u8; 1024];
        loop {
            let n = match stdin.read(&mut buffer).await {
                Ok(0) | Err(_) if terminal.is_none() && !write => {
                    // Nothing to type: follow the console until it closes.
                    return std::future::pending().await;
                }
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let bytes = &buffer[..n];
            if terminal.is_some() && bytes.contains(&DETACH) {
                return;
            }
            if write && to_vm.write_all(bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = output => {}
        _ = input => {}
    }
    drop(terminal);
    Ok(0)
}

pub fn token(args: TokenArgs) -> anyhow::Result<i32> {
    let client = client(&args.daemon)?;
    let output = args.daemon.output;
    runtime()?.block_on(async move {
        let value = match args.action {
            TokenAction::Create {
                name,
                role,
                project,
            } => {
                let mut body = json!({ "name": name, "role": role });
                if let Some(project) = project {
                    body["project"] = json!(project);
                }
                let created = client
                    .expect(Method::POST, "/v1/tokens", Some(&body))
                    .await?;
                if output == OutputFormat::Text {
                    println!("{}", created["token"].as_str().unwrap_or_default());
                    return Ok(0);
                }
                created
            }
            TokenAction::Ls => client.expect(Method::GET, "/v1/tokens", None).await?,
            TokenAction::Rm { id } => {
                client
                    .expect(Method::DELETE, &format!("/v1/tokens/{id}"), None)
                    .await?;
                Value::Null
            }
        };
        match output {
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&value)?),
            OutputFormat::Text => {
                for token in value.as_array().into_iter().flatten() {
                    println!(
                        "{}  {:<20}  {:<12}  {}",
                        token["id"].as_str().unwrap_or(""),
                        token["name"].as_str().unwrap_or(""),
                        token["project"].as_str().unwrap_or(""),
                        token["role"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_takes_every_device_option_run_takes() {
        use clap::Parser;
        #[derive(Parser)]
        struct Command {
            #[command(flatten)]
            create: CreateArgs,
        }
        let args = Command::try_parse_from([
            "create",
            "web",
            "--disk",
            "path=/srv/d.img,ro,id=data-1,bps=1M,iops=100",
            "--net",
            "tap=tap0,mac=02:00:00:00:00:07,bps=10M,bps_burst=20M",
            "--rng",
            "--balloon",
            "target_mib=16,deflate_on_oom",
        ])
        .unwrap();
        let spec = serde_json::to_value(create_spec(&args.create).unwrap()).unwrap();
        assert_eq!(
            spec["disks"][0],
            json!({"path": "/srv/d.img", "readonly": true, "id": "data-1",
                   "rate_limit": {"bytes_per_sec": 1 << 20, "ops_per_sec": 100}})
        );
        assert_eq!(
            spec["nics"][0],
            json!({"tap": "tap0", "mac": "02:00:00:00:00:07",
                   "rate_limit": {"bytes_per_sec": 10 << 20, "bytes_burst": 20 << 20}})
        );
        assert_eq!(spec["rng"], true);
        assert_eq!(
            spec["balloon"],
            json!({"target_mib": 16, "deflate_on_oom": true, "free_page_reporting": false})
        );
        // The API reads back what the CLI sent.
        let _: VmSpec = serde_json::from_value(spec).unwrap();
        for bad in ["path=/srv/d.img,rw", "path=/srv/d.img,bps_burst=1M"] {
            assert!(
                Command::try_parse_from(["create", "web", "--disk", bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn paths_are_sent_as_the_files_they_name() {
        let dir = std::env::temp_dir().join(format!("bulkhead-vm-cli-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let file = dir.join("disk.img");
        std::fs::write(&file, b"x").unwrap();
        std::os::unix::fs::symlink(&file, dir.join("link")).unwrap();
        let real = file.canonicalize().unwrap();
        assert_eq!(host_path(dir.join("link")).unwrap(), real);
        assert_eq!(host_path(dir.join("sub/../disk.img")).unwrap(), real);
        // A missing file goes as given, made absolute, for the daemon to refuse.
        assert_eq!(host_path(dir.join("missing")).unwrap(), dir.join("missing"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
