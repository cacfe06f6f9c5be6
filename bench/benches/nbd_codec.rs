//! Criterion micro-benchmarks for the NBD codec: request decoding, validation, reply encoding,
//! and a whole negotiation.

use bytes::{BufMut, BytesMut};
use criterion::{Criterion, criterion_group, criterion_main};
use replicator::nbd::negotiate::{ExportInfo, Negotiation, Session, Tls};
use replicator::nbd::proto::*;
use replicator::nbd::request::{Limits, validate};
use std::hint::black_box;

fn export() -> ExportInfo {
    ExportInfo {
        name: "vol0".into(),
        description: "bench".into(),
        size: 1 << 30,
        read_only: false,
        min_block: 1,
        preferred_block: 4096,
        max_payload: 32 << 20,
    }
}

fn codec(c: &mut Criterion) {
    let mut wire = BytesMut::new();
    for i in 0..64u64 {
        encode_request(
            &mut wire,
            &RequestHeader { flags: 0, kind: CMD_WRITE, cookie: i, offset: i * 4096, len: 4096 },
        );
    }
    let wire = wire.freeze();
    c.bench_function("decode_request x64", |b| {
        b.iter(|| {
            let mut n = 0u64;
            for chunk in wire.chunks(REQUEST_HEADER_LEN) {
                n += decode_request(black_box(chunk)).expect("valid").expect("whole").offset;
            }
            n
        })
    });
    let ex = export();
    let lim = Limits::new(&ex, &Session { export: 0, structured: true, base_allocation: true });
    let h = RequestHeader {
        flags: CMD_FLAG_FUA,
        kind: CMD_WRITE,
        cookie: 1,
        offset: 1 << 20,
        len: 4096,
    };
    c.bench_function("validate write", |b| b.iter(|| validate(black_box(&h), black_box(&lim))));
    let mut out = BytesMut::with_capacity(4096);
    c.bench_function("encode 64 simple replies", |b| {
        b.iter(|| {
            out.clear();
            for i in 0..64 {
                encode_simple_reply(&mut out, 0, black_box(i));
            }
            out.len()
        })
    });
    c.bench_function("encode read chunk header", |b| {
        b.iter(|| {
            out.clear();
            encode_read_chunk_header(&mut out, black_box(7), black_box(4096), black_box(4096));
            out.len()
        })
    });
    let exports = vec![ex];
    let mut go = BytesMut::new();
    go.put_u32(4);
    go.put_slice(b"vol0");
    go.put_u16(1);
    go.put_u16(INFO_BLOCK_SIZE);
    c.bench_function("negotiate structured + GO", |b| {
        b.iter(|| {
            let mut out = BytesMut::with_capacity(512);
            let mut n = Negotiation::new(
                &exports,
                FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
                Tls::Unavailable,
            );
            n.handle(OPT_STRUCTURED_REPLY, &[], &mut out);
            n.handle(OPT_GO, black_box(&go), &mut out)
        })
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
