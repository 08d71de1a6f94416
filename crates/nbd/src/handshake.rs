//! Sans-IO server side of the fixed newstyle handshake.
//!
//! [`Handshake::new`] queues the greeting; the caller then loops: write [`Handshake::take_output`]
//! to the peer, read some bytes, [`Handshake::feed`] them. `feed` answers options as they
//! complete and returns [`Progress::Done`] once the client chose an export (`NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`), [`Progress::Abort`] after `NBD_OPT_ABORT`, or an error when the client
//! broke a rule that forces the connection closed. No I/O, no clocks, no panics on any input.

use thiserror::Error;

use crate::proto::*;

/// What the handshake needs to know about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    pub multi_conn: bool,
}

/// Where the handshake looks exports up. `Handle` is whatever the caller wants back for the chosen
/// export (the server uses `Arc<Export>`).
pub trait Catalog {
    type Handle;
    fn lookup(&self, name: &str) -> Option<(Self::Handle, ExportInfo)>;
    fn list(&self) -> Vec<String>;
}

/// Result of a finished handshake: the export and what was negotiated for transmission.
#[derive(Debug, Clone)]
pub struct Negotiated<H> {
    pub export: H,
    pub info: ExportInfo,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// Context id of `base:allocation` if the client selected it for this export.
    pub allocation_context: Option<u32>,
}

/// Context id we hand out for `base:allocation` (any value works; 0 is reserved for listings).
pub const ALLOCATION_CONTEXT_ID: u32 = 1;

#[derive(Debug)]
pub enum Progress<H> {
    /// Feed more bytes (after writing the pending output).
    NeedMore,
    /// Transmission phase starts; write the pending output first. Bytes the client sent after
    /// the final option are in [`Handshake::take_leftover`].
    Done(Box<Negotiated<H>>),
    /// The client sent `NBD_OPT_ABORT`: write the pending output (the ACK), then close.
    Abort,
}

/// Violations that end the connection (the spec allows or requires a hard disconnect).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE (client flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("client set unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("option {option} has length {len}, over the limit of {MAX_OPTION_LEN}")]
    OptionTooLong { option: u32, len: u32 },
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME with an invalid name")]
    BadExportName,
    #[error("data after the handshake ended")]
    AlreadyFinished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    Finished,
}

#[derive(Debug, Clone)]
struct MetaSelection {
    export: String,
    allocation: bool,
}

/// The handshake state machine (one per connection).
#[derive(Debug)]
pub struct Handshake {
    state: State,
    input: Vec<u8>,
    output: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    /// A new handshake with the server greeting already queued.
    pub fn new() -> Self {
        let mut output = Vec::with_capacity(18);
        output.extend_from_slice(&NBDMAGIC.to_be_bytes());
        output.extend_from_slice(&IHAVEOPT.to_be_bytes());
        output.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Handshake {
            state: State::ClientFlags,
            input: Vec::new(),
            output,
            no_zeroes: false,
            structured: false,
            meta: None,
        }
    }

