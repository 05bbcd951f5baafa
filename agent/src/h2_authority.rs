//! Makes gRPC C-core clients (py-spiffe, C++, Ruby, PHP) work over a Unix socket.
//!
//! For a `unix:/path` target C-core sends the percent-encoded socket path as the HTTP/2
//! `:authority` (e.g. `tmp%2Fagent%2Fapi.sock`). The `http` crate, and so h2/hyper/tonic, allow
//! `%` in an authority only inside userinfo and reset such a stream with PROTOCOL_ERROR, although
//! the Workload API never looks at the authority. Go's gRPC server (SPIRE) accepts it, so every
//! C-core client of SPIRE would break against plinth.
//!
//! [`AuthorityFix`] sits on the client-to-agent byte stream of each connection: it passes the
//! connection preface and every frame through unchanged, except header blocks (HEADERS plus
//! CONTINUATION frames), which it decodes with an HPACK decoder that mirrors the client's
//! encoder, rewrites an `:authority` that would be refused to `localhost`, and re-encodes with an
//! HPACK encoder that mirrors h2's decoder. Memory is bounded: header blocks are capped at
//! [`MAX_HEADER_BLOCK_LEN`], other frames stream through without buffering.

use std::io;

use loona_hpack::{Decoder, Encoder};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Every HTTP/2 peer accepts frames of this size (SETTINGS_MAX_FRAME_SIZE's initial value).
const MAX_OUT_FRAME_LEN: usize = 16_384;
/// HPACK dynamic table size: the SETTINGS_HEADER_TABLE_SIZE initial value, which h2 keeps.
const TABLE_SIZE: usize = 4096;

/// Largest header block accepted from a client, over all its frames.
pub const MAX_HEADER_BLOCK_LEN: usize = 64 * 1024;
/// What a refused `:authority` is replaced with.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

#[derive(Debug)]
struct PendingBlock {
    stream_id: [u8; 4],
    /// END_STREAM of the opening HEADERS frame.
    end_stream: bool,
    /// The 5 priority bytes of the opening HEADERS frame, if it had them.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The rewriting state of one connection's client-to-server direction.
pub struct AuthorityFix {
    preface_left: usize,
    input: Vec<u8>,
    /// Bytes of a non-header frame payload still to pass through untouched.
    passthrough: usize,
    block: Option<PendingBlock>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
}

impl std::fmt::Debug for AuthorityFix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("preface_left", &self.preface_left)
            .field("buffered", &self.input.len())
            .field("passthrough", &self.passthrough)
            .finish_non_exhaustive()
    }
}

impl Default for AuthorityFix {
    fn default() -> Self {
        Self::new()
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// True if h2 would refuse this `:authority`.
fn refused_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_err()
}

impl AuthorityFix {
    pub fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        let mut encoder = Encoder::new();
        encoder.set_max_table_size(TABLE_SIZE);
        Self {
            preface_left: PREFACE.len(),
            input: Vec::new(),
            passthrough: 0,
            block: None,
            decoder,
            encoder,
        }
    }

