//! [`Format`]: how arguments and return values become payload bytes.
//!
//! The framing never looks inside a payload; a `Format` turns serde values into bytes and
//! back. [`Bincode`] (bincode 2) is the default; `Postcard` is behind the `postcard`
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

    /// Serializes `value` as an [`Encoded`]: held inline, with no allocation, when it
    /// takes at most [`Encoded::INLINE`] bytes. A server's answers are made this way
    /// (`#[courier::service]`): a small answer is copied into its connection's write
    /// buffer from where it lies, never allocated and freed.
    ///
    /// The bytes are those of [`Format::encode`]. The default calls it; [`Bincode`] and
    /// `Postcard` write a small value in place.
    ///
    /// ```
    /// use rpc_core::format::{Bincode, Format};
    ///
    /// let small = Bincode::encode_small(&("hi", 7u8)).unwrap();
    /// assert!(small.is_inline());
    /// assert_eq!(small.as_slice(), &Bincode::encode(&("hi", 7u8)).unwrap()[..]);
    /// let large = Bincode::encode_small(&vec![1u8; 100]).unwrap();
    /// assert!(!large.is_inline());
    /// assert_eq!(large.len(), 101);
    /// ```
    fn encode_small<T: Serialize + ?Sized>(value: &T) -> Result<Encoded, FormatError> {
        Self::encode(value).map(Encoded::from)
    }
}

/// A serialized value: up to [`Encoded::INLINE`] bytes held in the value itself, longer
/// ones in [`Bytes`] ([`Format::encode_small`]).
///
/// ```
/// use bytes::Bytes;
/// use rpc_core::format::Encoded;
///
/// let small = Encoded::copy_from_slice(b"seventeen bytes!!");
/// assert!(small.is_inline());
/// assert_eq!(small.as_slice(), b"seventeen bytes!!");
/// let shared = Encoded::from(Bytes::from(vec![0u8; 1000]));
/// assert!(!shared.is_inline());
/// assert_eq!(shared.into_bytes().len(), 1000);
/// ```
#[derive(Clone)]
pub struct Encoded(Repr);

#[derive(Clone)]
enum Repr {
    /// `bytes[..len]`, `len` at most `INLINE`.
    Inline {
        len: u8,
        bytes: [u8; Encoded::INLINE],
    },
    Shared(Bytes),
}

impl Encoded {
    /// The most bytes held inline: 46, which makes an `Encoded` 48 bytes long, half
    /// again a [`Bytes`].
    pub const INLINE: usize = 46;

    /// A copy of `bytes`: inline when they fit, otherwise in a new [`Bytes`].
    pub fn copy_from_slice(bytes: &[u8]) -> Self {
        let inline = Self::inline_with(bytes.len(), |inline| {
            inline.copy_from_slice(bytes);
            Ok::<(), std::convert::Infallible>(())
        });
        match inline {
            Some(Ok(encoded)) => encoded,
            _ => Encoded(Repr::Shared(Bytes::copy_from_slice(bytes))),
        }
    }

    /// `len` bytes inline, written by `write` into a slice of exactly that length; `None`
    /// when `len` is over [`Encoded::INLINE`].
    fn inline_with<E>(
        len: usize,
        write: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Option<Result<Self, E>> {
        let short = u8::try_from(len)
            .ok()
            .filter(|&l| usize::from(l) <= Self::INLINE)?;
        let mut bytes = [0u8; Self::INLINE];
        Some(write(&mut bytes[..len]).map(|()| Encoded(Repr::Inline { len: short, bytes })))
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(bytes) => bytes,
        }
    }

    /// How many bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the bytes are held inline (no allocation).
    pub fn is_inline(&self) -> bool {
        matches!(self.0, Repr::Inline { .. })
    }

    /// The bytes as [`Bytes`]: those it holds, or inline ones copied into a new
    /// allocation.
    pub fn into_bytes(self) -> Bytes {
        match self.0 {
            Repr::Inline { len, bytes } => Bytes::copy_from_slice(&bytes[..usize::from(len)]),
            Repr::Shared(bytes) => bytes,
        }
    }
}

impl From<Bytes> for Encoded {
    fn from(bytes: Bytes) -> Self {
        Encoded(Repr::Shared(bytes))
    }
}

