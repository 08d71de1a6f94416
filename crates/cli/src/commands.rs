//! Client commands: talk to the controller, print tables or JSON.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde::Serialize;
use tandem_api::{
    ClusterStatus, ConnectInfo, Node, Pool, Protocol, StateDocument, StateImportResult, Volume,
    VolumeCreate, VolumeState,
};
use tandem_types::{format_size, parse_size};

use crate::client::{Client, ClientError};
use crate::output;
use crate::{Cli, Command, Format};

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// List nodes.
    List,
    /// Declare a node before its agent first syncs (it shows offline until then): the agent
    /// that registers under NAME must report ADDR; `--witness`: the node only ever gets
    /// witnesses (diskless voters), never data. Agents that are not declared register by
    /// themselves as before.
    Add {
        name: String,
        /// Host name or IP address the node's agent reports (`address` in its config; no
        /// port).
        address: String,
        #[arg(long)]
        witness: bool,
    },
    /// Forget a node that holds no replica and no witness (e.g. a decommissioned host).
    Remove { name: String },
    /// Declare a node gone for good (its agent must be down): its replicas are dropped, every
    /// affected volume gets a new replica on another node, resynced fully, and a new witness
    /// when needed; waits until they are all in sync.
    Lost {
        name: String,
        /// Return once the controller has replanned, without waiting for the resyncs.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for the resyncs.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Move every replica and witness off a node, online: each volume gets a new replica (or
    /// witness) elsewhere, resynced fully, the Primary moves to a replica that stays, then the
    /// node's copy is deleted. Waits until the node holds nothing; fails naming the volumes
    /// that could not move.
    Evacuate {
        name: String,
        /// Return once the controller has planned the moves.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for the moves.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// List pools with capacity and free space.
    List,
}

#[derive(Subcommand, Debug)]
pub enum StateCmd {
    /// Write the whole desired state (cluster id, nodes, volumes) to FILE (`-`: stdout).
    Export { file: String },
    /// Load a state document into the controller. Refused when the controller's store holds
    /// conflicting objects, unless --replace.
    Import {
        file: String,
        /// Drop the controller's nodes and volumes first (agents keep their replicas).
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume and wait until it can be used.
    Create {
        name: String,
        /// Size with an explicit unit: KiB/MiB/GiB/TiB (1024) or KB/MB/GB/TB (1000), or bytes.
        size: String,
        /// Diskful replicas.
        #[arg(long)]
        replicas: Option<u32>,
        /// Pool to place replicas in.
        #[arg(long)]
        pool: Option<String>,
        /// Nodes to place replicas on (comma separated).
        #[arg(long, value_delimiter = ',')]
        nodes: Option<Vec<String>>,
        /// Replication protocol: C (synchronous, default) or A (asynchronous).
        #[arg(long)]
        protocol: Option<String>,
        /// Resync rate limit per second, e.g. 100MiB (default: unlimited).
        #[arg(long)]
        resync_rate: Option<String>,
        /// The resync rate while the consumer does I/O (the dynamic controller yields to it),
        /// e.g. 16MiB (the default), or `off` (never yield).
        #[arg(long)]
        resync_min_rate: Option<String>,
        /// What a split brain does: `disconnect` (default: stay apart until `volume
        /// resolve-split-brain`), `discard-zero-changes` (the side that wrote nothing since the
        /// split resyncs from the other; if both wrote, disconnect), `discard-younger-primary`
        /// (the side that became Primary more recently discards its changes),
        /// `discard-node:NODE` (that node's changes are discarded).
        #[arg(long)]
        after_split_brain: Option<String>,
        /// Checksum-based resync: compare digests per 4 KiB block with the source first and
        /// transfer only the blocks that differ.
        #[arg(long)]
        resync_checksums: bool,
        /// What a Primary that lost quorum does with I/O: `io-error` (default: requests fail)
        /// or `suspend` (requests are held until quorum is back). Replicated volumes only.
        #[arg(long)]
        on_no_quorum: Option<String>,
        /// Return at once instead of waiting for the replicas.
        #[arg(long)]
        no_wait: bool,
    },
    /// Change options of a volume while it runs.
    Set {
        name: String,
        /// Resync rate limit per second: a size with an explicit unit, e.g. 50MiB (or
        /// 50MiB/s), or `unlimited` (same as 0). Applies at once, also to a running resync.
        #[arg(long)]
        resync_rate: Option<String>,
        /// The resync rate while the consumer does I/O (the dynamic resync controller holds a
        /// resync to it and returns to the limit when the consumer is idle), e.g. 16MiB, or
        /// `off` (never yield). Applies at once.
        #[arg(long)]
        resync_min_rate: Option<String>,
        /// Split-brain policy: `disconnect`, `discard-zero-changes`,
        /// `discard-younger-primary`, `discard-node:NODE` (from the next handshake).
        #[arg(long)]
        after_split_brain: Option<String>,
        /// Checksum-based resync: `on` or `off` (applies at once).
        #[arg(long)]
        resync_checksums: Option<String>,
        /// The dual-primary window for live migration: `on` lets a second node be Primary
        /// (`volume promote` of it, or a consumer opening its export) while one is, the two
        /// writing one at a time; `off` closes it (refused while two nodes are Primary).
        /// Protocol C only.
        #[arg(long)]
        allow_two_primaries: Option<String>,
        /// What a Primary that lost quorum does with I/O: `io-error` (requests fail with EIO)
        /// or `suspend` (requests are held, the consumer's I/O hangs, until quorum is back;
        /// they fail if the node stops being Primary). Applies at once; back to `io-error`,
        /// held requests fail. Replicated volumes only.
        #[arg(long)]
        on_no_quorum: Option<String>,
    },
    /// Resolve a split brain: NODE's changes since the split are discarded (it resyncs from
    /// the other replicas, bitmap-based where the generations allow, else fully); the others
    /// keep theirs. Refused without a split brain, or when NODE holds the only UpToDate data.
    /// Waits until the replicas are in sync.
    ResolveSplitBrain {
        name: String,
        /// The node whose changes are discarded.
        #[arg(long)]
        discard: String,
        /// How long to wait: seconds, or with a unit (90s, 10m, 2h).
        #[arg(long, default_value = "1h")]
        timeout: String,
    },
    /// Change the size of a volume online (block layers only: backing stores, replication,
    /// NBD export; `volume grow` also grows the partition table and filesystem) and wait
    /// until every replica reports the new size. Connected NBD clients keep the old size until
    /// they reconnect (NBD cannot announce a new size).
    Resize {
        name: String,
        /// New size with an explicit unit: KiB/MiB/GiB/TiB (1024) or KB/MB/GB/TB (1000), or
        /// bytes.
        size: String,
        /// Allow a smaller size. Still refused when a partition or filesystem lies past the
        /// new end (probed through the volume's NBD export).
        #[arg(long)]
        allow_shrink: bool,
        /// How long to wait for every replica: seconds, or with a unit (90s, 5m, 1h).
        #[arg(long, default_value = "300")]
        timeout: String,
    },
    /// Move one replica (or the witness) to another node, online: a new replica there is
    /// resynced fully, the Primary moves to a replica that stays if it was on the old node,
    /// then the old copy is deleted. Waits until done, showing the steps and resync progress.
    Move {
        name: String,
        /// Where it is: NODE or NODE:POOL.
        #[arg(long)]
        from: String,
        /// Where it goes: NODE or NODE:POOL (default pool: most free space that fits).
        #[arg(long)]
        to: String,
        /// Return once the controller has planned the move.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for the move.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Add one replica, online: it joins with a full resync. The witness follows (added when
    /// the replica count becomes even, removed when it becomes odd; a witness on the chosen
    /// node becomes the replica). Waits until the new replica is in sync.
    AddReplica {
        name: String,
        /// Where: NODE or NODE:POOL (default: the online diskful node with most free space
        /// not holding the volume, else the witness's node).
        #[arg(long)]
        to: Option<String>,
        /// Return once the controller has planned it.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Remove the replica on NODE, online: it leaves the volume and its node deletes it. The
    /// witness follows the new replica count (added, possibly on NODE, or removed). Refused
    /// for the only replica, the Primary's (promote another first) and the last UpToDate one.
    RemoveReplica {
        name: String,
        node: String,
        /// Return once the controller has planned it.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Stop the volume's running move or evacuation and undo it (possible until the old copy
    /// left the volume): the new replica is dropped and deleted, the volume stays where it
    /// was. Other operations cannot be aborted (the refusal says why).
    Abort { name: String },
    /// List volumes.
    List,
    /// Show one volume with its replicas and operations.
    Show { name: String },
    /// Delete a volume and its replicas, and wait until they are gone.
    Delete {
        name: String,
        /// Delete even while consumers are connected.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Print the NBD URI of a volume (for qemu, qemu-img, nbdinfo, nbdcopy).
    Connect {
        name: String,
        /// Node whose export to use (default: the Primary).
        #[arg(long)]
        node: Option<String>,
    },
    /// Show the volume and each partition in it as regular files in DIR (FUSE; I/O goes
    /// through the volume's NBD export). Stays in the foreground until Ctrl-C / SIGTERM or
    /// `fusermount3 -u DIR`.
    Mount {
        name: String,
        dir: std::path::PathBuf,
        /// Node whose export to use (default: the Primary).
        #[arg(long)]
        node: Option<String>,
        /// Files are read-only (0400), writes are refused.
        #[arg(long)]
        read_only: bool,
    },
    /// Grow a volume through every layer: block layer, partition table (GPT/MBR), filesystem
    /// (ext2/3/4: e2fsck -f + resize2fs; xfs: xfs_growfs), after a preflight. The filesystem
    /// step is offline: no consumer may be connected. Re-running resumes an interrupted grow.
    Grow {
        name: String,
        /// Size to grow to with an explicit unit: KiB/MiB/GiB/TiB (1024) or KB/MB/GB/TB
        /// (1000), or bytes.
        size: Option<String>,
        /// Print every step with exact sizes and the preflight's verdict; change nothing.
        #[arg(long)]
        plan: bool,
        /// Put the partition table back as it was before an unfinished grow.
        #[arg(long, conflicts_with = "plan")]
        undo: bool,
        /// Seconds to wait for the block layer (resize of every replica).
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Make a node's replica the volume's Primary (the one that accepts consumer I/O) and
    /// wait until it is. The current Primary is demoted first; with the dual-primary window
    /// open (`volume set NAME --allow-two-primaries on`) it stays Primary instead and the node
    /// becomes the second Primary (live migration). Refused when the replica is not UpToDate,
    /// its node has no quorum, or consumers have the volume open on the current Primary
    /// (unless --force).
    Promote {
        name: String,
        /// Node to promote.
        #[arg(long)]
        node: String,
        /// Take the Primary role away from a node although consumers are connected there
        /// (their further I/O fails), e.g. when that node is known to be dead.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the agent to report the role.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Compare the replicas online, block by block (BLAKE3 per 4 KiB), from the Primary (or an
    /// UpToDate replica when there is none), and wait for the result. Differing blocks are
    /// marked out of sync (shown as `out_of_sync_bytes`); --resync copies them from the verify
    /// source to the replicas that differ. Consumer I/O continues meanwhile. Exits 0 when the
    /// verify compared the whole volume (whatever it found), 1 when it failed or timed out.
    Verify {
        name: String,
        /// Resync the differing blocks from the verify source when done.
        #[arg(long)]
        resync: bool,
        /// How long to wait for the result: seconds, or with a unit (90s, 10m, 2h).
        #[arg(long, default_value = "24h")]
        timeout: String,
    },
    /// Make a node's replica Secondary (the volume then has no Primary) and wait until it is.
    Demote {
        name: String,
        /// Node to demote.
        #[arg(long)]
        node: String,
        /// Demote although consumers are connected (their further I/O fails).
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the agent to report the role.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

const WAIT: Duration = Duration::from_secs(60);

pub(crate) fn print_json<T: Serialize + ?Sized>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints `v` as JSON, or as the human rendering `human` gives.
fn emit<T: Serialize + ?Sized>(json: bool, v: &T, human: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        print_json(v)
    } else {
        print!("{}", human(v));
        Ok(())
    }
}

pub(crate) fn path_segment(s: &str) -> String {
    // Names are validated by the controller; escape anyway so a typo cannot change the route.
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn run(cli: &Cli) -> Result<()> {
    let client = Client::new(&cli.controller);
    let json = cli.output == Format::Json;
    match &cli.command {
        Command::Status { watch: false } => {
            let s: ClusterStatus = client.get("/v1/status")?;
            emit(json, &s, |s| output::status(s, crate::now_unix()))
        }
        Command::Status { watch: true } => watch_status(&client, json),
        Command::State { cmd } => state(&client, cmd, json),
        Command::Node { cmd: NodeCmd::List } => {
            let n: Vec<Node> = client.get("/v1/nodes")?;
            emit(json, &n[..], output::nodes_table)
        }
        Command::Node {
            cmd:
                NodeCmd::Add {
                    name,
                    address,
                    witness,
                },
        } => {
            let req = tandem_api::NodeAdd {
                name: name.clone(),
                address: address.clone(),
                witness: *witness,
            };
            let n: Node = client.post("/v1/nodes", &req)?;
            emit(json, &n, |n| {
                format!(
                    "Node {} added ({}, {}, node id {}); it shows {} until its agent syncs: run \
                     `tandem agent run --config FILE` there with `node = \"{}\"`, `address = \
                     \"{}\"` and this controller's URL.\n",
                    n.name,
                    n.address,
                    if *witness { "witness" } else { "diskful" },
                    n.node_id.map_or("?".to_string(), |i| i.to_string()),
                    format!("{:?}", n.state).to_lowercase(),
                    n.name,
                    n.address
                )
            })
        }
        Command::Node {
            cmd: NodeCmd::Remove { name },
        } => {
            let () = client.delete(&format!("/v1/nodes/{}", path_segment(name)))?;
            if json {
                print_json(&serde_json::json!({ "node": name, "removed": true }))
            } else {
                println!("Removed node {name}.");
                Ok(())
            }
        }
        Command::Node {
            cmd:
                NodeCmd::Lost {
                    name,
                    no_wait,
                    timeout,
                },
        } => node_lost(&client, json, name, *no_wait, *timeout),
        Command::Node {
            cmd:
                NodeCmd::Evacuate {
                    name,
                    no_wait,
                    timeout,
                },
        } => node_evacuate(&client, json, name, *no_wait, *timeout),
        Command::Pool { cmd: PoolCmd::List } => {
            let p: Vec<Pool> = client.get("/v1/pools")?;
            emit(json, &p[..], output::pools_table)
        }
        Command::Volume { cmd } => volume(&client, cmd, json),
        _ => unreachable!("daemon commands are dispatched in main"),
    }
}

fn volume(client: &Client, cmd: &VolumeCmd, json: bool) -> Result<()> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            replicas,
            pool,
            nodes,
            protocol,
            resync_rate,
            resync_min_rate,
            after_split_brain,
            resync_checksums,
            on_no_quorum,
            no_wait,
        } => {
            let on_no_quorum = on_no_quorum.as_deref().map(no_quorum_arg).transpose()?;
            let size_bytes = parse_size(size).with_context(|| format!("invalid size '{size}'"))?;
            let resync_rate = resync_rate.as_deref().map(parse_rate).transpose()?;
            let resync_min_rate = resync_min_rate.as_deref().map(parse_min_rate).transpose()?;
            let protocol = match protocol.as_deref() {
                None => None,
                Some("C") | Some("c") => Some(Protocol::C),
                Some("A") | Some("a") => Some(Protocol::A),
                Some(other) => {
                    bail!("unknown protocol '{other}': use C (synchronous) or A (asynchronous)")
                }
            };
            let req = VolumeCreate {
                name: name.clone(),
                size_bytes,
                replicas: *replicas,
                pool: pool.clone(),
                nodes: nodes.clone(),
                protocol,
                resync_rate_bytes_per_sec: resync_rate,
                resync_min_rate_bytes_per_sec: resync_min_rate,
                after_split_brain: after_split_brain.as_deref().map(policy_arg),
                resync_checksums: resync_checksums.then_some(true),
                on_no_quorum,
            };
            let mut v: Volume = client.post("/v1/volumes", &req)?;
            if !no_wait {
                v = wait_for(client, name, |v| v.state == VolumeState::Ready, "ready")?;
            }
            if json {
                print_json(&v)
            } else {
                println!(
                    "Created volume {} of {}.",
                    v.name,
                    format_size(v.size_bytes)
                );
                print!("{}", output::volume_detail(&v));
                println!("\nConnect a client with: tandem volume connect {}", v.name);
                Ok(())
            }
        }
        VolumeCmd::List => {
            let v: Vec<Volume> = client.get("/v1/volumes")?;
            emit(json, &v[..], output::volumes_table)
        }
        VolumeCmd::Show { name } => {
            let v: Volume = client.get(&format!("/v1/volumes/{}", path_segment(name)))?;
            // A grow journal left behind (`volume grow`) is shown with the volume.
            let grow = crate::grow::journal_for_show(client, name);
            if json {
                let mut doc = serde_json::to_value(&v)?;
                doc["grow"] = serde_json::to_value(&grow)?;
                return print_json(&doc);
            }
            let extra = grow.as_ref().map(crate::grow::journal_text);
            emit(json, &v, |v| {
                output::volume_detail(v) + extra.as_deref().unwrap_or("")
            })
        }
        VolumeCmd::Delete {
            name,
            force,
            no_wait,
        } => {
            let path = format!("/v1/volumes/{}?force={force}", path_segment(name));
            let v: Volume = client.delete(&path)?;
            if !no_wait {
                wait_gone(client, name)?;
            }
            if json {
                print_json(&serde_json::json!({ "name": v.name, "deleted": !no_wait }))
            } else {
                if *no_wait {
                    println!("Deleting volume {}.", v.name);
                } else {
                    println!("Deleted volume {}.", v.name);
                }
                Ok(())
            }
        }
        VolumeCmd::Set {
            name,
            resync_rate,
            resync_min_rate,
            after_split_brain,
            resync_checksums,
            allow_two_primaries,
            on_no_quorum,
        } => {
            let no_quorum = on_no_quorum.as_deref().map(no_quorum_arg).transpose()?;
            let checksums = on_off("--resync-checksums", resync_checksums.as_deref())?;
            let two_primaries = on_off("--allow-two-primaries", allow_two_primaries.as_deref())?;
            if resync_rate.is_none()
                && resync_min_rate.is_none()
                && after_split_brain.is_none()
                && checksums.is_none()
                && two_primaries.is_none()
                && no_quorum.is_none()
            {
                bail!(
                    "nothing to set: name an option, e.g. --resync-rate 100MiB or \
                     --after-split-brain discard-zero-changes"
                );
            }
            let req = tandem_api::VolumeUpdate {
                resync_rate_bytes_per_sec: resync_rate.as_deref().map(parse_rate).transpose()?,
                resync_min_rate_bytes_per_sec: resync_min_rate
                    .as_deref()
                    .map(parse_min_rate)
                    .transpose()?,
                after_split_brain: after_split_brain.as_deref().map(policy_arg),
                resync_checksums: checksums,
                allow_two_primaries: two_primaries,
                on_no_quorum: no_quorum,
            };
            let v: Volume = client.patch(&format!("/v1/volumes/{}", path_segment(name)), &req)?;
            let (rate_set, policy_set) = (resync_rate.is_some(), after_split_brain.is_some());
            let min_set = resync_min_rate.is_some();
            emit(json, &v, |v| {
                let mut parts = Vec::new();
                if rate_set {
                    parts.push(format!(
                        "resync rate limit {}",
                        rate_text(v.resync_rate_bytes_per_sec)
                    ));
                }
                if min_set {
                    parts.push(format!(
                        "resync {}",
                        min_rate_text(v.resync_min_rate_bytes_per_sec)
                    ));
                }
                if policy_set {
                    parts.push(format!("after split brain: {}", v.after_split_brain));
                }
                if checksums.is_some() {
                    parts.push(format!(
                        "checksum-based resync {}",
                        if v.resync_checksums { "on" } else { "off" }
                    ));
                }
                if two_primaries.is_some() {
                    parts.push(format!(
                        "dual-primary window {}",
                        if v.allow_two_primaries {
                            "open (a second node may be Primary)"
                        } else {
                            "closed"
                        }
                    ));
                }
                if no_quorum.is_some() {
                    parts.push(format!(
                        "on no quorum: {}",
                        match v.on_no_quorum {
                            tandem_api::OnNoQuorum::IoError => "io-error (requests fail)",
                            tandem_api::OnNoQuorum::Suspend => "suspend (requests wait for quorum)",
                        }
                    ));
                }
                format!("Volume {}: {}.\n", v.name, parts.join(", "))
            })
        }
        VolumeCmd::ResolveSplitBrain {
            name,
            discard,
            timeout,
        } => resolve_split_brain(client, json, name, discard, timeout),
        VolumeCmd::Resize {
            name,
            size,
            allow_shrink,
            timeout,
        } => crate::resize::run(client, json, name, size, *allow_shrink, timeout),
        VolumeCmd::Move {
            name,
            from,
            to,
            no_wait,
            timeout,
        } => volume_move(client, json, name, from, to, *no_wait, *timeout),
        VolumeCmd::AddReplica {
            name,
            to,
            no_wait,
            timeout,
        } => add_replica(client, json, name, to.as_deref(), *no_wait, *timeout),
        VolumeCmd::RemoveReplica {
            name,
            node,
            no_wait,
            timeout,
        } => remove_replica(client, json, name, node, *no_wait, *timeout),
        VolumeCmd::Abort { name } => {
            let v: Volume =
                client.post(&format!("/v1/volumes/{}/abort", path_segment(name)), &())?;
            emit(json, &v, |v| {
                let op = v
                    .operations
                    .iter()
                    .rev()
                    .find(|o| o.state == "aborted")
                    .map(|o| {
                        format!(
                            "Aborted the {} of volume {}: {}.\n",
                            o.kind,
                            v.name,
                            o.last_error.as_deref().unwrap_or("undone")
                        )
                    });
                op.unwrap_or_else(|| format!("Volume {}: nothing aborted.\n", v.name))
            })
        }
        VolumeCmd::Promote {
            name,
            node,
            force,
            timeout,
        } => change_role(client, json, name, node, true, *force, *timeout),
        VolumeCmd::Demote {
            name,
            node,
            force,
            timeout,
        } => change_role(client, json, name, node, false, *force, *timeout),
        VolumeCmd::Verify {
            name,
            resync,
            timeout,
        } => verify(client, json, name, *resync, timeout),
        VolumeCmd::Mount {
            name,
            dir,
            node,
            read_only,
        } => crate::mount::run(client, json, name, dir, node.as_deref(), *read_only),
        VolumeCmd::Grow {
            name,
            size,
            plan,
            undo,
            timeout,
        } => crate::grow::run(client, json, name, size.as_deref(), *plan, *undo, *timeout),
        VolumeCmd::Connect { name, node } => {
            let mut path = format!("/v1/volumes/{}/connect", path_segment(name));
            if let Some(n) = node {
                path.push_str(&format!("?node={}", path_segment(n)));
            }
            let c: ConnectInfo = client.get(&path)?;
            if json {
                print_json(&c)
            } else {
                println!("{}", c.uri);
                Ok(())
            }
        }
    }
}

/// An `on`/`off` option value (`true`/`false` also accepted); `None` when not given.
fn on_off(option: &str, value: Option<&str>) -> Result<Option<bool>> {
    match value {
        None => Ok(None),
        Some("on") | Some("true") => Ok(Some(true)),
        Some("off") | Some("false") => Ok(Some(false)),
        Some(other) => bail!("{option} takes on or off, not '{other}'"),
    }
}

/// An `--on-no-quorum` value: `io-error` or `suspend`.
fn no_quorum_arg(s: &str) -> Result<tandem_api::OnNoQuorum> {
    s.trim()
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--on-no-quorum: {e}"))
}

/// `discard-node NODE` may also be written `discard-node:NODE` or `discard-node=NODE`.
fn policy_arg(s: &str) -> String {
    let t = s.trim();
    match t.strip_prefix("discard-node") {
        Some(rest) => format!(
            "discard-node:{}",
            rest.trim_start_matches([':', '=', ' ']).trim()
        ),
        None => t.to_string(),
    }
}

/// `volume resolve-split-brain`: starts the resolution, waits until the replicas are in sync.
fn resolve_split_brain(
    client: &Client,
    json: bool,
    name: &str,
    discard: &str,
    timeout: &str,
) -> Result<()> {
    let timeout = parse_duration(timeout)?;
    let path = format!("/v1/volumes/{}", path_segment(name));
    let v: Volume = client.post(
        &format!("{path}/resolve-split-brain"),
        &tandem_api::ResolveSplitBrain {
            discard: discard.to_string(),
        },
    )?;
    let id = v
        .operations
        .iter()
        .rev()
        .find(|o| o.kind == "resolve-split-brain")
        .map(|o| o.id.clone())
        .unwrap_or_default();
    if !json {
        eprintln!(
            "Discarding the changes of {discard} since the split; it resyncs from the other replicas (operation {id})."
        );
    }
    let deadline = Instant::now() + timeout;
    let v = loop {
        let v: Volume = client.get(&path)?;
        let op = v.operations.iter().find(|o| o.id == id);
        if op.is_none_or(|o| o.state == "done" || o.state == "failed") {
            break v;
        }
        if Instant::now() > deadline {
            bail!(
                "volume {name} is not in sync {} s after the resolution started (operation {id}{}); \
                 `tandem volume show {name}` follows it",
                timeout.as_secs(),
                op.and_then(|o| o.last_error.as_deref())
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let op = v.operations.iter().find(|o| o.id == id);
    if let Some(o) = op.filter(|o| o.state == "failed") {
        bail!(
            "the split-brain resolution of volume {name} failed: {}",
            o.last_error.as_deref().unwrap_or("unknown error")
        );
    }
    emit(json, &v, |v| {
        format!(
            "Split brain of volume {} resolved: {discard} resynced from the others ({} transferred).\n",
            v.name,
            v.replicas
                .iter()
                .find(|r| r.node == discard)
                .map(|r| output::size_cell(r.last_resync_bytes))
                .unwrap_or_default()
        )
    })
}

/// `90`, `90s`, `10m`, `2h`.
fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().with_context(|| {
        format!("invalid duration {s:?}: use seconds or a number with s, m or h (e.g. 10m)")
    })?;
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// `volume verify`: starts the verify operation and waits for its result.
fn verify(client: &Client, json: bool, name: &str, resync: bool, timeout: &str) -> Result<()> {
    let timeout = parse_duration(timeout)?;
    let path = format!("/v1/volumes/{}", path_segment(name));
    let op: tandem_api::Operation = client.post(
        &format!("{path}/verify"),
        &tandem_api::VerifyRequest { resync },
    )?;
    if !json {
        eprintln!(
            "{} (operation {})",
            op.steps
                .first()
                .map(|s| s.name.as_str())
                .unwrap_or("verify"),
            op.id
        );
    }
    let deadline = Instant::now() + timeout;
    let mut shown = Instant::now();
    let v = loop {
        let v: Volume = client.get(&path)?;
        let finished = v
            .operations
            .iter()
            .find(|o| o.id == op.id)
            .is_none_or(|o| o.state == "done" || o.state == "failed");
        if finished {
            break v;
        }
        if !json && shown.elapsed() >= Duration::from_secs(2) {
            shown = Instant::now();
            if let Some(r) = v
                .replicas
                .iter()
                .filter_map(|r| r.verify.as_ref())
                .find(|r| r.id == op.id)
            {
                eprintln!(
                    "  {} of {} compared, {}/s, {} different{}",
                    format_size(r.checked_bytes),
                    format_size(r.total_bytes),
                    format_size(r.bytes_per_sec),
                    format_size(r.different_bytes),
                    r.eta_secs
                        .map(|e| format!(", about {e} s left"))
                        .unwrap_or_default()
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the verify of volume {name} is still running after {} s (operation {});                  `tandem volume show {name}` follows it",
                timeout.as_secs(),
                op.id
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let op_now = v.operations.iter().find(|o| o.id == op.id);
    let result = v.last_verify.as_ref().filter(|r| r.id == op.id);
    let Some(r) = result else {
        let why = op_now
            .and_then(|o| o.last_error.clone())
            .unwrap_or_else(|| "the operation is gone".into());
        bail!("the verify of volume {name} failed: {why}");
    };
    if json {
        let mut out = serde_json::to_value(r)?;
        out["volume"] = serde_json::Value::String(name.to_string());
        out["operation_id"] = serde_json::Value::String(op.id.clone());
        print_json(&out)?;
    } else {
        print!("{}", output::verify_result(name, r));
    }
    if r.state != "done" {
        bail!(
            "the verify of volume {name} ended early: {}",
            r.error.as_deref().unwrap_or("unknown error")
        );
    }
    Ok(())
}

/// `node lost`: replan, then wait until every affected volume is whole and in sync again.
fn node_lost(client: &Client, json: bool, name: &str, no_wait: bool, timeout: u64) -> Result<()> {
    let r: tandem_api::NodeLostResult =
        client.post(&format!("/v1/nodes/{}/lost", path_segment(name)), &())?;
    if !json {
        println!(
            "Node {name} declared lost; {} volume(s) affected.",
            r.volumes.len()
        );
        for v in &r.volumes {
            println!("  {}: {}", v.volume, v.actions.join("; "));
        }
    }
    if !no_wait {
        let deadline = Instant::now() + Duration::from_secs(timeout);
        for v in &r.volumes {
            // The replacement's steps: new replica in sync, witness set up.
            wait_move(
                client,
                &v.volume,
                "node-lost",
                deadline,
                json,
                |vol, step| {
                    format!(
                        "volume {vol} is not back in sync after {timeout}s (now: {step}); \
                         `tandem volume show {vol}` shows its replicas (the resync goes on)"
                    )
                },
            )?;
            if !json {
                println!("  {}: in sync", v.volume);
            }
        }
    }
    if json { print_json(&r) } else { Ok(()) }
}

/// Waits until the newest `kind` operation (`evacuate`, `move`, `node-lost`, `add-replica`,
/// `remove-replica`) of `volume` is finished, printing its current step and resync progress
/// on stderr; `late(volume, step)` is the error after `deadline`.
fn wait_move(
    client: &Client,
    volume: &str,
    kind: &str,
    deadline: Instant,
    json: bool,
    late: impl Fn(&str, &str) -> String,
) -> Result<()> {
    let path = format!("/v1/volumes/{}", path_segment(volume));
    let mut last = String::new();
    loop {
        let vol: Volume = client.get(&path)?;
        // The newest operation of that kind is the one this command started.
        let Some(op) = vol.operations.iter().rev().find(|o| o.kind == kind) else {
            return Ok(());
        };
        match op.state.as_str() {
            "done" => return Ok(()),
            "aborted" | "failed" | "superseded" => bail!(
                "the {kind} of volume {volume} ended {}: {}",
                op.state,
                op.last_error.as_deref().unwrap_or("no reason recorded")
            ),
            _ => {}
        }
        let step = op
            .steps
            .iter()
            .find(|s| s.state != "done")
            .map(|s| s.name.clone())
            .unwrap_or_default();
        let resync: Vec<String> = vol
            .replicas
            .iter()
            .filter_map(|r| {
                r.resync_bytes_left
                    .map(|left| format!("{} {} left", r.node, format_size(left)))
            })
            .collect();
        let mut line = format!("  {}: {step}", vol.name);
        if !resync.is_empty() {
            line.push_str(&format!(" (resync: {})", resync.join(", ")));
        }
        if let Some(e) = &op.last_error {
            line.push_str(&format!(" [last error: {e}]"));
        }
        if !json && line != last {
            eprintln!("{line}");
            last = line;
        }
        if Instant::now() > deadline {
            bail!("{}", late(&vol.name, &step));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `volume move NAME --from NODE[:POOL] --to NODE[:POOL]`: records the move, then waits
/// until its operation is done.
fn volume_move(
    client: &Client,
    json: bool,
    name: &str,
    from: &str,
    to: &str,
    no_wait: bool,
    timeout: u64,
) -> Result<()> {
    let split = |s: &str| match s.split_once(':') {
        Some((n, p)) => (n.to_string(), Some(p.to_string())),
        None => (s.to_string(), None),
    };
    let ((from_node, from_pool), (to_node, to_pool)) = (split(from), split(to));
    let req = tandem_api::VolumeMove {
        from_node,
        from_pool,
        to_node,
        to_pool,
    };
    let v: Volume = client.post(&format!("/v1/volumes/{}/move", path_segment(name)), &req)?;
    let heading = format!("Moving volume {name} from {from} to {to}:");
    follow_members(
        client, json, &v, "move", &heading, "Moved", no_wait, timeout,
    )
}

/// After a membership change was recorded (`v`, with its new `kind` operation): prints the
/// planned steps under `heading`, waits until the operation is done unless `no_wait`
/// (showing the current step and resync progress), then prints where the volume is now
/// (`done`: the verb) or the volume as JSON.
#[allow(clippy::too_many_arguments)]
fn follow_members(
    client: &Client,
    json: bool,
    v: &Volume,
    kind: &str,
    heading: &str,
    done: &str,
    no_wait: bool,
    timeout: u64,
) -> Result<()> {
    let name = v.name.as_str();
    if !json {
        println!("{heading}");
        if let Some(op) = v.operations.iter().rev().find(|o| o.kind == kind) {
            for s in &op.steps {
                println!("  {}", s.name);
            }
        }
    }
    if !no_wait {
        let deadline = Instant::now() + Duration::from_secs(timeout);
        wait_move(client, name, kind, deadline, json, |vol, step| {
            format!(
                "the {kind} of volume {vol} is still running after {timeout}s (now: {step}); \
                 `tandem volume show {vol}` shows the operation (it goes on)"
            )
        })?;
    }
    let v: Volume = client.get(&format!("/v1/volumes/{}", path_segment(name)))?;
    if json {
        return print_json(&v);
    }
    if no_wait {
        println!("It goes on: `tandem volume show {name}` shows its steps.");
    } else {
        let mut on: Vec<String> = v
            .replicas
            .iter()
            .map(|r| {
                if r.diskless {
                    format!("{} (witness)", r.node)
                } else {
                    format!("{}:{}", r.node, r.pool)
                }
            })
            .collect();
        on.sort();
        println!("{done}: volume {name} is on {}.", on.join(", "));
    }
    Ok(())
}

/// `volume add-replica NAME [--to NODE[:POOL]]`.
fn add_replica(
    client: &Client,
    json: bool,
    name: &str,
    to: Option<&str>,
    no_wait: bool,
    timeout: u64,
) -> Result<()> {
    let (node, pool) = match to.map(|t| t.split_once(':').unwrap_or((t, ""))) {
        Some((n, p)) => (Some(n.to_string()), (!p.is_empty()).then(|| p.to_string())),
        None => (None, None),
    };
    let req = tandem_api::ReplicaAdd { node, pool };
    let v: Volume = client.post(
        &format!("/v1/volumes/{}/replicas", path_segment(name)),
        &req,
    )?;
    let heading = format!(
        "Adding a replica to volume {name} ({} replicas then):",
        v.replica_count
    );
    follow_members(
        client,
        json,
        &v,
        "add-replica",
        &heading,
        "Added",
        no_wait,
        timeout,
    )
}

/// `volume remove-replica NAME NODE`.
fn remove_replica(
    client: &Client,
    json: bool,
    name: &str,
    node: &str,
    no_wait: bool,
    timeout: u64,
) -> Result<()> {
    let v: Volume = client.delete(&format!(
        "/v1/volumes/{}/replicas/{}",
        path_segment(name),
        path_segment(node)
    ))?;
    let heading = format!(
        "Removing the replica on {node} from volume {name} ({} replicas then):",
        v.replica_count
    );
    follow_members(
        client,
        json,
        &v,
        "remove-replica",
        &heading,
        "Removed",
        no_wait,
        timeout,
    )
}

/// `node evacuate`: plan the moves, then wait until every volume that moves has finished its
/// evacuate operation (new members in sync, the node's copy deleted).
fn node_evacuate(
    client: &Client,
    json: bool,
    name: &str,
    no_wait: bool,
    timeout: u64,
) -> Result<()> {
    let r: tandem_api::NodeLostResult =
        client.post(&format!("/v1/nodes/{}/evacuate", path_segment(name)), &())?;
    let stuck: Vec<&tandem_api::NodeLostVolume> = r
        .volumes
        .iter()
        .filter(|v| v.actions.iter().any(|a| a.starts_with("not moved")))
        .collect();
    if !json {
        println!("Evacuating node {name}: {} volume(s).", r.volumes.len());
        for v in &r.volumes {
            println!("  {}: {}", v.volume, v.actions.join("; "));
        }
    }
    if !no_wait {
        let deadline = Instant::now() + Duration::from_secs(timeout);
        for v in r
            .volumes
            .iter()
            .filter(|v| !stuck.iter().any(|s| s.volume == v.volume))
        {
            wait_move(
                client,
                &v.volume,
                "evacuate",
                deadline,
                json,
                |vol, step| {
                    format!(
                        "volume {vol} has not left {name} after {timeout}s (now: {step}); `tandem \
                     volume show {vol}` shows the operation (it goes on)"
                    )
                },
            )?;
            if !json {
                println!("  {}: moved", v.volume);
            }
        }
    }
    if json {
        print_json(&r)?;
    }
    if !stuck.is_empty() {
        bail!(
            "node {name} still holds {} volume(s) that could not move: {}",
            stuck.len(),
            stuck
                .iter()
                .map(|v| v.volume.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !json && !no_wait {
        println!(
            "Node {name} holds no replica any more: stop its agent, then `tandem node remove {name}` forgets it."
        );
    }
    Ok(())
}

/// A rate per second: a size with an explicit unit (optionally followed by `/s`), or
/// `unlimited` / `0`.
fn parse_rate(s: &str) -> Result<u64> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    let t = t.strip_suffix("/s").unwrap_or(t);
    parse_size(t).with_context(|| {
        format!("invalid rate '{s}': use a size per second such as 100MiB, or 'unlimited'")
    })
}

/// `--resync-min-rate`: a rate, or `off` / `0` (never yield to consumer I/O).
fn parse_min_rate(s: &str) -> Result<u64> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let t = t.strip_suffix("/s").unwrap_or(t);
    parse_size(t).with_context(|| {
        format!("invalid rate '{s}': use a size per second such as 16MiB, or 'off'")
    })
}

/// The dynamic resync controller's floor, for humans.
pub(crate) fn min_rate_text(bytes_per_sec: u64) -> String {
    if bytes_per_sec == 0 {
        "never yields to consumer I/O".to_string()
    } else {
        format!(
            "{}/s while the consumer does I/O",
            format_size(bytes_per_sec)
        )
    }
}

pub(crate) fn rate_text(bytes_per_sec: u64) -> String {
    if bytes_per_sec == 0 {
        "unlimited".to_string()
    } else {
        format!("{}/s", format_size(bytes_per_sec))
    }
}

/// `volume promote` / `volume demote`: records the wish, then waits until the node's agent
/// reports the role (or says why its replication engine refuses it).
fn change_role(
    client: &Client,
    json: bool,
    name: &str,
    node: &str,
    promote: bool,
    force: bool,
    timeout: u64,
) -> Result<()> {
    let verb = if promote { "promote" } else { "demote" };
    let path = format!("/v1/volumes/{}/{verb}", path_segment(name));
    let _: Volume = client.post(
        &path,
        &tandem_api::RoleChange {
            node: node.to_string(),
            force,
        },
    )?;
    let want = if promote {
        tandem_api::Role::Primary
    } else {
        tandem_api::Role::Secondary
    };
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let show = format!("/v1/volumes/{}", path_segment(name));
    let mut last_refusal: Option<String> = None;
    loop {
        let v: Volume = client.get(&show)?;
        let r = v.replicas.iter().find(|r| r.node == node);
        if let Some(r) = r {
            if r.role == want {
                return emit(json, &v, |v| {
                    let dual = match (&v.primary_node, &v.second_primary_node) {
                        (Some(first), Some(second)) if promote && second == node => {
                            format!(" (second Primary next to {first}: dual-primary window)")
                        }
                        _ => String::new(),
                    };
                    format!(
                        "Volume {} on node {node} is {}{dual}.\n",
                        v.name,
                        if promote { "Primary" } else { "Secondary" }
                    )
                });
            }
            if let Some(e) = &r.role_error
                && last_refusal.as_deref() != Some(e.as_str())
            {
                if !json {
                    eprintln!("node {node}: {e} (still trying)");
                }
                last_refusal = Some(e.clone());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "volume {name} on node {node} is not {} after {timeout}s{}; the controller keeps \
                 asking for it: `tandem volume show {name}` shows the replicas{}",
                if promote { "Primary" } else { "Secondary" },
                match &last_refusal {
                    Some(e) => format!(" ({e})"),
                    None => String::new(),
                },
                if promote {
                    format!(", `tandem volume promote {name} --node OTHER` chooses another node")
                } else {
                    String::new()
                }
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_for(
    client: &Client,
    name: &str,
    done: impl Fn(&Volume) -> bool,
    what: &str,
) -> Result<Volume> {
    let deadline = Instant::now() + WAIT;
    let path = format!("/v1/volumes/{}", path_segment(name));
    loop {
        let v: Volume = client.get(&path)?;
        if done(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            let errors: Vec<String> = v
                .operations
                .iter()
                .filter_map(|o| o.last_error.clone())
                .collect();
            bail!(
                "volume {name} is not {what} after {}s (state {:?}){}; `tandem volume show {name}` shows its replicas",
                WAIT.as_secs(),
                v.state,
                if errors.is_empty() {
                    String::new()
                } else {
                    format!(", last error: {}", errors.join("; "))
                }
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_gone(client: &Client, name: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    let path = format!("/v1/volumes/{}", path_segment(name));
    loop {
        match client.get::<Volume>(&path) {
            Err(ClientError::Api { status: 404, .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(v) if Instant::now() > deadline => {
                bail!(
                    "volume {name} is still {:?} after {}s; `tandem volume show {name}` tells why",
                    v.state,
                    WAIT.as_secs()
                )
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `tandem status --watch`: a snapshot every second until Ctrl-C. On a terminal the screen is
/// redrawn in place (cursor home, each line cleared to its end, the rest of the screen
/// cleared: no flicker); in a pipe snapshots follow each other separated by a blank line;
/// JSON is one document per line.
fn watch_status(client: &Client, json: bool) -> Result<()> {
    use std::io::Write;
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(1) } == 1;
    let mut first = true;
    loop {
        let started = Instant::now();
        let frame = match client.get::<ClusterStatus>("/v1/status") {
            Ok(s) if json => format!("{}\n", serde_json::to_string(&s)?),
            Ok(s) => output::status(&s, crate::now_unix()),
            Err(e) if json => {
                eprintln!("error: {e}");
                String::new()
            }
            Err(e) => format!("error: {e}\n(retrying every second; Ctrl-C stops)\n"),
        };
        let mut out = std::io::stdout().lock();
        if json {
            out.write_all(frame.as_bytes())?;
        } else if tty {
            let mut screen = String::from("\x1b[H");
            for line in frame.lines() {
                screen.push_str(line);
                screen.push_str("\x1b[K\n");
            }
            screen.push_str("\x1b[J");
            out.write_all(screen.as_bytes())?;
        } else {
            if !first {
                out.write_all(b"\n")?;
            }
            out.write_all(frame.as_bytes())?;
        }
        out.flush()?;
        drop(out);
        first = false;
        std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
    }
}

fn state(client: &Client, cmd: &StateCmd, json: bool) -> Result<()> {
    match cmd {
        StateCmd::Export { file } => {
            let doc: StateDocument = client.get("/v1/state")?;
            let mut text = serde_json::to_string_pretty(&doc)?;
            text.push('\n');
            if file == "-" {
                print!("{text}");
                return Ok(());
            }
            write_atomically(std::path::Path::new(file), text.as_bytes())
                .with_context(|| format!("cannot write {file}"))?;
            let summary = serde_json::json!({
                "file": file,
                "cluster_id": doc.cluster_id,
                "format_version": doc.format_version,
                "nodes": doc.nodes.len(),
                "volumes": doc.volumes.len(),
            });
            emit(json, &summary, |_| {
                format!(
                    "Exported cluster {} ({} node(s), {} volume(s)) to {file} (format_version {}).\n",
                    doc.cluster_id,
                    doc.nodes.len(),
                    doc.volumes.len(),
                    doc.format_version
                )
            })
        }
        StateCmd::Import { file, replace } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
            } else {
                std::fs::read_to_string(file).with_context(|| format!("cannot read {file}"))?
            };
            // Sent as read: the controller validates (format_version, unknown fields, ...).
            let body: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{file} is not a JSON document"))?;
            let r: StateImportResult =
                client.post(&format!("/v1/state?replace={replace}"), &body)?;
            emit(json, &r, |r| {
                format!(
                    "Imported the state of cluster {}: {} volume(s) written, {} matched existing \
                     ones, {} node(s) registered{}.\n",
                    r.cluster_id,
                    r.volumes_imported,
                    r.volumes_matched,
                    r.nodes_imported,
                    if r.replaced {
                        " (the store's nodes and volumes were replaced)"
                    } else {
                        ""
                    }
                )
            })
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    fn volume_set(args: &[&str]) -> Option<String> {
        let cli = Cli::try_parse_from(
            ["tandem", "volume", "set", "vm1"]
                .iter()
                .chain(args)
                .copied(),
        )
        .unwrap();
        match cli.command {
            Command::Volume {
                cmd:
                    VolumeCmd::Set {
                        allow_two_primaries,
                        ..
                    },
            } => allow_two_primaries,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn volume_set_takes_allow_two_primaries_on_or_off() {
        assert_eq!(
            volume_set(&["--allow-two-primaries", "on"]).as_deref(),
            Some("on")
        );
        assert_eq!(
            volume_set(&["--allow-two-primaries=off"]).as_deref(),
            Some("off")
        );
        assert_eq!(volume_set(&["--resync-rate", "1MiB"]), None);
        let opt = "--allow-two-primaries";
        assert_eq!(on_off(opt, Some("on")).unwrap(), Some(true));
        assert_eq!(on_off(opt, Some("false")).unwrap(), Some(false));
        assert_eq!(on_off(opt, None).unwrap(), None);
        let e = on_off(opt, Some("yes")).unwrap_err().to_string();
        assert!(e.contains("--allow-two-primaries takes on or off"), "{e}");
    }

    #[test]
    fn on_no_quorum_takes_io_error_or_suspend() {
        let cli = Cli::try_parse_from([
            "tandem",
            "volume",
            "set",
            "vm1",
            "--on-no-quorum",
            "suspend",
        ])
        .unwrap();
        let Command::Volume {
            cmd: VolumeCmd::Set { on_no_quorum, .. },
        } = cli.command
        else {
            panic!("not volume set");
        };
        assert_eq!(on_no_quorum.as_deref(), Some("suspend"));
        assert_eq!(
            no_quorum_arg("suspend").unwrap(),
            tandem_api::OnNoQuorum::Suspend
        );
        assert_eq!(
            no_quorum_arg(" io-error").unwrap(),
            tandem_api::OnNoQuorum::IoError
        );
        let e = no_quorum_arg("hang").unwrap_err().to_string();
        assert!(e.contains("use io-error or suspend"), "{e}");
    }
}
