//! Registration entry IDs made by apply, in log order.
//!
//! An entry created without an ID gets a UUID version 7 (RFC 9562) from the state machine: the
//! first 48 bits are the leader's clock in Unix milliseconds, as stamped on the proposal, and the
//! 74 bits after the version and variant are a counter (RFC 9562 section 6.2, method 1). The
//! last ID made is kept in the state-machine metadata, and a new one is always greater: a
//! later millisecond starts the counter at zero, and a millisecond that is not later than the
//! last (two entries in one millisecond, or a new leader whose clock is behind) keeps the last
//! one's time and adds one to its counter. Every server applies the same log to the same state,
//! so all of them make the same IDs.
//!
//! IDs that only grow keep each new entry's rows after every earlier entry's in the entries
//! table and its indexes. RocksDB can then move a freshly flushed table file to the bottom
//! level instead of merging it with the files already there (docs/benchmarks.md measures the
//! rewrite this saves). IDs made when the request arrived were time-ordered too, but only
//! roughly: requests that overtake each other on the way into the log left every new file
//! overlapping the last one by a sliver.
//!
//! IDs are unique within a cluster's state, not across clusters, and not secret; join tokens,
//! which are, stay random version 4 UUIDs.

/// The 74 bits of an ID that are not time, version or variant, as one number.
const COUNTER_BITS: u32 = 74;
const COUNTER_MAX: u128 = (1 << COUNTER_BITS) - 1;
/// The largest time a version 7 UUID can hold.
const TIME_MAX: u64 = (1 << 48) - 1;

/// A version 7 UUID as its time (Unix milliseconds) and counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EntryId {
    millis: u64,
    counter: u128,
}

impl EntryId {
    /// The first ID after `last` for a proposal stamped `millis` (Unix milliseconds; clamped to
    /// what the format can hold).
    pub fn next(last: Option<EntryId>, millis: i64) -> EntryId {
        let millis = u64::try_from(millis).unwrap_or(0).min(TIME_MAX);
        match last {
            Some(l) if l.millis >= millis => {
                if l.counter < COUNTER_MAX {
                    EntryId {
                        millis: l.millis,
                        counter: l.counter + 1,
                    }
                } else {
                    // 2^74 entries in one millisecond cannot happen; borrow the next one.
                    EntryId {
                        millis: (l.millis + 1).min(TIME_MAX),
                        counter: 0,
                    }
                }
            }
            _ => EntryId { millis, counter: 0 },
        }
    }

    /// The Unix milliseconds in the ID.
    pub fn millis(&self) -> u64 {
        self.millis
    }

    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&self.millis.to_be_bytes()[2..]);
        // Counter bits 73..62 go after the version nibble, bits 61..0 after the variant.
        let high = (self.counter >> 62) as u16;
        b[6..8].copy_from_slice(&(0x7000 | high).to_be_bytes());
        let low = (self.counter & ((1 << 62) - 1)) as u64;
        b[8..16].copy_from_slice(&((1 << 63) | low).to_be_bytes());
        b
    }

    /// Reads the text form; `None` unless it is a version 7 UUID in lowercase hex.
    pub fn parse(text: &str) -> Option<EntryId> {
        let hex: String = text.split('-').collect();
        if text.len() != 36
            || hex.len() != 32
            || !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        let n = u128::from_str_radix(&hex, 16).ok()?;
        if (n >> 76) & 0xf != 7 || (n >> 62) & 0x3 != 2 {
            return None;
        }
        let id = EntryId {
            millis: (n >> 80) as u64,
            counter: (((n >> 64) & 0xfff) << 62) | (n & ((1 << 62) - 1)),
        };
        (id.to_string() == text).then_some(id)
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&uuid_text(self.bytes()))
    }
}

/// The text form of UUID bytes whose version is set, with the RFC 9562 variant.
pub fn uuid_text(mut b: [u8; 16]) -> String {
    b[8] = (b[8] & 0x3f) | 0x80;
    use std::fmt::Write;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        // Writing to a String cannot fail.
        let _ = write!(s, "{byte:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_only_grow_even_when_the_clock_goes_back() {
        let a = EntryId::next(None, 1_700_000_000_123);
        assert_eq!(a.to_string(), "018bcfe5-687b-7000-8000-000000000000");
        let b = EntryId::next(Some(a), 1_700_000_000_123);
        assert_eq!(b.to_string(), "018bcfe5-687b-7000-8000-000000000001");
        // A new leader whose clock is behind keeps the last time.
        let c = EntryId::next(Some(b), 1_600_000_000_000);
        assert_eq!(c.millis(), 1_700_000_000_123);
        let d = EntryId::next(Some(c), 1_700_000_000_124);
        assert_eq!(d.to_string(), "018bcfe5-687c-7000-8000-000000000000");
        let ids = [a, b, c, d];
        for w in ids.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].to_string() < w[1].to_string(), "{} {}", w[0], w[1]);
        }
    }

    #[test]
    fn the_counter_carries_from_the_low_bits_into_the_version_word() {
        let a = EntryId {
            millis: 5,
            counter: (1 << 62) - 1,
        };
        let b = EntryId::next(Some(a), 5);
        assert_eq!(a.to_string(), "00000000-0005-7000-bfff-ffffffffffff");
        assert_eq!(b.to_string(), "00000000-0005-7001-8000-000000000000");
        assert!(a.to_string() < b.to_string());
        let full = EntryId {
            millis: 5,
            counter: COUNTER_MAX,
        };
        assert_eq!(full.to_string(), "00000000-0005-7fff-bfff-ffffffffffff");
        assert_eq!(
            EntryId::next(Some(full), 5),
            EntryId {
                millis: 6,
                counter: 0
            }
        );
        // Out-of-range clocks are clamped, not wrapped.
        assert_eq!(EntryId::next(None, -1).millis(), 0);
        assert_eq!(EntryId::next(None, i64::MAX).millis(), TIME_MAX);
    }

    #[test]
    fn parse_reads_back_what_display_writes_and_nothing_else() {
        for id in [
            EntryId::next(None, 1_700_000_000_123),
            EntryId {
                millis: TIME_MAX,
                counter: COUNTER_MAX,
            },
            EntryId {
                millis: 42,
                counter: 0x2_0000_0000_0000_1234,
            },
        ] {
            assert_eq!(EntryId::parse(&id.to_string()), Some(id));
        }
        for bad in [
            "",
            "web",
            // version 4
            "018bcfe5-687b-4000-8000-000000000000",
            // variant 0
            "018bcfe5-687b-7000-0000-000000000000",
            // uppercase
            "018BCFE5-687B-7000-8000-000000000000",
            // dashes misplaced
            "018bcfe5687b-7000-8000-000000000000-",
        ] {
            assert_eq!(EntryId::parse(bad), None, "{bad}");
        }
    }
}
