//! Codec and handshake tests: round trips of every message, chunked decoding, corruption,
//! random input, handshake happy path, every refusal, replays.

use bytes::Bytes;
use proptest::prelude::*;
use proptest::strategy::Union;

use crate::frame::{KNOWN_FRAME_FLAGS, write_header};
use crate::message::{MAX_NODE_ID, oos_flags, resync_flags, state_flags, write_flags};
use crate::*;

// ---------- strategies ----------

fn id() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,40}"
}

fn detail() -> impl Strategy<Value = String> {
    "\\PC{0,60}"
}

fn node() -> impl Strategy<Value = NodeId> {
    0..=MAX_NODE_ID
}

fn data(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 1..max).prop_map(Bytes::from)
}

fn status() -> impl Strategy<Value = Status> {
    proptest::sample::select(Status::ALL)
}

fn failed_status() -> impl Strategy<Value = Status> {
    proptest::sample::select(&Status::ALL[1..])
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..(1 << 40), 0u64..u64::MAX / 2]
}

fn block_size() -> impl Strategy<Value = u32> {
    (0u32..=11).prop_map(|s| 512 << s)
}

fn versions() -> impl Strategy<Value = (u16, u16)> {
    (1u16..100, 0u16..100).prop_map(|(a, b)| (a, a.saturating_add(b)))
}

fn state_report() -> impl Strategy<Value = StateReport> {
    (
        (any::<u64>(), node(), proptest::sample::select(Role::ALL)),
        proptest::sample::select(DiskState::ALL),
        (any::<bool>(), 0u8..=32, any::<u8>()),
        (0..=state_flags::ALL, any::<u64>()),
        any::<[u64; 4]>(),
        proptest::collection::vec((node(), any::<u64>()), 0..=31),
        (
            any::<u32>(),
            any::<u64>(),
            node(),
            any::<u64>(),
            proptest::option::of((node(), any::<u64>(), any::<u64>())),
        ),
    )
        .prop_map(
            |(
                (seq, node_id, role),
                disk_state,
                (hq, voters, r),
                (flags, size),
                g,
                peers,
                (outdated, outdated_gen, outdated_by, primary_epoch, lost),
            )| {
                StateReport {
                    seq,
                    node_id,
                    role,
                    disk_state,
                    quorum: QuorumInfo {
                        has_quorum: hq,
                        voters,
                        reachable: r % (voters + 1),
                    },
                    flags,
                    size_bytes: size,
                    generations: Generations {
                        current: g[0],
                        bitmap: g[1],
                        history: [g[2], g[3]],
                    },
                    outdated,
                    outdated_gen,
                    outdated_by,
                    primary_epoch,
                    lost_writer: lost.map(|(node, epoch, seq)| LostWriter { node, epoch, seq }),
                    peer_bitmaps: peers
                        .into_iter()
                        .map(|(node, generation)| PeerBitmap { node, generation })
                        .collect(),
                }
            },
        )
}

fn arb_message() -> impl Strategy<Value = Message> {
    let arms: Vec<BoxedStrategy<Message>> = vec![
        (
            versions(),
            node(),
            1..=MAX_NODE_ID,
            any::<Nonce>(),
            id(),
            id(),
            id(),
        )
            .prop_map(|((min, max), from, d, nonce, c, v, u)| {
                Message::Hello(Box::new(Hello {
                    min_version: min,
                    max_version: max,
                    from_node: from,
                    to_node: (from + d) % (MAX_NODE_ID + 1),
                    nonce,
                    cluster_id: c,
                    volume_name: v,
                    volume_uuid: u,
                }))
            })
            .boxed(),
        (versions(), any::<u16>(), any::<Nonce>())
            .prop_map(|((min, max), pick, nonce)| Message::Challenge {
                min_version: min,
                max_version: max,
                version: min + pick % (max - min + 1),
                nonce,
            })
            .boxed(),
        any::<[u8; 32]>()
            .prop_map(|mac| Message::Auth { mac })
            .boxed(),
        any::<[u8; 32]>()
            .prop_map(|mac| Message::Welcome { mac })
            .boxed(),
        (
            proptest::sample::select(RefuseReason::ALL),
            versions(),
            detail(),
        )
            .prop_map(|(reason, (min, max), detail)| Message::Refused {
                reason,
                min_version: min,
                max_version: max,
                detail,
            })
            .boxed(),
        any::<u64>()
            .prop_map(|token| Message::Ping { token })
            .boxed(),
        any::<u64>()
            .prop_map(|token| Message::Pong { token })
            .boxed(),
        (proptest::sample::select(DisconnectReason::ALL), detail())
            .prop_map(|(reason, detail)| Message::Disconnect { reason, detail })
            .boxed(),
        state_report()
            .prop_map(|s| Message::StateReport(Box::new(s)))
            .boxed(),
        (any::<u64>(), offset(), any::<bool>(), data(8192))
            .prop_map(|(seq, offset, fua, data)| Message::Write {
                seq,
                offset,
                flags: if fua { write_flags::FUA } else { 0 },
                data,
            })
            .boxed(),
        (any::<u64>(), status())
            .prop_map(|(seq, status)| Message::WriteAck { seq, status })
            .boxed(),
        (any::<u64>(), offset(), 1u64..1 << 50, 0..=write_flags::FUA)
            .prop_map(|(seq, offset, len, flags)| Message::Trim {
                seq,
                offset,
                len,
                flags,
            })
            .boxed(),
        (any::<u64>(), offset(), 1u64..1 << 50, 0..=3u32)
            .prop_map(|(seq, offset, len, flags)| Message::WriteZeroes {
                seq,
                offset,
                len,
                flags,
            })
            .boxed(),
        any::<u64>().prop_map(|seq| Message::Flush { seq }).boxed(),
        any::<u64>()
            .prop_map(|seq| Message::Settled { seq })
            .boxed(),
        any::<u64>()
            .prop_map(|handoffs| Message::TokenRequest { handoffs })
            .boxed(),
        any::<u64>()
            .prop_map(|handoffs| Message::TokenGrant { handoffs })
            .boxed(),
        (any::<u64>(), status())
            .prop_map(|(seq, status)| Message::FlushAck { seq, status })
            .boxed(),
        (any::<u64>(), offset(), 1..=MAX_DATA as u32)
            .prop_map(|(seq, offset, len)| Message::ReadRequest { seq, offset, len })
            .boxed(),
        prop_oneof![
            (any::<u64>(), data(4096)).prop_map(|(seq, data)| Message::ReadReply {
                seq,
                status: Status::Ok,
                data
            }),
            (any::<u64>(), status()).prop_map(|(seq, status)| Message::ReadReply {
                seq,
                status,
                data: Bytes::new()
            }),
        ]
        .boxed(),
        (any::<u64>(), any::<u64>())
            .prop_map(|(generation, bytes)| Message::ResyncBegin { generation, bytes })
            .boxed(),
        (any::<u64>(), status())
            .prop_map(|(generation, status)| Message::ResyncEnd { generation, status })
            .boxed(),
        (any::<u64>(), offset(), 1..=MAX_DATA as u32)
            .prop_map(|(id, offset, len)| Message::ResyncRequest { id, offset, len })
            .boxed(),
        prop_oneof![
            (any::<u64>(), offset(), data(8192)).prop_map(|(id, offset, data)| {
                Message::ResyncData {
                    id,
                    offset,
                    status: Status::Ok,
                    flags: 0,
                    len: data.len() as u32,
                    data,
                }
            }),
            (any::<u64>(), offset(), 1..=MAX_DATA as u32).prop_map(|(id, offset, len)| {
                Message::ResyncData {
                    id,
                    offset,
                    status: Status::Ok,
                    flags: resync_flags::ZERO,
                    len,
                    data: Bytes::new(),
                }
            }),
            (any::<u64>(), offset(), 1..=MAX_DATA as u32, failed_status()).prop_map(
                |(id, offset, len, status)| Message::ResyncData {
                    id,
                    offset,
                    status,
                    flags: 0,
                    len,
                    data: Bytes::new(),
                }
            ),
        ]
        .boxed(),
        (
            any::<u64>(),
            offset(),
            1..=message::MAX_CHECKSUM_SPAN,
            block_size(),
            proptest::sample::select(ChecksumPurpose::ALL),
        )
            .prop_map(
                |(id, offset, len, block_size, purpose)| Message::ChecksumRequest {
                    id,
                    offset,
                    len,
                    block_size,
                    alg: ChecksumAlg::Blake3,
                    purpose,
                },
            )
            .boxed(),
        prop_oneof![
            (
                any::<u64>(),
                offset(),
                block_size(),
                proptest::collection::vec(any::<Digest>(), 0..40)
            )
                .prop_map(|(id, offset, block_size, digests)| {
                    Message::ChecksumReply {
                        id,
                        offset,
                        block_size,
                        alg: ChecksumAlg::Blake3,
                        status: Status::Ok,
                        digests,
                    }
                }),
            (any::<u64>(), offset(), block_size(), failed_status()).prop_map(
                |(id, offset, block_size, status)| Message::ChecksumReply {
                    id,
                    offset,
                    block_size,
                    alg: ChecksumAlg::Blake3,
                    status,
                    digests: vec![],
                }
            ),
        ]
        .boxed(),
        (
            0..=oos_flags::END_OF_BITMAP,
            proptest::collection::vec((offset(), 1u64..1 << 40), 0..50),
        )
            .prop_map(|(flags, r)| Message::OutOfSync {
                flags,
                ranges: r
                    .into_iter()
                    .map(|(offset, len)| ByteRange { offset, len })
                    .collect(),
            })
            .boxed(),
    ];
    Union::new(arms)
}

