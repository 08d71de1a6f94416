//! Duplicated and reordered frames (`SimOptions::frame_faults`): the simulator numbers every
//! frame per link as the wire does (protocol version 10) and checks the numbers with the
//! real `FrameCounter` before a message reaches the engine.

use tandem_sim::{Outcome, SimOptions, run};

fn totals(opts: &SimOptions, seeds: std::ops::Range<u64>) -> Outcome {
    let mut total = Outcome::default();
    for seed in seeds {
        let o = run(seed, opts).unwrap_or_else(|e| panic!("{e}"));
        total.frames_duplicated += o.frames_duplicated;
        total.frames_reordered += o.frames_reordered;
        total.sequence_breaks += o.sequence_breaks;
        total.link_breaks += o.link_breaks;
    }
    total
}

#[test]
fn duplicated_and_reordered_frames_break_the_link_and_nothing_else() {
    let t = totals(&SimOptions::default(), 0..200);
    assert!(t.frames_duplicated > 0 && t.frames_reordered > 0, "{t:?}");
    // Every fault that met a frame behind it (or its own copy) on a live link broke it; a
    // break never comes from anything else (the receiver's counter follows every frame).
    assert!(t.sequence_breaks > 0, "{t:?}");
    assert!(
        t.sequence_breaks <= t.frames_duplicated + t.frames_reordered,
        "{t:?}"
    );
    // Off, every link fault loses its frame: nothing is duplicated, reordered or refused.
    let off = SimOptions {
        frame_faults: false,
        ..SimOptions::default()
    };
    let t = totals(&off, 0..50);
    assert!(t.link_breaks > 0, "{t:?}");
    assert_eq!(
        (t.frames_duplicated, t.frames_reordered, t.sequence_breaks),
        (0, 0, 0)
    );
}
