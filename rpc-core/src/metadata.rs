//! [`Metadata`]: ordered, multi-valued key → bytes pairs carried with a call or a message.

use bytes::Bytes;

use crate::Utf8Bytes;

/// Key → bytes pairs sent with a request (RPC metadata) or a message (bus headers).
///
/// Keys are case-preserving and compared exactly; a key may appear several times, and the
/// order of insertion is kept on the wire. Lookups are linear: metadata is small (a few
/// entries), and a `Vec` costs no allocation at all when it is empty, which is the common
/// case on the hot path.
///
/// ```
/// use rpc_core::Metadata;
///
/// let mut md = Metadata::new();
/// md.insert("authorization", "Bearer abc");
/// md.append("x-tag", "a");
/// md.append("x-tag", "b");
/// assert_eq!(md.get("authorization").unwrap().as_ref(), b"Bearer abc");
/// assert_eq!(md.get_all("x-tag").count(), 2);
/// assert_eq!(md.len(), 3);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    entries: Vec<(Utf8Bytes, Bytes)>,
}

impl Metadata {
    /// Empty metadata; does not allocate.
    pub const fn new() -> Self {
        Metadata {
            entries: Vec::new(),
        }
    }

    /// Sets `key` to `value`, replacing every earlier value of `key`.
    pub fn insert(&mut self, key: impl Into<Utf8Bytes>, value: impl Into<Bytes>) {
        let key = key.into();
        self.entries.retain(|(k, _)| *k != key);
        self.entries.push((key, value.into()));
    }

    /// Adds a value for `key`, keeping the values already there.
    pub fn append(&mut self, key: impl Into<Utf8Bytes>, value: impl Into<Bytes>) {
        self.entries.push((key.into(), value.into()));
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&Bytes> {
        self.entries
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v)
    }

    /// The first value of `key`, if it is UTF-8.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of `key`, in order.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Bytes> + 'a {
        self.entries
            .iter()
            .filter(move |(k, _)| k.as_str() == key)
            .map(|(_, v)| v)
    }

    /// Removes every value of `key`; returns how many were removed.
    pub fn remove(&mut self, key: &str) -> usize {
        let before = self.entries.len();
        self.entries.retain(|(k, _)| k.as_str() != key);
        before - self.entries.len()
    }

    /// Adds every entry of `other` after the entries already here.
    pub fn extend(&mut self, other: &Metadata) {
        self.entries.extend(other.entries.iter().cloned());
    }

    /// All entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&Utf8Bytes, &Bytes)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// Number of entries (counting each value of a repeated key).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bytes these entries take in a frame: a 2-byte count, then per entry a 2-byte
    /// key length, the key, a 4-byte value length and the value. What a bus counts,
    /// besides the payload, against its maximum payload (as NATS counts headers).
    ///
    /// ```
    /// use rpc_core::Metadata;
    /// let mut md = Metadata::new();
    /// md.insert("k", "vv");
    /// assert_eq!(md.wire_len(), 2 + 2 + 1 + 4 + 2);
    /// ```
    pub fn wire_len(&self) -> usize {
        self.entries.iter().fold(2usize, |len, (k, v)| {
            len.saturating_add(6 + k.len()).saturating_add(v.len())
        })
    }

    pub(crate) fn with_capacity(n: usize) -> Self {
        Metadata {
            entries: Vec::with_capacity(n),
        }
    }

    pub(crate) fn push_raw(&mut self, key: Utf8Bytes, value: Bytes) {
        self.entries.push((key, value));
    }
}

impl<K: Into<Utf8Bytes>, V: Into<Bytes>> FromIterator<(K, V)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Metadata {
            entries: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}
