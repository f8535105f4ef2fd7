//! Subjects: `.`-separated tokens, with `*` and `>` wildcards in subscriptions.
//!
//! * A **subject** (what is published to) is one or more non-empty tokens without
//!   wildcards: `orders.eu.created`.
//! * A **filter** (what is subscribed to) may use whole-token wildcards: `*` matches
//!   exactly one token, `>` (last token only) matches one or more trailing tokens, so
//!   `orders.>` matches `orders.eu` and `orders.eu.created` but not `orders`.
//!
//! Tokens cannot contain whitespace or control characters, and a wildcard character
//! inside a longer token (`ord*rs`) is refused rather than taken literally. These are
//! NATS's rules, so a subject that works on the embedded bus works on a NATS server.

/// The longest subject or filter accepted, in bytes.
pub const MAX_SUBJECT_LEN: usize = 4096;

/// Why a subject, filter or queue group name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{text}`: {reason}")]
pub struct SubjectError {
    what: &'static str,
    text: String,
    reason: &'static str,
}

impl SubjectError {
    fn new(what: &'static str, text: &str, reason: &'static str) -> Self {
        let mut text = text.to_owned();
        if text.len() > 80 {
            let mut end = 80;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        SubjectError { what, text, reason }
    }

    /// What was refused: `"subject"`, `"subscription subject"` or `"queue group"`.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Why it was refused.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

/// Checks a subject to publish to: tokens, no wildcards.
///
/// ```
/// use mq_store::subject::validate_subject;
/// assert!(validate_subject("orders.eu.created").is_ok());
/// assert!(validate_subject("orders.*").is_err());
/// assert!(validate_subject("orders..eu").is_err());
/// ```
pub fn validate_subject(subject: &str) -> Result<(), SubjectError> {
    check_tokens("subject", subject, false)
}

/// Checks a filter to subscribe to: tokens, with `*` and a trailing `>` allowed.
///
/// ```
/// use mq_store::subject::validate_filter;
/// assert!(validate_filter("orders.*.created").is_ok());
/// assert!(validate_filter("orders.>").is_ok());
/// assert!(validate_filter("orders.>.created").is_err());
/// assert!(validate_filter("ord*rs").is_err());
/// ```
pub fn validate_filter(filter: &str) -> Result<(), SubjectError> {
    check_tokens("subscription subject", filter, true)
}

/// Checks a queue group name: non-empty, no whitespace or control characters.
pub fn validate_queue(queue: &str) -> Result<(), SubjectError> {
    const WHAT: &str = "queue group";
    if queue.is_empty() {
        return Err(SubjectError::new(WHAT, queue, "it is empty"));
    }
    if queue.len() > MAX_SUBJECT_LEN {
        return Err(SubjectError::new(
            WHAT,
            queue,
            "it is longer than 4096 bytes",
        ));
    }
    if queue.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SubjectError::new(
            WHAT,
            queue,
            "it contains whitespace or a control character",
        ));
    }
    Ok(())
}

fn check_tokens(what: &'static str, text: &str, wildcards: bool) -> Result<(), SubjectError> {
    if is_plain(text) {
        return Ok(()); // the common case, in one pass over the bytes
    }
    check_each_token(what, text, wildcards)
}