fn encode_all(msgs: &[Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        encode(m, &mut out).unwrap();
    }
    out
}

fn decode_all(bytes: &[u8], chunks: &[usize]) -> Result<Vec<Frame>, DecodeError> {
    let mut d = Decoder::new();
    let mut frames = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < bytes.len() {
        let n = if chunks.is_empty() {
            bytes.len()
        } else {
            chunks[i % chunks.len()].max(1)
        };
        i += 1;
        let end = (pos + n).min(bytes.len());
        d.feed(&bytes[pos..end]);
        pos = end;
        while let Some(f) = d.next_frame()? {
            frames.push(f);
        }
    }
    assert_eq!(d.buffered(), 0, "bytes left over");
    Ok(frames)
}

/// A frame with valid checksums around arbitrary header fields and payload.
fn raw_frame(version: u16, code: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let ty = MessageType::from_code(code).unwrap_or(MessageType::Ping);
    write_header(&mut out, version, ty, flags, &[payload]);
    // Patch the type (possibly unknown) and recompute both checksums.
    out[6..8].copy_from_slice(&code.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[0..16]), payload);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&out[0..20]);
    out[20..24].copy_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

// ---------- codec ----------

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(msg in arb_message()) {
        let mut whole = Vec::new();
        Encoder::default().encode(&msg, &mut whole).unwrap();
        // Vectored encoding produces the same bytes.
        let mut head = Vec::new();
        let tail = Encoder::default().encode_vectored(&msg, &mut head).unwrap();
        if let Some(t) = tail {
            head.extend_from_slice(&t);
        }
        prop_assert_eq!(&head, &whole);

        let frames = decode_all(&whole, &[]).unwrap();
        prop_assert_eq!(frames.len(), 1);
        let f = &frames[0];
        prop_assert_eq!(f.ty, msg.message_type());
        prop_assert_eq!(f.version, if f.ty.is_handshake() { 0 } else { ProtocolVersion::LATEST.number() });
        prop_assert_eq!(f.payload.len() + HEADER_LEN, whole.len());
        prop_assert_eq!(f.message().unwrap(), msg);
    }

    #[test]
    fn chunked_decoding_gives_identical_frames(
        msgs in proptest::collection::vec(arb_message(), 1..8),
        chunks in proptest::collection::vec(1usize..300, 1..20),
    ) {
        let bytes = encode_all(&msgs);
        let at_once = decode_all(&bytes, &[]).unwrap();
        let chunked = decode_all(&bytes, &chunks).unwrap();
        prop_assert_eq!(&at_once, &chunked);
        let decoded: Vec<Message> = chunked.iter().map(|f| f.message().unwrap()).collect();
        prop_assert_eq!(decoded, msgs);
    }

    #[test]
    fn corrupting_any_byte_is_detected(msg in arb_message(), pos in any::<prop::sample::Index>(), x in 1u8..=255) {
        let mut bytes = Vec::new();
        encode(&msg, &mut bytes).unwrap();
        let i = pos.index(bytes.len());
        bytes[i] ^= x;
        let mut d = Decoder::new();
        d.feed(&bytes);
        let r = d.next_frame();
        prop_assert!(r.is_err(), "byte {} xor {:#x} not detected: {:?}", i, x, r);
        // Sticky: the stream is out of step from now on.
        prop_assert!(d.next_frame().is_err());
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
        let mut d = Decoder::new();
        if magic {
            d.feed(&MAGIC);
        }
        d.feed(&bytes);
        for _ in 0..4 {
            if let Ok(Some(f)) = d.next_frame() {
                let _ = f.message();
            }
        }
    }

    /// Well-framed garbage reaches every message parser.
    #[test]
    fn random_payloads_never_panic(
        code in prop_oneof![proptest::sample::select(MessageType::ALL).prop_map(|t| t.code()), any::<u16>()],
        version in prop_oneof![Just(0u16), Just(1u16), any::<u16>()],
        flags in prop_oneof![Just(0u32), any::<u32>()],
        payload in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let bytes = raw_frame(version, code, flags, &payload);
        let mut d = Decoder::new();
        d.feed(&bytes);
        match d.next_frame() {
            Ok(Some(f)) => {
                prop_assert_eq!(f.payload.len(), payload.len());
                if let Ok(m) = f.message() {
                    // Whatever decodes re-encodes to the same bytes (in its frame's version).
                    let mut again = Vec::new();
                    let v = ProtocolVersion::from_number(f.version).unwrap_or(ProtocolVersion::LATEST);
                    Encoder::new(v).encode(&m, &mut again).unwrap();
                    prop_assert_eq!(again, bytes);
                }
            }
            Ok(None) => prop_assert!(false, "complete frame not returned"),
            Err(_) => {}
        }
    }
}

proptest! {
    // Fuzz-style: mutate valid streams (flips, insertions, deletions, truncation) and decode
    // them in random chunks. Nothing may panic; whatever decodes must be a valid message.
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_mutated_streams(
        msgs in proptest::collection::vec(arb_message(), 1..4),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<u8>()), 0..4),
        chunks in proptest::collection::vec(1usize..200, 1..6),
    ) {
        let mut bytes = encode_all(&msgs);
        for (pos, op, b) in edits {
            if bytes.is_empty() { break; }
            let i = pos.index(bytes.len());
            match op {
                0 => bytes[i] ^= b | 1,
                1 => bytes.insert(i, b),
                2 => { bytes.remove(i); }
                _ => bytes.truncate(i),
            }
        }
        let mut d = Decoder::new();
        for c in bytes.chunks(chunks[0]) {
            d.feed(c);
            while let Ok(Some(m)) = d.next_message() {
                prop_assert!(m.validate().is_ok());
            }
        }
    }
}

