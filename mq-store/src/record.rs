//! The segment file format, byte by byte: a segment header, then records.
//!
//! Every segment file starts with a 32-byte header. All integers are little-endian.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic: `COURSEG\0` |
//! | 8 | 2 | `version`: 1 |
//! | 10 | 2 | `flags`: 0 (reserved; a header with another value is refused) |
//! | 12 | 8 | `first_seq`: the first message sequence the segment may hold (its name) |
//! | 20 | 8 | `salt`: random, drawn when the segment is created |
//! | 28 | 4 | `crc`: CRC32C of bytes `0..28` |
//!
//! Records follow, each a 36-byte header and three variable fields:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | `len`: the whole record's length in bytes, this field included |
//! | 4 | 4 | `crc`: CRC32C of the segment's `salt` (8 bytes) followed by bytes `8..len` |
//! | 8 | 1 | `kind`: 1 message, 2 delete, 3 stream config, 4 purge, 5 message ids |
//! | 9 | 1 | `flags`: 0 (reserved; a record with another value is refused) |
//! | 10 | 2 | `subject_len` |
//! | 12 | 4 | `headers_len` |
//! | 16 | 8 | `seq` |
//! | 24 | 8 | `time`: nanoseconds since the Unix epoch, signed |
//! | 32 | 4 | `hcrc`: CRC32C of the `salt`, bytes `0..4` and bytes `8..32` |
//! | 36 | `subject_len` | the subject, UTF-8 |
//! | … | `headers_len` | the headers block (below) |
//! | … | the rest | the payload |
//!
//! The headers block is a run of entries, each `name_len: u16`, the name (UTF-8),
//! `value_len: u32`, the value. `docs/STORAGE.md` repeats this with worked examples.
//!
//! The salt makes a record valid in its own segment only. Recovery looks for the next
//! valid record after damage; without the salt, a record a publisher wrote into a
//! message's payload would pass for one of the store's own there. The header checksum
//! lets that search reject a candidate after 36 bytes, however long it claims to be.
//!
//! Decoding trusts nothing: a record is accepted only if its length is within the
//! limit and the file, its checksum matches, and every field fits inside it.

use bytes::Bytes;

/// Length of the fixed record header.
pub const HEADER_LEN: usize = 36;

/// Length of the header at the start of every segment file.
pub const SEGMENT_HEADER_LEN: usize = 32;

/// The first eight bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"COURSEG\0";

/// The segment format version written, and the only one read.
pub const SEGMENT_VERSION: u16 = 1;

/// What a segment header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The first message sequence the segment may hold.
    pub first_seq: u64,
    /// Mixed into the checksum of every record of the segment.
    pub salt: u64,
}

/// Appends a segment header to `buf`.
///
/// ```
/// use mq_store::record::{decode_segment_header, encode_segment_header, SegmentHeader};
/// let header = SegmentHeader { first_seq: 1, salt: 0x0123_4567_89AB_CDEF };
/// let mut buf = Vec::new();
/// encode_segment_header(&mut buf, &header);
/// assert_eq!(&buf[..8], b"COURSEG\0");
/// assert_eq!(decode_segment_header(&buf), Ok(header));
/// ```
pub fn encode_segment_header(buf: &mut Vec<u8>, header: &SegmentHeader) {
    let start = buf.len();
    buf.extend_from_slice(&SEGMENT_MAGIC);
    buf.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes());
    buf.extend_from_slice(&header.first_seq.to_le_bytes());
    buf.extend_from_slice(&header.salt.to_le_bytes());
    let crc = crc32c::crc32c(&buf[start..]);
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// Decodes the segment header at the start of `bytes`.
pub fn decode_segment_header(bytes: &[u8]) -> Result<SegmentHeader, DecodeError> {
    let Some(bytes) = bytes.get(..SEGMENT_HEADER_LEN) else {
        return Err(DecodeError::Incomplete {
            needed: SEGMENT_HEADER_LEN,
            available: bytes.len(),
        });
    };
    let stored = u32::from_le_bytes(bytes[28..32].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&bytes[..28]);
    if stored != computed {
        return Err(DecodeError::BadChecksum { stored, computed });
    }
    if bytes[..8] != SEGMENT_MAGIC {
        return Err(DecodeError::Malformed("not a segment file (bad magic)"));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != SEGMENT_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    if bytes[10..12] != [0, 0] {
        return Err(DecodeError::Malformed("unknown segment flags"));
    }
    Ok(SegmentHeader {
        first_seq: u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")),
        salt: u64::from_le_bytes(bytes[20..28].try_into().expect("8 bytes")),
    })
}

/// The checksum of a record's bytes `8..` in a segment with `salt`.
fn checksum(salt: u64, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&salt.to_le_bytes()), bytes)
}

