//! The bytes the meter may hold in buffers, across every call in flight. The agent beside the
//! meter is the hostile party: without this bound, three concurrent 32 MiB requests OOM-killed
//! the meter (64 MiB limit) and each crash lost up to a report interval of usage
//! (tests/meter/test_meter.py::test_concurrent_huge_requests_cannot_crash_the_meter).
//!
//! The arithmetic, for the container's 64 MiB limit (domain/meter_sidecar.rs): the meter's own
//! baseline (runtime, TLS roots, price table) is about 11 MiB idle in a release build (README,
//! `make bench-meter`); allocator slack and hyper's per-connection read buffers (up to ~400 KiB
//! each) take up to ~16 MiB more under a burst; that leaves [`TOTAL_BYTES`] = 24 MiB for bodies,
//! their parse and their rewrite, with ~13 MiB to spare. Measured: the debug build the attack
//! test runs (33 MiB idle, most of it its larger binary mapped) peaks at 47 MiB under it.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Every buffer of every call in flight together.
pub const TOTAL_BYTES: usize = 24 * 1024 * 1024;
/// One request body. With its parse and rewrite (about twice its size for ordinary JSON) it
/// still fits the whole budget, so any request under the cap goes through once others finish.
pub const MAX_REQUEST_BYTES: usize = 10 * 1024 * 1024;
/// What a parsed JSON value may hold per structural token (`{`, `[`, `,`, `:`): a 32-byte
/// `serde_json::Value`, doubled by `Vec` growth, a map entry's node share and its key's
/// allocation. Hostile JSON like `[0,0,0,…]` is 16 values per 32 bytes of input: charged for.
pub const BYTES_PER_JSON_TOKEN: usize = 160;

/// Why bytes were not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// More than the whole budget (or the per-request cap): it can never be had. HTTP 413.
    TooLarge,
    /// Held by other calls right now: worth a retry shortly. HTTP 503 with Retry-After.
    Busy,
}

#[derive(Clone, Debug)]
pub struct BufferBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl Default for BufferBudget {
    fn default() -> Self {
        BufferBudget::new(TOTAL_BYTES)
    }
}

impl BufferBudget {
    pub fn new(total: usize) -> BufferBudget {
        BufferBudget { bytes: Arc::new(Semaphore::new(total)), total }
    }

    /// Bytes not held by any call.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// `n` bytes at once, or why not. Never waits: a caller that cannot be served is told so
    /// rather than queued behind the calls holding the memory.
    pub fn try_charge(&self, n: usize) -> Result<Charge, Shortfall> {
        let mut charge = self.nothing();
        charge.try_grow(n)?;
        Ok(charge)
    }

    /// A charge of no bytes yet, to grow.
    pub fn nothing(&self) -> Charge {
        Charge { permit: None, budget: self.clone() }
    }
}

/// Bytes held from the budget; given back when dropped (with the buffer it travels with).
#[derive(Debug)]
pub struct Charge {
    permit: Option<OwnedSemaphorePermit>,
    budget: BufferBudget,
}

impl Charge {
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Gives every byte back (the buffer it covered is gone).
    pub fn release(&mut self) {
        self.permit = None;
    }

    /// Gives back all but `n` bytes (the buffer it covers shrank).
    pub fn shrink_to(&mut self, n: usize) {
        if let Some(permit) = &mut self.permit
            && permit.num_permits() > n
        {
            drop(permit.split(permit.num_permits() - n));
        }
    }

    /// `n` bytes more; on a shortfall the charge keeps what it had.
    pub fn try_grow(&mut self, n: usize) -> Result<(), Shortfall> {
        if n == 0 {
            return Ok(());
        }
        if self.bytes().saturating_add(n) > self.budget.total {
            return Err(Shortfall::TooLarge);
        }
        let wanted = u32::try_from(n).map_err(|_| Shortfall::TooLarge)?;
        let more = match self.budget.bytes.clone().try_acquire_many_owned(wanted) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => return Err(Shortfall::Busy),
            Err(TryAcquireError::Closed) => return Err(Shortfall::TooLarge),
        };
        match &mut self.permit {
            Some(permit) => permit.merge(more),
            None => self.permit = Some(more),
        }
        Ok(())
    }
}

/// Makes room in `buffer` for `more` bytes, charged to `charge` before it is allocated: grown by
/// doubling, as `Vec` would, up to `max` (past it: `TooLarge`). On a shortfall nothing changes.
pub fn reserve_charged(buffer: &mut Vec<u8>, charge: &mut Charge, more: usize, max: usize) -> Result<(), Shortfall> {
    let needed = buffer.len() + more;
    if needed > max {
        return Err(Shortfall::TooLarge);
    }
    if needed > buffer.capacity() {
        let capacity = needed.max(buffer.capacity() * 2).min(max);
        charge.try_grow(capacity - charge.bytes().min(capacity))?;
        buffer.reserve_exact(capacity - buffer.len());
    }
    Ok(())
}

