//! The record: the unit of a segment file, byte by byte.
//!
//! Every record, whatever its kind, is a 32-byte header followed by three variable
//! fields. All integers are little-endian.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | `len`: the whole record's length in bytes, this field included |
//! | 4 | 4 | `crc`: CRC32C (Castagnoli) of bytes `8..len` |
//! | 8 | 1 | `kind`: 1 message, 2 delete, 3 stream config, 4 purge |
//! | 9 | 1 | `flags`: 0 (reserved; a record with another value is refused) |
//! | 10 | 2 | `subject_len` |
//! | 12 | 4 | `headers_len` |
//! | 16 | 8 | `seq` |
//! | 24 | 8 | `time`: nanoseconds since the Unix epoch, signed |
//! | 32 | `subject_len` | the subject, UTF-8 |
//! | … | `headers_len` | the headers block (below) |
//! | … | the rest | the payload |
//!
//! The headers block is a run of entries, each `name_len: u16`, the name (UTF-8),
//! `value_len: u32`, the value. `docs/STORAGE.md` repeats this with worked examples.
//!
//! Decoding trusts nothing: a record is accepted only if its length is within the
//! limit and the file, its checksum matches, and every field fits inside it.

use bytes::Bytes;

/// Length of the fixed record header.
pub const HEADER_LEN: usize = 32;

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// A message: `seq`, `time`, subject, headers and payload.
    Message,
    /// Message `seq` was removed; no subject, headers or payload.
    Delete,
    /// The stream's configuration (JSON in the payload), written at the start of
    /// every segment and on every update; `seq` is the next message's sequence.
    Config,
    /// Every message below `seq` was removed.
    Purge,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Message => 1,
            Kind::Delete => 2,
            Kind::Config => 3,
            Kind::Purge => 4,
        }
    }

    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Message,
            2 => Kind::Delete,
            3 => Kind::Config,
            4 => Kind::Purge,
            _ => return None,
        })
    }
}

/// A decoded record, borrowing from the bytes it was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Its kind.
    pub kind: Kind,
    /// The sequence it concerns (see [`Kind`]).
    pub seq: u64,
    /// Nanoseconds since the Unix epoch.
    pub time: i64,
    /// The subject (messages only).
    pub subject: &'a str,
    /// The encoded headers block (messages only); see [`headers`].
    pub headers: &'a [u8],
    /// The payload.
    pub payload: &'a [u8],
}

/// Why bytes are not a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the record needs: at the end of a file, a torn write.
    #[error("incomplete record: {needed} bytes needed, {available} present")]
    Incomplete {
        /// Bytes the record needs (the header's, when even that is missing).
        needed: usize,
        /// Bytes there are.
        available: usize,
    },
    /// The length field is impossible or over the limit.
    #[error("record length {len} is outside 32..={limit}")]
    BadLength {
        /// The length found.
        len: u32,
        /// The largest record accepted.
        limit: u32,
    },
    /// The checksum does not match the bytes.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// The checksum in the record.
        stored: u32,
        /// The checksum of its bytes.
        computed: u32,
    },
    /// The checksum matches but a field is malformed.
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

/// Encodes one record at the end of `buf`; returns its length.
///
/// `headers` is an already encoded headers block (see [`encode_headers`]).
///
/// ```
/// use mq_store::record::{decode, encode, Kind};
/// let mut buf = Vec::new();
/// let len = encode(&mut buf, Kind::Message, 7, 1_000, "orders.eu", &[], b"hi");
/// assert_eq!(len, 32 + 9 + 2);
/// let record = decode(&buf, u32::MAX).unwrap();
/// assert_eq!((record.seq, record.subject, record.payload), (7, "orders.eu", &b"hi"[..]));
/// ```
pub fn encode(
    buf: &mut Vec<u8>,
    kind: Kind,
    seq: u64,
    time: i64,
    subject: &str,
    headers: &[u8],
    payload: &[u8],
) -> usize {
    let len = HEADER_LEN + subject.len() + headers.len() + payload.len();
    let start = buf.len();
    buf.reserve(len);
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // the checksum, filled in below
    buf.push(kind.byte());
    buf.push(0);
    buf.extend_from_slice(&(subject.len() as u16).to_le_bytes());
    buf.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&time.to_le_bytes());
    buf.extend_from_slice(subject.as_bytes());
    buf.extend_from_slice(headers);
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    len
}

/// The length a record with these fields takes.
pub fn encoded_len(subject: &str, headers: &[u8], payload: &[u8]) -> usize {
    HEADER_LEN + subject.len() + headers.len() + payload.len()
}