/// The checksum of a record header's fixed fields (`header` is its first 32 bytes):
/// the length and bytes `8..32`, in a segment with `salt`.
fn header_checksum(salt: u64, header: &[u8]) -> u32 {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&salt.to_le_bytes()), &header[..4]);
    crc32c::crc32c_append(crc, &header[8..32])
}

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
    /// Every message below `seq` was removed. `time` and a `Msg-Id` header repeat
    /// the newest message's, which may be among those removed.
    Purge,
    /// `Msg-Id`s still inside the duplicate window whose messages were removed: a run
    /// of entries in the payload (see [`encode_msg_id`]).
    MsgIds,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Message => 1,
            Kind::Delete => 2,
            Kind::Config => 3,
            Kind::Purge => 4,
            Kind::MsgIds => 5,
        }
    }

    pub(crate) fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Message,
            2 => Kind::Delete,
            3 => Kind::Config,
            4 => Kind::Purge,
            5 => Kind::MsgIds,
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
    #[error("record length {len} is outside 36..={limit}")]
    BadLength {
        /// The length found.
        len: u32,
        /// The largest record accepted.
        limit: u32,
    },
    /// The header checksum does not match the header's bytes.
    #[error("header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadHeaderChecksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of its bytes.
        computed: u32,
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
    /// A segment header of a format version this code does not read.
    #[error("segment format version {0} is not supported (this build reads version 1)")]
    UnsupportedVersion(u16),
}

/// Encodes `record` at the end of `buf`, for a segment with `salt`; returns its
/// length.
///
/// `record.headers` is an already encoded headers block (see [`encode_headers`]).
///
/// ```
/// use mq_store::record::{decode, encode, Kind, Record};
/// let salt = 0x0123_4567_89AB_CDEF;
/// let mut buf = Vec::new();
/// let record = Record {
///     kind: Kind::Message,
///     seq: 7,
///     time: 1_000,
///     subject: "orders.eu",
///     headers: &[],
///     payload: b"hi",
/// };
/// let len = encode(&mut buf, salt, &record);
/// assert_eq!(len, 36 + 9 + 2);
/// assert_eq!(decode(&buf, salt, u32::MAX), Ok(record));
/// // valid in its own segment only
/// assert!(decode(&buf, salt + 1, u32::MAX).is_err());
/// ```
pub fn encode(buf: &mut Vec<u8>, salt: u64, record: &Record<'_>) -> usize {
    let Record {
        kind,
        seq,
        time,
        subject,
        headers,
        payload,
    } = *record;
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
    let hcrc = header_checksum(salt, &buf[start..]);
    buf.extend_from_slice(&hcrc.to_le_bytes());
    buf.extend_from_slice(subject.as_bytes());
    buf.extend_from_slice(headers);
    buf.extend_from_slice(payload);
    let crc = checksum(salt, &buf[start + 8..]);
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

/// Decodes the record at the start of `bytes`, in a segment with `salt`, refusing
/// one longer than `limit`.
pub fn decode(bytes: &[u8], salt: u64, limit: u32) -> Result<Record<'_>, DecodeError> {
    decode_with(bytes, salt, limit, true)
}

