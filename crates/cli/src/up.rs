//! `tandem up`: a whole cluster on loopback in the foreground. Each daemon is its own process
//! with its config and pid file in its own directory, so any of them can be killed and
//! restarted by hand with `tandem agent run --config DIR/<node>/agent.toml`.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tandem_api::{DEFAULT_CONTROLLER_PORT, Node, NodeState};

use crate::client::Client;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Directory for configs, logs, state and pools (created if missing, reused if present).
    #[arg(long, default_value = "./tandem-data")]
    pub dir: PathBuf,
    /// Number of agents (nodes) to run.
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
    /// Controller port on 127.0.0.1 (default 7450, which the CLI uses by default).
    #[arg(long)]
    pub port: Option<u16>,
    /// Start the controller with `experimental_replication` (volumes with 2 or 3 replicas,
    /// replicated by the agents' experimental replication drivers). Remembered in the
    /// controller's config.
    #[arg(long)]
    pub experimental_replication: bool,
}

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A daemon `up` is responsible for.
struct Daemon {
    label: String,
    config: PathBuf,
    pid_file: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    fn spawn(&mut self, exe: &Path) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(exe);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; the closure touches no shared state. It makes the
        // daemon get SIGTERM if `tandem up` dies, so nothing is left running behind it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.label))?;
        self.child = Some(child);
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence/permission.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The pid in `pid_file` if that process is alive and was started with `config` on its command line.
fn running_pid(pid_file: &Path, config: &Path) -> Option<i32> {
    let pid = read_pid(pid_file)?;
    if !pid_alive(pid) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = config.to_string_lossy();
    let matches = cmdline
        .split(|b| *b == 0)
        .any(|arg| String::from_utf8_lossy(arg) == needle);
    matches.then_some(pid)
}

fn free_port() -> Result<u16> {
    crate::ports::free_port().context("finding a free port")
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn controller_config(
    dir: &Path,
    port: Option<u16>,
    experimental_replication: bool,
) -> Result<(PathBuf, String)> {
    let cdir = dir.join("controller");
    std::fs::create_dir_all(&cdir).with_context(|| format!("creating {}", cdir.display()))?;
    let path = cdir.join("controller.toml");
    let mut config: tandem_controller::Config = if path.exists() {
        let text = std::fs::read_to_string(&path)?;
        toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?
    } else {
        let listen = format!("127.0.0.1:{}", port.unwrap_or(DEFAULT_CONTROLLER_PORT));
        let data_dir = cdir.join("store");
        toml::from_str(&format!("listen = {listen:?}\ndata_dir = {data_dir:?}\n"))?
    };
    if let Some(p) = port {
        config.listen = format!("127.0.0.1:{p}");
    }
    if experimental_replication {
        config.experimental_replication = true;
    }
    write_file(&path, &toml::to_string(&config)?)?;
    let url = format!("http://{}", config.listen);
    Ok((path, url))
}

fn agent_config(dir: &Path, node: &str, url: &str) -> Result<(PathBuf, tandem_agent::Config)> {
    let ndir = dir.join(node);
    std::fs::create_dir_all(ndir.join("pool"))
        .with_context(|| format!("creating {}", ndir.display()))?;
    let path = ndir.join("agent.toml");
    let mut config: tandem_agent::Config = if path.exists() {
        let text = std::fs::read_to_string(&path)?;
        toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?
    } else {
        let sock = ndir.join("nbd.sock");
        if sock.as_os_str().len() > 100 {
            bail!(
                "{} is too long for a unix socket path (limit 107 bytes); use a shorter --dir",
                sock.display()
            );
        }
        let text = format!(
            "node = {node:?}\ncontroller = {url:?}\naddress = \"127.0.0.1\"\nstate_dir = {:?}\nnbd_socket = {sock:?}\nnbd_tcp = \"127.0.0.1:{}\"\nrepl_listen = \"127.0.0.1:{}\"\n\n[[pools]]\nname = \"default\"\npath = {:?}\n",
            ndir.join("state"),
            free_port()?,
            free_port()?,
            ndir.join("pool"),
        );
        toml::from_str(&text)?
    };
    if config.repl_listen.is_none() {
        // A config written by an older `tandem up`: give it a fixed replication port too.
        config.repl_listen = Some(format!("127.0.0.1:{}", free_port()?));
    }
    config.controller = url.to_string();
    write_file(&path, &toml::to_string(&config)?)?;
    Ok((path, config))
}

fn existing_nodes(dir: &Path) -> Vec<String> {
    let mut nodes: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("agent.toml").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    nodes.sort_by_key(|n| (n.len(), n.clone()));
    nodes
}

pub fn run(args: &UpArgs) -> Result<()> {
    if args.nodes == 0 || args.nodes > 32 {
        bail!("--nodes must be between 1 and 32");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let exe = std::env::current_exe().context("locating the tandem binary")?;

    let (ctl_config, url) = controller_config(&dir, args.port, args.experimental_replication)?;
    let mut names: Vec<String> = (1..=args.nodes).map(|i| format!("node{i}")).collect();
    let mut extra = Vec::new();
    for n in existing_nodes(&dir) {
        if !names.contains(&n) {
            extra.push(n.clone());
            names.push(n);
        }
    }

    let mut daemons = vec![Daemon {
        label: "controller".into(),
        pid_file: dir.join("controller/controller.pid"),
        log: dir.join("controller/controller.log"),
        args: vec![
            "controller".into(),
            "run".into(),
            "--config".into(),
            ctl_config.display().to_string(),
        ],
        config: ctl_config,
        child: None,
    }];
    let mut agents = Vec::new();
    for n in &names {
        let (path, cfg) = agent_config(&dir, n, &url)?;
        daemons.push(Daemon {
            label: format!("agent {n}"),
            pid_file: dir.join(n).join("agent.pid"),
            log: dir.join(n).join("agent.log"),
            args: vec![
                "agent".into(),
                "run".into(),
                "--config".into(),
                path.display().to_string(),
            ],
            config: path,
            child: None,
        });
        agents.push(cfg);
    }
    for d in &daemons {
        if let Some(pid) = running_pid(&d.pid_file, &d.config) {
            bail!(
                "{} from {} is already running (pid {pid}); stop it first or use another --dir",
                d.label,
                dir.display()
            );
        }
    }

    let client = Client::new(&url);
    if client.healthy() {
        bail!("something already answers on {url}; stop it or pick another --port");
    }

    let result = start_and_wait(&exe, &mut daemons, &client, &names);
    if let Err(e) = result {
        stop_all(&mut daemons);
        return Err(e);
    }

    println!("controller: {url}");
    println!(
        "tandem is up: a controller and {} agents on loopback, data in {}",
        names.len(),
        dir.display()
    );
    for a in &agents {
        println!(
            "  {:<8} nbd socket {}  tcp {}  pool default in {}",
            a.node,
            a.nbd_socket.display(),
            a.nbd_tcp.as_deref().unwrap_or("-"),
            a.pools
                .first()
                .map(|p| p.path.display().to_string())
                .unwrap_or_default()
        );
    }
    if !extra.is_empty() {
        println!(
            "  (also started {} found in {})",
            extra.join(", "),
            dir.display()
        );
    }
    println!(
        "Configs, logs and pid files: {}/<node>/agent.{{toml,log,pid}}, {}/controller/",
        dir.display(),
        dir.display()
    );
    println!();
    println!("Next, in another terminal:");
    if url != tandem_api::DEFAULT_CONTROLLER_URL {
        println!("  export TANDEM_CONTROLLER={url}");
    }
    println!("  tandem volume create demo 1GiB");
    println!("  tandem volume connect demo            # prints the NBD URI");
    println!("  qemu-img info \"$(tandem volume connect demo)\"");
    println!("  tandem status");
    println!();
    println!(
        "Ctrl-C stops the cluster; `tandem up --dir {}` starts it again with the same volumes.",
        dir.display()
    );

    supervise(&mut daemons)
}

fn start_and_wait(
    exe: &Path,
    daemons: &mut [Daemon],
    client: &Client,
    names: &[String],
) -> Result<()> {
    daemons[0].spawn(exe)?;
    let deadline = Instant::now() + START_TIMEOUT;
    while !client.healthy() {
        check_alive(&mut daemons[0])?;
        if Instant::now() > deadline {
            bail!(
                "the controller did not answer within {}s; its log:\n{}",
                START_TIMEOUT.as_secs(),
                daemons[0].log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for d in daemons.iter_mut().skip(1) {
        d.spawn(exe)?;
    }
    loop {
        for d in daemons.iter_mut() {
            check_alive(d)?;
        }
        let nodes: Vec<Node> = client.get("/v1/nodes").unwrap_or_default();
        let online = |n: &String| {
            nodes
                .iter()
                .any(|x| &x.name == n && x.state == NodeState::Online)
        };
        if names.iter().all(online) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let missing: Vec<&String> = names.iter().filter(|n| !online(n)).collect();
            bail!(
                "agents {missing:?} did not register within {}s; see their agent.log",
                START_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_alive(d: &mut Daemon) -> Result<()> {
    if let Some(child) = d.child.as_mut()
        && let Some(status) = child.try_wait()?
    {
        d.child = None;
        bail!(
            "{} exited during start-up ({status}); its log ({}):\n{}",
            d.label,
            d.log.display(),
            d.log_tail()
        );
    }
    Ok(())
}

/// Blocks until SIGINT/SIGTERM, reporting daemons that exit meanwhile, then stops everything.
fn supervise(daemons: &mut [Daemon]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => {
                    for d in daemons.iter_mut() {
                        if let Some(child) = d.child.as_mut()
                            && let Ok(Some(status)) = child.try_wait()
                        {
                            d.child = None;
                            println!(
                                "{} exited ({status}); restart it with: tandem {}",
                                d.label,
                                d.args.join(" ")
                            );
                        }
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    println!("stopping...");
    stop_all(daemons);
    println!("stopped.");
    Ok(())
}

/// SIGTERM to every daemon (ours, or restarted by hand and found by its pid file), agents first,
/// then the controller; SIGKILL what is still running after the timeout.
fn stop_all(daemons: &mut [Daemon]) {
    let mut pids: Vec<(String, i32)> = Vec::new();
    for d in daemons.iter_mut().rev() {
        let pid = match &d.child {
            Some(c) => Some(c.id() as i32),
            None => running_pid(&d.pid_file, &d.config),
        };
        if let Some(pid) = pid {
            // SAFETY: sending a signal to a pid we started or found running with our config.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            pids.push((d.label.clone(), pid));
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for d in daemons.iter_mut() {
        if let Some(child) = d.child.as_mut() {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        eprintln!(
                            "{} did not stop within {}s; killing it",
                            d.label,
                            STOP_TIMEOUT.as_secs()
                        );
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            d.child = None;
        }
    }
    for (label, pid) in pids {
        while pid_alive(pid) && !is_zombie(pid) {
            if Instant::now() > deadline {
                eprintln!("{label} (pid {pid}) did not stop; killing it");
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}
