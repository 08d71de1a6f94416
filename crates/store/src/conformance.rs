//! Conformance suite for [`StateStore`] implementations. Every backend runs the same checks;
//! a failing check panics with a message naming it (this module is test support only).

use crate::{Entry, Expect, StateStore, StoreError, TxnOp};

fn conflict_actual(r: Result<impl std::fmt::Debug, StoreError>, what: &str) -> Option<u64> {
    match r {
        Err(StoreError::Conflict { actual, .. }) => actual,
        other => panic!("{what}: expected a conflict, got {other:?}"),
    }
}

fn keys(entries: &[Entry]) -> Vec<&str> {
    entries.iter().map(|e| e.key.as_str()).collect()
}

/// Runs every check against `store`, which must be new and empty.
pub fn check_all<S: StateStore>(store: &S) {
    basics(store);
    compare_and_swap(store);
    deletes(store);
    prefix_list(store);
    transactions(store);
    values(store);
    concurrent_cas(store);
}

fn basics<S: StateStore>(s: &S) {
    assert_eq!(s.revision().unwrap(), 0, "a new store is at revision 0");
    assert_eq!(s.get("k").unwrap(), None);
    assert!(s.list("").unwrap().is_empty());
    let r1 = s.put("k", b"one", Expect::Any).unwrap();
    assert_eq!(r1, 1, "first write makes revision 1");
    assert_eq!(s.get("k").unwrap(), Some((1, b"one".to_vec())));
    let r2 = s.put("k", b"two", Expect::Any).unwrap();
    assert_eq!(r2, 2);
    assert_eq!(s.get("k").unwrap(), Some((2, b"two".to_vec())));
    let r3 = s.put("other", b"x", Expect::Any).unwrap();
    assert_eq!(r3, 3);
    assert_eq!(
        s.get("k").unwrap().unwrap().0,
        2,
        "writing another key leaves a key's mod revision alone"
    );
    assert_eq!(s.revision().unwrap(), 3);
    s.txn(vec![
        TxnOp::delete("k", Expect::Any),
        TxnOp::delete("other", Expect::Any),
    ])
    .unwrap();
}

fn compare_and_swap<S: StateStore>(s: &S) {
    let base = s.revision().unwrap();
    let r = s.put("cas", b"a", Expect::Absent).unwrap();
    assert_eq!(r, base + 1);
    // Absent on an existing key.
    let actual = conflict_actual(s.put("cas", b"b", Expect::Absent), "put Absent on existing");
    assert_eq!(actual, Some(r));
    assert_eq!(
        s.get("cas").unwrap(),
        Some((r, b"a".to_vec())),
        "a conflict writes nothing"
    );
    assert_eq!(
        s.revision().unwrap(),
        r,
        "a conflict does not bump the revision"
    );
    // Stale revision.
    let r2 = s.put("cas", b"b", Expect::Revision(r)).unwrap();
    let actual = conflict_actual(
        s.put("cas", b"c", Expect::Revision(r)),
        "put stale revision",
    );
    assert_eq!(actual, Some(r2));
    assert_eq!(s.get("cas").unwrap(), Some((r2, b"b".to_vec())));
    // Revision on an absent key.
    let actual = conflict_actual(
        s.put("cas-missing", b"x", Expect::Revision(r2)),
        "put Revision on absent key",
    );
    assert_eq!(actual, None);
    assert_eq!(s.get("cas-missing").unwrap(), None);
    assert_eq!(s.delete("cas", Expect::Any).unwrap(), Some(r2 + 1));
    // The error names the key and both sides.
    let msg = s
        .put("cas-2", b"x", Expect::Revision(7))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("cas-2") && msg.contains("revision 7"), "{msg}");
}

