//! Human-readable tables for the CLI.

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, Table};
use sluice_store::{RequestRecord, VariantSummary};

/// `YYYY-MM-DD HH:MM:SS.mmm` (UTC) from unix milliseconds.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{millis:03}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

/// Recent requests, oldest first.
pub fn requests(rows: &[RequestRecord]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "time (UTC)",
        "id",
        "deployment",
        "variant",
        "status",
        "error",
        "latency ms",
        "ttft ms",
        "tokens in/out",
        "stream",
    ]);
    for r in rows.iter().rev() {
        t.add_row([
            utc(r.ts_ms),
            r.id.clone(),
            opt(r.deployment.as_deref()),
            match (&r.shadow_of, &r.fallback_from) {
                // A mirrored call of a shadow stage: nobody was served it.
                (Some(_), _) => format!("{} (shadow)", opt(r.variant.as_deref())),
                // The assigned variant failed; another one served.
                (None, Some(from)) => {
                    format!("{} (fallback from {from})", opt(r.variant.as_deref()))
                }
                (None, None) => opt(r.variant.as_deref()),
            },
            r.status.to_string(),
            opt(r.error_kind.as_deref()),
            format!("{:.1}", r.latency_ms),
            opt(r.ttft_ms.map(|t| format!("{t:.1}"))),
            format!("{}/{}", opt(r.tokens_in), opt(r.tokens_out)),
            if r.stream { "yes" } else { "no" }.to_string(),
        ]);
    }
    for i in [4, 6, 7, 8] {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// Per-variant summary.
pub fn summary(rows: &[VariantSummary]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "deployment",
        "variant",
        "requests",
        "errors",
        "error rate",
        "p50 ms",
        "p99 ms",
        "ttft p50 ms",
        "tokens out",
    ]);
    for s in rows {
        t.add_row([
            s.deployment.clone(),
            s.variant.clone(),
            s.requests.to_string(),
            s.errors.to_string(),
            format!(
                "{:.1} %",
                100.0 * s.errors as f64 / s.requests.max(1) as f64
            ),
            format!("{:.0}", s.latency_p50_ms),
            format!("{:.0}", s.latency_p99_ms),
            opt(s.ttft_p50_ms.map(|t| format!("{t:.0}"))),
            s.tokens_out.to_string(),
        ]);
    }
    for i in 2..9 {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20.123");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000");
    }
}