impl AsRef<[u8]> for Encoded {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::Deref for Encoded {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for Encoded {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Encoded {}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A byte string, as `Bytes` shows itself, whichever way the bytes are held.
        write!(f, "b\"{}\"", self.as_slice().escape_ascii())
    }
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
/// runs with a limit: one decode may claim at most [`Bincode::DECODE_LIMIT`] bytes, the
/// default maximum frame length (a payload cannot be larger). A hostile length prefix
/// gets an error instead of an allocation of what it claims. A service whose frames are
/// allowed to be larger uses [`BincodeWithLimit`] with its own limit.
pub type Bincode = BincodeWithLimit<{ crate::ConnectionConfig::DEFAULT_MAX_FRAME_LEN }>;

/// bincode 2 with a decode limit of `LIMIT` bytes claimed per decode; [`Bincode`] is the
/// one with the default frame length.
///
/// ```
/// use rpc_core::format::{BincodeWithLimit, Format};
///
/// type Big = BincodeWithLimit<{ 64 * 1024 * 1024 }>;
/// let bytes = Big::encode(&vec![7u8; 10 * 1024 * 1024]).unwrap();
/// assert_eq!(Big::decode::<Vec<u8>>(&bytes).unwrap().len(), 10 * 1024 * 1024);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct BincodeWithLimit<const LIMIT: usize>;

impl<const LIMIT: usize> BincodeWithLimit<LIMIT> {
    /// The most bytes one decode may claim.
    pub const DECODE_LIMIT: usize = LIMIT;

    const CONFIG: bincode::config::Configuration<
        bincode::config::LittleEndian,
        bincode::config::Varint,
        bincode::config::Limit<LIMIT>,
    > = bincode::config::standard().with_limit::<LIMIT>();

    /// How many bytes `value` encodes to.
    fn size<T: Serialize + ?Sized>(value: &T) -> Result<usize, bincode::error::EncodeError> {
        let mut size = bincode::enc::write::SizeWriter::default();
        bincode::serde::encode_into_writer(value, &mut size, Self::CONFIG)?;
        Ok(size.bytes_written)
    }

    /// `value`, of `size` bytes, written into one allocation of that length.
    fn encode_sized<T: Serialize + ?Sized>(
        value: &T,
        size: usize,
    ) -> Result<Bytes, bincode::error::EncodeError> {
        let mut encoded = Vec::with_capacity(size);
        bincode::serde::encode_into_std_write(value, &mut encoded, Self::CONFIG)?;
        Ok(Bytes::from(encoded))
    }
}

impl<const LIMIT: usize> Format for BincodeWithLimit<LIMIT> {
    const NAME: &'static str = "bincode";

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, FormatError> {
        let error = |e| FormatError::new(Self::NAME, "encode", e);
        // Sized first, then written into one allocation of exactly that length, as
        // bincode's own `encode_to_vec` does for its native traits. Its serde version
        // grows a Vec from empty instead: an allocation, a reallocation and a copy per
        // value, ~10% of a 16-byte echo server's instructions. A Vec whose length is its
        // capacity also becomes `Bytes` without another allocation.
        let size = Self::size(value).map_err(error)?;
        Self::encode_sized(value, size).map_err(error)
    }