/// [`decode`] for a record where one is known to start (the next record of a segment
/// read in order, or one the index points at): the header checksum is not checked
/// apart, as the record's checksum covers it and a wrong length makes that one fail.
/// What looks for records anywhere (recovery after damage) must use [`decode`], which
/// refuses a forged header after 36 bytes.
pub fn decode_at_boundary(bytes: &[u8], salt: u64, limit: u32) -> Result<Record<'_>, DecodeError> {
    decode_with(bytes, salt, limit, false)
}

fn decode_with(
    bytes: &[u8],
    salt: u64,
    limit: u32,
    check_header: bool,
) -> Result<Record<'_>, DecodeError> {
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
    if check_header {
        let stored = u32_at(32);
        let computed = header_checksum(salt, bytes);
        if stored != computed {
            return Err(DecodeError::BadHeaderChecksum { stored, computed });
        }
    }
    let len = len as usize;
    if bytes.len() < len {
        return Err(DecodeError::Incomplete {
            needed: len,
            available: bytes.len(),
        });
    }
    let stored = u32_at(4);
    let computed = checksum(salt, &bytes[8..len]);
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
pub fn headers(
    block: &Bytes,
    names: &mut crate::SharedNames,
) -> Result<Vec<(std::sync::Arc<str>, Bytes)>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = &block[..];
    while !rest.is_empty() {
        let (name, value) = next_header(&mut rest)?;
        let start = block.len() - rest.len() - value.len();
        out.push((
            names.header(out.len(), name),
            block.slice(start..start + value.len()),
        ));
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

/// Appends one entry of a [`Kind::MsgIds`] payload: `seq: u64`, `time: i64`,
/// `id_len: u32`, the id (UTF-8).
pub fn encode_msg_id(buf: &mut Vec<u8>, seq: u64, time: i64, id: &str) {
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&time.to_le_bytes());
    buf.extend_from_slice(&(id.len() as u32).to_le_bytes());
    buf.extend_from_slice(id.as_bytes());
}

