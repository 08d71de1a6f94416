//! Seeds that found bugs, pinned to the topology they failed with. Each name says what broke.
//! (The engine changed since, so a seed no longer replays the exact failing schedule, but it
//! keeps exercising the same situation.)

use tandem_sim::{SimOptions, Topology, run};

fn seed(seed: u64, topology: Topology) {
    let opts = SimOptions {
        topology: Some(topology),
        ..SimOptions::default()
    };
    if let Err(e) = run(seed, &opts) {
        panic!("{e}");
    }
}

/// An isolated Primary minted a generation when its first link broke (it still had quorum via
/// the witness for an instant); the healed handshake saw split brain. Now minted lazily.
#[test]
fn isolated_primary_does_not_mint_without_writing() {
    seed(1, Topology::TwoPlusWitness);
}

/// A Primary without quorum served reads of stale data while another node was Primary.
#[test]
fn stale_primary_without_quorum_refuses_reads() {
    seed(13, Topology::TwoPlusWitness);
}

/// A write in flight when a link broke completed without the peer under the old generation;
/// the peer, later promoted, looked equal and overwrote it.
#[test]
fn write_completed_without_peer_mints_generation() {
    seed(99, Topology::TwoPlusWitness);
}

/// A Secondary's acknowledged writes were unflushed when its Primary crashed; nobody made
/// them durable and its own later crash lost them.
#[test]
fn secondary_flushes_when_it_loses_the_primary() {
    seed(57, Topology::Two);
}

/// A demoted Primary cleared its activity log before its own writes were durable; a later
/// crash as Secondary lost acknowledged data.
#[test]
fn demote_flushes_before_dropping_the_activity_log() {
    seed(620, Topology::Two);
}

/// Three diskful: a sync source cleared its bitmap when the target announced UpToDate after a
/// resync from another node (ours was paused); the target now closes paused links first.
#[test]
fn paused_source_keeps_bits_when_target_syncs_elsewhere() {
    seed(4, Topology::Three);
}

/// Three diskful: resync data from a Secondary source overtook a newer write the Primary sent
/// the target directly; replicated writes now fence resync data for the blocks they cover.
#[test]
fn resync_from_secondary_does_not_overwrite_newer_writes() {
    seed(10, Topology::Three);
}

/// Three diskful: the crashed Primary was made sync source (DRBD's rule) and spread the data
/// its crash had lost; with protocol C it is the target.
#[test]
fn crashed_primary_is_sync_target() {
    seed(79, Topology::Three);
}

/// Three diskful: both ends decided from different generation snapshots and both became
/// sync source; a mismatched ResyncBegin now forces a new comparison.
#[test]
fn mismatched_decisions_reconnect() {
    seed(37, Topology::Three);
}

/// Three diskful: a Secondary applied a Primary write, then became sync target of another
/// Secondary that had not applied that write yet when it read the block; the older resync data
/// overwrote it. Blocks a target received from the connected Primary are now kept.
#[test]
fn resync_from_secondary_keeps_blocks_the_primary_wrote() {
    seed(135, Topology::Three);
}
