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
            }
            Err(e) => panic!("{e}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{n} seeds in {secs:.1} s ({:.0} seeds/s): {} events, {} writes acked, {} failed, {} reads checked, {} crashes, {} partitions, {} link breaks, {} failovers, {} resync bytes",
        n as f64 / secs,
        total.events,
        total.writes_acked,
        total.writes_failed,
        total.reads_checked,
        total.crashes,
        total.partitions,
        total.link_breaks,
        total.failovers,
        total.resync_bytes
    );
}

/// Three diskful nodes: not yet reliable (see docs/replication.md, "Known gaps"): some seeds
/// end with a sync source waiting for a target that resynced elsewhere, or diverge. Run with
/// `SIM_TOPOLOGY=three cargo test -p tandem-sim -- --ignored`.
#[test]
#[ignore]
fn three_diskful_seeds() {
    let opts = SimOptions {
        topology: Some(Topology::Three),
        ..SimOptions::default()
    };
    let n = env("SIM_SEEDS").unwrap_or(200);
    let failed: Vec<u64> = (0..n).filter(|s| run(*s, &opts).is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {n} seeds fail: {failed:?}",
        failed.len()
    );
}
