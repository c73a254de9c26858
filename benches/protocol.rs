//! Criterion micro-benchmarks for the sans-I/O SMTP grammar: the command parser
//! (`protocol::parse_command`) and the DATA decoder (`protocol::DataDecoder`).
//!
//! They measure the pure code only (no sockets, no store), so a regression in the hot
//! per-command and per-byte paths shows up here before it is lost in the noise of the
//! end-to-end relay benchmark (`scripts/bench-relay`). Run with `cargo bench --bench protocol`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use erlmail::protocol::{parse_command, DataDecoder, DataOutcome};

/// A typical pipelined transaction's command lines, as a client sends them.
const LINES: [&[u8]; 5] = [
    b"EHLO client.example.org",
    b"MAIL FROM:<alice@example.org> SIZE=1000 BODY=8BITMIME",
    b"RCPT TO:<bob@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.com",
    b"DATA",
    b"QUIT",
];

fn bench_parse_command(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_command");
    group.bench_function("mail_from_size_body", |b| {
        b.iter(|| parse_command(black_box(b"MAIL FROM:<a@b> SIZE=1000 BODY=8BITMIME")))
    });
    group.bench_function("rcpt_to", |b| {
        b.iter(|| parse_command(black_box(b"RCPT TO:<bob@example.com>")))
    });
    group.throughput(Throughput::Elements(LINES.len() as u64));
    group.bench_function("transaction_5_lines", |b| {
        b.iter(|| {
            for line in LINES {
                let _ = black_box(parse_command(black_box(line)));
            }
        })
    });
    group.finish();
}

/// About `size` bytes of DATA: 76-character lines, every fourth one starting with a dot
/// (so it is stuffed on the wire), ended by `CRLF.CRLF`.
fn stuffed_data(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 128);
    out.extend_from_slice(b"Subject: bench\r\n\r\n");
    let mut n = 0usize;
    while out.len() < size {
        if n.is_multiple_of(4) {
            // A body line starting with a dot is sent as two dots.
            out.extend_from_slice(b"..");
        }
        out.extend_from_slice(&[b'a' + (n % 26) as u8; 74]);
        out.extend_from_slice(b"\r\n");
        n += 1;
    }
    out.extend_from_slice(b".\r\n");
    out
}

fn decode(input: &[u8], chunk: usize) -> usize {
    let mut dec = DataDecoder::new(0);
    let mut off = 0;
    for piece in input.chunks(chunk) {
        let (used, done) = dec.feed(piece);
        off += used;
        if done {
            break;
        }
    }
    match dec.finish() {
        DataOutcome::Message(m) => m.len() + off,
        other => panic!("benchmark input refused: {other:?}"),
    }
}

fn bench_data_decoder(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_decoder");
    for (name, size) in [("1KiB", 1024usize), ("100KiB", 100 * 1024)] {
        let input = stuffed_data(size);
        group.throughput(Throughput::Bytes(input.len() as u64));
        // One feed of the whole section, then 16 KiB socket-sized reads.
        group.bench_function(format!("{name}_one_read"), |b| {
            b.iter(|| decode(black_box(&input), input.len()))
        });
        group.bench_function(format!("{name}_16KiB_reads"), |b| {
            b.iter_batched(
                || &input,
                |i| decode(black_box(i), 16 * 1024),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: this is a 2-core machine shared with timing-sensitive tests.
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench_parse_command, bench_data_decoder
}
criterion_main!(benches);
