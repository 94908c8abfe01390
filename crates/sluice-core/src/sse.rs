//! An incremental decoder for server-sent events (the WHATWG event-stream
//! format) as upstreams send them.
//!
//! Bytes arrive in arbitrary pieces; [`SseDecoder::feed`] returns every event
//! completed by the new bytes. Lines may end in `\n`, `\r\n` or `\r`; comment
//! lines (`:`) are skipped; multi-line `data` is joined with `\n`. A single
//! event larger than the configured limit is an error instead of unbounded
//! memory growth.

/// One decoded event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The joined `data:` lines.
    pub data: String,
}

/// Why decoding stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// An event grew beyond the limit without being terminated.
    #[error("server-sent event exceeds {limit} bytes without ending")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A line was not valid UTF-8.
    #[error("server-sent event line is not valid UTF-8")]
    InvalidUtf8,
}

/// Incremental SSE decoder.
#[derive(Debug)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already scanned for line ends.
    scanned: usize,
    event: Option<String>,
    data: String,
    has_data: bool,
    /// A `\r` ended the previous piece: a leading `\n` belongs to it.
    pending_cr: bool,
    limit: usize,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new(16 * 1024 * 1024)
    }
}

impl SseDecoder {
    /// A decoder that refuses events larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        SseDecoder {
            buf: Vec::new(),
            scanned: 0,
            event: None,
            data: String::new(),
            has_data: false,
            pending_cr: false,
            limit,
        }
    }

    /// Feeds bytes, returning the events they complete.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut out = Vec::new();
        if self.pending_cr {
            if let Some(rest) = bytes.strip_prefix(b"\n") {
                bytes = rest;
            }
            self.pending_cr = false;
        }
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        let mut i = self.scanned;
        while i < self.buf.len() {
            let b = self.buf[i];
            if b == b'\n' || b == b'\r' {
                let line_end = i;
                let mut next = i + 1;
                if b == b'\r' {
                    if next < self.buf.len() {
                        if self.buf[next] == b'\n' {
                            next += 1;
                        }
                    } else {
                        self.pending_cr = true;
                    }
                }
                let line = std::str::from_utf8(&self.buf[start..line_end])
                    .map_err(|_| SseError::InvalidUtf8)?
                    .to_owned();
                if let Some(ev) = self.line(&line) {
                    out.push(ev);
                }
                start = next;
                i = next;
            } else {
                i += 1;
            }
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        if self.buf.len() + self.data.len() > self.limit {
            return Err(SseError::TooLarge { limit: self.limit });
        }
        Ok(out)
    }

    /// Ends the input: a final event without its blank line is still
    /// delivered (some upstreams close right after the last `data:` line).
    pub fn finish(&mut self) -> Result<Option<SseEvent>, SseError> {
        if !self.buf.is_empty() {
            let line = std::str::from_utf8(&self.buf)
                .map_err(|_| SseError::InvalidUtf8)?
                .to_owned();
            self.buf.clear();
            self.scanned = 0;
            if let Some(ev) = self.line(&line) {
                return Ok(Some(ev));
            }
        }
        Ok(self.dispatch())
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.find(':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_string()),
            _ => {} // id, retry and unknown fields are irrelevant here
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        if !self.has_data {
            return None;
        }
        self.has_data = false;
        Some(SseEvent {
            event,
            data: std::mem::take(&mut self.data),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(input: &[u8]) -> Vec<SseEvent> {
        let mut d = SseDecoder::default();
        let mut v = d.feed(input).expect("decodes");
        v.extend(d.finish().expect("finishes"));
        v
    }

    #[test]
    fn decodes_openai_style_streams() {
        let evs = all(b"data: {\"a\":1}\n\ndata: [DONE]\n\n");
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].data, "{\"a\":1}");
        assert_eq!(evs[1].data, "[DONE]");
    }

    #[test]
    fn decodes_named_events_multiline_data_and_comments() {
        let evs = all(b": ping\r\nevent: message_start\r\ndata: a\r\ndata: b\r\n\r\nevent: x\n\n");
        assert_eq!(
            evs,
            vec![SseEvent {
                event: Some("message_start".into()),
                data: "a\nb".into()
            }]
        );
    }

    #[test]
    fn delivers_a_final_unterminated_event() {
        let evs = all(b"data: last");
        assert_eq!(evs[0].data, "last");
    }

    #[test]
    fn refuses_oversized_events() {
        let mut d = SseDecoder::new(8);
        assert!(matches!(
            d.feed(b"data: 0123456789"),
            Err(SseError::TooLarge { limit: 8 })
        ));
    }

    proptest! {
        /// However the bytes are split, the same events come out.
        #[test]
        fn splitting_does_not_change_events(
            datas in proptest::collection::vec("[a-z{}\":, ]{0,20}", 1..6),
            crlf in any::<bool>(),
            cuts in proptest::collection::vec(0usize..200, 0..8),
        ) {
            let nl = if crlf { "\r\n" } else { "\n" };
            let text: String = datas.iter().map(|d| format!("data: {d}{nl}{nl}")).collect();
            let bytes = text.as_bytes();
            let whole = all(bytes);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut d = SseDecoder::default();
            let mut got = Vec::new();
            let mut prev = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                got.extend(d.feed(&bytes[prev..c]).expect("decodes"));
                prev = c;
            }
            got.extend(d.finish().expect("finishes"));
            prop_assert_eq!(&got, &whole);
            prop_assert_eq!(got.len(), datas.len());
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = SseDecoder::new(256);
            let _ = d.feed(&bytes);
            let _ = d.finish();
        }
    }
}