/// The entries of a [`Kind::MsgIds`] payload: (seq, time, id).
pub fn msg_ids(payload: &[u8]) -> Result<Vec<(u64, i64, &str)>, DecodeError> {
    const BAD: DecodeError = DecodeError::Malformed("message id entry is truncated");
    let mut out = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let fixed = rest.get(..20).ok_or(BAD)?;
        let seq = u64::from_le_bytes(fixed[..8].try_into().expect("8"));
        let time = i64::from_le_bytes(fixed[8..16].try_into().expect("8"));
        let len = u32::from_le_bytes(fixed[16..20].try_into().expect("4")) as usize;
        let id = rest.get(20..20 + len).ok_or(BAD)?;
        let id = std::str::from_utf8(id)
            .map_err(|_| DecodeError::Malformed("message id is not UTF-8"))?;
        out.push((seq, time, id));
        rest = &rest[20 + len..];
    }
    Ok(out)
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

    const SALT: u64 = 0x5A17;

    fn message<'a>(
        seq: u64,
        time: i64,
        subject: &'a str,
        headers: &'a [u8],
        payload: &'a [u8],
    ) -> Record<'a> {
        Record {
            kind: Kind::Message,
            seq,
            time,
            subject,
            headers,
            payload,
        }
    }

    #[test]
    fn a_record_round_trips_with_its_headers() {
        let mut headers = Vec::new();
        encode_headers(&mut headers, [("Msg-Id", &b"a1"[..]), ("k", &b""[..])]);
        let mut buf = vec![0xFF]; // records may start anywhere in a buffer
        encode(
            &mut buf,
            SALT,
            &message(42, -5, "a.b", &headers, b"payload"),
        );
        let record = decode(&buf[1..], SALT, 1 << 20).unwrap();
        assert_eq!(record.kind, Kind::Message);
        assert_eq!((record.seq, record.time, record.subject), (42, -5, "a.b"));
        assert_eq!(record.payload, b"payload");
        let parsed = super::headers(
            &Bytes::copy_from_slice(record.headers),
            &mut crate::SharedNames::default(),
        )
        .unwrap();
        assert_eq!(parsed[0], ("Msg-Id".into(), Bytes::from_static(b"a1")));
        assert_eq!(find_header(record.headers, "k").unwrap(), Some(&b""[..]));
        assert_eq!(find_header(record.headers, "none").unwrap(), None);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let mut buf = Vec::new();
        encode(&mut buf, SALT, &message(1, 2, "s", b"", b"0123456789"));
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    decode(&bad, SALT, 1 << 20).is_err(),
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn short_and_oversized_records_are_refused_without_reading_past_the_buffer() {
        let mut buf = Vec::new();
        encode(&mut buf, SALT, &message(1, 2, "s", b"", b"abc"));
        for cut in 0..buf.len() {
            assert!(matches!(
                decode(&buf[..cut], SALT, 1 << 20),
                Err(DecodeError::Incomplete { .. })
            ));
        }
        assert_eq!(
            decode(&buf, SALT, 33),
            Err(DecodeError::BadLength {
                len: buf.len() as u32,
                limit: 33
            })
        );
    }

    #[test]
    fn a_malformed_headers_block_is_an_error_not_a_panic() {
        let block = Bytes::from_static(&[5, 0, b'a']);
        assert!(headers(&block, &mut crate::SharedNames::default()).is_err());
        assert!(find_header(&[1, 0, b'a', 9, 0, 0, 0, 1], "a").is_err());
    }

    #[test]
    fn a_record_is_valid_only_under_its_segments_salt() {
        let mut buf = Vec::new();
        encode(&mut buf, SALT, &message(1, 2, "s", b"", b"abc"));
        assert!(decode(&buf, SALT, 1 << 20).is_ok());
        assert!(matches!(
            decode(&buf, SALT ^ 1, 1 << 20),
            Err(DecodeError::BadHeaderChecksum { .. })
        ));
    }

    #[test]
    fn a_header_claiming_a_long_record_is_refused_from_its_own_36_bytes() {
        // What a publisher can write into a payload: plausible fields, a guessed salt.
        let mut forged = Vec::new();
        encode(&mut forged, 0, &message(1, 0, "s", b"", &[0xAB; 1000]));
        let header = &forged[..HEADER_LEN];
        assert!(matches!(
            decode(header, SALT, 1 << 20),
            Err(DecodeError::BadHeaderChecksum { .. })
        ));
        // under the right salt the same header only lacks its body
        assert!(matches!(
            decode(header, 0, 1 << 20),
            Err(DecodeError::Incomplete { .. })
        ));
    }

    #[test]
    fn every_flipped_bit_of_a_segment_header_is_caught() {
        let mut buf = Vec::new();
        let header = SegmentHeader {
            first_seq: 9,
            salt: SALT,
        };
        encode_segment_header(&mut buf, &header);
        assert_eq!(buf.len(), SEGMENT_HEADER_LEN);
        assert_eq!(decode_segment_header(&buf), Ok(header));
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    decode_segment_header(&bad).is_err(),
                    "byte {byte} bit {bit}"
                );
            }
        }
        for cut in 0..buf.len() {
            assert!(decode_segment_header(&buf[..cut]).is_err());
        }
    }

    #[test]
    fn message_id_entries_round_trip_and_truncation_is_an_error() {
        let mut payload = Vec::new();
        encode_msg_id(&mut payload, 3, -1, "a");
        encode_msg_id(&mut payload, 4, 7, "");
        assert_eq!(msg_ids(&payload).unwrap(), [(3, -1, "a"), (4, 7, "")]);
        for cut in 1..payload.len() {
            if cut != 21 {
                assert!(msg_ids(&payload[..cut]).is_err(), "cut at {cut}");
            }
        }
    }
}