    /// Consumes bytes read from the client, appending what h2 should see to `out`. Returns an
    /// error for malformed input; the connection should then be dropped.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let mut input = std::mem::take(&mut self.input);
        input.extend_from_slice(data);
        let mut pos = 0;
        loop {
            let avail = &input[pos..];
            if avail.is_empty() {
                break;
            }
            if self.preface_left > 0 {
                let n = self.preface_left.min(avail.len());
                let expected = &PREFACE[PREFACE.len() - self.preface_left..][..n];
                if &avail[..n] != expected {
                    return Err(invalid("bad HTTP/2 connection preface"));
                }
                out.extend_from_slice(&avail[..n]);
                self.preface_left -= n;
                pos += n;
                continue;
            }
            if self.passthrough > 0 {
                let n = self.passthrough.min(avail.len());
                out.extend_from_slice(&avail[..n]);
                self.passthrough -= n;
                pos += n;
                continue;
            }
            if avail.len() < FRAME_HEADER_LEN {
                break;
            }
            let len =
                usize::from(avail[0]) << 16 | usize::from(avail[1]) << 8 | usize::from(avail[2]);
            let kind = avail[3];
            let flags = avail[4];
            let stream_id = [avail[5], avail[6], avail[7], avail[8]];
            let is_header_frame = kind == TYPE_HEADERS || kind == TYPE_CONTINUATION;
            if self.block.is_some() && kind != TYPE_CONTINUATION {
                return Err(invalid("header block interrupted by another frame"));
            }
            if !is_header_frame {
                out.extend_from_slice(&avail[..FRAME_HEADER_LEN]);
                self.passthrough = len;
                pos += FRAME_HEADER_LEN;
                continue;
            }
            if len > MAX_HEADER_BLOCK_LEN {
                return Err(invalid("header frame too large"));
            }
            if avail.len() < FRAME_HEADER_LEN + len {
                break;
            }
            let payload = &avail[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
            self.header_frame(kind, flags, stream_id, payload, out)?;
            pos += FRAME_HEADER_LEN + len;
        }
        input.drain(..pos);
        self.input = input;
        Ok(())
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream_id: [u8; 4],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        if kind == TYPE_HEADERS {
            let mut body = payload;
            let mut pad = 0;
            if flags & FLAG_PADDED != 0 {
                let (&p, rest) = body
                    .split_first()
                    .ok_or_else(|| invalid("padded HEADERS frame without pad length"))?;
                pad = usize::from(p);
                body = rest;
            }
            let mut priority = None;
            if flags & FLAG_PRIORITY != 0 {
                if body.len() < 5 {
                    return Err(invalid("HEADERS priority truncated"));
                }
                let mut p = [0u8; 5];
                p.copy_from_slice(&body[..5]);
                priority = Some(p);
                body = &body[5..];
            }
            if pad > body.len() {
                return Err(invalid("HEADERS padding exceeds the frame"));
            }
            self.block = Some(PendingBlock {
                stream_id,
                end_stream: flags & FLAG_END_STREAM != 0,
                priority,
                fragment: body[..body.len() - pad].to_vec(),
            });
        } else {
            let block = self
                .block
                .as_mut()
                .ok_or_else(|| invalid("CONTINUATION without HEADERS"))?;
            if block.stream_id != stream_id {
                return Err(invalid("CONTINUATION on another stream"));
            }
            if block.fragment.len() + payload.len() > MAX_HEADER_BLOCK_LEN {
                return Err(invalid("header block too large"));
            }
            block.fragment.extend_from_slice(payload);
        }
        if flags & FLAG_END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                self.emit(block, out)?;
            }
        }
        Ok(())
    }

    fn emit(&mut self, block: PendingBlock, out: &mut Vec<u8>) -> io::Result<()> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                let value = if name.as_ref() == b":authority" && refused_authority(&value) {
                    REPLACEMENT_AUTHORITY.to_vec()
                } else {
                    value.into_owned()
                };
                headers.push((name.into_owned(), value));
            })
            .map_err(|e| invalid(format!("HPACK: {e}")))?;
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));

        let mut first_room = MAX_OUT_FRAME_LEN;
        if block.priority.is_some() {
            first_room -= 5;
        }
        let (first, mut rest) = encoded.split_at(first_room.min(encoded.len()));
        let mut flags = 0;
        if block.end_stream {
            flags |= FLAG_END_STREAM;
        }
        if rest.is_empty() {
            flags |= FLAG_END_HEADERS;
        }
        let prio: &[u8] = match &block.priority {
            Some(p) => {
                flags |= FLAG_PRIORITY;
                p
            }
            None => &[],
        };
        write_frame(out, TYPE_HEADERS, flags, block.stream_id, &[prio, first]);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(MAX_OUT_FRAME_LEN.min(rest.len()));
            let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
            write_frame(out, TYPE_CONTINUATION, flags, block.stream_id, &[chunk]);
            rest = tail;
        }
        Ok(())
    }
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream_id: [u8; 4], parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    // len <= MAX_OUT_FRAME_LEN, so it fits the 24-bit length field.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream_id);
    for p in parts {
        out.extend_from_slice(p);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn frame(kind: u8, flags: u8, stream: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, kind, flags, [0, 0, 0, stream], &[payload]);
        v
    }

    /// Splits `out` into frames after the preface; decodes header blocks with a fresh decoder
    /// (as h2 would) and returns (kind, flags, stream, headers or raw payload).
    type Headers = Vec<(Vec<u8>, Vec<u8>)>;
    /// (kind, flags, stream, decoded headers, raw payload)
    type OutFrame = (u8, u8, u8, Headers, Vec<u8>);

    fn parse_out(out: &[u8]) -> Vec<OutFrame> {
        assert!(out.starts_with(PREFACE));
        let mut rest = &out[PREFACE.len()..];
        let mut dec = Decoder::new();
        let mut frames = Vec::new();
        let mut block = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags, stream) = (rest[3], rest[4], rest[8]);
            let mut payload = rest[9..9 + len].to_vec();
            rest = &rest[9 + len..];
            if kind == TYPE_HEADERS || kind == TYPE_CONTINUATION {
                if kind == TYPE_HEADERS && flags & FLAG_PRIORITY != 0 {
                    payload.drain(..5);
                }
                block.extend_from_slice(&payload);
                if flags & FLAG_END_HEADERS != 0 {
                    let headers = dec.decode(&block).unwrap();
                    block.clear();
                    frames.push((kind, flags, stream, headers, Vec::new()));
                }
            } else {
                frames.push((kind, flags, stream, Vec::new(), payload));
            }
        }
        frames
    }

    fn request(authority: &[u8]) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec()),
            (b":authority", authority.to_vec()),
            (b"workload.spiffe.io", b"true".to_vec()),
        ]
    }

    #[test]
    fn percent_encoded_authority_is_replaced_and_the_rest_is_untouched() {
        let mut client = Encoder::new();
        let bad = b"tmp%2Fagent%2Fapi.sock".as_slice();
        let h1 = request(bad);
        let b1 = client.encode(h1.iter().map(|(n, v)| (*n, v.as_slice())));
        // The second request reuses the client's dynamic table entries.
        let b2 = client.encode(h1.iter().map(|(n, v)| (*n, v.as_slice())));
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b1));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0")); // DATA
                                                                     // The second block split over HEADERS (padded, with priority) and CONTINUATION.
        let (p1, p2) = b2.split_at(b2.len() / 2);
        let mut first = vec![2u8]; // pad length
        first.extend_from_slice(&[0, 0, 0, 0, 16]); // priority
        first.extend_from_slice(p1);
        first.extend_from_slice(&[0, 0]);
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            3,
            &first,
        ));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, p2));

        // Fed one byte at a time, to exercise every partial state.
        let mut fix = AuthorityFix::new();
        let mut out = Vec::new();
        for b in &input {
            fix.feed(std::slice::from_ref(b), &mut out).unwrap();
        }
        let frames = parse_out(&out);
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[0].0, 0x4);
        assert_eq!(frames[0].4, vec![0, 3, 0, 0, 0, 100]);
        let expected: Headers = request(REPLACEMENT_AUTHORITY)
            .into_iter()
            .map(|(n, v)| (n.to_vec(), v))
            .collect();
        assert_eq!(frames[1].3, expected);
        assert_eq!((frames[1].1 & FLAG_END_STREAM, frames[1].2), (0, 1));
        assert_eq!(frames[2].0, 0x0);
        assert_eq!(frames[2].4, b"\0\0\0\0\0");
        assert_eq!(frames[3].3, expected);
        assert_eq!(frames[3].1 & FLAG_END_STREAM, FLAG_END_STREAM);
        assert_eq!(frames[3].1 & FLAG_PADDED, 0);
        assert_eq!(frames[3].2, 3);
    }

    #[test]
    fn valid_authority_is_kept() {
        let mut client = Encoder::new();
        let h = request(b"localhost:8080");
        let b = client.encode(h.iter().map(|(n, v)| (*n, v.as_slice())));
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b));
        let mut out = Vec::new();
        AuthorityFix::new().feed(&input, &mut out).unwrap();
        let frames = parse_out(&out);
        assert_eq!(frames[0].3[3].1, b"localhost:8080");
    }

    #[test]
    fn malformed_input_is_an_error() {
        let mut out = Vec::new();
        assert!(AuthorityFix::new()
            .feed(b"GET / HTTP/1.1\r\n", &mut out)
            .is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b"x"));
        assert!(AuthorityFix::new().feed(&input, &mut out).is_err());
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0x01, 0, 1, TYPE_HEADERS, 0, 0, 0, 0, 1]);
        assert!(
            AuthorityFix::new().feed(&input, &mut out).is_err(),
            "a 64 KiB + 1 header frame is refused before it is buffered"
        );
    }
}
