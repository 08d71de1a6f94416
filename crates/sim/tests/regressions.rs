//! Seeds that found bugs, pinned to the topology they failed with. Each name says what broke.
//! (The engine changed since, so a seed no longer replays the exact failing schedule, but it
//! keeps exercising the same situation.)

use tandem_sim::{SimOptions, Topology, run};

/// Runs `seed`; the failure report (seed, invariant, trace) is the panic message.
fn must_pass(seed: u64, opts: &SimOptions) {
    if let Err(e) = run(seed, opts) {
        panic!("{e}");
    }
}

/// The defaults, less what came after these seeds were found and would change their
/// schedules (slow-disk periods, duplicated and reordered frames; the options of each helper
/// below say which others).
fn found() -> SimOptions {
    SimOptions {
        slow_disks: false,
        frame_faults: false,
        ..SimOptions::default()
    }
}

fn seed(seed: u64, topology: Topology) {
    // Disk faults came later: without them these seeds keep the schedules they were found with.
    let opts = SimOptions {
        topology: Some(topology),
        disk_faults: false,
        diskless_primary: false,
        dual_primary: false,
        suspend: false,
        // The schedule the seed was found with (engine flushes of its own came later).
        own_flushes: false,
        crash_in_flight: false,
        ..found()
    };
    must_pass(seed, &opts);
}

/// Seeds found with the witness promoted (a diskless Primary), with every fault kind.
fn diskless_seed(seed: u64) {
    let opts = SimOptions {
        topology: Some(Topology::TwoPlusWitness),
        dual_primary: false,
        suspend: false,
        // The schedule the seed was found with (engine flushes of its own came later).
        own_flushes: false,
        crash_in_flight: false,
        ..found()
    };
    must_pass(seed, &opts);
}

/// A restarted replica resynced from the other while the diskless Primary wrote only to the
/// source (it had not reconnected yet): the writes the source applied after the bitmap
/// exchange were missing on the target (stale read through the diskless Primary).
#[test]
fn diskless_primary_writes_during_a_resync_between_secondaries() {
    diskless_seed(42);
}

/// A Secondary crashed with writes of the diskless Primary unflushed; its peer had received
/// them only through a resync, so nothing marked them toward the crashed one.
#[test]
fn diskless_primary_hands_a_lost_peers_unflushed_writes_to_the_others() {
    diskless_seed(97);
}

/// The diskless Primary started a generation while its only data peer was becoming a sync
/// target; the peer could not adopt it and the Primary had no data peer left for good.
#[test]
fn a_resynced_peer_adopts_the_diskless_primarys_new_generation() {
    diskless_seed(1008);
}

/// Switchover from a diskless Primary, then a crash of a Secondary that had its last writes
/// unflushed: the demotion now flushes the peers before the writes are settled.
#[test]
fn diskless_primary_demotion_flushes_its_peers() {
    diskless_seed(1056);
}

/// Resync data read before a diskless Primary's write reached the target after the late mark
/// for that write and cleared it.
#[test]
fn resync_data_older_than_a_late_mark_does_not_clear_it() {
    diskless_seed(8479);
}