fn deletes<S: StateStore>(s: &S) {
    let base = s.revision().unwrap();
    assert_eq!(s.delete("nothing", Expect::Any).unwrap(), None);
    assert_eq!(s.delete("nothing", Expect::Absent).unwrap(), None);
    assert_eq!(
        s.revision().unwrap(),
        base,
        "deleting nothing is not a write"
    );
    let actual = conflict_actual(
        s.delete("nothing", Expect::Revision(1)),
        "delete Revision of absent",
    );
    assert_eq!(actual, None);
    let r = s.put("del", b"v", Expect::Any).unwrap();
    let actual = conflict_actual(s.delete("del", Expect::Absent), "delete Absent of existing");
    assert_eq!(actual, Some(r));
    let actual = conflict_actual(s.delete("del", Expect::Revision(r + 100)), "delete stale");
    assert_eq!(actual, Some(r));
    assert!(s.get("del").unwrap().is_some());
    assert_eq!(s.delete("del", Expect::Revision(r)).unwrap(), Some(r + 1));
    assert_eq!(s.get("del").unwrap(), None);
    assert_eq!(s.revision().unwrap(), r + 1);
    // Re-created key starts a new history.
    let r3 = s.put("del", b"again", Expect::Absent).unwrap();
    assert_eq!(r3, r + 2);
    s.delete("del", Expect::Any).unwrap();
}

fn prefix_list<S: StateStore>(s: &S) {
    for k in [
        "vol/b",
        "vol/a",
        "vol",
        "vol0",
        "vol/",
        "vom/a",
        "nodes/x",
        "vol/a/sub",
        "völ/x",
    ] {
        s.put(k, k.as_bytes(), Expect::Absent).unwrap();
    }
    let l = s.list("vol/").unwrap();
    assert_eq!(
        keys(&l),
        ["vol/", "vol/a", "vol/a/sub", "vol/b"],
        "sorted, prefix only"
    );
    for e in &l {
        assert_eq!(e.value, e.key.as_bytes());
        assert_eq!(s.get(&e.key).unwrap().unwrap().0, e.revision);
    }
    assert_eq!(
        keys(&s.list("vol").unwrap()),
        ["vol", "vol/", "vol/a", "vol/a/sub", "vol/b", "vol0"]
    );
    assert_eq!(keys(&s.list("vö").unwrap()), ["völ/x"]);
    assert!(s.list("zzz").unwrap().is_empty());
    assert!(s.list("vol/c").unwrap().is_empty());
    assert_eq!(s.list("").unwrap().len(), 9);
    let ops = s
        .list("")
        .unwrap()
        .into_iter()
        .map(|e| TxnOp::delete(e.key, Expect::Revision(e.revision)))
        .collect();
    s.txn(ops).unwrap();
    assert!(s.list("").unwrap().is_empty());
}

fn transactions<S: StateStore>(s: &S) {
    let base = s.revision().unwrap();
    assert_eq!(
        s.txn(vec![]).unwrap(),
        base,
        "empty transaction writes nothing"
    );
    let ra = s.put("t/a", b"a", Expect::Any).unwrap();
    // A failing precondition anywhere aborts everything.
    let err = s.txn(vec![
        TxnOp::put("t/b", b"b".to_vec(), Expect::Absent),
        TxnOp::delete("t/a", Expect::Revision(ra)),
        TxnOp::check("t/c", Expect::Revision(1)),
    ]);
    assert_eq!(conflict_actual(err, "txn with failing check"), None);
    assert_eq!(s.get("t/b").unwrap(), None);
    assert_eq!(s.get("t/a").unwrap(), Some((ra, b"a".to_vec())));
    assert_eq!(s.revision().unwrap(), ra);
    // Check-only transaction.
    assert_eq!(
        s.txn(vec![TxnOp::check("t/a", Expect::Revision(ra))])
            .unwrap(),
        ra
    );
    // Success: one new revision for every write.
    let r = s
        .txn(vec![
            TxnOp::put("t/b", b"b".to_vec(), Expect::Absent),
            TxnOp::put("t/c", b"c".to_vec(), Expect::Any),
            TxnOp::delete("t/a", Expect::Revision(ra)),
            TxnOp::delete("t/none", Expect::Any),
            TxnOp::check("t/zz", Expect::Absent),
        ])
        .unwrap();
    assert_eq!(r, ra + 1);
    assert_eq!(s.revision().unwrap(), r);
    let l = s.list("t/").unwrap();
    assert_eq!(keys(&l), ["t/b", "t/c"]);
    assert!(l.iter().all(|e| e.revision == r));
    // A key twice is refused.
    match s.txn(vec![
        TxnOp::put("t/b", b"1".to_vec(), Expect::Any),
        TxnOp::delete("t/b", Expect::Any),
    ]) {
        Err(StoreError::DuplicateKey(k)) => assert_eq!(k, "t/b"),
        other => panic!("duplicate key: {other:?}"),
    }
    assert_eq!(s.revision().unwrap(), r);
    s.txn(vec![
        TxnOp::delete("t/b", Expect::Any),
        TxnOp::delete("t/c", Expect::Any),
    ])
    .unwrap();
}