    /// Bytes to send to the client now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Bytes received after the option that ended the handshake (start of transmission).
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.input)
    }

    /// Consumes bytes from the client. After an error or a `Done`/`Abort`, stop feeding.
    pub fn feed<C: Catalog>(
        &mut self,
        bytes: &[u8],
        catalog: &C,
    ) -> Result<Progress<C::Handle>, HandshakeError> {
        if self.state == State::Finished {
            return Err(HandshakeError::AlreadyFinished);
        }
        self.input.extend_from_slice(bytes);
        let mut pos = 0;
        let result = loop {
            let rest = &self.input[pos..];
            match self.state {
                State::ClientFlags => {
                    let Some(flags) = be_u32(rest, 0) else {
                        break Ok(Progress::NeedMore);
                    };
                    pos += 4;
                    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                        break Err(HandshakeError::UnknownClientFlags(flags));
                    }
                    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
                        break Err(HandshakeError::NotFixedNewstyle(flags));
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Options => {
                    let (Some(magic), Some(option), Some(len)) =
                        (be_u64(rest, 0), be_u32(rest, 8), be_u32(rest, 12))
                    else {
                        break Ok(Progress::NeedMore);
                    };
                    if magic != IHAVEOPT {
                        break Err(HandshakeError::BadOptionMagic(magic));
                    }
                    if len > MAX_OPTION_LEN {
                        break Err(HandshakeError::OptionTooLong { option, len });
                    }
                    let total = 16 + len as usize;
                    if rest.len() < total {
                        break Ok(Progress::NeedMore);
                    }
                    let data = rest[16..total].to_vec();
                    pos += total;
                    match self.option(option, &data, catalog) {
                        Ok(None) => {}
                        Ok(Some(progress)) => {
                            self.state = State::Finished;
                            break Ok(progress);
                        }
                        Err(e) => break Err(e),
                    }
                }
                State::Finished => break Err(HandshakeError::AlreadyFinished),
            }
        };
        if result.is_err() {
            self.state = State::Finished;
        }
        self.input.drain(..pos);
        result
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.output
            .extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.output.extend_from_slice(&option.to_be_bytes());
        self.output.extend_from_slice(&kind.to_be_bytes());
        self.output
            .extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.output.extend_from_slice(data);
    }

    fn error(&mut self, option: u32, kind: u32, message: &str) {
        self.reply(option, kind, message.as_bytes());
    }

    fn transmission_flags(&self, info: &ExportInfo) -> u16 {
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
        if info.read_only {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        if self.structured {
            flags |= FLAG_SEND_DF;
        }
        if info.multi_conn {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        flags
    }

    /// Handles one complete option. `Some` ends the handshake.
    fn option<C: Catalog>(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &C,
    ) -> Result<Option<Progress<C::Handle>>, HandshakeError> {
        match option {
            OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(data).map_err(|_| HandshakeError::BadExportName)?;
                let Some((handle, info)) = catalog.lookup(name) else {
                    return Err(HandshakeError::UnknownExport(name.to_string()));
                };
                let flags = self.transmission_flags(&info);
                self.output.extend_from_slice(&info.size.to_be_bytes());
                self.output.extend_from_slice(&flags.to_be_bytes());
                if !self.no_zeroes {
                    self.output.extend_from_slice(&[0u8; 124]);
                }
                let allocation_context = self.allocation_context_for(name);
                Ok(Some(Progress::Done(Box::new(Negotiated {
                    export: handle,
                    info,
                    flags,
                    structured: self.structured,
                    allocation_context,
                }))))
            }
            OPT_ABORT => {
                // The spec says to ignore any data sent with ABORT.
                self.reply(option, REP_ACK, &[]);
                Ok(Some(Progress::Abort))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Ok(None);
                }
                for name in catalog.list() {
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    self.reply(option, REP_SERVER, &d);
                }
                self.reply(option, REP_ACK, &[]);
                Ok(None)
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, catalog),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]);
                }
                Ok(None)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, catalog);
                Ok(None)
            }
            _ => {
                // STARTTLS (we run NOTLS), EXTENDED_HEADERS, PEEK_EXPORT and unknown options.
                self.error(option, REP_ERR_UNSUP, "option not supported");
                Ok(None)
            }
        }
    }

    fn allocation_context_for(&self, name: &str) -> Option<u32> {
        match &self.meta {
            Some(m) if m.allocation && m.export == name => Some(ALLOCATION_CONTEXT_ID),
            _ => None,
        }
    }

    fn info_or_go<C: Catalog>(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &C,
    ) -> Result<Option<Progress<C::Handle>>, HandshakeError> {
        let mut r = Reader::new(data);
        let parsed = (|| {
            let name = r.string32()?;
            let n = r.u16()? as usize;
            let mut requests = Vec::with_capacity(n);
            for _ in 0..n {
                requests.push(r.u16()?);
            }
            r.end()?;
            Some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            self.error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO");
            return Ok(None);
        };
        let Some((handle, info)) = catalog.lookup(&name) else {
            self.error(option, REP_ERR_UNKNOWN, "no such export");
            return Ok(None);
        };
        let flags = self.transmission_flags(&info);
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&info.size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, REP_INFO, &d);
        if requests.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(info.name.as_bytes());
            self.reply(option, REP_INFO, &d);
        }
        if requests.contains(&INFO_DESCRIPTION) && !info.description.is_empty() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            let desc = truncate_utf8(&info.description, MAX_STRING_LEN);
            d.extend_from_slice(desc.as_bytes());
            self.reply(option, REP_INFO, &d);
        }
        // Always sent: clients ignore info they did not ask for, and these are the defaults.
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        d.extend_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        self.reply(option, REP_INFO, &d);
        self.reply(option, REP_ACK, &[]);
        if option == OPT_INFO {
            return Ok(None);
        }
        let allocation_context = self.allocation_context_for(&name);
        Ok(Some(Progress::Done(Box::new(Negotiated {
            export: handle,
            info,
            flags,
            structured: self.structured,
            allocation_context,
        }))))
    }

    fn meta_context<C: Catalog>(&mut self, option: u32, data: &[u8], catalog: &C) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // Replaced even when the option fails.
            self.meta = None;
        }
        if !self.structured {
            self.error(
                option,
                REP_ERR_INVALID,
                "negotiate NBD_OPT_STRUCTURED_REPLY first",
            );
            return;
        }
        let mut r = Reader::new(data);
        let parsed = (|| {
            let name = r.string32()?;
            let n = r.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(r.string32()?);
            }
            r.end()?;
            Some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            self.error(option, REP_ERR_INVALID, "malformed meta context request");
            return;
        };
        if catalog.lookup(&name).is_none() {
            self.error(option, REP_ERR_UNKNOWN, "no such export");
            return;
        }
        let allocation = if queries.is_empty() {
            // LIST: everything we have. SET: nothing.
            !set
        } else {
            queries
                .iter()
                .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
        };
        if allocation {
            let id = if set { ALLOCATION_CONTEXT_ID } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &d);
        }
        if set {
            self.meta = Some(MetaSelection {
                export: name,
                allocation,
            });
        }
        self.reply(option, REP_ACK, &[]);
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Bounds-checked cursor over option data.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    /// A string with a 32-bit length prefix: valid UTF-8, no NUL, at most 4096 bytes.
    fn string32(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LEN {
            return None;
        }
        let s = std::str::from_utf8(self.take(len)?).ok()?;
        if s.contains('\0') {
            return None;
        }
        Some(s.to_string())
    }
    fn end(&self) -> Option<()> {
        (self.pos == self.data.len()).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Cat;
    impl Catalog for Cat {
        type Handle = &'static str;
        fn lookup(&self, name: &str) -> Option<(Self::Handle, ExportInfo)> {
            let (h, ro) = match name {
                "disk" => ("disk", false),
                "ro" => ("ro", true),
                _ => return None,
            };
            Some((
                h,
                ExportInfo {
                    name: name.into(),
                    description: "a disk".into(),
                    size: 1 << 20,
                    read_only: ro,
                    multi_conn: true,
                },
            ))
        }
        fn list(&self) -> Vec<String> {
            vec!["disk".into(), "ro".into()]
        }
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Parses option replies: (option, type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(be_u64(out, 0), Some(OPTION_REPLY_MAGIC));
            let o = be_u32(out, 8).unwrap();
            let t = be_u32(out, 12).unwrap();
            let l = be_u32(out, 16).unwrap() as usize;
            v.push((o, t, out[20..20 + l].to_vec()));
            out = &out[20 + l..];
        }
        v
    }

    fn started() -> Handshake {
        let mut h = Handshake::new();
        let greeting = h.take_output();
        assert_eq!(greeting.len(), 18);
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(&greeting[16..], &[0, 3]);
        assert!(matches!(
            h.feed(&3u32.to_be_bytes(), &Cat).unwrap(),
            Progress::NeedMore
        ));
        h
    }

    #[test]
    fn go_with_structured_and_meta_context() {
        let mut h = started();
        h.feed(&opt(OPT_STRUCTURED_REPLY, &[]), &Cat).unwrap();
        assert_eq!(
            replies(&h.take_output()),
            vec![(OPT_STRUCTURED_REPLY, REP_ACK, vec![])]
        );
        h.feed(
            &opt(OPT_SET_META_CONTEXT, &meta_data("disk", &[BASE_ALLOCATION])),
            &Cat,
        )
        .unwrap();
        let r = replies(&h.take_output());
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(&r[0].2[4..], BASE_ALLOCATION.as_bytes());
        assert_eq!(r[1].1, REP_ACK);

        // GO split across feeds, followed by a request's first bytes.
        let mut bytes = opt(OPT_GO, &go_data("disk", &[INFO_NAME, INFO_DESCRIPTION]));
        bytes.extend_from_slice(&[0x25, 0x60]);
        assert!(matches!(
            h.feed(&bytes[..7], &Cat).unwrap(),
            Progress::NeedMore
        ));
        let Progress::Done(n) = h.feed(&bytes[7..], &Cat).unwrap() else {
            panic!("not done")
        };
        assert_eq!(h.take_leftover(), vec![0x25, 0x60]);
        assert!(n.structured);
        assert_eq!(n.allocation_context, Some(ALLOCATION_CONTEXT_ID));
        assert_eq!(
            n.flags,
            FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_CACHE
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_SEND_FAST_ZERO
                | FLAG_SEND_DF
                | FLAG_CAN_MULTI_CONN
        );
        let r = replies(&h.take_output());
        let infos: Vec<u16> = r
            .iter()
            .filter(|x| x.1 == REP_INFO)
            .map(|x| u16::from_be_bytes([x.2[0], x.2[1]]))
            .collect();
        assert_eq!(
            infos,
            vec![INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]
        );
        assert_eq!(r[0].2.len(), 12);
        assert_eq!(r.last().unwrap().1, REP_ACK);
        assert_eq!(
            h.feed(&[0], &Cat).unwrap_err(),
            HandshakeError::AlreadyFinished
        );
    }

    #[test]
    fn meta_context_for_other_export_is_not_used() {
        let mut h = started();
        h.feed(&opt(OPT_STRUCTURED_REPLY, &[]), &Cat).unwrap();
        h.feed(
            &opt(OPT_SET_META_CONTEXT, &meta_data("ro", &[BASE_ALLOCATION])),
            &Cat,
        )
        .unwrap();
        let Progress::Done(n) = h.feed(&opt(OPT_GO, &go_data("disk", &[])), &Cat).unwrap() else {
            panic!()
        };
        assert_eq!(n.allocation_context, None);
    }

    #[test]
    fn meta_context_needs_structured_replies_and_valid_data() {
        let mut h = started();
        h.feed(
            &opt(OPT_SET_META_CONTEXT, &meta_data("disk", &[BASE_ALLOCATION])),
            &Cat,
        )
        .unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_INVALID);
        h.feed(&opt(OPT_STRUCTURED_REPLY, &[]), &Cat).unwrap();
        h.take_output();
        let mut bad = meta_data("disk", &[BASE_ALLOCATION]);
        bad.push(0);
        h.feed(&opt(OPT_LIST_META_CONTEXT, &bad), &Cat).unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_INVALID);
        h.feed(&opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &[])), &Cat)
            .unwrap();
        let r = replies(&h.take_output());
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(&r[0].2[..4], &[0, 0, 0, 0]);
        assert_eq!(r[1].1, REP_ACK);
        h.feed(
            &opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &["x-foo:bar"])),
            &Cat,
        )
        .unwrap();
        assert_eq!(
            replies(&h.take_output()),
            vec![(OPT_LIST_META_CONTEXT, REP_ACK, vec![])]
        );
        h.feed(
            &opt(OPT_SET_META_CONTEXT, &meta_data("nope", &[BASE_ALLOCATION])),
            &Cat,
        )
        .unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_UNKNOWN);
    }

    #[test]
    fn list_info_unknown_and_errors() {
        let mut h = started();
        h.feed(&opt(OPT_LIST, &[]), &Cat).unwrap();
        let r = replies(&h.take_output());
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].1, REP_SERVER);
        assert_eq!(&r[0].2[4..], b"disk");
        assert_eq!(r[2].1, REP_ACK);

        h.feed(&opt(OPT_LIST, &[1]), &Cat).unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_INVALID);
        h.feed(&opt(OPT_STRUCTURED_REPLY, &[1]), &Cat).unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_INVALID);
        h.feed(&opt(OPT_INFO, &go_data("nope", &[])), &Cat).unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_UNKNOWN);
        // Name length says more than the option holds.
        let mut d = go_data("disk", &[]);
        d[3] = 200;
        h.feed(&opt(OPT_GO, &d), &Cat).unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_INVALID);
        // Info request count disagrees with the length.
        let mut d = go_data("disk", &[INFO_NAME]);
        d.pop();
        h.feed(&opt(OPT_GO, &d), &Cat).unwrap();
        assert_eq!(replies(&h.take_output())[0].1, REP_ERR_INVALID);
        for o in [OPT_STARTTLS, OPT_EXTENDED_HEADERS, OPT_PEEK_EXPORT, 12345] {
            h.feed(&opt(o, &[]), &Cat).unwrap();
            assert_eq!(
                replies(&h.take_output()),
                vec![(o, REP_ERR_UNSUP, b"option not supported".to_vec())]
            );
        }
        // INFO on the read-only export: flags say so, and advertise no trim/zero.
        h.feed(&opt(OPT_INFO, &go_data("ro", &[])), &Cat).unwrap();
        let r = replies(&h.take_output());
        let flags = u16::from_be_bytes([r[0].2[10], r[0].2[11]]);
        assert_ne!(flags & FLAG_READ_ONLY, 0);
        assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
        assert_eq!(flags & FLAG_SEND_DF, 0, "no DF without structured replies");
        // Still usable after all those errors.
        assert!(matches!(
            h.feed(&opt(OPT_GO, &go_data("ro", &[])), &Cat).unwrap(),
            Progress::Done(_)
        ));
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        for (client_flags, expect_len) in [(1u32, 8 + 2 + 124), (3, 10)] {
            let mut h = Handshake::new();
            h.take_output();
            h.feed(&client_flags.to_be_bytes(), &Cat).unwrap();
            let Progress::Done(n) = h.feed(&opt(OPT_EXPORT_NAME, b"disk"), &Cat).unwrap() else {
                panic!()
            };
            assert!(!n.structured);
            let out = h.take_output();
            assert_eq!(out.len(), expect_len);
            assert_eq!(&out[..8], &(1u64 << 20).to_be_bytes());
        }
        let mut h = started();
        assert_eq!(
            h.feed(&opt(OPT_EXPORT_NAME, b"nope"), &Cat).unwrap_err(),
            HandshakeError::UnknownExport("nope".into())
        );
    }

    #[test]
    fn fatal_errors() {
        let mut h = Handshake::new();
        assert_eq!(
            h.feed(&0u32.to_be_bytes(), &Cat).unwrap_err(),
            HandshakeError::NotFixedNewstyle(0)
        );
        let mut h = Handshake::new();
        assert_eq!(
            h.feed(&5u32.to_be_bytes(), &Cat).unwrap_err(),
            HandshakeError::UnknownClientFlags(5)
        );
        let mut h = started();
        let mut bad = opt(OPT_LIST, &[]);
        bad[0] = b'X';
        assert!(matches!(
            h.feed(&bad, &Cat).unwrap_err(),
            HandshakeError::BadOptionMagic(_)
        ));
        let mut h = started();
        let mut huge = IHAVEOPT.to_be_bytes().to_vec();
        huge.extend_from_slice(&OPT_GO.to_be_bytes());
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            h.feed(&huge, &Cat).unwrap_err(),
            HandshakeError::OptionTooLong { .. }
        ));
        let mut h = started();
        assert!(matches!(
            h.feed(&opt(OPT_ABORT, &[1, 2]), &Cat).unwrap(),
            Progress::Abort
        ));
        assert_eq!(
            replies(&h.take_output()),
            vec![(OPT_ABORT, REP_ACK, vec![])]
        );
    }

    fn arb_option() -> impl Strategy<Value = Vec<u8>> {
        let names = prop_oneof![
            Just("disk".to_string()),
            Just("ro".to_string()),
            Just(String::new()),
            "[a-z]{0,8}"
        ];
        let queries = proptest::collection::vec(
            prop_oneof![
                Just(BASE_ALLOCATION.to_string()),
                Just("base:".to_string()),
                "[a-z:]{0,12}"
            ],
            0..3,
        );
        prop_oneof![
            (0u32..14, proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(o, d)| opt(o, &d)),
            (names.clone(), proptest::collection::vec(0u16..6, 0..4))
                .prop_map(|(n, i)| opt(OPT_INFO, &go_data(&n, &i))),
            (names.clone(), queries.clone()).prop_map(|(n, q)| {
                let q: Vec<&str> = q.iter().map(|s| s.as_str()).collect();
                opt(OPT_SET_META_CONTEXT, &meta_data(&n, &q))
            }),
            (names, queries).prop_map(|(n, q)| {
                let q: Vec<&str> = q.iter().map(|s| s.as_str()).collect();
                opt(OPT_LIST_META_CONTEXT, &meta_data(&n, &q))
            }),
            Just(opt(OPT_STRUCTURED_REPLY, &[])),
            Just(opt(OPT_LIST, &[])),
        ]
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                    cuts in proptest::collection::vec(1usize..64, 0..16)) {
            let mut h = Handshake::new();
            let mut rest = &bytes[..];
            for c in cuts.iter().chain(std::iter::once(&usize::MAX)) {
                let n = (*c).min(rest.len());
                match h.feed(&rest[..n], &Cat) {
                    Ok(Progress::NeedMore) => {}
                    _ => break,
                }
                let _ = h.take_output();
                rest = &rest[n..];
            }
        }

        #[test]
        fn random_option_sequences_never_panic(
            flags in prop_oneof![Just(1u32), Just(3u32), any::<u32>()],
            options in proptest::collection::vec(arb_option(), 0..12),
            chunk in 1usize..50,
        ) {
            let mut stream = flags.to_be_bytes().to_vec();
            for o in &options { stream.extend_from_slice(o); }
            let mut h = Handshake::new();
            let _ = h.take_output();
            for piece in stream.chunks(chunk) {
                match h.feed(piece, &Cat) {
                    Ok(Progress::NeedMore) => {
                        // Every reply is well formed.
                        let _ = replies(&h.take_output());
                    }
                    Ok(Progress::Done(n)) => {
                        prop_assert!(n.allocation_context.is_none() || n.structured);
                        break;
                    }
                    _ => break,
                }
            }
        }
    }
}