/// The frames of `msgs` as a version-10 link sends them, numbered from 1 (one buffer each).
fn numbered(msgs: &[Message]) -> Vec<Vec<u8>> {
    let enc = Encoder::new(ProtocolVersion::V10);
    let mut counter = FrameCounter::new();
    msgs.iter()
        .map(|m| {
            let mut b = Vec::new();
            enc.encode_seq(m, counter.take(), &mut b).unwrap();
            b
        })
        .collect()
}

/// Decodes `frames` (fed in this order) on an established link of `version`: the messages
/// decoded, then the error that ended the stream, if any.
fn receive(version: ProtocolVersion, frames: &[Vec<u8>]) -> (Vec<Message>, Option<DecodeError>) {
    let mut d = Decoder::new();
    d.set_version(version);
    let mut got = Vec::new();
    for f in frames {
        d.feed(f);
        loop {
            match d.next_message() {
                Ok(Some(m)) => got.push(m),
                Ok(None) => break,
                Err(e) => return (got, Some(e)),
            }
        }
    }
    (got, None)
}

fn ping(token: u64) -> Message {
    Message::Ping { token }
}

#[test]
fn frames_are_numbered_from_version_10() {
    let msgs: Vec<Message> = (0..5).map(ping).collect();
    let frames = numbered(&msgs);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f[8..12], (i as u32 + 1).to_le_bytes(), "frame {i}");
    }
    let mut d = Decoder::new();
    d.set_version(ProtocolVersion::V10);
    for (i, f) in frames.iter().enumerate() {
        d.feed(f);
        let frame = d.next_frame().unwrap().unwrap();
        assert_eq!((frame.seq, frame.flags), (i as u32 + 1, 0));
    }
    // Handshake frames and older links carry 0 whatever number the sender passes.
    let mut b = Vec::new();
    Encoder::new(ProtocolVersion::V9)
        .encode_seq(&ping(1), 7, &mut b)
        .unwrap();
    assert_eq!(b[8..12], [0; 4]);
    let (got, err) = receive(ProtocolVersion::V9, &[b.clone(), b]);
    assert_eq!((got.len(), err), (2, None), "version 9 does not number");
    let (_, hello) = Initiator::new(icfg(), [1; 32]).unwrap();
    let mut b = Vec::new();
    Encoder::new(ProtocolVersion::V10)
        .encode_seq(&hello, 7, &mut b)
        .unwrap();
    assert_eq!(b[8..12], [0; 4]);
}

#[test]
fn a_duplicated_lost_or_reordered_frame_breaks_the_stream() {
    let msgs: Vec<Message> = (0..4).map(ping).collect();
    let f = numbered(&msgs);
    let seq_err = |expected, found| DecodeError::Sequence {
        ty: MessageType::Ping,
        expected,
        found,
    };
    // In order: everything arrives.
    assert_eq!(receive(ProtocolVersion::V10, &f), (msgs.clone(), None));
    // Frame 2 twice in a row.
    let dup = [f[0].clone(), f[1].clone(), f[1].clone(), f[2].clone()];
    assert_eq!(
        receive(ProtocolVersion::V10, &dup),
        (msgs[..2].to_vec(), Some(seq_err(3, 2)))
    );
    // Frame 1 again later.
    let late = [f[0].clone(), f[1].clone(), f[0].clone()];
    assert_eq!(
        receive(ProtocolVersion::V10, &late),
        (msgs[..2].to_vec(), Some(seq_err(3, 1)))
    );
    // Frames 2 and 3 swapped; frame 2 lost.
    let swapped = [f[0].clone(), f[2].clone(), f[1].clone()];
    assert_eq!(
        receive(ProtocolVersion::V10, &swapped),
        (msgs[..1].to_vec(), Some(seq_err(2, 3)))
    );
    let lost = [f[0].clone(), f[2].clone()];
    assert_eq!(
        receive(ProtocolVersion::V10, &lost),
        (msgs[..1].to_vec(), Some(seq_err(2, 3)))
    );
    // Unnumbered frames (a version-9 sender, or a sender that forgot) on a version-10 link.
    let mut b = Vec::new();
    encode(&ping(0), &mut b).unwrap();
    assert_eq!(
        receive(ProtocolVersion::V10, &[b]),
        (vec![], Some(seq_err(1, 0)))
    );
    // A version-9 decoder refuses a numbered frame as unknown flags.
    assert_eq!(
        receive(ProtocolVersion::V9, &f[1..2]),
        (vec![], Some(DecodeError::UnknownFlags { flags: 2 }))
    );
    // The error is sticky and names the frame.
    let mut d = Decoder::new();
    d.set_version(ProtocolVersion::V10);
    d.feed(&f[1]);
    let e = d.next_frame().unwrap_err();
    assert_eq!(
        e.to_string(),
        "Ping frame numbered 2 where frame 1 was due: a frame was duplicated, lost or \
         reordered on the link"
    );
    d.feed(&f[0]);
    assert_eq!(d.next_frame(), Err(e));
}

