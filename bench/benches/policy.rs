//! The default PII + secrets principles on 128 bytes and 1, 4 and 64 KB of text, and the
//! streaming guard per chunk on 4 and 32 KB answers. Target: 4 KB scanned in under 20 µs.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_core::config::Applies;
use sluice_core::policy::guard::OutputGuard;

fn whole_text(c: &mut Criterion) {
    let constitution = sluice_bench::default_constitution();
    let mut g = c.benchmark_group("policy/whole_text");
    // 128 bytes: a typical chat message or short answer.
    for bytes in [128usize, 1024, 4096, 65536] {
        let t = sluice_bench::text(bytes);
        g.throughput(Throughput::Bytes(t.len() as u64));
        let name = if bytes < 1024 {
            format!("{bytes}B")
        } else {
            format!("{}KB", bytes / 1024)
        };
        g.bench_with_input(BenchmarkId::from_parameter(name), &t, |b, t| {
            b.iter(|| constitution.check(Applies::Output, std::hint::black_box(t)))
        });
    }
    g.finish();
}

fn streaming(c: &mut Criterion) {
    let constitution = sluice_bench::default_constitution();
    let mut g = c.benchmark_group("policy/stream");
    // A long answer costs the same per piece as a short one: the guard
    // rescans a bounded window, never the whole answer so far.
    for kb in [4usize, 32] {
        let t = sluice_bench::text(kb * 1024);
        // ~4 characters per token, as models stream.
        let chunks: Vec<&str> = {
            let mut v = Vec::new();
            let mut at = 0;
            while at < t.len() {
                let mut end = (at + 4).min(t.len());
                while !t.is_char_boundary(end) {
                    end += 1;
                }
                v.push(&t[at..end]);
                at = end;
            }
            v
        };
        g.throughput(Throughput::Elements(chunks.len() as u64));
        g.bench_function(format!("{kb}KB_in_4_byte_chunks"), |b| {
            b.iter(|| {
                let mut guard = OutputGuard::new(&constitution);
                for ch in &chunks {
                    std::hint::black_box(guard.push(ch));
                }
                guard.finish()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, whole_text, streaming);
criterion_main!(benches);