/// A buffer and the charge for it: as the owner of a `Bytes`, the bytes go back to the budget
/// when the last clone of that `Bytes` is dropped (hyper drops a request body once sent).
pub struct Charged {
    pub buffer: Vec<u8>,
    pub charge: Charge,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Charged {
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

/// Structural tokens of a JSON text outside its strings: an upper bound (plus one) on the
/// values and map entries parsing it creates. Not a validator: bad JSON is the parser's to refuse.
pub fn json_tokens(text: &[u8]) -> usize {
    let mut tokens = 0;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'{' | b'[' | b',' | b':' => tokens += 1,
                _ => {}
            }
        }
    }
    tokens
}

/// The bytes parsing `body` into a `serde_json::Value` and writing it back out may take.
pub fn parse_cost(body: &[u8]) -> usize {
    json_tokens(body).saturating_add(1).saturating_mul(BYTES_PER_JSON_TOKEN).saturating_add(body.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_grows_by_doubling_charged_first_and_not_past_its_cap() {
        let budget = BufferBudget::new(100);
        let (mut buffer, mut charge) = (Vec::new(), budget.nothing());
        reserve_charged(&mut buffer, &mut charge, 10, 64).unwrap();
        buffer.extend_from_slice(&[0; 10]);
        reserve_charged(&mut buffer, &mut charge, 5, 64).unwrap();
        assert_eq!((buffer.capacity(), charge.bytes()), (20, 20), "doubled, and charged what it holds");
        assert_eq!(reserve_charged(&mut buffer, &mut charge, 60, 64), Err(Shortfall::TooLarge));
        let _others = budget.try_charge(75).unwrap();
        assert_eq!(reserve_charged(&mut buffer, &mut charge, 15, 64), Err(Shortfall::Busy));
        assert_eq!((buffer.capacity(), charge.bytes()), (20, 20), "a shortfall changes nothing");
    }

    #[test]
    fn charges_come_back_when_dropped_with_their_buffer() {
        let budget = BufferBudget::new(100);
        let a = budget.try_charge(60).unwrap();
        assert_eq!(budget.available(), 40);
        assert_eq!(budget.try_charge(41).unwrap_err(), Shortfall::Busy, "held by another call: retry later");
        assert_eq!(budget.try_charge(101).unwrap_err(), Shortfall::TooLarge, "more than the whole budget: never");
        let bytes = Charged { buffer: vec![1; 60], charge: a }.into_bytes();
        let clone = bytes.clone();
        drop(bytes);
        assert_eq!(budget.available(), 40, "a clone still holds the buffer");
        drop(clone);
        assert_eq!(budget.available(), 100);
    }

    #[test]
    fn a_charge_grows_chunk_by_chunk_and_keeps_what_it_had_on_a_shortfall() {
        let budget = BufferBudget::new(100);
        let mut charge = budget.try_charge(0).unwrap();
        for _ in 0..7 {
            charge.try_grow(10).unwrap();
        }
        assert_eq!((charge.bytes(), budget.available()), (70, 30));
        let other = budget.try_charge(25).unwrap();
        assert_eq!(charge.try_grow(10), Err(Shortfall::Busy));
        assert_eq!(charge.try_grow(31), Err(Shortfall::TooLarge), "70 + 31 exceeds the whole budget");
        assert_eq!((charge.bytes(), budget.available()), (70, 5));
        drop(other);
        charge.shrink_to(40);
        assert_eq!((charge.bytes(), budget.available()), (40, 60));
        charge.try_grow(60).unwrap();
        assert_eq!(budget.available(), 0);
        drop(charge);
        assert_eq!(budget.available(), 100);
    }

    #[test]
    fn many_concurrent_charges_never_exceed_the_total() {
        let budget = BufferBudget::new(1000);
        let held: Vec<Charge> = (0..50).filter_map(|_| budget.try_charge(64).ok()).collect();
        assert_eq!(held.len(), 1000 / 64);
        assert_eq!(held.iter().map(Charge::bytes).sum::<usize>() + budget.available(), 1000);
        drop(held);
        assert_eq!(budget.available(), 1000);
    }

    #[test]
    fn json_tokens_count_structure_outside_strings_only() {
        assert_eq!(json_tokens(br#"{"a":"x,y:[{\"}","b":[1,2]}"#), 6);
        assert_eq!(json_tokens(b"[0,0,0,0]"), 4);
        // Hostile structure is charged far above its size; a prompt of text about its size.
        let hostile = format!("[{}0]", "0,".repeat(1000));
        assert!(parse_cost(hostile.as_bytes()) > 50 * hostile.len());
        let prompt = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#, "word, ".repeat(1000));
        assert!(parse_cost(prompt.as_bytes()) < 2 * prompt.len());
    }
}