#[test]
fn frame_numbers_wrap() {
    let mut c = FrameCounter::new();
    assert_eq!((c.peek(), c.take(), c.peek()), (1, 1, 2));
    assert_eq!(c.take_many(u32::MAX - 2), 2);
    assert_eq!(c.take(), u32::MAX);
    assert_eq!(c.take(), 0);
    let mut r = FrameCounter::new();
    r.take_many(u32::MAX - 1);
    assert_eq!(r.check(MessageType::Ping, u32::MAX), Ok(()));
    assert_eq!(r.check(MessageType::Ping, 0), Ok(()));
    assert_eq!(r.check(MessageType::Ping, 1), Ok(()));
    assert!(r.check(MessageType::Ping, 1).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// On a version-10 link, a stream in which one frame is repeated somewhere later, or in
    /// which two frames swapped places, delivers exactly the frames before the fault and then
    /// stops with `Sequence`: nothing out of order reaches the receiver.
    #[test]
    fn numbered_streams_refuse_any_duplicate_or_swap(
        msgs in proptest::collection::vec(arb_message(), 2..12),
        a in any::<prop::sample::Index>(),
        b in any::<prop::sample::Index>(),
        swap in any::<bool>(),
    ) {
        let msgs: Vec<Message> = msgs
            .into_iter()
            .filter(|m| !m.message_type().is_handshake())
            .collect();
        prop_assume!(msgs.len() >= 2);
        let mut frames = numbered(&msgs);
        let (i, j) = (a.index(msgs.len()), b.index(msgs.len()));
        prop_assume!(i != j);
        let (lo, hi) = (i.min(j), i.max(j));
        let first_bad = if swap {
            frames.swap(lo, hi);
            lo
        } else {
            // Frame `lo` arrives again in place of frame `hi`'s turn.
            frames.insert(hi, frames[lo].clone());
            hi
        };
        let (got, err) = receive(ProtocolVersion::V10, &frames);
        prop_assert_eq!(&got[..], &msgs[..first_bad]);
        let is_sequence_error = matches!(err, Some(DecodeError::Sequence { .. }));
        prop_assert!(is_sequence_error, "{:?}", err);
    }
}

fn one_of_each() -> Vec<Message> {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strat = arb_message();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..5000 {
        let m = strat.new_tree(&mut runner).unwrap().current();
        seen.entry(m.message_type().code()).or_insert(m);
    }
    seen.into_values().collect()
}

#[test]
fn strategy_covers_every_message_type() {
    let msgs = one_of_each();
    let types: Vec<MessageType> = msgs.iter().map(|m| m.message_type()).collect();
    assert_eq!(types, MessageType::ALL);
}

#[test]
fn bulk_data_is_not_copied_by_the_decoder() {
    let data = Bytes::from(vec![7u8; 64 * 1024]);
    let msg = Message::Write {
        seq: 1,
        offset: 4096,
        flags: write_flags::FUA,
        data: data.clone(),
    };
    let mut bytes = Vec::new();
    encode(&msg, &mut bytes).unwrap();
    let mut d = Decoder::new();
    d.feed(&bytes);
    let f = d.next_frame().unwrap().unwrap();
    let Message::Write { data: got, .. } = f.message().unwrap() else {
        panic!("not a write")
    };
    assert_eq!(got, data);
    let p = f.payload.as_ptr() as usize;
    let g = got.as_ptr() as usize;
    assert!(
        g > p && g + got.len() == p + f.payload.len(),
        "data is not a slice of the frame"
    );
}

#[test]
fn typed_header_errors() {
    // Bad magic, reported before a whole header arrived.
    let mut d = Decoder::new();
    d.feed(b"GET / HTTP/1.1\r\n");
    assert!(matches!(d.next_frame(), Err(DecodeError::BadMagic { found }) if &found == b"GET "));
    let mut d = Decoder::new();
    d.feed(b"TX");
    assert!(matches!(d.next_frame(), Err(DecodeError::BadMagic { .. })));
    let mut d = Decoder::new();
    d.feed(b"TD");
    assert_eq!(d.next_frame(), Ok(None));

    // Unknown type.
    let mut d = Decoder::new();
    d.feed(&raw_frame(1, 0x7777, 0, &[]));
    assert_eq!(
        d.next_frame(),
        Err(DecodeError::UnknownType { code: 0x7777 })
    );

    // Unknown frame flags.
    let mut d = Decoder::new();
    d.feed(&raw_frame(1, MessageType::Ping.code(), 4, &[0; 8]));
    assert_eq!(d.next_frame(), Err(DecodeError::UnknownFlags { flags: 4 }));
    assert_eq!(KNOWN_FRAME_FLAGS, 0);

    // Oversized: refused from the header alone, without waiting for the payload.
    let mut hdr = raw_frame(1, MessageType::Write.code(), 0, &[]);
    hdr[12..16].copy_from_slice(&((MAX_PAYLOAD as u32) + 1).to_le_bytes());
    let hcrc = crc32c::crc32c(&hdr[0..20]);
    hdr[20..24].copy_from_slice(&hcrc.to_le_bytes());
    let mut d = Decoder::new();
    d.feed(&hdr);
    assert!(matches!(d.next_frame(), Err(DecodeError::Oversized { .. })));
    // A lower limit of the caller's choice.
    let mut d = Decoder::with_max_payload(16);
    d.feed(&raw_frame(1, MessageType::Ping.code(), 0, &[0; 17]));
    assert_eq!(
        d.next_frame(),
        Err(DecodeError::Oversized { len: 17, max: 16 })
    );

    // The handshake limit holds the largest handshake messages, and can be lifted afterwards.
    let biggest = [
        Message::Refused {
            reason: RefuseReason::ProtocolError,
            min_version: 1,
            max_version: 1,
            detail: "\u{10348}".repeat(256),
        },
        Message::Hello(Box::new(Hello {
            min_version: 1,
            max_version: 1,
            from_node: 0,
            to_node: 1,
            nonce: [0; 32],
            cluster_id: "c".repeat(255),
            volume_name: "v".repeat(255),
            volume_uuid: "u".repeat(255),
        })),
    ];
    let mut d = Decoder::with_max_payload(MAX_HANDSHAKE_PAYLOAD);
    for m in &biggest {
        let mut b = Vec::new();
        encode(m, &mut b).unwrap();
        d.feed(&b);
        assert_eq!(d.next_message().unwrap().as_ref(), Some(m));
    }
    let big = Message::Write {
        seq: 1,
        offset: 0,
        flags: 0,
        data: Bytes::from(vec![0; 4096]),
    };
    let mut b = Vec::new();
    encode(&big, &mut b).unwrap();
    d.set_max_payload(MAX_PAYLOAD);
    d.feed(&b);
    assert_eq!(d.next_message().unwrap(), Some(big));

    // Versions: unknown, handshake not 0, not the negotiated one.
    let mut d = Decoder::new();
    d.feed(&raw_frame(11, MessageType::Ping.code(), 0, &[0; 8]));
    assert_eq!(
        d.next_frame(),
        Err(DecodeError::UnsupportedVersion { found: 11 })
    );
    let mut d = Decoder::new();
    d.feed(&raw_frame(1, MessageType::Auth.code(), 0, &[0; 32]));
    assert!(matches!(
        d.next_frame(),
        Err(DecodeError::WrongVersion { expected: 0, .. })
    ));
    let mut d = Decoder::new();
    d.set_version(ProtocolVersion::V1);
    d.feed(&raw_frame(0, MessageType::Ping.code(), 0, &[0; 8]));
    assert!(matches!(
        d.next_frame(),
        Err(DecodeError::UnsupportedVersion { found: 0 })
    ));

    // Frame checksum.
    let mut bytes = Vec::new();
    encode(&Message::Ping { token: 5 }, &mut bytes).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    let mut d = Decoder::new();
    d.feed(&bytes);
    assert!(matches!(
        d.next_frame(),
        Err(DecodeError::FrameChecksum {
            ty: MessageType::Ping,
            ..
        })
    ));
    // Header checksum: a corrupted length is caught without waiting for the payload.
    let mut bytes = Vec::new();
    encode(&Message::Ping { token: 5 }, &mut bytes).unwrap();
    bytes[13] ^= 1;
    let mut d = Decoder::new();
    d.feed(&bytes[..HEADER_LEN]);
    assert!(matches!(
        d.next_frame(),
        Err(DecodeError::HeaderChecksum { .. })
    ));
}

#[test]
fn typed_payload_errors() {
    let ping =
        |payload: &[u8]| Message::decode(MessageType::Ping, 1, Bytes::copy_from_slice(payload));
    assert_eq!(
        ping(&[0; 7]),
        Err(DecodeError::Truncated {
            ty: MessageType::Ping
        })
    );
    assert_eq!(
        ping(&[0; 9]),
        Err(DecodeError::TrailingBytes {
            ty: MessageType::Ping,
            extra: 1
        })
    );
    // Unknown enum code.
    let mut p = 5u64.to_le_bytes().to_vec();
    p.push(200);
    assert!(matches!(
        Message::decode(MessageType::WriteAck, 1, Bytes::from(p)),
        Err(DecodeError::Invalid {
            ty: MessageType::WriteAck,
            ..
        })
    ));
    // A write past the end of the address space.
    let mut p = Vec::new();
    p.extend_from_slice(&1u64.to_le_bytes());
    p.extend_from_slice(&(u64::MAX - 1).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&[1, 2, 3]);
    assert!(matches!(
        Message::decode(MessageType::Write, 1, Bytes::from(p)),
        Err(DecodeError::Invalid { .. })
    ));
    // A huge element count does not allocate or panic.
    let mut p = Vec::new();
    p.extend_from_slice(&0u32.to_le_bytes());
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        Message::decode(MessageType::OutOfSync, 1, Bytes::from(p)),
        Err(DecodeError::Truncated {
            ty: MessageType::OutOfSync
        })
    );
}

#[test]
fn encoder_refuses_invalid_messages() {
    let e = encode(
        &Message::Write {
            seq: 1,
            offset: 0,
            flags: 0x80,
            data: Bytes::from_static(b"x"),
        },
        &mut Vec::new(),
    );
    assert!(matches!(
        e,
        Err(EncodeError::Invalid {
            ty: MessageType::Write,
            ..
        })
    ));
    let e = encode(
        &Message::Write {
            seq: 1,
            offset: 0,
            flags: 0,
            data: Bytes::from(vec![0; MAX_DATA + 1]),
        },
        &mut Vec::new(),
    );
    assert!(e.is_err());
    let e = encode(
        &Message::Disconnect {
            reason: DisconnectReason::Other,
            detail: "x".repeat(2000),
        },
        &mut Vec::new(),
    );
    assert!(e.is_err());
    // The largest data block fits.
    let mut out = Vec::new();
    encode(
        &Message::Write {
            seq: 1,
            offset: 0,
            flags: 0,
            data: Bytes::from(vec![1; MAX_DATA]),
        },
        &mut out,
    )
    .unwrap();
    assert!(out.len() <= MAX_FRAME);
    let mut d = Decoder::new();
    d.feed(&out);
    assert!(d.next_message().unwrap().is_some());
}