    /// A value of at most [`Encoded::INLINE`] bytes is written in place: no allocation.
    fn encode_small<T: Serialize + ?Sized>(value: &T) -> Result<Encoded, FormatError> {
        let error = |e| FormatError::new(Self::NAME, "encode", e);
        let size = Self::size(value).map_err(error)?;
        let inline = Encoded::inline_with(size, |slot| {
            let written = bincode::serde::encode_into_slice(value, slot, Self::CONFIG)?;
            // A value that writes other than it sizes (a `Serialize` that is not
            // deterministic) would leave zeros or be cut short: refused, as a value.
            if written != slot.len() {
                return Err(bincode::error::EncodeError::Other(
                    "value encoded to a different length than it was sized",
                ));
            }
            Ok(())
        });
        match inline {
            Some(encoded) => encoded.map_err(error),
            None => Self::encode_sized(value, size)
                .map(Encoded::from)
                .map_err(error),
        }
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
        let (value, read) = bincode::serde::decode_from_slice(bytes, Self::CONFIG)
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

    /// A value that fits in [`Encoded::INLINE`] bytes is written in place. postcard does
    /// not size a value first: a larger one stops where the inline bytes end and is
    /// written again into an allocation of its own.
    fn encode_small<T: Serialize + ?Sized>(value: &T) -> Result<Encoded, FormatError> {
        let mut inline = [0u8; Encoded::INLINE];
        match postcard::to_slice(value, &mut inline) {
            Ok(written) => Ok(Encoded::copy_from_slice(written)),
            Err(postcard::Error::SerializeBufferFull) => Self::encode(value).map(Encoded::from),
            Err(e) => Err(FormatError::new(Self::NAME, "encode", e)),
        }
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
    fn bincode_decode_limit_is_the_frame_limit_so_ten_bytes_cannot_claim_164_mib() {
        assert_eq!(
            Bincode::DECODE_LIMIT,
            crate::ConnectionConfig::DEFAULT_MAX_FRAME_LEN
        );
        // varint 0xFC + u32: a string claiming 164 MiB, then 5 bytes of it. bincode
        // allocates a string's claimed length before reading it.
        let mut input = vec![0xFC];
        input.extend_from_slice(&(164u32 * 1024 * 1024).to_le_bytes());
        input.extend_from_slice(&[1, 2, 3, 4, 5]);
        assert_eq!(input.len(), 10);
        let err = Bincode::decode::<String>(&input).unwrap_err();
        assert!(err.message.to_lowercase().contains("limit"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn bincode_encodes_byte_for_byte_as_bincodes_own_encode_to_vec(
            name in ".{0,40}",
            values in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..20),
            blob in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            flag in proptest::option::of(proptest::prelude::any::<i32>()),
        ) {
            let value = (name, values, blob, flag);
            let ours = Bincode::encode(&value).unwrap();
            let theirs = bincode::serde::encode_to_vec(&value, bincode::config::standard()).unwrap();
            proptest::prop_assert_eq!(&ours[..], &theirs[..]);
            let back: (String, Vec<u64>, Vec<u8>, Option<i32>) = Bincode::decode(&ours).unwrap();
            proptest::prop_assert_eq!(back, value);
        }
    }

    proptest::proptest! {
        #[test]
        fn bincode_encode_small_writes_the_bytes_of_encode_inline_up_to_46_bytes(
            name in ".{0,40}",
            blob in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
        ) {
            let value = (name, blob);
            let whole = Bincode::encode(&value).unwrap();
            let small = Bincode::encode_small(&value).unwrap();
            proptest::prop_assert_eq!(small.as_slice(), &whole[..]);
            proptest::prop_assert_eq!(small.is_inline(), whole.len() <= Encoded::INLINE);
            proptest::prop_assert_eq!(small.clone().into_bytes(), whole);
        }
    }

    #[test]
    fn an_encoded_value_holds_46_bytes_inline_and_47_in_bytes() {
        assert_eq!(std::mem::size_of::<Encoded>(), 48);
        // A string of n bytes: a 1-byte length, then the bytes.
        let at_limit = Bincode::encode_small(&"x".repeat(45)).unwrap();
        assert_eq!((at_limit.len(), at_limit.is_inline()), (46, true));
        let over = Bincode::encode_small(&"x".repeat(46)).unwrap();
        assert_eq!((over.len(), over.is_inline()), (47, false));
        assert!(Encoded::copy_from_slice(&[1; 46]).is_inline());
        assert!(!Encoded::copy_from_slice(&[1; 47]).is_inline());
        assert_eq!(
            format!("{:?}", Encoded::copy_from_slice(b"a\n")),
            "b\"a\\n\""
        );
    }

    /// Serializes as a byte string that changes length by `step` each time it is asked.
    struct Unsteady {
        len: std::cell::Cell<usize>,
        step: isize,
    }

    impl Serialize for Unsteady {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let len = self.len.get();
            self.len.set(len.saturating_add_signed(self.step));
            serializer.serialize_bytes(&vec![0; len])
        }
    }

    #[test]
    fn a_value_that_encodes_to_another_length_than_it_sized_is_an_encode_error() {
        for step in [1, -1] {
            let value = Unsteady {
                len: std::cell::Cell::new(5),
                step,
            };
            let err = Bincode::encode_small(&value).unwrap_err();
            assert_eq!(err.action, "encode", "step {step}");
        }
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
    fn postcard_encode_small_writes_the_bytes_of_encode_inline_up_to_46_bytes() {
        // A string of n bytes: a varint length (one byte below 128), then the bytes.
        for (len, inline) in [(0, true), (45, true), (46, false), (300, false)] {
            let value = "p".repeat(len);
            let small = Postcard::encode_small(&value).unwrap();
            assert_eq!(
                small.as_slice(),
                &Postcard::encode(&value).unwrap()[..],
                "{len}"
            );
            assert_eq!(small.is_inline(), inline, "{len}");
        }
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
