//! The fixed-newstyle option haggling, as a pure state machine: option in, reply bytes out.
//!
//! The driver reads an option header and its data, calls [`Negotiation::handle`], writes what it
//! produced and acts on the returned [`Step`]. Nothing here touches a socket.

use bytes::{BufMut, BytesMut};

use super::proto::*;

/// What the server knows about one export before transmission starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name (the resource name).
    pub name: String,
    /// Free text for `NBD_INFO_DESCRIPTION` and LIST.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Writes refused with EPERM.
    pub read_only: bool,
    /// Minimum block size (1, or the device's logical block size with O_DIRECT).
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Maximum payload of a READ or WRITE.
    pub max_payload: u32,
}

impl ExportInfo {
    /// Transmission flags for this export; `structured` adds DF.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        // CAN_MULTI_CONN is honest: every connection shares one file descriptor, and FLUSH is an
        // fdatasync of that descriptor, so it covers writes completed on any connection.
        let mut f = TF_HAS_FLAGS
            | TF_SEND_FLUSH
            | TF_SEND_FUA
            | TF_SEND_TRIM
            | TF_SEND_WRITE_ZEROES
            | TF_SEND_FAST_ZERO
            | TF_SEND_CACHE
            | TF_CAN_MULTI_CONN;
        if structured {
            f |= TF_SEND_DF;
        }
        if self.read_only {
            f |= TF_READ_ONLY;
        }
        f
    }
}

/// Context id we hand out for `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The result of negotiation: what transmission looks like for this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Index into the export list.
    pub export: usize,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
}

/// What the driver does after writing the produced bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read the next option.
    Continue,
    /// Close the connection (ABORT, or EXPORT_NAME of an unknown export).
    Close,
    /// Enter transmission with this session.
    Transmit(Session),
    /// The ACK of `NBD_OPT_STARTTLS` was produced: write it, run the TLS handshake, and
    /// negotiate again over TLS with [`Negotiation::new`] and [`Tls::Established`] (the spec:
    /// nothing negotiated before the upgrade carries over).
    StartTls,
}

/// Where a connection stands with TLS (the spec's NOTLS, SELECTIVETLS and FORCEDTLS modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// The server has no TLS (NOTLS): `NBD_OPT_STARTTLS` is unsupported.
    Unavailable,
    /// TLS is the client's choice (`tls = "optional"`).
    Offered,
    /// Nothing but `NBD_OPT_STARTTLS` (and ABORT) before TLS (FORCEDTLS, `tls = "require"`).
    Required,
    /// The upgrade is done: this negotiation runs over TLS.
    Established,
}

/// Negotiation state of one connection.
#[derive(Debug)]
pub struct Negotiation<'a> {
    exports: &'a [ExportInfo],
    no_zeroes: bool,
    structured: bool,
    /// Export index and whether base:allocation was selected by the last SET_META_CONTEXT.
    meta: Option<(usize, bool)>,
    shutting_down: bool,
    tls: Tls,
}

impl<'a> Negotiation<'a> {
    /// Starts negotiation after the client's flags were read. A client that did not answer
    /// fixed newstyle cannot be offered TLS (the spec keeps it in NOTLS mode); if TLS is
    /// required it gets no export.
    pub fn new(exports: &'a [ExportInfo], client_flags: u32, tls: Tls) -> Self {
        let fixed = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
        let tls = match tls {
            Tls::Offered if !fixed => Tls::Unavailable,
            t => t,
        };
        Self {
            exports,
            no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
            structured: false,
            meta: None,
            shutting_down: false,
            tls,
        }
    }

    /// From now on GO/EXPORT_NAME are refused because the server is stopping.
    pub fn set_shutting_down(&mut self) {
        self.shutting_down = true;
    }

    fn find(&self, name: &str) -> Option<usize> {
        if name.is_empty() && !self.exports.is_empty() {
            return Some(0); // the default export
        }
        self.exports.iter().position(|e| e.name == name)
    }