#[test]
fn blake3_block_digests() {
    let a = ChecksumAlg::Blake3.digest(&[0u8; 4096]);
    let mut block = [0u8; 4096];
    block[4095] = 1;
    assert_ne!(a, ChecksumAlg::Blake3.digest(&block));
    assert_eq!(a, ChecksumAlg::Blake3.digest(&[0u8; 4096]));
    // Known answer: BLAKE3 of the empty input.
    assert_eq!(
        ChecksumAlg::Blake3.digest(&[])[..4],
        [0xaf, 0x13, 0x49, 0xb9]
    );
}

// ---------- handshake ----------

const SECRET: &[u8] = b"correct horse battery staple";

fn secret() -> ClusterSecret {
    ClusterSecret::new(SECRET).unwrap()
}

fn icfg() -> InitiatorConfig {
    InitiatorConfig {
        cluster_id: "c1".into(),
        volume_name: "vm-disk".into(),
        volume_uuid: "7f0c7a0e-1111-4222-8333-944455556666".into(),
        local_node: 1,
        peer_node: 2,
        versions: VersionRange::SUPPORTED,
        secret: secret(),
    }
}

fn acfg() -> AcceptorConfig {
    AcceptorConfig {
        cluster_id: "c1".into(),
        versions: VersionRange::SUPPORTED,
        secret: secret(),
    }
}

fn volumes() -> Vec<LocalVolume> {
    vec![
        LocalVolume {
            volume_name: "other".into(),
            volume_uuid: "u-other".into(),
            local_node: 0,
            peers: vec![1],
        },
        LocalVolume {
            volume_name: "vm-disk".into(),
            volume_uuid: "7f0c7a0e-1111-4222-8333-944455556666".into(),
            local_node: 2,
            peers: vec![0, 1],
        },
    ]
}

/// Sends a message through the real encoder and decoder, as a link would.
fn wire(m: Message) -> Message {
    let mut b = Vec::new();
    encode(&m, &mut b).unwrap();
    let mut d = Decoder::new();
    d.feed(&b);
    d.next_message().unwrap().unwrap()
}

/// Runs a handshake to the end; returns both results and every message sent, in order.
fn run(
    icfg: InitiatorConfig,
    acfg: AcceptorConfig,
    vols: Vec<LocalVolume>,
    ni: Nonce,
    na: Nonce,
) -> (
    Result<Established, HandshakeFailure>,
    Result<Established, HandshakeFailure>,
    Vec<Message>,
) {
    let (mut ini, hello) = Initiator::new(icfg, ni).unwrap();
    let mut acc = Acceptor::new(acfg, vols, na).unwrap();
    let mut log = vec![hello.clone()];
    let mut to_acceptor = Some(hello);
    let mut i_res = None;
    let mut a_res = None;
    for _ in 0..8 {
        let Some(m) = to_acceptor.take() else { break };
        match acc.on_message(wire(m)) {
            Err(f) => {
                a_res = Some(Err(f.clone()));
                if let Some(s) = f.send {
                    log.push(s.clone());
                    if let Err(f) = ini.on_message(wire(s)) {
                        i_res = Some(Err(f));
                    }
                }
                break;
            }
            Ok(out) => {
                if let Some(e) = out.established {
                    a_res = Some(Ok(e));
                }
                let Some(s) = out.send else { break };
                log.push(s.clone());
                match ini.on_message(wire(s)) {
                    Err(f) => {
                        i_res = Some(Err(f.clone()));
                        if let Some(s) = f.send {
                            log.push(s.clone());
                            if let Err(f) = acc.on_message(wire(s)) {
                                a_res = Some(Err(f));
                            }
                        }
                        break;
                    }
                    Ok(out) => {
                        if let Some(e) = out.established {
                            i_res = Some(Ok(e));
                        }
                        if let Some(s) = out.send {
                            log.push(s.clone());
                            to_acceptor = Some(s);
                        }
                    }
                }
            }
        }
    }
    (
        i_res.expect("initiator finished"),
        a_res.expect("acceptor finished"),
        log,
    )
}

fn error_of(r: Result<Established, HandshakeFailure>) -> HandshakeError {
    *r.expect_err("handshake should fail").error
}

#[test]
fn handshake_happy_path() {
    let (i, a, log) = run(icfg(), acfg(), volumes(), [1; 32], [2; 32]);
    let i = i.unwrap();
    let a = a.unwrap();
    assert_eq!(i.version, ProtocolVersion::LATEST);
    assert_eq!(a.version, ProtocolVersion::LATEST);
    assert_eq!((i.local_node, i.peer_node), (1, 2));
    assert_eq!((a.local_node, a.peer_node), (2, 1));
    assert_eq!(a.cluster_id, "c1");
    assert_eq!(a.volume_name, "vm-disk");
    assert_eq!(a.volume_uuid, i.volume_uuid);
    assert_eq!(i.session_key, a.session_key);
    let types: Vec<_> = log.iter().map(|m| m.message_type()).collect();
    assert_eq!(
        types,
        [
            MessageType::Hello,
            MessageType::Challenge,
            MessageType::Auth,
            MessageType::Welcome
        ]
    );
    // The secret never crosses the wire.
    let mut bytes = Vec::new();
    for m in &log {
        encode(m, &mut bytes).unwrap();
    }
    assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET));
    // A different nonce gives a different session key.
    let (i2, _, _) = run(icfg(), acfg(), volumes(), [1; 32], [3; 32]);
    assert_ne!(i2.unwrap().session_key, i.session_key);
    // Lookup through a closure works the same.
    let (mut ini, hello) = Initiator::new(icfg(), [1; 32]).unwrap();
    let mut acc = Acceptor::new(acfg(), |n: &str| volumes().lookup(n), [2; 32]).unwrap();
    let ch = acc.on_message(hello).unwrap().send.unwrap();
    let auth = ini.on_message(ch).unwrap().send.unwrap();
    let out = acc.on_message(auth).unwrap();
    assert!(acc.is_established());
    assert!(
        ini.on_message(out.send.unwrap())
            .unwrap()
            .established
            .is_some()
    );
    assert!(ini.is_established());
}

#[test]
fn refuses_wrong_cluster() {
    let mut c = icfg();
    c.cluster_id = "c2".into();
    let (i, a, log) = run(c, acfg(), volumes(), [1; 32], [2; 32]);
    assert_eq!(
        error_of(a),
        HandshakeError::WrongCluster {
            ours: "c1".into(),
            theirs: "c2".into()
        }
    );
    assert!(matches!(
        error_of(i),
        HandshakeError::RefusedByPeer {
            reason: RefuseReason::WrongCluster,
            ..
        }
    ));
    // The refusal does not tell a stranger our cluster id.
    let Message::Refused { detail, .. } = log.last().unwrap() else {
        panic!()
    };
    assert!(!detail.contains("\"c1\""), "{detail}");
}

