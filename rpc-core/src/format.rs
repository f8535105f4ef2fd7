//! [`Format`]: how arguments and return values become payload bytes.
//!
//! The framing never looks inside a payload; a `Format` turns serde values into bytes and
//! back. [`Bincode`] (bincode 2) is the default; [`Postcard`] is behind the `postcard`
//! feature. Client and server must use the same format.

use std::fmt;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A serde-based serialization format for payloads.
///
/// Implementations are zero-sized markers; all methods are associated functions so that
/// generated code can call `F::encode(&value)` without carrying a value around.
///
/// Decoding is given untrusted bytes: it must return an error, never panic, and must not
/// allocate without bound because of a length the bytes claim.
///
/// ```
/// use rpc_core::format::{Bincode, Format};
///
/// let bytes = Bincode::encode(&("hello", 42u32)).unwrap();
/// let (s, n): (String, u32) = Bincode::decode(&bytes).unwrap();
/// assert_eq!((s.as_str(), n), ("hello", 42));
/// assert!(Bincode::decode::<(String, u32)>(&bytes[..3]).is_err());
/// ```
pub trait Format: Copy + Default + Send + Sync + fmt::Debug + 'static {
    /// A short name for errors and logs.
    const NAME: &'static str;

    /// Serializes `value`.
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, FormatError>;

    /// Deserializes a `T` from all of `bytes`; leftover bytes are an error.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError>;
}

/// A value could not be serialized or deserialized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{format} could not {action} {what}: {message}")]
pub struct FormatError {
    /// Which format.
    pub format: &'static str,
    /// `"encode"` or `"decode"`.
    pub action: &'static str,
    /// What was being (de)serialized, when known (`"value"` otherwise).
    pub what: &'static str,
    /// The format's own message.
    pub message: String,
}

impl FormatError {
    fn new(format: &'static str, action: &'static str, message: impl fmt::Display) -> Self {
        FormatError {
            format,
            action,
            what: "value",
            message: message.to_string(),
        }
    }

    /// The same error, saying what was being (de)serialized (`"request"`, `"response"`…).
    pub fn context(mut self, what: &'static str) -> Self {
        self.what = what;
        self
    }
}

/// bincode 2 with its standard configuration (little-endian, variable-length integers).
///
/// bincode allocates the length a sequence or string claims before reading it, so decoding
/// runs with a limit of [`Bincode::DECODE_LIMIT`] bytes: a hostile length prefix gets an
/// error instead of a huge allocation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bincode;

impl Bincode {
    /// The most bytes one decode may claim: 256 MiB, well above the default maximum frame
    /// length (see [`crate::ConnectionConfig`]), far below what would exhaust memory.
    pub const DECODE_LIMIT: usize = 256 * 1024 * 1024;
}

type BincodeConfig = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<{ Bincode::DECODE_LIMIT }>,
>;

const BINCODE: BincodeConfig =
    bincode::config::standard().with_limit::<{ Bincode::DECODE_LIMIT }>();

impl Format for Bincode {
    const NAME: &'static str = "bincode";

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, FormatError> {
        bincode::serde::encode_to_vec(value, BINCODE)
            .map(Bytes::from)
            .map_err(|e| FormatError::new(Self::NAME, "encode", e))
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
        let (value, read) = bincode::serde::decode_from_slice(bytes, BINCODE)
            .map_err(|e| FormatError::new(Self::NAME, "decode", e))?;
        if read != bytes.len() {
            return Err(FormatError::new(
                Self::NAME,
                "decode",
                format_args!("{} bytes left over after the value", bytes.len() - read),
            ));
        }
        Ok(value)
    }
}

/// postcard 1 (feature `postcard`): compact, and checks every length against the input
/// before it allocates.
#[cfg(feature = "postcard")]
#[derive(Clone, Copy, Debug, Default)]
pub struct Postcard;

#[cfg(feature = "postcard")]
impl Format for Postcard {
    const NAME: &'static str = "postcard";

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, FormatError> {
        postcard::to_stdvec(value)
            .map(Bytes::from)
            .map_err(|e| FormatError::new(Self::NAME, "encode", e))
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
        let (value, rest) = postcard::take_from_bytes(bytes)
            .map_err(|e| FormatError::new(Self::NAME, "decode", e))?;
        if !rest.is_empty() {
            return Err(FormatError::new(
                Self::NAME,
                "decode",
                format_args!("{} bytes left over after the value", rest.len()),
            ));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bincode_refuses_a_length_prefix_over_its_decode_limit_without_allocating_it() {
        // varint 0xFD + u64: a string claiming 2^40 bytes in a 9-byte input.
        let mut input = vec![0xFD];
        input.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let err = Bincode::decode::<String>(&input).unwrap_err();
        assert_eq!(err.action, "decode");
    }

    #[test]
    fn bincode_rejects_trailing_bytes() {
        let mut bytes = Bincode::encode(&5u8).unwrap().to_vec();
        bytes.push(0);
        let err = Bincode::decode::<u8>(&bytes).unwrap_err();
        assert!(err.message.contains("1 bytes left over"), "{err}");
    }

    #[cfg(feature = "postcard")]
    #[test]
    fn postcard_round_trips_and_rejects_truncation() {
        let bytes = Postcard::encode(&("x".to_string(), vec![1u8, 2, 3])).unwrap();
        let back: (String, Vec<u8>) = Postcard::decode(&bytes).unwrap();
        assert_eq!(back, ("x".to_string(), vec![1, 2, 3]));
        assert!(Postcard::decode::<(String, Vec<u8>)>(&bytes[..bytes.len() - 1]).is_err());
    }
}