/// A node was promoted between the handshake that made it a sync target and `ResyncBegin`.
#[test]
fn no_promotion_of_a_pending_sync_target() {
    diskless_seed(8648);
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

/// Three diskful: a Secondary crashed (losing unflushed writes) just as the Primary was
/// switched over; only the old Primary's bitmap recorded the loss. The crashed node resynced
/// from the new Primary, then equal generations with bits on both sides picked the source by
/// node id and spread its stale blocks. The side that recorded the peer as behind (bitmap
/// generation toward it) is now the source (`EqualBitsPeerMissedWrites`). (First seen as seeds
/// 68 and 101.)
#[test]
fn equal_generations_source_is_the_side_that_recorded_missed_writes() {
    seed(3326, Topology::Three);
}

/// Three diskful: a sync source answered a resync read only after releasing the write that
/// waited for it, so the newer `Write` went out on the link before the older `ResyncData` and
/// the target applied the older data last. (First seen as seeds 207, 101.)
#[test]
fn resync_data_is_sent_before_the_write_that_waited_for_it() {
    seed(1179, Topology::Three);
}

/// Three diskful: the Primary started a new generation at every write after each link churn,
/// even for peers it had already recorded as behind; a node that caught up elsewhere found its
/// generation pushed out of the two-entry history and saw split brain. A new generation is
/// now started only for peers not yet recorded as behind. (Also the original seed 1089.)
#[test]
fn no_new_generation_for_peers_already_behind() {
    seed(499, Topology::Three);
}

/// Same cause as `no_new_generation_for_peers_already_behind`, another schedule.
#[test]
fn no_generation_churn_split_brain() {
    seed(613, Topology::Three);
}

/// Three diskful: a Secondary that had lost its link to the Primary (missing its last writes)
/// became the sync source of a node that had just resynced from that Primary, equal
/// generations. A Secondary that loses its Primary now records it (bitmap generation = its
/// current), and the other side is preferred (`EqualBitsLostPrimary`). (First seen as seed
/// 5798.)
#[test]
fn secondary_that_lost_its_primary_is_not_the_source() {
    seed(311, Topology::Three);
}

/// Three diskful: a resync was interrupted while another link was paused behind it (or had
/// been decided while we were still UpToDate); those links never resumed and the cluster
/// stayed Inconsistent. They now reconnect and compare again. (Found with this seed while the
/// other fixes were in progress; with all of them no seed in 0..12000 fails without this one,
/// so the unit test `interrupted_resync_makes_paused_links_compare_again` pins it.)
#[test]
fn interrupted_resync_resumes_paused_links() {
    seed(16076, Topology::Three);
}

/// Three diskful: both ends of a link decided from different snapshots that each was the sync
/// target and became Inconsistent at once; the crossed requests broke the link and no node
/// kept good data. A target now becomes Inconsistent only after the source's `ResyncBegin`.
/// (Found with this seed, and seed 208, while the other fixes were in progress; with all of
/// them no seed in 0..12000 fails without this one, so the unit test
/// `sync_target_stays_up_to_date_until_the_source_confirms` pins it.)
#[test]
fn sync_target_waits_for_the_source_before_going_inconsistent() {
    seed(7197, Topology::Three);
}

// ------------------------------------------------------------------ disk I/O errors (detach)

fn disk_seed(seed: u64, topology: Option<Topology>) {
    let opts = SimOptions {
        topology,
        // The schedule the seed was found with (engine flushes of its own came later).
        own_flushes: false,
        crash_in_flight: false,
        ..found()
    };
    must_pass(seed, &opts);
}

/// A detached disk flushed its activity log in a loop (every flush failed at once and asked
/// for the next one): the run never ended. A detached engine no longer keeps an activity log.
#[test]
fn detached_disk_does_not_flush_its_activity_log_forever() {
    disk_seed(3, None);
}

/// The Primary's disk failed on the activity-log write of a write it had already sent: the
/// peer applied it, the restarted disk lacked it unrecorded. The detaching Primary now sends
/// its hot extents as out of sync to its peers.
#[test]
fn detaching_primary_marks_its_hot_extents_on_the_peers() {
    disk_seed(31, Some(Topology::Two));
}

/// The Primary's disk failed while it was the source of a resync: both replicas ended not
/// UpToDate (a second fault: the link broke before the engine noticed the failure). The
/// simulator now breaks a failing node's links only once it detached.
#[test]
fn source_disk_failure_during_resync_is_a_second_fault() {
    disk_seed(524, Some(Topology::Two));
}

/// Three diskful: a detached Primary wrote with one Secondary while the other, reconnected,
/// got nothing; that one was promoted later and served stale data. The detached Primary's
/// `outdated` list now reaches connected peers.
#[test]
fn detached_primary_outdates_connected_peers_it_wrote_without() {
    disk_seed(3, Some(Topology::Three));
}

/// A link blip between a detached Primary and its only peer: the unflushed marks made the
/// peer Outdated and the volume had no UpToDate replica left. The peer with the only copy now
/// serves again and is not outdated.
#[test]
fn only_copy_peer_serves_again_after_a_link_blip() {
    disk_seed(9, Some(Topology::TwoPlusWitness));
}

/// A restarted detached disk carried the generation minted after it failed and looked newer
/// than the peer that had all the writes (`SourceNotUpToDate`, stuck). The metadata of a
/// detached disk now keeps the generations of when it was detached.
#[test]
fn detached_metadata_keeps_the_old_generation() {
    disk_seed(582, Some(Topology::Two));
}

/// A write went to the peer although the activity-log write before it had failed, and the
/// link broke at once: neither side recorded that the detached disk lacked it. Sends after a
/// failed persist are now dropped and their links broken.
#[test]
fn sends_after_a_failed_persist_break_the_link() {
    disk_seed(2606, Some(Topology::TwoPlusWitness));
}

/// A replica caught up through the other while the diskless Primary's link to it was not
/// reported yet; a write sent without it was not marked by the replica that looked in sync
/// with it. The diskless Primary now sends `THIRD_NODE` marks with such writes, and a replica
/// that looks in sync resyncs them online.
#[test]
fn writes_without_a_peer_that_caught_up_elsewhere_are_marked() {
    diskless_seed(11038);
}

/// Both replicas lost the diskless Primary with writes in doubt; the one whose handshake made
/// it the sync target (paused until the Primary is back) was promoted and served stale blocks.
#[test]
fn a_paused_sync_target_is_not_promoted() {
    diskless_seed(1953);
}

/// A diskless Primary's mark for a write without a replica reached the other replica while it
/// was that replica's sync source; the end of the resync cleared it.
#[test]
fn a_mark_for_a_resync_target_outlives_the_end_of_the_resync() {
    diskless_seed(11028);
}

/// Marks arrived between sending our bitmap and deciding: the two ends decided differently
/// (one waited as sync target forever). The handshake now starts over when our bits changed.
#[test]
fn bits_that_change_during_the_handshake_restart_it() {
    diskless_seed(19838);
}

/// Seeds found with the dual-primary window (every option on, as found).
fn window_seed(seed: u64) {
    let opts = SimOptions {
        suspend: false,
        // The schedule the seed was found with (engine flushes of its own came later).
        own_flushes: false,
        crash_in_flight: false,
        ..found()
    };
    must_pass(seed, &opts);
}

/// A member that handed the token over in the same batch as a completion: the simulator's
/// quorum check of that completion saw a Secondary waiting for its role-change barrier.
#[test]
fn a_completion_right_before_a_token_hand_off_counts_with_quorum() {
    window_seed(7);
}

/// A crash made an acknowledged write uncertain, a flush on the surviving replica then made it
/// durable, a newer write was acknowledged and lost in a second crash: the model had forgotten
/// that the older write could be what the disk holds (`Block::maybe_durable`).
#[test]
fn a_write_a_crash_made_uncertain_may_be_durable_after_the_next_crash() {
    window_seed(866);
}

/// An operator promoted a node that did not see the diskless Primary (a racing promotion,
/// forced back): before that, it had caught up to the diskless Primary's generation through
/// the other replica, then missed writes at that generation; back on the diskless Primary's
/// link it served reads with stale blocks. The diskless Primary now starts a new generation
/// when a peer it recorded behind comes back at its current one.
#[test]
fn a_replica_that_caught_up_elsewhere_does_not_serve_a_diskless_primary_stale_data() {
    let opts = SimOptions {
        racing_promotions: true,
        suspend: false,
        // The schedule the seed was found with (engine flushes of its own came later).
        own_flushes: false,
        crash_in_flight: false,
        ..found()
    };
    must_pass(4838, &opts);
}

/// Two resync requests for the same blocks were in flight when a diskless Primary's write
/// to them reached the source: the target's late mark kept the first answer from clearing
/// the blocks, but not the second (both carried data read before the write), so the target
/// ended in sync with stale blocks that the diskless Primary then read. The late mark now
/// counts every pending resync write it predates. Found by a 40,000-seed run (all options).
#[test]
fn a_late_mark_outlives_every_older_resync_answer_for_its_blocks() {
    must_pass(27981, &found());
}

/// Model, not engine: a write failed to the consumer but reached both replicas and a flush;
/// two newer acknowledged writes were then lost with the cache of the node that went on (a
/// disk failure repaired by a restart, in a dual-primary window), and the failed write's
/// data came back. The model now keeps failed writes newer than the last durable one as
/// what such a crash may reveal (`Block::failed`).
#[test]
fn a_failed_write_on_the_disks_may_come_back_when_newer_unflushed_ones_are_lost() {
    must_pass(39932, &found());
}

/// A diskless Primary under suspend held a write while its only data peer was resyncing; the
/// peer became UpToDate again without the Primary noticing a new serving peer (it had been
/// serving before), so the held write stayed queued while newer writes went ahead, one of
/// them overlapping: applied out of order, a stale block read back. New requests now queue
/// behind held ones, and held ones resume whenever a peer serves again.
#[test]
fn requests_held_by_a_diskless_primary_are_not_overtaken() {
    must_pass(49738, &found());
}

/// Three diskful nodes with the options `three_diskful_seeds` uses (no disk faults; seeds
/// found with them run through `disk_seed`).
fn three(seed: u64) {
    let opts = SimOptions {
        topology: Some(Topology::Three),
        disk_faults: false,
        // The schedule the seed was found with (engine flushes of its own came later).
        own_flushes: false,
        crash_in_flight: false,
        ..found()
    };
    must_pass(seed, &opts);
}

/// Three diskful nodes: the Primary's disk failed, so it wrote only to the Secondary that
/// served it while that one resynced the third; the source did not pass those writes on as
/// late marks (only a diskless Primary's were), and the target ended "in sync" with old
/// blocks (found by verify).
#[test]
fn a_detached_primarys_writes_reach_a_target_resyncing_from_its_serving_peer() {
    disk_seed(276, Some(Topology::Three));
}

/// Three diskful nodes: a Primary with a detached disk wrote to the one Secondary that served
/// it, not to the other, which had just caught up through that Secondary and looked in sync
/// to it; only the Primary knew, in memory, and its restart lost that. The serving Secondary
/// now marks such writes toward the peers the Primary reports outdated and resyncs them online.
#[test]
fn a_detached_primarys_writes_are_passed_on_to_the_peers_it_skips() {
    disk_seed(544, Some(Topology::Three));
}

/// Three diskful nodes: an online resync (of bits a peer held for a node that caught up
/// elsewhere) fetched a block from a Secondary source before the Primary's newer write of it
/// reached that source, while the target had that write already (it arrived before the
/// online resync began, so nothing fenced it): the target took the old data. An online
/// resync now skips the blocks the Primary gave the target whole, as a handshake resync does.
#[test]
fn an_online_resync_skips_blocks_the_primary_gave_the_target() {
    three(5186);
}

/// Three diskful nodes: a second peer's bits joined a resync that was already finishing (its
/// last flush running); it finished without them, "UpToDate" with a block lost in its crash,
/// and later passed that block on. Bits join only a resync that is not finishing.
#[test]
fn a_finishing_resync_takes_no_more_bits() {
    three(5943);
}

/// Three diskful nodes: a Secondary resyncing from the other skipped blocks "already current
/// from the Primary" (received whole over the live link), but that Primary's disk was
/// detached and its next write to those blocks went only to the Secondary serving it. A
/// detached Primary's writes no longer count as fresh.
#[test]
fn a_detached_primarys_blocks_are_not_fresh() {
    disk_seed(201, Some(Topology::Three));
}

/// Three diskful nodes: in a dual-primary window the Primary's disk detached; the other two
/// adopted its new generation while the link between them was down, each recording the other
/// behind at the generation before. One took the write token and wrote alone without a new
/// generation (the other was "already behind"); at the reconnect both were at that generation
/// with bits on both sides, rule `EqualBitsLowerNode` made the other the source, and an
/// acknowledged, flushed write was lost. A Primary now starts a new generation before writing
/// without a peer that may have adopted its current one from the same Primary.
#[test]
fn a_peer_that_adopted_the_same_generation_is_written_without_under_a_new_one() {
    disk_seed(209, Some(Topology::Three));
}

/// Three diskful nodes: a sync target (equal generations, bits on both sides) adopted the
/// detached Primary's new generation before the source's `ResyncBegin` arrived and applied a
/// write the source never got; the resync ran anyway and ended "in sync" at the source's older
/// generation with that block different (found by verify). Such a target now refuses the
/// `ResyncBegin` and compares again.
#[test]
fn a_sync_target_whose_generation_changed_before_the_resync_began_compares_again() {
    disk_seed(444, Some(Topology::Three));
}

/// Three diskful nodes with disk faults: a Primary whose disk was detached lost its links while
/// a write was on its way; one Secondary had it, the other not, the write failed, and the two
/// stayed at one generation with nothing marked (replicas differed after the run). A detached
/// Primary's writes are now kept unsettled on its peers like a diskless Primary's.
#[test]
fn a_detached_primarys_write_that_reached_one_replica_is_marked_for_the_other() {
    disk_seed(102, Some(Topology::Three));
}

/// Every option as it is by default (own flushes, disk faults...), in `topology`;
/// `crash_in_flight` as when the seed was found (it came later).
fn default_seed(seed: u64, topology: Topology, crash_in_flight: bool) {
    let opts = SimOptions {
        topology: Some(topology),
        crash_in_flight,
        ..found()
    };
    must_pass(seed, &opts);
}

/// Three diskful nodes and a witness, with the options `three_diskful_seeds` uses under
/// `SIM_TOPOLOGY=three-witness` (no disk faults), as when these seeds were found (before
/// `crash_in_flight`).
fn three_witness(seed: u64) {
    let opts = SimOptions {
        topology: Some(Topology::ThreePlusWitness),
        disk_faults: false,
        crash_in_flight: false,
        ..found()
    };
    must_pass(seed, &opts);
}

/// Three diskful nodes with disk faults: the Primary's disk was detached and it wrote through
/// the Secondary serving it while the third resynced from that Secondary; the target got those
/// writes through the resync (late marks) but, unlike the writes it applies from the Primary,
/// did not mark them toward the detached disk. The repaired disk resynced from that target
/// alone, came back "UpToDate" with an old block and later passed it on to the replica that
/// had the write (replicas differed after the run). A sync target now marks what the resync
/// writes toward every peer whose disk is detached.
#[test]
fn a_sync_target_marks_resynced_blocks_toward_a_detached_disk() {
    default_seed(4585, Topology::Three, false);
}

/// Two diskful nodes, found once crashes struck with messages in flight: the Primary crashed
/// right after its write reached the Secondary, before that write was on the Secondary's
/// disk; the flush the Secondary made on losing its Primary did not cover it, and a later
/// crash of the Secondary (promoted meanwhile) lost the block. A lost writer's writes that
/// land afterwards are flushed too now.
#[test]
fn a_write_of_a_lost_primary_that_lands_after_the_loss_is_flushed() {
    default_seed(31764, Topology::Two, true);
}

/// Three diskful nodes and a witness: a sync source took a report its target sent before it
/// saw the `ResyncBegin` (still UpToDate) as the end of the resync and confirmed it
/// (`ResyncEnd`) before the target had the data. The target finished after the confirmation
/// and told third nodes Inconsistent for good ("finished, not confirmed yet"), while it
/// decided its own handshakes as UpToDate: with another Secondary both ends chose to be the
/// source, refused each other's `ResyncBegin` and reconnected until the end of the run (no
/// convergence). A source now takes a report as the end only after the target answered a
/// `Ping` sent behind the `ResyncBegin`, and a node decides a handshake on the disk state it
/// reported to that peer. (Failing seeds of 0..500: 48, 112, 195, 206, 207, 390.)
#[test]
fn a_report_from_before_the_resync_began_does_not_end_it() {
    three_witness(390);
}

/// Same cause as `a_report_from_before_the_resync_began_does_not_end_it`, another schedule.
#[test]
fn a_premature_resync_end_does_not_leave_two_sources_48() {
    three_witness(48);
}

/// Same cause as `a_report_from_before_the_resync_began_does_not_end_it`, another schedule.
#[test]
fn a_premature_resync_end_does_not_leave_two_sources_112() {
    three_witness(112);
}

/// Same cause as `a_report_from_before_the_resync_began_does_not_end_it`, another schedule.
#[test]
fn a_premature_resync_end_does_not_leave_two_sources_195() {
    three_witness(195);
}

/// Same cause as `a_report_from_before_the_resync_began_does_not_end_it`, another schedule.
#[test]
fn a_premature_resync_end_does_not_leave_two_sources_206() {
    three_witness(206);
}

/// Same cause as `a_report_from_before_the_resync_began_does_not_end_it`, another schedule.
#[test]
fn a_premature_resync_end_does_not_leave_two_sources_207() {
    three_witness(207);
}

/// Three diskful nodes and a witness, found with the fix above (a node deciding on the disk
/// state it reports): a node whose resync was not confirmed yet decided "no good data" with a
/// peer that, on the node's report from before its resync finished, decided to be its source;
/// the paused link took the `ResyncBegin` silently and both waited until the end of the run.
/// A paused link without a target decision now compares again on a `ResyncBegin`, and the
/// confirmation makes links that found no good data compare again.
#[test]
fn a_link_that_found_no_good_data_does_not_wait_for_a_resync_begin() {
    three_witness(2205);
}

/// Three diskful nodes with disk faults (found with every default option, `crash_in_flight`
/// included): a node became Primary (dual-primary write token) as its disk failed with its
/// metadata writes, and lost from its cache a write the previous Primary had marked toward it.
/// Repaired, it came back at its peers' generation with no bits; rule `EqualBitsLostPrimary`
/// made the peer that knew what it lacked its target and the stale blocks won. Toward the lost
/// Primary itself that rule now needs bits on the Primary's side (unit test
/// `a_lost_primary_back_without_the_writes_we_marked_for_it_is_our_target`).
#[test]
fn a_lost_primary_back_without_the_writes_marked_for_it_is_the_target_1154() {
    default_seed(1154, Topology::Three, true);
}

/// Same cause as `a_lost_primary_back_without_the_writes_marked_for_it_is_the_target_1154`,
/// another schedule.
#[test]
fn a_lost_primary_back_without_the_writes_marked_for_it_is_the_target_1513() {
    default_seed(1513, Topology::Three, true);
}

/// Three diskful nodes with disk faults: a Primary whose disk was detached sent a write to
/// both Secondaries; the link to node 1 broke before it arrived, the Primary completed it
/// with node 2's ack (quorum 2 of 3), then the link to node 2 broke too. Both survivors had
/// unsettled writes of it and bits toward each other, and rule `EqualBitsLowerNode` made
/// node 1, without the write, the source. The survivors now report the last write they
/// received from the Primary they lost (protocol version 9) and the later one is the source
/// (rule `EqualBitsLaterWrites`).
#[test]
fn the_survivor_with_the_later_write_of_a_lost_primary_is_the_source_4896() {
    default_seed(4896, Topology::Three, true);
}

/// Three diskful nodes with disk faults: a Primary whose disk was detached wrote without
/// node 0, which it still took for the target of an online resync (node 0's report that the
/// resync had ended was on its way). It listed node 0 as outdated only in a report after it
/// had declared the write `Settled`; node 1, which applied it, had forgotten it, and node 0
/// later caught up from node 1 without it. A detached Primary now reports a changed list
/// before it settles, and node 1 marks its unsettled writes toward the nodes newly listed.
#[test]
fn a_replica_a_detached_primary_skipped_gets_the_write_from_its_peer_2063() {
    default_seed(2063, Topology::Three, true);
}

/// Three diskful nodes and a witness, found once the end waited for every out-of-sync mark
/// to clear (`SimOptions::strict_end`, now the default): nodes 1 and 2 both resynced from
/// the Primary over links of their own while the link between them stayed established;
/// node 2 marked the Primary's writes toward node 1 (a sync target, not in sync), though
/// node 1 received them too. Node 1 finished first and reported UpToDate while node 2,
/// still a target, could not act on it; nothing looked at those marks again (status kept
/// listing them, a reconnect would have resynced them). A target that finishes now resyncs
/// what it marked for the peers that caught up meanwhile.
#[test]
fn a_target_that_finishes_resyncs_its_marks_for_a_peer_that_caught_up_first_1428() {
    strict_end(1428, Topology::ThreePlusWitness, false);
}

/// Three diskful nodes and a witness: a sync target took the source's `ResyncEnd` (sent on
/// an UpToDate report of another resync into it) before its own last flush; finishing
/// afterwards, it waited for a confirmation that had come already and told every other
/// peer Inconsistent for good, and one of them kept the whole volume marked toward it.
#[test]
fn an_end_confirmed_before_the_target_finished_counts_3792() {
    strict_end(3792, Topology::ThreePlusWitness, false);
}

/// Three diskful nodes with disk faults: a sync target lost the Primary (its disk
/// detached) with writes not settled and marked them toward its source; the resync had
/// walked past them and ended with the marks in place, on a link in sync, for good. Running
/// resyncs now take a lost writer's unsettled blocks in their own direction.
#[test]
fn a_resync_takes_the_unsettled_writes_of_a_primary_lost_meanwhile_4136() {
    strict_end(4136, Topology::Three, true);
}

/// A seed of the suites' options (`three_diskful_seeds` and its variants) whose end waits
/// for every out-of-sync mark to clear (`SimOptions::strict_end`, set here in case the
/// default changes).
fn strict_end(seed: u64, topology: Topology, disk_faults: bool) {
    let opts = SimOptions {
        topology: Some(topology),
        disk_faults,
        strict_end: true,
        ..found()
    };
    must_pass(seed, &opts);
}

/// Three diskful nodes with disk faults, seeds 5000..10000: a Primary with a detached disk
/// started a generation for a write without node 0 (their link had broken) and reported it
/// before the write marked node 0, so its outdated list did not name node 0. Node 2 relayed
/// the generation; node 0 closed that link as "diverged" and heard nothing more before the
/// Primary went down, stayed UpToDate at the older generation and was promoted: split brain
/// with node 2's writes at the next meeting. The list now names the nodes such a Primary
/// recorded as behind.
#[test]
fn a_replica_a_detached_primary_wrote_without_is_outdated_by_the_first_relay_8062() {
    default_seed(8062, Topology::Three, true);
}

/// Three diskful nodes with disk faults (in the dual-primary window), seeds 5000..10000: a
/// write that waited behind an overlapping one started after its node had been cut off from
/// every peer, was written locally under a new generation and failed; the heal found a split
/// brain. A write that starts without quorum fails before it touches the disk now.
#[test]
fn a_write_that_starts_without_quorum_does_not_split_the_brain_5110() {
    default_seed(5110, Topology::Three, true);
}

/// Every default option with slow disks (`SimOptions::slow_disks`, 2026-12-07), in
/// `topology` (None: chosen by the seed); link faults lose their frame as when these were
/// found.
fn slow_seed(seed: u64, topology: Option<Topology>) {
    let opts = SimOptions {
        topology,
        slow_disks: true,
        frame_faults: false,
        ..SimOptions::default()
    };
    must_pass(seed, &opts);
}

/// Slow disks, three diskful with disk faults: node 0 took the dual-primary write token as
/// its disk failed, metadata writes too, and its cache lost writes of node 2 it had
/// acknowledged. Node 1 was promoted while node 0 was down; node 0 came back from metadata
/// that predated its promotion, met node 1 first and was counted in sync (`EqualNoBits`),
/// then marked node 1's writes toward node 2 while that link was down; at their handshake
/// rule `EqualBitsLostPrimary` made node 2, which had marked what node 0 lacked, the target:
/// an acknowledged write was lost on two replicas (the final verify found them different
/// from node 1). A peer that lost a Primary in a promotion that Primary came back without
/// now resyncs it in full (rule `EqualLostPromotion`).
#[test]
fn a_primary_back_without_its_promotion_is_resynced_in_full_2595() {
    slow_seed(2595, Some(Topology::Three));
}

/// Slow disks: a dual-primary token holder asked for the token while a write sat on its
/// slow disk counted the requests its consumer sent meanwhile as in flight and never handed
/// over; both members' requests waited for good.
#[test]
fn a_token_holder_with_a_slow_write_hands_over_34() {
    slow_seed(34, None);
}

/// Slow disks: a Primary with a detached disk sent a write that waited on a replica behind
/// an overlapping one and started after the link was gone; it was not marked toward the
/// Primary, whose repaired disk never got it.
#[test]
fn a_detached_primarys_late_write_is_marked_toward_it_277() {
    slow_seed(277, None);
}

/// Slow disks, on-no-quorum=suspend: a write that waited behind an overlapping one started
/// without quorum, landed locally and started a generation; the others failed over, and
/// the heal found a split brain. Such a write starts no generation now.
#[test]
fn a_held_write_starts_no_generation_286() {
    slow_seed(286, None);
}

#[test]
fn a_held_write_starts_no_generation_1260() {
    slow_seed(1260, Some(Topology::Three));
}

/// Slow disks, three diskful: a partition cut a dual-primary token holder's links one
/// after another; between two of them its queued writes started a generation with the
/// quorum still there and then failed for want of it; the generation of the Primary the
/// others promoted met it as a split brain. A Primary confirms quorum with a ping round trip
/// before a new generation now.
#[test]
fn a_generation_waits_for_a_quorum_confirmation_1782() {
    slow_seed(1782, Some(Topology::Three));
}

#[test]
fn a_generation_waits_for_a_quorum_confirmation_3116() {
    slow_seed(3116, Some(Topology::Three));
}

#[test]
fn a_generation_waits_for_a_quorum_confirmation_4458() {
    slow_seed(4458, Some(Topology::Three));
}

/// Slow disks, three diskful: a Primary with a detached disk wrote without a connected
/// replica that did not serve it; that replica learned it was outdated only at the next
/// tick, and a handshake with the replica that had the write made it that one's source
/// meanwhile: an acknowledged write was overwritten. The outdated list goes out with the
/// write now.
#[test]
fn a_skipped_replica_is_outdated_before_it_can_be_a_source_4548() {
    slow_seed(4548, Some(Topology::Three));
}

/// Three diskful nodes with disk faults (found with the quorum confirmation, which moved
/// the schedules): a dual-primary member that wrote without node 0 left the window; no node
/// relayed its outdated list any more and a majority promoted node 0 (split brain). A
/// Secondary relays the last list it knew from a Primary while none is connected.
#[test]
fn the_outdated_list_outlives_its_primary_3533() {
    default_seed(3533, Topology::Three, true);
}

/// Three diskful nodes with disk faults (found with the quorum confirmation): a detached
/// Primary's last write reached one replica after its links broke, the other replica got it
/// by a resync while the Primary was away and did not mark it toward the Primary's disk,
/// which later resynced from that replica without it.
#[test]
fn a_resync_marks_toward_a_detached_peer_that_is_away_1571() {
    default_seed(1571, Topology::Three, true);
}

/// Slow disks: a Secondary's write of the link before the last break waited behind an
/// overlapping operation on its slow disk and started during the resync that followed the
/// reconnect; it fenced its blocks as current, the resync skipped them, and the newer data
/// of the Primary never came. Only writes of the writer's current link fence now.
#[test]
fn a_write_of_an_earlier_link_does_not_fence_the_resync_5670() {
    slow_seed(5670, None);
}

/// Slow disks, dual-primary window: a write of the token holder waited only for its
/// partner's acknowledgement when a partition cut the partner and then the witness; it
/// completed under the old generation with the witness still counted, and the witness
/// promoted over the partner's stale copy (a stale read). It completes under a new
/// generation now, after a quorum confirmation, or fails.
#[test]
fn a_write_waiting_for_a_lost_peer_needs_a_new_generation_13893() {
    slow_seed(13893, None);
}

/// Every default option (frame faults included) in `topology`, slow disks as given: the
/// options of `three_diskful_disk_fault_seeds` (`SIM_SLOW_DISKS=0` for `slow_disks: false`)
/// when these seeds were found.
fn current_seed(seed: u64, topology: Topology, slow_disks: bool) {
    let opts = SimOptions {
        topology: Some(topology),
        slow_disks,
        ..SimOptions::default()
    };
    must_pass(seed, &opts);
}

/// Three diskful nodes with disk faults (without slow disks, frame faults on), seeds
/// 5000..10000: Primary node 0's disk failed, metadata included; it started a generation at
/// the detach that node 1 adopted (recording node 2 behind) and node 2 never heard of (its
/// links broke first). Node 0 crashed and came back from metadata older than that
/// generation, and node 2 was promoted with node 0's vote at the older generation while node
/// 0 also talked to node 1; node 2 wrote under a generation of its own and met node 1 as a
/// split brain. A voter that knows a replica recording the new Primary behind at the
/// generation it reports does not back it now (and does not relay its outdated list).
#[test]
fn a_voter_does_not_back_a_primary_another_replica_records_behind_5218() {
    current_seed(5218, Topology::Three, false);
}

/// Slow disks, three diskful with disk faults (found before frame faults, with them the
/// schedule passes): a Primary's disk detached and it wrote through its peers under
/// generations its failing metadata never recorded; repaired, it came back from older
/// metadata, UpToDate. Its handshake with node 1, newer but Outdated, found no source
/// (`SourceNotUpToDate`), and node 1's vote made a majority: the stale node was promoted
/// and wrote, a split brain with node 0, which held the writes. A node whose handshake found
/// the peer newer is not promoted now, and that peer does not back it.
#[test]
fn a_node_behind_an_outdated_peer_is_not_promoted_9439() {
    slow_seed(9439, Some(Topology::Three));
}

/// Every default option without disk faults, in `topology`: the options of
/// `three_diskful_seeds` and `three_diskful_and_witness_seeds` when these seeds were found.
fn no_disk_fault_seed(seed: u64, topology: Topology) {
    let opts = SimOptions {
        topology: Some(topology),
        disk_faults: false,
        ..SimOptions::default()
    };
    must_pass(seed, &opts);
}

/// Three diskful nodes, seeds 5000..10000: the isolated Primary node 0 came back, met the new
/// Primary node 1 (not written yet, same generation) and was made its target, and the link
/// dropped before the resync began (node 0's report still said Primary: "two Primaries").
/// Still UpToDate, with bits toward node 2 (its own last write, made alone and never
/// acknowledged), node 0 met node 2 and became its source by `EqualBitsOneSide`: its block
/// replaced the acknowledged write node 2 held, behind node 1's back. A node whose link to
/// an UpToDate Primary drops before the resync that Primary decided began is Outdated now.
#[test]
fn a_target_of_the_primary_cut_off_before_its_resync_is_no_source_8648() {
    no_disk_fault_seed(8648, Topology::Three);
}

/// Three diskful and a witness, seeds 5000..10000: the diskless Primary crashed with two
/// writes (not acknowledged) that reached node 1 only; each replica marked the writes it
/// kept unsettled toward the others and the handshakes resynced the unions by rule
/// `EqualBitsLowerNode`. Node 1 resynced its blocks to node 2, then node 0 resynced its own
/// (older) blocks to node 1; node 2, which now differed from node 0 there, had not marked
/// it (only its source, node 1, had), and replicas 0 and 2 stayed different. A sync source
/// now passes its marks toward third nodes on with the blocks it resyncs.
#[test]
fn a_sync_target_takes_its_sources_marks_toward_third_nodes_9705() {
    no_disk_fault_seed(9705, Topology::ThreePlusWitness);
}

/// Three diskful and a witness (frame faults on: a reordered frame broke link 0-2 right
/// after a promotion): the same as 9705 with crashes of nodes 0 and 2 around a diskless
/// Primary, node 1 resynced block 38 to node 2 and then got node 0's older block 38 by the
/// same rule; node 2 did not know it differed from node 0.
#[test]
fn a_sync_target_takes_its_sources_marks_toward_third_nodes_8960() {
    no_disk_fault_seed(8960, Topology::ThreePlusWitness);
}

/// Three diskful with disk faults and slow disks (the options of
/// `three_diskful_disk_fault_seeds`), seeds 5000..10000: nodes 1 and 2 formed a dual-primary
/// window; node 0 was promoted between node 1's report of a token hand-over (Secondary) and
/// node 2's report of its promotion (Primary): two Primaries with quorum. A window member is
/// Primary to its consumer whatever its report says: promotion next to it is refused. (Since
/// the fix of 9705 the schedule differs and passes without this fix too; unit test
/// `no_promotion_next_to_a_window_member_while_the_token_is_handed_over`.)
#[test]
fn no_promotion_next_to_a_window_member_in_a_hand_over_7674() {
    current_seed(7674, Topology::Three, true);
}