/// The full check, token by token, saying what is wrong.
fn check_each_token(what: &'static str, text: &str, wildcards: bool) -> Result<(), SubjectError> {
    if text.is_empty() {
        return Err(SubjectError::new(what, text, "it is empty"));
    }
    if text.len() > MAX_SUBJECT_LEN {
        return Err(SubjectError::new(
            what,
            text,
            "it is longer than 4096 bytes",
        ));
    }
    let mut tokens = text.split('.').peekable();
    while let Some(token) = tokens.next() {
        if token.is_empty() {
            return Err(SubjectError::new(
                what,
                text,
                "it has an empty token (leading, trailing or double `.`)",
            ));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(SubjectError::new(
                what,
                text,
                "it contains whitespace or a control character",
            ));
        }
        match token {
            "*" | ">" if !wildcards => {
                return Err(SubjectError::new(
                    what,
                    text,
                    "wildcards `*` and `>` are for subscriptions, not for publishing",
                ));
            }
            ">" if tokens.peek().is_some() => {
                return Err(SubjectError::new(what, text, "`>` must be the last token"));
            }
            "*" | ">" => {}
            _ if token.contains(['*', '>']) => {
                return Err(SubjectError::new(
                    what,
                    text,
                    "a wildcard must be a whole token",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `text` is a valid subject made of printable ASCII without wildcards: at most
/// [`MAX_SUBJECT_LEN`] bytes, no empty token. Anything else takes the full check (which
/// also says what is wrong).
fn is_plain(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_SUBJECT_LEN {
        return false;
    }
    let mut after_dot = true; // a leading `.` is an empty token
    // Eight bytes at a time: a client checks every subject it publishes, and a
    // byte-by-byte loop cost ~10 instructions a byte.
    let mut words = bytes.chunks_exact(8);
    for chunk in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        if !plain_word(u64::from_le_bytes(word), &mut after_dot) {
            return false;
        }
    }
    let rest = words.remainder();
    if let Some(&last) = rest.last() {
        // padded with a plain byte, which neither ends a token nor starts one
        let mut word = [b'a'; 8];
        word[..rest.len()].copy_from_slice(rest);
        if !plain_word(u64::from_le_bytes(word), &mut after_dot) {
            return false;
        }
        after_dot = last == b'.';
    }
    !after_dot
}

/// Whether the eight bytes of `w` (little-endian) are printable ASCII without
/// wildcards, with no empty token among them or at their start (`after_dot`: the byte
/// before them was a dot). Sets `after_dot` to whether their last byte is one.
fn plain_word(w: u64, after_dot: &mut bool) -> bool {
    // Every byte in 0x21..=0x7e: none with its high bit set, each at least 0x21 (adding
    // 0x5f sets its high bit) and none 0x7f (adding 1 sets it). Bytes under 0x80 carry
    // nothing into the next byte in either sum.
    if w & HIGH != 0
        || w.wrapping_add(ONES * 0x5f) & HIGH != HIGH
        || w.wrapping_add(ONES) & HIGH != 0
    {
        return false;
    }
    if zero_bytes(w ^ (ONES * u64::from(b'*'))) | zero_bytes(w ^ (ONES * u64::from(b'>'))) != 0 {
        return false;
    }
    let dots = zero_bytes(w ^ (ONES * u64::from(b'.')));
    // two dots side by side, or one right after a dot that ended the bytes before
    if dots & (dots << 8) != 0 || (*after_dot && dots & 0x80 != 0) {
        return false;
    }
    *after_dot = dots >> 63 != 0;
    true
}

/// 0x01 in every byte of a `u64`.
const ONES: u64 = 0x0101_0101_0101_0101;
/// The high bit of every byte of a `u64`.
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The high bit set in each byte of `x` that is zero, and nothing else.
fn zero_bytes(x: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    // A byte's low seven bits plus 0x7f set its high bit unless they are all zero, and
    // never carry into the next byte.
    !(((x & LOW7) + LOW7) | x | LOW7)
}

/// Whether `filter` matches `subject`, token by token. Both are assumed valid.
///
/// This is the reference definition; the subscription index answers the same question
/// for many filters at once.
///
/// ```
/// use mq_store::subject::matches;
/// assert!(matches("a.*.c", "a.b.c"));
/// assert!(matches("a.>", "a.b.c"));
/// assert!(!matches("a.>", "a"));
/// ```
pub fn matches(filter: &str, subject: &str) -> bool {
    // Token by token over the bytes: every publish to a stream is matched against the
    // streams' filters, and two `str::split` iterators took about 600 of a broker's
    // 12,500 instructions per pipelined durable publish (callgrind).
    let (mut f, mut s) = (filter.as_bytes(), subject.as_bytes());
    loop {
        let (token, f_rest) = next_token(f);
        let (other, s_rest) = next_token(s);
        match token {
            b">" => return true,
            b"*" => {}
            _ if token == other => {}
            _ => return false,
        }
        match (f_rest, s_rest) {
            (None, None) => return true,
            (Some(f_next), Some(s_next)) => (f, s) = (f_next, s_next),
            _ => return false,
        }
    }
}

/// The first token of `text` and, if a dot follows it, the rest after that dot.
fn next_token(text: &[u8]) -> (&[u8], Option<&[u8]>) {
    match text.iter().position(|&b| b == b'.') {
        Some(dot) => (&text[..dot], Some(&text[dot + 1..])),
        None => (text, None),
    }
}

/// Whether some subject matches both filters. Both are assumed valid.
///
/// Streams use it to refuse a subject that two streams would both capture.
///
/// ```
/// use mq_store::subject::overlaps;
/// assert!(overlaps("orders.>", "orders.eu.*"));
/// assert!(overlaps("a.*.c", "a.b.*"));
/// assert!(!overlaps("orders.>", "orders"));
/// assert!(!overlaps("a.*", "a.b.c"));
/// ```
pub fn overlaps(a: &str, b: &str) -> bool {
    let mut a = a.split('.');
    let mut b = b.split('.');
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_check_accepts_only_what_the_full_check_accepts() {
        let long = "a".repeat(MAX_SUBJECT_LEN + 1);
        let cases = [
            "a",
            "orders.eu.1",
            "$CR.ACK.S.c.1.2.3.4",
            "_INBOX.x",
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "a b",
            "a\tb",
            "a.*",
            "a.>",
            "a*b",
            "caf\u{e9}",
            "a\u{7f}",
            &long,
        ];
        for s in cases {
            for wildcards in [false, true] {
                if is_plain(s) {
                    assert!(check_each_token("subject", s, wildcards).is_ok(), "{s:?}");
                }
                assert_eq!(
                    check_tokens("subject", s, wildcards),
                    check_each_token("subject", s, wildcards),
                    "{s:?}"
                );
            }
        }
    }

    /// The quick check as it was, a byte at a time: the reference for the word-wise one.
    fn is_plain_bytewise(text: &str) -> bool {
        let bytes = text.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_SUBJECT_LEN {
            return false;
        }
        let mut after_dot = true;
        for &b in bytes {
            match b {
                b'.' if after_dot => return false,
                b'.' => after_dot = true,
                b'*' | b'>' => return false,
                0x21..=0x7e => after_dot = false,
                _ => return false,
            }
        }
        !after_dot
    }

    /// The matching rule as NATS states it, token list against token list: the oracle
    /// for [`matches`].
    fn matches_by_tokens(filter: &str, subject: &str) -> bool {
        let mut f = filter.split('.');
        let mut s = subject.split('.');
        loop {
            match (f.next(), s.next()) {
                (None, None) => return true,
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                _ => return false,
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn matching_over_bytes_agrees_with_matching_token_lists(
            filter in "(\\*|>|a|b|ab)(\\.(\\*|>|a|b|ab)){0,4}",
            subject in "(a|b|ab|ba)(\\.(a|b|ab|ba)){0,4}",
        ) {
            proptest::prop_assert_eq!(
                matches(&filter, &subject),
                matches_by_tokens(&filter, &subject),
                "{} against {}", filter, subject
            );
        }

        #[test]
        fn the_quick_check_eight_bytes_at_a_time_agrees_with_the_check_a_byte_at_a_time(
            text in "[a-c.*> \\t\u{7f}\u{80}\u{e9}!~]{0,40}",
        ) {
            proptest::prop_assert_eq!(is_plain(&text), is_plain_bytewise(&text), "{:?}", text);
            if is_plain(&text) {
                proptest::prop_assert!(check_each_token("subject", &text, false).is_ok());
            }
        }

        #[test]
        fn the_quick_check_agrees_on_any_bytes(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            let text = String::from_utf8_lossy(&bytes);
            proptest::prop_assert_eq!(is_plain(&text), is_plain_bytewise(&text), "{:?}", text);
        }
    }

    #[test]
    fn dots_at_word_edges_are_judged_as_anywhere_else() {
        for (text, plain) in [
            ("abcdefg.h", true),
            ("abcdefgh.i", true),
            ("abcdefg..h", false),
            ("abcdefgh.", false),
            ("abcdefg.", false),
            (".bcdefghi", false),
            ("abcdefghijklmno.p", true),
            ("abcdefghijklmno..p", false),
            ("~!abcdef.ghijklm", true),
            ("abcdefgh\u{7f}", false),
            ("abcdefg ", false),
        ] {
            assert_eq!(is_plain(text), plain, "{text:?}");
            assert_eq!(is_plain_bytewise(text), plain, "{text:?}");
        }
    }

    #[test]
    fn wildcard_matching_follows_the_nats_rules() {
        // (filter, subject, matches)
        let table = [
            ("a", "a", true),
            ("a", "b", false),
            ("a.b", "a.b", true),
            ("a.b", "a", false),
            ("a", "a.b", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("a.*", "a.b", true),
            ("a.*", "a", false),
            ("a.*", "a.b.c", false),
            ("*.b", "a.b", true),
            ("*.*", "a.b", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
            (">", "a", true),
            (">", "a.b.c", true),
            ("a.>", "a", false),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c.d", true),
            ("a.>", "b.c", false),
            ("a.*.>", "a.b", false),
            ("a.*.>", "a.b.c", true),
            ("*.>", "a.b", true),
            ("*.>", "a", false),
            ("a.b.>", "a.b", false),
            ("orders.eu", "orders.eu", true),
            ("orders.eu", "orders.us", false),
        ];
        for (filter, subject, expected) in table {
            validate_filter(filter).unwrap();
            validate_subject(subject).unwrap();
            assert_eq!(matches(filter, subject), expected, "{filter} vs {subject}");
        }
    }

    #[test]
    fn malformed_subjects_are_refused_with_the_reason() {
        for (bad, reason) in [
            ("", "empty"),
            (".a", "empty token"),
            ("a.", "empty token"),
            ("a..b", "empty token"),
            ("a b", "whitespace"),
            ("a\tb", "whitespace"),
            ("a.*", "not for publishing"),
            ("a.>", "not for publishing"),
            ("a*", "whole token"),
        ] {
            let err = validate_subject(bad).unwrap_err();
            assert!(err.to_string().contains(reason), "{bad:?}: {err}");
        }
        for (bad, reason) in [
            ("a.>.b", "last token"),
            ("a.b*", "whole token"),
            ("a.>>", "whole token"),
            ("", "empty"),
        ] {
            let err = validate_filter(bad).unwrap_err();
            assert!(err.to_string().contains(reason), "{bad:?}: {err}");
        }
        assert!(validate_subject(&"a".repeat(MAX_SUBJECT_LEN + 1)).is_err());
        assert!(validate_queue("workers").is_ok());
        assert!(validate_queue("").is_err());
        assert!(validate_queue("a b").is_err());
    }
}
