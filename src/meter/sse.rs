//! Incremental Server-Sent Events parser: bytes in as they pass through the meter, whole events
//! out. It works on bytes, never on `str`, so a chunk boundary anywhere (mid-line, mid-CRLF,
//! mid-UTF-8 sequence) changes nothing: only `\r` and `\n` delimit, and they never occur inside a
//! multi-byte UTF-8 sequence.

/// One dispatched event: its `event:` name (empty when absent) and its `data:` lines joined by
/// `\n`, as the SSE specification defines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub name: Vec<u8>,
    pub data: Vec<u8>,
}

#[derive(Debug)]
pub struct Parser {
    line: Vec<u8>,
    event: Event,
    has_data: bool,
    /// The previous byte was `\r`: a `\n` right after it (maybe in the next chunk) ends nothing new.
    after_cr: bool,
    /// Bytes an event or line may hold; beyond it the event is dropped and `overflowed` is set, so
    /// a hostile or broken upstream cannot make the meter buffer without bound.
    max_event_bytes: usize,
    pub overflowed: bool,
    /// Dropping the rest of an oversized event, up to its blank line.
    skipping: bool,
    /// Bytes of the current line arrived (kept or not): such a line is not the blank one.
    line_seen: bool,
}

impl Parser {
    pub fn new(max_event_bytes: usize) -> Parser {
        Parser {
            line: Vec::new(),
            event: Event::default(),
            has_data: false,
            after_cr: false,
            max_event_bytes,
            overflowed: false,
            skipping: false,
            line_seen: false,
        }
    }

    /// The bytes the parser holds (allocated) of an unfinished line and event.
    pub fn held_bytes(&self) -> usize {
        self.line.capacity() + self.event.data.capacity() + self.event.name.capacity()
    }

    /// Feeds one chunk; calls `on_event` for every event the chunk completes.
    pub fn feed(&mut self, mut chunk: &[u8], on_event: &mut impl FnMut(Event)) {
        while !chunk.is_empty() {
            if self.after_cr && chunk[0] == b'\n' {
                chunk = &chunk[1..];
                self.after_cr = false;
                continue;
            }
            self.after_cr = false;
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(end) => {
                    self.push_line_bytes(&chunk[..end]);
                    self.after_cr = chunk[end] == b'\r';
                    chunk = &chunk[end + 1..];
                    self.end_line(on_event);
                }
                None => {
                    self.push_line_bytes(chunk);
                    chunk = &[];
                }
            }
        }
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        self.line_seen |= !bytes.is_empty();
        if self.skipping {
            return;
        }
        if self.line.len() + self.event.data.len() + bytes.len() > self.max_event_bytes {
            self.overflowed = true;
            self.skipping = true;
            self.line.clear();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn end_line(&mut self, on_event: &mut impl FnMut(Event)) {
        let line = std::mem::take(&mut self.line);
        let blank = !std::mem::take(&mut self.line_seen);
        if blank {
            // A blank line dispatches the event (or ends the skipped one).
            if self.has_data && !self.skipping {
                on_event(std::mem::take(&mut self.event));
            }
            self.event = Event::default();
            self.has_data = false;
            self.skipping = false;
        } else if !self.skipping && line[0] != b':' {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(i) => {
                    let value = &line[i + 1..];
                    (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (&line[..], &[][..]),
            };
            match field {
                b"data" => {
                    if self.has_data {
                        self.event.data.push(b'\n');
                    }
                    self.event.data.extend_from_slice(value);
                    self.has_data = true;
                }
                b"event" => self.event.name = value.to_vec(),
                _ => {} // id, retry and unknown fields carry no usage.
            }
        }
        self.line = line;
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_chunks(input: &[u8], cuts: &[usize]) -> Vec<Event> {
        let mut parser = Parser::new(1 << 20);
        let mut events = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let cut = cut.clamp(start, input.len());
            parser.feed(&input[start..cut], &mut |e| events.push(e));
            start = cut;
        }
        events
    }

    fn ev(name: &str, data: &str) -> Event {
        Event { name: name.as_bytes().to_vec(), data: data.as_bytes().to_vec() }
    }

    const STREAM: &str =
        "event: message_start\ndata: {\"a\":\"é✓\"}\n\n: keep-alive\n\ndata: one\ndata:two\r\n\r\nevent: x\rdata: y\r\rdata: [DONE]\n\n";

    fn expected() -> Vec<Event> {
        vec![ev("message_start", "{\"a\":\"é✓\"}"), ev("", "one\ntwo"), ev("x", "y"), ev("", "[DONE]")]
    }

    #[test]
    fn parses_events_with_every_line_ending() {
        assert_eq!(parse_in_chunks(STREAM.as_bytes(), &[]), expected());
    }

    #[test]
    fn any_split_of_the_stream_gives_the_same_events() {
        // Every cut point, including between \r and \n and inside the two-byte `é` and three-byte `✓`.
        let bytes = STREAM.as_bytes();
        for a in 0..=bytes.len() {
            assert_eq!(parse_in_chunks(bytes, &[a]), expected(), "split at {a}");
        }
        let one_byte_at_a_time: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(parse_in_chunks(bytes, &one_byte_at_a_time), expected());
    }

    #[test]
    fn an_unterminated_event_at_the_end_is_not_dispatched() {
        assert_eq!(parse_in_chunks(b"data: {\"usage\":1}\n", &[]), vec![]);
        assert_eq!(parse_in_chunks(b"data: a\n\ndata: b", &[]), vec![ev("", "a")]);
    }

    #[test]
    fn an_event_larger_than_the_limit_is_dropped_and_flagged() {
        let mut parser = Parser::new(16);
        let mut events = Vec::new();
        parser.feed(b"data: 0123456789abcdefghij\n\ndata: ok\n\n", &mut |e| events.push(e));
        assert!(parser.overflowed);
        assert_eq!(events, vec![ev("", "ok")], "parsing resumes at the next event");
        // Many small data lines of one event count together.
        let mut parser = Parser::new(16);
        let mut events = Vec::new();
        parser.feed(b"data: 0123456\ndata: 0123456\ndata: 0123456\n\n", &mut |e| events.push(e));
        assert!(parser.overflowed);
        assert!(events.is_empty());
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut seed = 7u64;
        for _ in 0..2000 {
            let mut parser = Parser::new(64);
            let len = (seed % 200) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    [b'\n', b'\r', b':', b' ', b'd', b'a', b't', 0xff, 0xe2][(seed >> 33) as usize % 9]
                })
                .collect();
            parser.feed(&bytes, &mut |e| assert!(e.data.len() <= 64));
        }
    }
}