/// The length field of the record starting at `bytes`, if 4 bytes are there.
pub fn peek_len(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// Decodes the record at the start of `bytes`, refusing one longer than `limit`.
pub fn decode(bytes: &[u8], limit: u32) -> Result<Record<'_>, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Incomplete {
            needed: HEADER_LEN,
            available: bytes.len(),
        });
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let len = u32_at(0);
    if (len as usize) < HEADER_LEN || len > limit {
        return Err(DecodeError::BadLength { len, limit });
    }
    let len = len as usize;
    if bytes.len() < len {
        return Err(DecodeError::Incomplete {
            needed: len,
            available: bytes.len(),
        });
    }
    let stored = u32_at(4);
    let computed = crc32c::crc32c(&bytes[8..len]);
    if stored != computed {
        return Err(DecodeError::BadChecksum { stored, computed });
    }
    let kind = Kind::from_byte(bytes[8]).ok_or(DecodeError::Malformed("unknown kind"))?;
    if bytes[9] != 0 {
        return Err(DecodeError::Malformed("unknown flags"));
    }
    let subject_len = u16_at(10) as usize;
    let headers_len = u32_at(12) as usize;
    let seq = u64_at(16);
    let time = u64_at(24) as i64;
    let body = &bytes[HEADER_LEN..len];
    if subject_len + headers_len > body.len() {
        return Err(DecodeError::Malformed(
            "subject and headers are longer than the record",
        ));
    }
    let subject = std::str::from_utf8(&body[..subject_len])
        .map_err(|_| DecodeError::Malformed("subject is not UTF-8"))?;
    let headers = &body[subject_len..subject_len + headers_len];
    let payload = &body[subject_len + headers_len..];
    Ok(Record {
        kind,
        seq,
        time,
        subject,
        headers,
        payload,
    })
}

/// Appends the headers block for `headers` to `buf`.
///
/// Names longer than 65,535 bytes or values longer than 4 GiB cannot be encoded; the
/// callers' payload limits are far below that.
pub fn encode_headers<'a>(
    buf: &mut Vec<u8>,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) {
    for (name, value) in headers {
        buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        buf.extend_from_slice(value);
    }
}

/// Decodes a headers block into owned pairs, sharing `block`'s allocation.
pub fn headers(block: &Bytes) -> Result<Vec<(String, Bytes)>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = &block[..];
    while !rest.is_empty() {
        let (name, value) = next_header(&mut rest)?;
        let start = block.len() - rest.len() - value.len();
        out.push((name.to_owned(), block.slice(start..start + value.len())));
    }
    Ok(out)
}

/// The first value of header `wanted` in a headers block, without allocating.
pub fn find_header<'a>(block: &'a [u8], wanted: &str) -> Result<Option<&'a [u8]>, DecodeError> {
    let mut rest = block;
    while !rest.is_empty() {
        let (name, value) = next_header(&mut rest)?;
        if name == wanted {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

fn next_header<'a>(rest: &mut &'a [u8]) -> Result<(&'a str, &'a [u8]), DecodeError> {
    const BAD: DecodeError = DecodeError::Malformed("headers block is truncated");
    let bytes = *rest;
    let name_len = u16::from_le_bytes(bytes.get(..2).ok_or(BAD)?.try_into().expect("2")) as usize;
    let name = bytes.get(2..2 + name_len).ok_or(BAD)?;
    let name = std::str::from_utf8(name)
        .map_err(|_| DecodeError::Malformed("header name is not UTF-8"))?;
    let at = 2 + name_len;
    let value_len =
        u32::from_le_bytes(bytes.get(at..at + 4).ok_or(BAD)?.try_into().expect("4")) as usize;
    let value = bytes.get(at + 4..at + 4 + value_len).ok_or(BAD)?;
    *rest = &bytes[at + 4 + value_len..];
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_with_its_headers() {
        let mut headers = Vec::new();
        encode_headers(&mut headers, [("Msg-Id", &b"a1"[..]), ("k", &b""[..])]);
        let mut buf = vec![0xFF]; // records may start anywhere in a buffer
        encode(&mut buf, Kind::Message, 42, -5, "a.b", &headers, b"payload");
        let record = decode(&buf[1..], 1 << 20).unwrap();
        assert_eq!(record.kind, Kind::Message);
        assert_eq!((record.seq, record.time, record.subject), (42, -5, "a.b"));
        assert_eq!(record.payload, b"payload");
        let parsed = super::headers(&Bytes::copy_from_slice(record.headers)).unwrap();
        assert_eq!(parsed[0], ("Msg-Id".to_owned(), Bytes::from_static(b"a1")));
        assert_eq!(find_header(record.headers, "k").unwrap(), Some(&b""[..]));
        assert_eq!(find_header(record.headers, "none").unwrap(), None);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let mut buf = Vec::new();
        encode(&mut buf, Kind::Message, 1, 2, "s", b"", b"0123456789");
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(decode(&bad, 1 << 20).is_err(), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn short_and_oversized_records_are_refused_without_reading_past_the_buffer() {
        let mut buf = Vec::new();
        encode(&mut buf, Kind::Message, 1, 2, "s", b"", b"abc");
        for cut in 0..buf.len() {
            assert!(matches!(
                decode(&buf[..cut], 1 << 20),
                Err(DecodeError::Incomplete { .. })
            ));
        }
        assert_eq!(
            decode(&buf, 33),
            Err(DecodeError::BadLength {
                len: buf.len() as u32,
                limit: 33
            })
        );
    }

    #[test]
    fn a_malformed_headers_block_is_an_error_not_a_panic() {
        let block = Bytes::from_static(&[5, 0, b'a']);
        assert!(headers(&block).is_err());
        assert!(find_header(&[1, 0, b'a', 9, 0, 0, 0, 1], "a").is_err());
    }
}
