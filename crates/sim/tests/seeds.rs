//! Runs the simulator over many seeds. `SIM_SEED=N` runs exactly one seed (reproduces a
//! failure); `SIM_SEEDS=N` sets how many seeds from `SIM_SEED_BASE` (default 0) to run.

use std::time::Instant;

use tandem_sim::{SimOptions, Topology, run};

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn simulate_seeds() {
    let mut opts = SimOptions::default();
    if let Some(n) = env("SIM_TRACE") {
        opts.trace_len = n as usize;
    }
    if std::env::var("SIM_TOPOLOGY").as_deref() == Ok("three") {
        opts.topology = Some(Topology::Three);
    }
    if let Some(seed) = env("SIM_SEED") {
        match run(seed, &opts) {
            Ok(o) => eprintln!("seed {seed}: ok {o:?}"),
            Err(e) => panic!("{e}"),
        }
        return;
    }
    let base = env("SIM_SEED_BASE").unwrap_or(0);
    let n = env("SIM_SEEDS").unwrap_or(3000);
    let start = Instant::now();
    let mut total = tandem_sim::Outcome::default();
    for seed in base..base + n {
        match run(seed, &opts) {
            Ok(o) => {
                total.events += o.events;
                total.writes_acked += o.writes_acked;
                total.writes_failed += o.writes_failed;
                total.reads_checked += o.reads_checked;
                total.crashes += o.crashes;
                total.partitions += o.partitions;
                total.link_breaks += o.link_breaks;
                total.failovers += o.failovers;
                total.resync_bytes += o.resync_bytes;
                total.resizes += o.resizes;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{n} seeds in {secs:.1} s ({:.0} seeds/s): {} events, {} writes acked, {} failed, {} reads checked, {} crashes, {} partitions, {} link breaks, {} failovers, {} resync bytes, {} online resizes",
        n as f64 / secs,
        total.events,
        total.writes_acked,
        total.writes_failed,
        total.reads_checked,
        total.crashes,
        total.partitions,
        total.link_breaks,
        total.failovers,
        total.resync_bytes,
        total.resizes
    );
}

/// Three diskful nodes (every node keeps a bitmap toward both others). `SIM_SEEDS` (default
/// 1000, a few seconds in debug) and `SIM_SEED_BASE` choose the seeds; `SIM_TOPOLOGY=three
/// SIM_SEED=N` with `simulate_seeds` reproduces one with its trace.
#[test]
fn three_diskful_seeds() {
    let opts = SimOptions {
        topology: Some(Topology::Three),
        ..SimOptions::default()
    };
    let base = env("SIM_SEED_BASE").unwrap_or(0);
    let n = env("SIM_SEEDS").unwrap_or(1000);
    let start = Instant::now();
    let mut failed = Vec::new();
    let mut first_error = None;
    for seed in base..base + n {
        if let Err(e) = run(seed, &opts) {
            failed.push(seed);
            first_error.get_or_insert(e);
        }
    }
    eprintln!(
        "three diskful: {n} seeds in {:.1} s, {} failed",
        start.elapsed().as_secs_f64(),
        failed.len()
    );
    if let Some(e) = first_error {
        panic!(
            "{} of {n} seeds fail: {failed:?}\nfirst failure:\n{e}",
            failed.len()
        );
    }
}