#[test]
fn refuses_wrong_volume() {
    let mut c = icfg();
    c.volume_name = "nope".into();
    let (i, a, _) = run(c, acfg(), volumes(), [1; 32], [2; 32]);
    assert!(matches!(
        error_of(a),
        HandshakeError::WrongVolume {
            ours_uuid: None,
            ..
        }
    ));
    assert!(matches!(
        error_of(i),
        HandshakeError::RefusedByPeer {
            reason: RefuseReason::WrongVolume,
            ..
        }
    ));
    // Same name, different uuid: a re-created volume.
    let mut c = icfg();
    c.volume_uuid = "stale-uuid".into();
    let (_, a, log) = run(c, acfg(), volumes(), [1; 32], [2; 32]);
    assert!(matches!(
        error_of(a),
        HandshakeError::WrongVolume { ours_uuid: Some(ref u), .. } if u.starts_with("7f0c")
    ));
    let Message::Refused { detail, .. } = log.last().unwrap() else {
        panic!()
    };
    assert!(!detail.contains("7f0c"), "our uuid leaked: {detail}");
}

#[test]
fn refuses_unknown_and_unexpected_nodes() {
    let mut c = icfg();
    c.local_node = 5;
    let (i, a, _) = run(c, acfg(), volumes(), [1; 32], [2; 32]);
    assert_eq!(
        error_of(a),
        HandshakeError::UnknownNode {
            volume: "vm-disk".into(),
            node: 5
        }
    );
    assert!(matches!(
        error_of(i),
        HandshakeError::RefusedByPeer {
            reason: RefuseReason::UnknownNode,
            ..
        }
    ));
    let mut c = icfg();
    c.peer_node = 0;
    let (i, a, _) = run(c, acfg(), volumes(), [1; 32], [2; 32]);
    assert_eq!(
        error_of(a),
        HandshakeError::UnexpectedNode {
            expected: 2,
            found: 0
        }
    );
    assert!(matches!(
        error_of(i),
        HandshakeError::RefusedByPeer {
            reason: RefuseReason::UnexpectedNode,
            ..
        }
    ));
}

#[test]
fn refuses_bad_mac() {
    // The initiator does not know the secret.
    let mut c = icfg();
    c.secret = ClusterSecret::new(b"a different secret!!".to_vec()).unwrap();
    let (i, a, _) = run(c, acfg(), volumes(), [1; 32], [2; 32]);
    assert_eq!(error_of(a), HandshakeError::BadMac);
    assert!(matches!(
        error_of(i),
        HandshakeError::RefusedByPeer {
            reason: RefuseReason::BadMac,
            ..
        }
    ));
    // The acceptor does not know the secret: it cannot forge a Welcome.
    let (mut ini, _) = Initiator::new(icfg(), [1; 32]).unwrap();
    let out = ini
        .on_message(Message::Challenge {
            min_version: 1,
            max_version: 1,
            version: 1,
            nonce: [9; 32],
        })
        .unwrap();
    assert!(matches!(out.send, Some(Message::Auth { .. })));
    let f = ini
        .on_message(Message::Welcome { mac: [0; 32] })
        .unwrap_err();
    assert_eq!(*f.error, HandshakeError::BadMac);
    assert!(matches!(
        f.send,
        Some(Message::Refused {
            reason: RefuseReason::BadMac,
            ..
        })
    ));
    assert!(!ini.is_established());
}

#[test]
fn refuses_version_mismatch_naming_both_ranges() {
    // A future initiator speaking only 11..=12.
    let mut acc = Acceptor::new(acfg(), volumes(), [2; 32]).unwrap();
    let (_, hello) = Initiator::new(icfg(), [1; 32]).unwrap();
    let Message::Hello(mut h) = hello else {
        panic!()
    };
    h.min_version = 11;
    h.max_version = 12;
    let f = acc.on_message(wire(Message::Hello(h))).unwrap_err();
    let want = VersionMismatch {
        ours: VersionRange::new(1, 10).unwrap(),
        theirs: VersionRange::new(11, 12).unwrap(),
    };
    assert_eq!(*f.error, HandshakeError::VersionMismatch(want));
    assert!(
        f.error
            .to_string()
            .contains("we speak 1..=10, the peer speaks 11..=12")
    );
    // The refusal carries the acceptor's range, so the initiator names both too.
    let refusal = wire(f.send.unwrap());
    let (mut ini, _) = Initiator::new(icfg(), [1; 32]).unwrap();
    let Message::Refused {
        reason,
        min_version,
        max_version,
        ..
    } = refusal.clone()
    else {
        panic!()
    };
    assert_eq!(
        (reason, min_version, max_version),
        (
            RefuseReason::VersionMismatch,
            1,
            VersionRange::SUPPORTED.max
        )
    );
    // Pretend the initiator is the future one: its error names its and the acceptor's range.
    let f = ini.on_message(refusal).unwrap_err();
    assert!(matches!(*f.error, HandshakeError::VersionMismatch(_)));
    assert_eq!(f.send, None);

    // A future acceptor offering only 11..=12.
    let (mut ini, _) = Initiator::new(icfg(), [1; 32]).unwrap();
    let f = ini
        .on_message(Message::Challenge {
            min_version: 11,
            max_version: 12,
            version: 12,
            nonce: [2; 32],
        })
        .unwrap_err();
    assert_eq!(
        *f.error,
        HandshakeError::VersionMismatch(VersionMismatch {
            ours: VersionRange::SUPPORTED,
            theirs: VersionRange::new(11, 12).unwrap(),
        })
    );
    assert!(matches!(
        f.send,
        Some(Message::Refused {
            reason: RefuseReason::VersionMismatch,
            ..
        })
    ));
}

#[test]
fn refuses_a_downgraded_choice() {
    // An acceptor (or a man in the middle) that picks a version other than the highest common.
    let mut c = icfg();
    c.versions = VersionRange::SUPPORTED;
    let (mut ini, _) = Initiator::new(c, [1; 32]).unwrap();
    let f = ini
        .on_message(Message::Challenge {
            min_version: 1,
            max_version: 3,
            version: 1,
            nonce: [2; 32],
        })
        .unwrap_err();
    assert!(matches!(*f.error, HandshakeError::Malformed(_)));
}

#[test]
fn refuses_unexpected_messages() {
    let mut acc = Acceptor::new(acfg(), volumes(), [2; 32]).unwrap();
    let f = acc.on_message(Message::Ping { token: 1 }).unwrap_err();
    assert_eq!(
        *f.error,
        HandshakeError::UnexpectedMessage {
            state: "waiting for Hello",
            got: MessageType::Ping
        }
    );
    assert!(matches!(
        f.send,
        Some(Message::Refused {
            reason: RefuseReason::UnexpectedMessage,
            ..
        })
    ));
    // A failed machine stays failed.
    assert!(acc.on_message(Message::Ping { token: 1 }).is_err());

    // Auth before Hello, Welcome before Challenge, a second Hello.
    let mut acc = Acceptor::new(acfg(), volumes(), [2; 32]).unwrap();
    assert!(acc.on_message(Message::Auth { mac: [0; 32] }).is_err());
    let (mut ini, hello) = Initiator::new(icfg(), [1; 32]).unwrap();
    assert!(ini.on_message(Message::Welcome { mac: [0; 32] }).is_err());
    let mut acc = Acceptor::new(acfg(), volumes(), [2; 32]).unwrap();
    acc.on_message(hello.clone()).unwrap();
    let f = acc.on_message(hello).unwrap_err();
    assert!(matches!(
        *f.error,
        HandshakeError::UnexpectedMessage {
            got: MessageType::Hello,
            ..
        }
    ));

    // Anything after the handshake is not for the state machine.
    let (i, _, _) = run(icfg(), acfg(), volumes(), [1; 32], [2; 32]);
    assert!(i.is_ok());
    let (mut ini, hello) = Initiator::new(icfg(), [1; 32]).unwrap();
    let mut acc = Acceptor::new(acfg(), volumes(), [2; 32]).unwrap();
    let ch = acc.on_message(hello).unwrap().send.unwrap();
    let auth = ini.on_message(ch).unwrap().send.unwrap();
    let welcome = acc.on_message(auth.clone()).unwrap().send.unwrap();
    ini.on_message(welcome.clone()).unwrap();
    assert!(matches!(
        *ini.on_message(welcome).unwrap_err().error,
        HandshakeError::UnexpectedMessage {
            state: "already established",
            ..
        }
    ));
    assert!(acc.on_message(auth).is_err());
}

