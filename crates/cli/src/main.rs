//! `tandem`: one binary for the daemons (`agent run`, `controller run`), the local cluster
//! (`up`) and every client command. Thin: the work lives in the library crates.

mod client;
mod commands;
mod daemon;
mod grow;
mod mount;
mod output;
mod ports;
mod resize;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "Replicated block storage for VM hosts",
    max_term_width = 100
)]
pub struct Cli {
    /// Controller URL.
    #[arg(long, global = true, env = "TANDEM_CONTROLLER", default_value = tandem_api::DEFAULT_CONTROLLER_URL)]
    pub controller: String,
    /// Output format of commands that print state.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a local cluster on loopback (controller + N agents) in the foreground.
    Up(up::UpArgs),
    /// Run the controller daemon.
    Controller {
        #[command(subcommand)]
        cmd: daemon::ControllerCmd,
    },
    /// Run the agent daemon.
    Agent {
        #[command(subcommand)]
        cmd: daemon::AgentCmd,
    },
    /// The cluster at a glance: nodes, pools with usage, volumes, operations, issues.
    Status {
        /// Redraw every second until Ctrl-C (JSON: one document per line).
        #[arg(long)]
        watch: bool,
    },
    /// Export or import the controller's whole desired state (JSON).
    State {
        #[command(subcommand)]
        cmd: commands::StateCmd,
    },
    /// Nodes (hosts running an agent).
    Node {
        #[command(subcommand)]
        cmd: commands::NodeCmd,
    },
    /// Storage pools on the nodes.
    Pool {
        #[command(subcommand)]
        cmd: commands::PoolCmd,
    },
    /// Volumes.
    Volume {
        #[command(subcommand)]
        cmd: commands::VolumeCmd,
    },
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(ref args) => up::run(args),
        Command::Controller { ref cmd } => daemon::controller(cmd),
        Command::Agent { ref cmd } => daemon::agent(cmd),
        _ => {
            // Client commands behave like Unix tools in pipes: `tandem volume list | head`
            // ends quietly when the reader goes away. (Daemons keep SIGPIPE ignored.)
            // SAFETY: restoring the default disposition of one signal before any threads start.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            commands::run(&cli)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