    /// Handles one option; appends the reply bytes to `out`.
    pub fn handle(&mut self, option: u32, data: &[u8], out: &mut BytesMut) -> Step {
        if option == OPT_STARTTLS {
            return self.starttls(data, out);
        }
        if self.tls == Tls::Required {
            // FORCEDTLS: every other option is refused, EXPORT_NAME (which cannot be refused)
            // closes the connection. ABORT is still honoured: it costs nothing.
            return match option {
                OPT_EXPORT_NAME => Step::Close,
                OPT_ABORT => {
                    encode_option_reply(out, option, REP_ACK, &[]);
                    Step::Close
                }
                _ => {
                    encode_option_reply(out, option, REP_ERR_TLS_REQD, b"TLS is required");
                    Step::Continue
                }
            };
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data, out),
            OPT_ABORT => {
                encode_option_reply(out, option, REP_ACK, &[]);
                Step::Close
            }
            OPT_LIST => {
                if !data.is_empty() {
                    encode_option_reply(out, option, REP_ERR_INVALID, b"LIST takes no data");
                    return Step::Continue;
                }
                for e in self.exports {
                    let mut d = BytesMut::new();
                    d.put_u32(u32::try_from(e.name.len()).expect("export names are short"));
                    d.put_slice(e.name.as_bytes());
                    d.put_slice(e.description.as_bytes());
                    encode_option_reply(out, option, REP_SERVER, &d);
                }
                encode_option_reply(out, option, REP_ACK, &[]);
                Step::Continue
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    encode_option_reply(out, option, REP_ERR_INVALID, b"takes no data");
                } else {
                    self.structured = true;
                    encode_option_reply(out, option, REP_ACK, &[]);
                }
                Step::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data, out),
            _ => {
                encode_option_reply(out, option, REP_ERR_UNSUP, b"option not supported");
                Step::Continue
            }
        }
    }

    fn starttls(&mut self, data: &[u8], out: &mut BytesMut) -> Step {
        let (kind, why): (u32, &[u8]) = match self.tls {
            Tls::Unavailable => (REP_ERR_UNSUP, b"option not supported"),
            Tls::Established => (REP_ERR_INVALID, b"TLS is already in use"),
            Tls::Offered | Tls::Required if !data.is_empty() => {
                (REP_ERR_INVALID, b"STARTTLS takes no data")
            }
            Tls::Offered | Tls::Required => {
                encode_option_reply(out, OPT_STARTTLS, REP_ACK, &[]);
                return Step::StartTls;
            }
        };
        encode_option_reply(out, OPT_STARTTLS, kind, why);
        Step::Continue
    }

    fn export_name(&mut self, data: &[u8], out: &mut BytesMut) -> Step {
        // EXPORT_NAME has no error reply: an unknown name (or a shutdown) closes the connection.
        let idx = std::str::from_utf8(data).ok().and_then(|n| self.find(n));
        let (Some(idx), false) = (idx, self.shutting_down) else { return Step::Close };
        let e = &self.exports[idx];
        out.put_u64(e.size);
        out.put_u16(e.transmission_flags(self.structured));
        if !self.no_zeroes {
            out.put_bytes(0, 124);
        }
        Step::Transmit(self.session(idx))
    }

    fn session(&self, idx: usize) -> Session {
        let base_allocation = matches!(self.meta, Some((i, true)) if i == idx) && self.structured;
        Session { export: idx, structured: self.structured, base_allocation }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], out: &mut BytesMut) -> Step {
        let mut r = OptReader::new(data);
        let Some(name) = r.string() else {
            encode_option_reply(out, option, REP_ERR_INVALID, b"malformed export name");
            return Step::Continue;
        };
        let Some(n) = r.u16() else {
            encode_option_reply(out, option, REP_ERR_INVALID, b"missing request count");
            return Step::Continue;
        };
        if r.remaining() != usize::from(n) * 2 {
            encode_option_reply(out, option, REP_ERR_INVALID, b"request count mismatch");
            return Step::Continue;
        }
        let mut wanted = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            wanted.push(r.u16().expect("length checked above"));
        }
        let Some(idx) = self.find(name) else {
            encode_option_reply(out, option, REP_ERR_UNKNOWN, b"no such export");
            return Step::Continue;
        };
        if option == OPT_GO && self.shutting_down {
            encode_option_reply(out, option, REP_ERR_SHUTDOWN, b"server is shutting down");
            return Step::Continue;
        }
        let e = &self.exports[idx];
        let mut d = BytesMut::new();
        d.put_u16(INFO_EXPORT);
        d.put_u64(e.size);
        d.put_u16(e.transmission_flags(self.structured));
        encode_option_reply(out, option, REP_INFO, &d);
        // Block sizes are always sent: they are advisory for clients that did not ask.
        d.clear();
        d.put_u16(INFO_BLOCK_SIZE);
        d.put_u32(e.min_block);
        d.put_u32(e.preferred_block);
        d.put_u32(e.max_payload);
        encode_option_reply(out, option, REP_INFO, &d);
        if wanted.contains(&INFO_NAME) {
            d.clear();
            d.put_u16(INFO_NAME);
            d.put_slice(e.name.as_bytes());
            encode_option_reply(out, option, REP_INFO, &d);
        }
        if wanted.contains(&INFO_DESCRIPTION) {
            d.clear();
            d.put_u16(INFO_DESCRIPTION);
            d.put_slice(e.description.as_bytes());
            encode_option_reply(out, option, REP_INFO, &d);
        }
        encode_option_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO { Step::Transmit(self.session(idx)) } else { Step::Continue }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut BytesMut) -> Step {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // "Issuing this command replaces all previously-set metadata contexts (including
            // when this command fails)".
            self.meta = None;
        }
        if !self.structured {
            encode_option_reply(
                out,
                option,
                REP_ERR_INVALID,
                b"negotiate structured replies first",
            );
            return Step::Continue;
        }
        let mut r = OptReader::new(data);
        let (Some(name), Some(count)) = (r.string(), r.u32()) else {
            encode_option_reply(out, option, REP_ERR_INVALID, b"malformed request");
            return Step::Continue;
        };
        let mut queries = Vec::new();
        for _ in 0..count {
            let Some(q) = r.string() else {
                encode_option_reply(out, option, REP_ERR_INVALID, b"malformed query");
                return Step::Continue;
            };
            queries.push(q);
        }
        if r.remaining() != 0 {
            encode_option_reply(out, option, REP_ERR_INVALID, b"trailing bytes");
            return Step::Continue;
        }
        let Some(idx) = self.find(name) else {
            encode_option_reply(out, option, REP_ERR_UNKNOWN, b"no such export");
            return Step::Continue;
        };
        let selected = if set {
            queries.contains(&BASE_ALLOCATION)
        } else {
            // LIST: no queries lists everything; "base:" is the namespace wildcard.
            queries.is_empty() || queries.iter().any(|q| *q == BASE_ALLOCATION || *q == "base:")
        };
        if selected {
            let mut d = BytesMut::new();
            d.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
            d.put_slice(BASE_ALLOCATION.as_bytes());
            encode_option_reply(out, option, REP_META_CONTEXT, &d);
        }
        if set {
            self.meta = Some((idx, selected));
        }
        encode_option_reply(out, option, REP_ACK, &[]);
        Step::Continue
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use bytes::Buf;

    fn exports() -> Vec<ExportInfo> {
        vec![ExportInfo {
            name: "vol0".into(),
            description: "test".into(),
            size: 1 << 20,
            read_only: false,
            min_block: 1,
            preferred_block: 4096,
            max_payload: 1 << 25,
        }]
    }

    /// Splits option replies into (option, type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(out.get_u64(), OPT_REPLY_MAGIC);
            let (o, t, l) = (out.get_u32(), out.get_u32(), out.get_u32() as usize);
            v.push((o, t, out[..l].to_vec()));
            out.advance(l);
        }
        v
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = BytesMut::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u16(infos.len() as u16);
        for i in infos {
            d.put_u16(*i);
        }
        d.to_vec()
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = BytesMut::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u32(queries.len() as u32);
        for q in queries {
            d.put_u32(q.len() as u32);
            d.put_slice(q.as_bytes());
        }
        d.to_vec()
    }

    #[test]
    fn go_known_export_sends_info_and_acks() {
        let ex = exports();
        let mut n =
            Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, Tls::Unavailable);
        let mut out = BytesMut::new();
        let step = n.handle(OPT_GO, &go_data("vol0", &[INFO_NAME, INFO_DESCRIPTION]), &mut out);
        assert_eq!(
            step,
            Step::Transmit(Session { export: 0, structured: false, base_allocation: false })
        );
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|x| x.1).collect();
        assert_eq!(types, vec![REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
        assert_eq!(&r[0].2[..2], &INFO_EXPORT.to_be_bytes());
        assert_eq!(&r[0].2[2..10], &(1u64 << 20).to_be_bytes());
        let flags = u16::from_be_bytes([r[0].2[10], r[0].2[11]]);
        assert_ne!(flags & TF_CAN_MULTI_CONN, 0);
        assert_eq!(flags & TF_SEND_DF, 0, "DF only with structured replies");
        assert_eq!(&r[2].2[2..], b"vol0");
        assert_eq!(&r[3].2[2..], b"test");
    }

    #[test]
    fn default_export_is_the_first() {
        let ex = exports();
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Unavailable);
        let mut out = BytesMut::new();
        assert!(matches!(n.handle(OPT_GO, &go_data("", &[]), &mut out), Step::Transmit(_)));
    }

    #[test]
    fn unknown_export_refused_and_negotiation_continues() {
        let ex = exports();
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Unavailable);
        let mut out = BytesMut::new();
        assert_eq!(n.handle(OPT_GO, &go_data("nope", &[]), &mut out), Step::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
        out.clear();
        assert_eq!(n.handle(OPT_INFO, &go_data("nope", &[]), &mut out), Step::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
        out.clear();
        assert_eq!(n.handle(OPT_EXPORT_NAME, b"nope", &mut out), Step::Close);
        assert!(out.is_empty());
    }

    #[test]
    fn malformed_go_is_invalid() {
        let ex = exports();
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Unavailable);
        for bad in [vec![], vec![0, 0, 0, 9, b'v'], {
            let mut d = go_data("vol0", &[1]);
            d.push(0);
            d
        }] {
            let mut out = BytesMut::new();
            assert_eq!(n.handle(OPT_GO, &bad, &mut out), Step::Continue);
            assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        }
    }

    #[test]
    fn unknown_option_unsupported_then_continue() {
        let ex = exports();
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Unavailable);
        let mut out = BytesMut::new();
        for opt in [OPT_STARTTLS, 4, 11, 0xdead_beef] {
            out.clear();
            assert_eq!(n.handle(opt, b"xyz", &mut out), Step::Continue);
            assert_eq!(replies(&out), vec![(opt, REP_ERR_UNSUP, b"option not supported".to_vec())]);
        }
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        let ex = exports();
        let mut out = BytesMut::new();
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Unavailable);
        assert!(matches!(n.handle(OPT_EXPORT_NAME, b"vol0", &mut out), Step::Transmit(_)));
        assert_eq!(out.len(), 8 + 2 + 124);
        out.clear();
        let mut n =
            Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, Tls::Unavailable);
        assert!(matches!(n.handle(OPT_EXPORT_NAME, b"vol0", &mut out), Step::Transmit(_)));
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn list_and_abort() {
        let ex = exports();
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Unavailable);
        let mut out = BytesMut::new();
        assert_eq!(n.handle(OPT_LIST, &[], &mut out), Step::Continue);
        let r = replies(&out);
        assert_eq!(r[0].1, REP_SERVER);
        assert_eq!(&r[0].2[4..8], b"vol0");
        assert_eq!(r[1].1, REP_ACK);
        out.clear();
        assert_eq!(n.handle(OPT_LIST, &[1], &mut out), Step::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        assert_eq!(n.handle(OPT_ABORT, &[], &mut out), Step::Close);
        assert_eq!(replies(&out)[0].1, REP_ACK);
    }

    #[test]
    fn meta_context_needs_structured_and_selects_base_allocation() {
        let ex = exports();
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Unavailable);
        let mut out = BytesMut::new();
        n.handle(OPT_SET_META_CONTEXT, &meta_data("vol0", &[BASE_ALLOCATION]), &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        n.handle(OPT_STRUCTURED_REPLY, &[], &mut out);
        out.clear();
        n.handle(OPT_LIST_META_CONTEXT, &meta_data("vol0", &[]), &mut out);
        let r = replies(&out);
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(&r[0].2[4..], BASE_ALLOCATION.as_bytes());
        out.clear();
        n.handle(
            OPT_SET_META_CONTEXT,
            &meta_data("vol0", &["x-foo:bar", BASE_ALLOCATION]),
            &mut out,
        );
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(&r[0].2[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        out.clear();
        let step = n.handle(OPT_GO, &go_data("vol0", &[]), &mut out);
        assert_eq!(
            step,
            Step::Transmit(Session { export: 0, structured: true, base_allocation: true })
        );
        let r = replies(&out);
        let flags = u16::from_be_bytes([r[0].2[10], r[0].2[11]]);
        assert_ne!(flags & TF_SEND_DF, 0);
    }

    #[test]
    fn failed_set_meta_context_clears_selection() {
        let ex = exports();
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Unavailable);
        let mut out = BytesMut::new();
        n.handle(OPT_STRUCTURED_REPLY, &[], &mut out);
        n.handle(OPT_SET_META_CONTEXT, &meta_data("vol0", &[BASE_ALLOCATION]), &mut out);
        out.clear();
        n.handle(OPT_SET_META_CONTEXT, &[0, 0, 0, 1], &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        let step = n.handle(OPT_GO, &go_data("vol0", &[]), &mut out);
        assert_eq!(
            step,
            Step::Transmit(Session { export: 0, structured: true, base_allocation: false })
        );
    }

    #[test]
    fn shutdown_refuses_go() {
        let ex = exports();
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Unavailable);
        n.set_shutting_down();
        let mut out = BytesMut::new();
        assert_eq!(n.handle(OPT_GO, &go_data("vol0", &[]), &mut out), Step::Continue);
        assert_eq!(replies(&out).last().unwrap().1, REP_ERR_SHUTDOWN);
        assert_eq!(n.handle(OPT_EXPORT_NAME, b"vol0", &mut BytesMut::new()), Step::Close);
    }

    #[test]
    fn forced_tls_refuses_everything_but_starttls_and_abort() {
        let ex = exports();
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Required);
        let mut out = BytesMut::new();
        for (opt, data) in [
            (OPT_GO, go_data("vol0", &[])),
            (OPT_INFO, go_data("vol0", &[])),
            (OPT_LIST, vec![]),
            (OPT_STRUCTURED_REPLY, vec![]),
            (OPT_SET_META_CONTEXT, meta_data("vol0", &[BASE_ALLOCATION])),
            (0xdead_beef, vec![1, 2]),
        ] {
            out.clear();
            assert_eq!(n.handle(opt, &data, &mut out), Step::Continue, "{opt}");
            assert_eq!(replies(&out), vec![(opt, REP_ERR_TLS_REQD, b"TLS is required".to_vec())]);
        }
        out.clear();
        assert_eq!(n.handle(OPT_EXPORT_NAME, b"vol0", &mut out), Step::Close);
        assert!(out.is_empty(), "EXPORT_NAME has no error reply: the connection closes");
        assert_eq!(n.handle(OPT_ABORT, &[], &mut out), Step::Close);
        assert_eq!(replies(&out)[0].1, REP_ACK);
        // STARTTLS with data is invalid; without, it is acknowledged.
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Required);
        out.clear();
        assert_eq!(n.handle(OPT_STARTTLS, b"x", &mut out), Step::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        assert_eq!(n.handle(OPT_STARTTLS, &[], &mut out), Step::StartTls);
        assert_eq!(replies(&out), vec![(OPT_STARTTLS, REP_ACK, vec![])]);
    }

    #[test]
    fn optional_tls_serves_plain_clients_and_upgrades_on_request() {
        let ex = exports();
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Offered);
        let mut out = BytesMut::new();
        assert_eq!(n.handle(OPT_STARTTLS, &[], &mut out), Step::StartTls);
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Offered);
        assert!(matches!(n.handle(OPT_GO, &go_data("vol0", &[]), &mut out), Step::Transmit(_)));
    }

    #[test]
    fn after_the_upgrade_starttls_is_invalid_and_the_rest_works() {
        let ex = exports();
        let mut n = Negotiation::new(&ex, FLAG_C_FIXED_NEWSTYLE, Tls::Established);
        let mut out = BytesMut::new();
        assert_eq!(n.handle(OPT_STARTTLS, &[], &mut out), Step::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        assert!(matches!(n.handle(OPT_GO, &go_data("vol0", &[]), &mut out), Step::Transmit(_)));
        assert!(!replies(&out).iter().any(|r| r.1 == REP_ERR_TLS_REQD));
    }

    #[test]
    fn a_client_without_fixed_newstyle_is_never_offered_tls() {
        let ex = exports();
        let mut n = Negotiation::new(&ex, 0, Tls::Offered);
        let mut out = BytesMut::new();
        assert_eq!(n.handle(OPT_STARTTLS, &[], &mut out), Step::Continue);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
        // With TLS required such a client gets no export at all.
        let mut n = Negotiation::new(&ex, 0, Tls::Required);
        assert_eq!(n.handle(OPT_EXPORT_NAME, b"vol0", &mut BytesMut::new()), Step::Close);
    }
}