#[test]
fn replayed_handshake_is_refused() {
    // Record a successful handshake.
    let (_, _, log) = run(icfg(), acfg(), volumes(), [1; 32], [2; 32]);
    let (hello, challenge, auth, welcome) = (
        log[0].clone(),
        log[1].clone(),
        log[2].clone(),
        log[3].clone(),
    );

    // Replay the initiator's side against an acceptor with a fresh nonce.
    let mut acc = Acceptor::new(acfg(), volumes(), [7; 32]).unwrap();
    let out = acc.on_message(hello).unwrap();
    assert!(matches!(out.send, Some(Message::Challenge { nonce, .. }) if nonce == [7; 32]));
    let f = acc.on_message(auth.clone()).unwrap_err();
    assert_eq!(*f.error, HandshakeError::BadMac);
    assert!(!acc.is_established());

    // Replay the acceptor's side against an initiator with a fresh nonce.
    let (mut ini, _) = Initiator::new(icfg(), [8; 32]).unwrap();
    ini.on_message(challenge).unwrap();
    let f = ini.on_message(welcome.clone()).unwrap_err();
    assert_eq!(*f.error, HandshakeError::BadMac);

    // Reflection: the initiator's own proof is not a valid acceptor proof.
    let Message::Auth { mac } = auth else {
        panic!()
    };
    let (mut ini, _) = Initiator::new(icfg(), [1; 32]).unwrap();
    ini.on_message(log[1].clone()).unwrap();
    assert_eq!(
        *ini.on_message(Message::Welcome { mac }).unwrap_err().error,
        HandshakeError::BadMac
    );
}

#[test]
fn tampered_binding_is_refused() {
    // A man in the middle rewrites the Hello's node ids or the acceptor's version range:
    // the proofs no longer match.
    let (mut ini, hello) = Initiator::new(icfg(), [1; 32]).unwrap();
    let mut acc = Acceptor::new(
        acfg(),
        vec![LocalVolume {
            volume_name: "vm-disk".into(),
            volume_uuid: "7f0c7a0e-1111-4222-8333-944455556666".into(),
            local_node: 2,
            peers: vec![1, 3],
        }],
        [2; 32],
    )
    .unwrap();
    let Message::Hello(mut h) = hello else {
        panic!()
    };
    h.from_node = 3;
    let ch = acc.on_message(Message::Hello(h)).unwrap().send.unwrap();
    let auth = ini.on_message(ch).unwrap().send.unwrap();
    assert_eq!(
        *acc.on_message(auth).unwrap_err().error,
        HandshakeError::BadMac
    );
}

