//! Runs the simulator over many seeds. `SIM_SEED=N` runs exactly one seed (reproduces a
//! failure); `SIM_SEEDS=N` sets how many seeds from `SIM_SEED_BASE` (default 0) to run.

use std::time::Instant;

use tandem_sim::{SimOptions, Topology, run};

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// `SIM_STRICT_END=0` turns `SimOptions::strict_end` off (to see whether a seed also fails
/// at the first moment everything is connected and UpToDate).
fn strict_end() -> bool {
    env("SIM_STRICT_END") != Some(0)
}

#[test]
fn simulate_seeds() {
    let mut opts = SimOptions {
        strict_end: strict_end(),
        ..SimOptions::default()
    };
    if let Some(n) = env("SIM_TRACE") {
        opts.trace_len = n as usize;
    }
    if env("SIM_DISK_FAULTS") == Some(0) {
        // Reproduces a seed of a run without disk faults (e.g. `three_diskful_seeds`).
        opts.disk_faults = false;
    }
    if env("SIM_SLOW_DISKS") == Some(0) {
        // Reproduces a seed of a run without slow-disk periods (a regression seed's options).
        opts.slow_disks = false;
    }
    if env("SIM_FRAME_FAULTS") == Some(0) {
        // Every link fault loses its frame (the regression seeds' options).
        opts.frame_faults = false;
    }
    if env("SIM_RACING") == Some(1) {
        // Racing promotions (see `SimOptions::racing_promotions`).
        opts.racing_promotions = true;
    }
    match std::env::var("SIM_TOPOLOGY").as_deref() {
        Ok("three") => opts.topology = Some(Topology::Three),
        Ok("three-witness") => opts.topology = Some(Topology::ThreePlusWitness),
        _ => {}
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
    let (mut checksum_runs, mut checksum_resync) = (0u64, 0u64);
    for seed in base..base + n {
        match run(seed, &opts) {
            Ok(o) => {
                total.events += o.events;
                total.writes_acked += o.writes_acked;
                total.writes_failed += o.writes_failed;
                total.reads_checked += o.reads_checked;
                total.crashes += o.crashes;
                total.disk_failures += o.disk_failures;
                total.disk_failures_primary += o.disk_failures_primary;
                total.detached_io_ok += o.detached_io_ok;
                total.partitions += o.partitions;
                total.link_breaks += o.link_breaks;
                total.failovers += o.failovers;
                total.diskless_promotions += o.diskless_promotions;
                total.diskless_io_ok += o.diskless_io_ok;
                total.offers_taken += o.offers_taken;
                total.diskless_resumes += o.diskless_resumes;
                total.window_seeds += o.window_seeds;
                total.window_joins += o.window_joins;
                total.window_io_ok += o.window_io_ok;
                total.suspend_seeds += o.suspend_seeds;
                total.suspended_io_ok += o.suspended_io_ok;
                total.healthy_io_ok += o.healthy_io_ok;
                total.resync_bytes += o.resync_bytes;
                total.verifies += o.verifies;
                total.verifies_done += o.verifies_done;
                total.verified_bytes += o.verified_bytes;
                if o.resync_checksums {
                    checksum_runs += 1;
                    checksum_resync += o.resync_bytes;
                    total.resync_skipped_bytes += o.resync_skipped_bytes;
                }
                total.resizes += o.resizes;
                total.slow_disk_periods += o.slow_disk_periods;
                total.slow_disk_ops += o.slow_disk_ops;
                total.frames_duplicated += o.frames_duplicated;
                total.frames_reordered += o.frames_reordered;
                total.sequence_breaks += o.sequence_breaks;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{n} seeds in {secs:.1} s ({:.0} seeds/s): {} events, {} writes acked, {} failed, {} reads checked, {} crashes, {} partitions, {} link breaks, {} failovers, {} resync bytes, {} verifies ({} done, {} bytes compared, 0 differences), {} online resizes",
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
        total.verifies,
        total.verifies_done,
        total.verified_bytes,
        total.resizes
    );
    eprintln!(
        "liveness: {} consumer requests issued to a converged cluster completed (none failed without a fault or role change)",
        total.healthy_io_ok
    );
    eprintln!(
        "disk failures: {} ({} of a Primary), {} consumer requests completed by a Primary with a detached disk",
        total.disk_failures, total.disk_failures_primary, total.detached_io_ok
    );
    eprintln!(
        "diskless Primary: {} promotions of the witness, {} consumer requests completed by it, {} generations adopted from its offer after a blip, {} times it resumed requests held (suspend) while no peer held its data",
        total.diskless_promotions, total.diskless_io_ok, total.offers_taken, total.diskless_resumes
    );
    eprintln!(
        "dual-primary window: open in {} seeds, {} second Primaries promoted into it, {} consumer requests completed by a member that had to fetch the write token",
        total.window_seeds, total.window_joins, total.window_io_ok
    );
    eprintln!(
        "on-no-quorum=suspend: {} seeds, {} consumer requests held for quorum and then acknowledged",
        total.suspend_seeds, total.suspended_io_ok
    );
    eprintln!(
        "slow disks: {} periods, {} disk operations started inside one",
        total.slow_disk_periods, total.slow_disk_ops
    );
    eprintln!(
        "frame faults: {} frames duplicated, {} reordered, {} links broken by the receiver's frame-number check (none delivered)",
        total.frames_duplicated, total.frames_reordered, total.sequence_breaks
    );
    eprintln!(
        "checksum-based resync in {checksum_runs} runs: {checksum_resync} bytes transferred, {} bytes found identical and skipped",
        total.resync_skipped_bytes
    );
}

/// Three diskful nodes (every node keeps a bitmap toward both others). `SIM_SEEDS` (default
/// 1000, a few seconds in debug) and `SIM_SEED_BASE` choose the seeds; `SIM_TOPOLOGY=three
/// SIM_SEED=N` with `simulate_seeds` reproduces one with its trace. `SIM_TOPOLOGY=three-witness`
/// runs three diskful nodes and a witness instead, like `three_diskful_and_witness_seeds`.
#[test]
fn three_diskful_seeds() {
    let topology = if std::env::var("SIM_TOPOLOGY").as_deref() == Ok("three-witness") {
        Topology::ThreePlusWitness
    } else {
        Topology::Three
    };
    three_diskful(topology, false);
}

/// Three diskful nodes and a witness the operator sometimes promotes
/// (`Topology::ThreePlusWitness`), no disk faults; `SIM_SEEDS` (default 1000, about 15 s in
/// release, 20 s in debug) and `SIM_SEED_BASE` choose the seeds. Reproduce one with
/// `SIM_DISK_FAULTS=0 SIM_TOPOLOGY=three-witness SIM_SEED=N` and `simulate_seeds`.
#[test]
fn three_diskful_and_witness_seeds() {
    three_diskful(Topology::ThreePlusWitness, false);
}

/// Three diskful nodes with disk I/O errors among the faults (crashes strike mid-flight,
/// `SimOptions::crash_in_flight`) and slow disks (`SIM_SLOW_DISKS=0`: without). `SIM_SEEDS`
/// and `SIM_SEED_BASE` as above; reproduce one with `SIM_TOPOLOGY=three SIM_SEED=N` and
/// `simulate_seeds`. Seeds 0..5000 pass since 2026-12-07, with slow disks since seed 2595
/// was fixed (failures found on the way and a window still open: docs/replication.md,
/// "Not implemented yet").
#[test]
fn three_diskful_disk_fault_seeds() {
    three_diskful(Topology::Three, true);
}

fn three_diskful(topology: Topology, disk_faults: bool) {
    // Slow disks (`SimOptions::slow_disks`); `SIM_SLOW_DISKS=0` turns them off.
    let slow_disks = env("SIM_SLOW_DISKS") != Some(0);
    let opts = SimOptions {
        topology: Some(topology),
        disk_faults,
        strict_end: strict_end(),
        slow_disks,
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
        "{topology:?}: {n} seeds in {:.1} s, {} failed",
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

/// The scripted split-brain scenario (`SimOptions::split_brain`): a real split brain made on
/// purpose, resolved by the seed's policy or by the manual resolution; never merged, and both
/// replicas end equal to the kept side. `SIM_SEEDS` (default 1000) and `SIM_SEED_BASE` choose
/// the seeds.
#[test]
fn split_brain_seeds() {
    let opts = SimOptions {
        split_brain: true,
        ..SimOptions::default()
    };
    if let Some(seed) = env("SIM_SEED") {
        match run(seed, &opts) {
            Ok(o) => eprintln!("split brain seed {seed}: ok {o:?}"),
            Err(e) => panic!("{e}"),
        }
        return;
    }
    let base = env("SIM_SEED_BASE").unwrap_or(0);
    let n = env("SIM_SEEDS").unwrap_or(1000);
    let start = Instant::now();
    let mut how: std::collections::BTreeMap<String, u64> = Default::default();
    for seed in base..base + n {
        match run(seed, &opts) {
            Ok(o) => {
                let h = o.split_brain.unwrap_or_default();
                let h = h.split(" node").next().unwrap_or("").to_string();
                *how.entry(h).or_insert(0) += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!(
        "split brain: {n} seeds in {:.1} s: {how:?}",
        start.elapsed().as_secs_f64()
    );
    assert!(how.len() >= 2, "both resolutions covered: {how:?}");
}
