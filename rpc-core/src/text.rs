//! [`Utf8Bytes`]: a string that shares the frame's buffer instead of copying out of it.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use bytestring::ByteString;

/// An immutable UTF-8 string backed by [`Bytes`].
///
/// Method names, subjects and metadata keys are decoded from a frame without copying: the
/// value is a slice of the received buffer, validated as UTF-8 once when it is built.
///
/// ```
/// use rpc_core::Utf8Bytes;
///
/// let method = Utf8Bytes::from_static("Echo.echo");
/// assert_eq!(method.as_str(), "Echo.echo");
/// assert_eq!(&*method, "Echo.echo");
/// assert!(Utf8Bytes::try_from(bytes::Bytes::from_static(b"\xff")).is_err());
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Utf8Bytes(ByteString);

impl Utf8Bytes {
    /// Wraps a static string; no allocation.
    pub const fn from_static(s: &'static str) -> Self {
        Utf8Bytes(ByteString::from_static(s))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // checked once, when the value was built (`ByteString` keeps them UTF-8)
        &self.0
    }

    /// The underlying bytes.
    pub fn as_bytes(&self) -> &Bytes {
        self.0.as_bytes()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the string is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<Bytes> for Utf8Bytes {
    type Error = std::str::Utf8Error;

    fn try_from(bytes: Bytes) -> Result<Self, Self::Error> {
        ByteString::try_from(bytes).map(Utf8Bytes)
    }
}

impl From<String> for Utf8Bytes {
    fn from(s: String) -> Self {
        Utf8Bytes(ByteString::from(s))
    }
}

/// A string literal is wrapped without copying (as `Bytes: From<&'static str>`); for a
/// borrowed string, go through `String`.
impl From<&'static str> for Utf8Bytes {
    fn from(s: &'static str) -> Self {
        Utf8Bytes::from_static(s)
    }
}

impl Deref for Utf8Bytes {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Utf8Bytes {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for Utf8Bytes {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Utf8Bytes {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