#[test]
fn config_is_checked() {
    assert!(matches!(
        ClusterSecret::new(b"short".to_vec()),
        Err(HandshakeError::InvalidConfig(_))
    ));
    assert_eq!(format!("{:?}", secret()), "ClusterSecret(<28 bytes>)");
    let mut c = icfg();
    c.peer_node = c.local_node;
    assert!(Initiator::new(c, [0; 32]).is_err());
    let mut c = icfg();
    c.versions = VersionRange::new(1, 11).unwrap();
    assert!(Initiator::new(c, [0; 32]).is_err());
    let mut c = icfg();
    c.cluster_id = String::new();
    assert!(Initiator::new(c, [0; 32]).is_err());
    let mut a = acfg();
    a.cluster_id = "x".repeat(300);
    assert!(Acceptor::new(a, volumes(), [0; 32]).is_err());
    // The caller's own refusal.
    let acc = Acceptor::new(acfg(), volumes(), [0; 32]).unwrap();
    let m = wire(acc.refusal(RefuseReason::AlreadyConnected, "link to node 1 is up"));
    assert!(matches!(
        m,
        Message::Refused {
            reason: RefuseReason::AlreadyConnected,
            ..
        }
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random nonces always complete, and session keys agree.
    #[test]
    fn handshake_with_random_nonces(ni in any::<Nonce>(), na in any::<Nonce>()) {
        let (i, a, _) = run(icfg(), acfg(), volumes(), ni, na);
        prop_assert_eq!(i.unwrap().session_key, a.unwrap().session_key);
    }

    /// Arbitrary messages in any handshake state never panic and never establish a link.
    #[test]
    fn handshake_garbage_never_establishes(msgs in proptest::collection::vec(arb_message(), 1..5)) {
        let mut acc = Acceptor::new(acfg(), volumes(), [2; 32]).unwrap();
        let (mut ini, _) = Initiator::new(icfg(), [1; 32]).unwrap();
        for m in msgs {
            if let Ok(out) = acc.on_message(m.clone()) {
                prop_assert!(out.established.is_none());
            }
            if let Ok(out) = ini.on_message(m) {
                prop_assert!(out.established.is_none());
            }
        }
    }
}

// ---------- docs/protocol.md stays true to the code ----------

#[test]
fn protocol_doc_lists_every_type_and_version() {
    let doc = include_str!("../../../docs/protocol.md");
    for t in MessageType::ALL {
        let row = format!("| {:#06x} | {t} |", t.code());
        assert!(doc.contains(&row), "docs/protocol.md lacks the row {row:?}");
    }
    for v in ProtocolVersion::ALL {
        let row = format!("\n| {} | ", v.number());
        assert!(doc.contains(&row), "docs/protocol.md lacks version {v}");
    }
    assert!(doc.contains(&format!("`{}`", std::str::from_utf8(&MAGIC).unwrap())));
}

#[test]
fn payload_sizes_match_the_doc() {
    fn size(m: Message) -> usize {
        let mut b = Vec::new();
        encode(&m, &mut b).unwrap();
        b.len() - HEADER_LEN
    }
    let d = Bytes::from_static(&[1, 2, 3]);
    let s = |n: usize| "x".repeat(n);
    let cases: Vec<(Message, usize)> = vec![
        (
            Message::Hello(Box::new(Hello {
                min_version: 1,
                max_version: 1,
                from_node: 0,
                to_node: 1,
                nonce: [0; 32],
                cluster_id: s(1),
                volume_name: s(2),
                volume_uuid: s(3),
            })),
            38 + 3 * 2 + 6,
        ),
        (
            Message::Challenge {
                min_version: 1,
                max_version: 1,
                version: 1,
                nonce: [0; 32],
            },
            38,
        ),
        (Message::Auth { mac: [0; 32] }, 32),
        (Message::Welcome { mac: [0; 32] }, 32),
        (
            Message::Refused {
                reason: RefuseReason::BadMac,
                min_version: 1,
                max_version: 1,
                detail: s(4),
            },
            6 + 2 + 4,
        ),
        (Message::Ping { token: 0 }, 8),
        (Message::Pong { token: 0 }, 8),
        (
            Message::Disconnect {
                reason: DisconnectReason::Shutdown,
                detail: s(5),
            },
            2 + 2 + 5,
        ),
        (
            Message::StateReport(Box::new(StateReport {
                seq: 0,
                node_id: 0,
                role: Role::Primary,
                disk_state: DiskState::UpToDate,
                quorum: QuorumInfo::default(),
                flags: 0,
                size_bytes: 0,
                generations: Generations::default(),
                peer_bitmaps: vec![
                    PeerBitmap {
                        node: 1,
                        generation: 2
                    };
                    2
                ],
                outdated: 1 << 2,
                outdated_gen: 9,
                outdated_by: 3,
                primary_epoch: 0,
                lost_writer: None,
            })),
            99 + 2 * 9,
        ),
        (
            Message::Write {
                seq: 0,
                offset: 0,
                flags: 0,
                data: d.clone(),
            },
            20 + 3,
        ),
        (
            Message::WriteAck {
                seq: 0,
                status: Status::Ok,
            },
            9,
        ),
        (
            Message::Trim {
                seq: 0,
                offset: 0,
                len: 1,
                flags: 0,
            },
            28,
        ),
        (
            Message::WriteZeroes {
                seq: 0,
                offset: 0,
                len: 1,
                flags: 0,
            },
            28,
        ),
        (Message::Flush { seq: 0 }, 8),
        (Message::Settled { seq: 0 }, 8),
        (Message::TokenRequest { handoffs: 0 }, 8),
        (Message::TokenGrant { handoffs: 0 }, 8),
        (
            Message::FlushAck {
                seq: 0,
                status: Status::Ok,
            },
            9,
        ),
        (
            Message::ReadRequest {
                seq: 0,
                offset: 0,
                len: 1,
            },
            20,
        ),
        (
            Message::ReadReply {
                seq: 0,
                status: Status::Ok,
                data: d.clone(),
            },
            9 + 3,
        ),
        (
            Message::ResyncBegin {
                generation: 0,
                bytes: 0,
            },
            16,
        ),
        (
            Message::ResyncEnd {
                generation: 0,
                status: Status::Ok,
            },
            9,
        ),
        (
            Message::ResyncRequest {
                id: 0,
                offset: 0,
                len: 1,
            },
            20,
        ),
        (
            Message::ResyncData {
                id: 0,
                offset: 0,
                status: Status::Ok,
                flags: 0,
                len: 3,
                data: d.clone(),
            },
            25 + 3,
        ),
        (
            Message::ChecksumRequest {
                id: 0,
                offset: 0,
                len: 4096,
                block_size: 4096,
                alg: ChecksumAlg::Blake3,
                purpose: ChecksumPurpose::Verify,
            },
            26,
        ),
        (
            Message::ChecksumReply {
                id: 0,
                offset: 0,
                block_size: 4096,
                alg: ChecksumAlg::Blake3,
                status: Status::Ok,
                digests: vec![[0; 32]; 2],
            },
            26 + 64,
        ),
        (
            Message::OutOfSync {
                flags: 0,
                ranges: vec![ByteRange { offset: 0, len: 1 }; 3],
            },
            8 + 48,
        ),
    ];
    assert_eq!(cases.len(), MessageType::ALL.len());
    for (m, want) in cases {
        let t = m.message_type();
        assert_eq!(size(m), want, "{t}");
    }
}

/// `msg` (a `StateReport`) encoded and decoded on a link of `version`: payload length, report.
fn report_over(version: ProtocolVersion, msg: &Message) -> (usize, StateReport) {
    let mut buf = Vec::new();
    // The first frame of an established link (numbered from version 10).
    crate::Encoder::new(version)
        .encode_seq(msg, 1, &mut buf)
        .unwrap();
    let mut d = Decoder::new();
    d.set_version(version);
    d.feed(&buf);
    let frame = d.next_frame().unwrap().expect("one frame");
    let Message::StateReport(got) = frame.message().unwrap() else {
        panic!("not a StateReport");
    };
    (frame.payload.len(), *got)
}

/// Version 2 appends the `outdated` mask to `StateReport`; a version-1 link neither sends nor
/// expects it (a version-1 peer reads it as 0).
#[test]
fn state_report_outdated_mask_is_a_version_2_field() {
    let report = StateReport {
        seq: 7,
        node_id: 1,
        role: Role::Primary,
        disk_state: DiskState::UpToDate,
        quorum: QuorumInfo::default(),
        flags: 0,
        size_bytes: 1 << 20,
        generations: Generations::default(),
        peer_bitmaps: vec![],
        outdated: 1 << 2,
        outdated_gen: 0x55,
        outdated_by: 1,
        primary_epoch: 7,
        lost_writer: Some(LostWriter {
            node: 0,
            epoch: 4,
            seq: 99,
        }),
    };
    let msg = Message::StateReport(Box::new(report.clone()));
    let none = None;
    for (version, len, outdated, outdated_gen, outdated_by, primary_epoch, lost_writer) in [
        (ProtocolVersion::V1, 60, 0, 0, 0, 0, none),
        (ProtocolVersion::V2, 73, 1 << 2, 0x55, 1, 0, none),
        (ProtocolVersion::V3, 81, 1 << 2, 0x55, 1, 7, none),
        (ProtocolVersion::V8, 81, 1 << 2, 0x55, 1, 7, none),
        (
            ProtocolVersion::V9,
            99,
            1 << 2,
            0x55,
            1,
            7,
            report.lost_writer,
        ),
    ] {
        let (payload_len, got) = report_over(version, &msg);
        assert_eq!(payload_len, len, "{version}");
        assert_eq!(
            got,
            StateReport {
                outdated,
                outdated_gen,
                outdated_by,
                primary_epoch,
                lost_writer,
                ..report.clone()
            }
        );
    }
}

/// Version 6 adds the `StateReport` flag `ADOPT_OFFER`, version 7 `SETTLES`; the encoder
/// clears each on an older link (an older peer would refuse the unknown bit and break the
/// link).
#[test]
fn report_flags_of_newer_versions_are_sent_only_on_links_that_know_them() {
    let report = StateReport {
        seq: 3,
        node_id: 2,
        role: Role::Primary,
        disk_state: DiskState::Diskless,
        quorum: QuorumInfo::default(),
        flags: state_flags::SETTLES | state_flags::ADOPT_OFFER | state_flags::SUSPENDED,
        size_bytes: 1 << 20,
        generations: Generations::default(),
        peer_bitmaps: vec![],
        outdated: 0,
        outdated_gen: 0,
        outdated_by: 0,
        primary_epoch: 1,
        lost_writer: None,
    };
    let msg = Message::StateReport(Box::new(report));
    let newer = state_flags::ADOPT_OFFER | state_flags::SUSPENDED;
    for (version, flags) in [
        (ProtocolVersion::V5, state_flags::SUSPENDED),
        (ProtocolVersion::V6, newer),
        (ProtocolVersion::V7, newer | state_flags::SETTLES),
    ] {
        let (_, got) = report_over(version, &msg);
        assert_eq!(got.flags, flags, "version {version}");
    }
}

/// Version 8: a zero-write (the shared zero buffer) goes as a `WriteZeroes` frame without its
/// data; an ordinary buffer of zeros, and any zero-write on an older link, as a `Write`.
#[test]
fn zero_writes_travel_without_their_data_on_version_8_links() {
    let write = |data: Bytes| Message::Write {
        seq: 9,
        offset: 4096,
        flags: write_flags::FUA,
        data,
    };
    let z = crate::zeroes::zeroes(65536).unwrap();
    let cases = [
        (ProtocolVersion::V8, write(z.clone()), true),
        (ProtocolVersion::V7, write(z), false),
        (
            ProtocolVersion::V8,
            write(Bytes::from(vec![0u8; 65536])),
            false,
        ),
    ];
    for (version, msg, small) in cases {
        let enc = Encoder::new(version);
        let mut out = Vec::new();
        enc.encode(&msg, &mut out).unwrap();
        assert_eq!(
            out.len() < 1024,
            small,
            "version {version}: {} bytes",
            out.len()
        );
        let mut dec = Decoder::new();
        dec.set_version(version);
        dec.feed(&out);
        let got = dec.next_frame().unwrap().unwrap().message().unwrap();
        if small {
            assert_eq!(
                got,
                Message::WriteZeroes {
                    seq: 9,
                    offset: 4096,
                    len: 65536,
                    flags: write_flags::FUA,
                }
            );
        } else {
            assert_eq!(got, msg);
        }
    }
}