fn values<S: StateStore>(s: &S) {
    s.put("v/empty", b"", Expect::Any).unwrap();
    assert_eq!(s.get("v/empty").unwrap().unwrap().1, Vec::<u8>::new());
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    s.put("v/big", &big, Expect::Any).unwrap();
    assert_eq!(s.get("v/big").unwrap().unwrap().1, big);
    let binary = [0u8, 255, 0, 1];
    s.put("", &binary, Expect::Any).unwrap();
    assert_eq!(
        s.get("").unwrap().unwrap().1,
        binary,
        "the empty key is a key"
    );
    s.txn(vec![
        TxnOp::delete("v/empty", Expect::Any),
        TxnOp::delete("v/big", Expect::Any),
        TxnOp::delete("", Expect::Any),
    ])
    .unwrap();
}

/// Several threads increment one counter with read + compare-and-swap + retry: no update may
/// be lost.
fn concurrent_cas<S: StateStore>(s: &S) {
    const THREADS: u64 = 4;
    const EACH: u64 = 25;
    s.put("counter", b"0", Expect::Absent).unwrap();
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| {
                for _ in 0..EACH {
                    loop {
                        let (rev, v) = s.get("counter").unwrap().unwrap();
                        let n: u64 = String::from_utf8(v).unwrap().parse().unwrap();
                        match s.put(
                            "counter",
                            (n + 1).to_string().as_bytes(),
                            Expect::Revision(rev),
                        ) {
                            Ok(_) => break,
                            Err(e) if e.is_conflict() => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            });
        }
    });
    let (_, v) = s.get("counter").unwrap().unwrap();
    assert_eq!(v, (THREADS * EACH).to_string().as_bytes());
    s.delete("counter", Expect::Any).unwrap();
}

/// Persistence: what was committed before the store was dropped is there after reopening,
/// with the same revisions. `open` opens the same underlying storage each time.
pub fn check_persistence<S: StateStore>(open: impl Fn() -> S) {
    let (r_keep, r_total) = {
        let s = open();
        s.put("p/a", b"1", Expect::Absent).unwrap();
        let r_keep = s.put("p/b", b"2", Expect::Absent).unwrap();
        s.put("p/c", b"3", Expect::Absent).unwrap();
        let r_total = s.delete("p/c", Expect::Any).unwrap().unwrap();
        // A failed transaction leaves no trace after reopening either.
        assert!(
            s.txn(vec![
                TxnOp::put("p/d", b"4".to_vec(), Expect::Any),
                TxnOp::check("p/a", Expect::Absent),
            ])
            .is_err()
        );
        (r_keep, r_total)
    };
    let s = open();
    assert_eq!(s.revision().unwrap(), r_total);
    assert_eq!(s.get("p/b").unwrap(), Some((r_keep, b"2".to_vec())));
    assert_eq!(keys(&s.list("p/").unwrap()), ["p/a", "p/b"]);
    let r = s.put("p/b", b"22", Expect::Revision(r_keep)).unwrap();
    assert_eq!(
        r,
        r_total + 1,
        "the revision counter continues after reopening"
    );
}
