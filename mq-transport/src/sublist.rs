//! The subscription index: which subscriptions a subject reaches.
//!
//! A trie keyed by token. Each node holds the subscriptions whose filter ends there, and
//! those whose filter continues with `>` from there; `*` is one more child. Matching a
//! subject of `n` tokens visits at most the literal and `*` child per token, so its cost
//! depends on the subject and on how many wildcard filters overlap it, not on how many
//! subscriptions exist.
//!
//! Results are cached per subject (up to [`CACHE_CAPACITY`] subjects). Adding or removing
//! a subscription evicts exactly the cached subjects its filter matches; the trie's write
//! lock is held while doing so, and a lookup fills the cache under the read lock, so a
//! stale result can never be cached. Reply subjects, each used once, are kept by their
//! inbox instead (up to [`INBOX_CAPACITY`] inboxes; see [`Sublist::matches_inbox`]), and
//! every change drops them all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use rpc_core::sync::{lock, read, write};

use crate::subject;

/// Subjects whose match results are kept.
pub const CACHE_CAPACITY: usize = 4096;

/// Inbox prefixes whose match results are kept ([`Sublist::matches_inbox`]).
pub const INBOX_CAPACITY: usize = 1024;

/// A reply subject's inbox: the subject up to and including its last `.`
/// (`_INBOX.<id>.` of `_INBOX.<id>.7`), or `None` for a subject of one token. Replies
/// to one inbox differ in their last token only.
///
/// ```
/// use mq_transport::sublist::inbox_of;
///
/// assert_eq!(inbox_of("_INBOX.a.7"), Some("_INBOX.a."));
/// assert_eq!(inbox_of("orders"), None);
/// ```
pub fn inbox_of(subject: &str) -> Option<&str> {
    subject.rfind('.').map(|dot| &subject[..=dot])
}

/// The subscriptions one subject reaches.
#[derive(Debug)]
pub struct Match<T> {
    /// Plain subscriptions: each gets every message.
    pub plain: Vec<T>,
    /// Queue groups, by name: one member of each gets each message.
    pub groups: Vec<(Box<str>, Vec<T>)>,
    /// Rotates the member tried first in each group.
    next: AtomicUsize,
}

/// What became of a message [`Match::offer`] offered to one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    /// Queued.
    Taken,
    /// The target's queue is full: wait for it, or try another member of its group.
    Full,
    /// The target's queue is full and it is known to be slow: try every other member of
    /// its group first; waiting for it is the last resort.
    Behind,
    /// The target cannot take it (gone, cut off).
    Refused,
}

impl<T> Match<T> {
    /// Whether nothing matched.
    pub fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }

    /// Offers one message: to every plain subscription, and to the members of each queue
    /// group in turn until one takes it (`deliver` returns whether it did). Returns how
    /// many took it.
    pub fn deliver(&self, mut deliver: impl FnMut(&T) -> bool) -> u64 {
        let offered = |target: &T| {
            if deliver(target) {
                Offered::Taken
            } else {
                Offered::Refused
            }
        };
        self.offer(offered, &mut Vec::new())
    }

    /// Offers one message, to a target that may be full: every plain subscription, and
    /// per queue group the members in turn until one takes it ([`Offered::Taken`]). A
    /// full plain subscription is pushed to `full`, to wait for; a group's full member is
    /// pushed only when no member took it, so that a member with room gets the message
    /// before anyone waits for a full one. Returns how many took it (or will, from
    /// `full`).
    pub fn offer<'a>(&'a self, mut offer: impl FnMut(&T) -> Offered, full: &mut Vec<&'a T>) -> u64 {
        let mut delivered = 0;
        for target in &self.plain {
            match offer(target) {
                Offered::Taken => delivered += 1,
                Offered::Full | Offered::Behind => {
                    full.push(target);
                    delivered += 1;
                }
                Offered::Refused => {}
            }
        }
        for (_, members) in &self.groups {
            let (mut first_full, mut first_behind) = (None, None);
            let mut taken = false;
            for member in self.group_order(members) {
                match offer(member) {
                    Offered::Taken => {
                        taken = true;
                        break;
                    }
                    Offered::Full => {
                        first_full.get_or_insert(member);
                    }
                    Offered::Behind => {
                        first_behind.get_or_insert(member);
                    }
                    Offered::Refused => {}
                }
            }
            if taken {
                delivered += 1;
            } else if let Some(member) = first_full.or(first_behind) {
                full.push(member);
                delivered += 1;
            }
        }
        delivered
    }

    /// Members of `group` in the order to try them for one message: round robin, so
    /// that a group's members share the load evenly.
    fn group_order<'a>(&self, group: &'a [T]) -> impl Iterator<Item = &'a T> + 'a {
        let start = if group.is_empty() {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % group.len()
        };
        group[start..].iter().chain(group[..start].iter())
    }
}

/// Subscriptions by key.
type Keyed<T> = Vec<(u64, T)>;

/// Subscriptions under one filter, or under one filter followed by `>`.
#[derive(Debug)]
struct Subs<T> {
    plain: Keyed<T>,
    groups: Vec<(Box<str>, Keyed<T>)>,
}

impl<T> Default for Subs<T> {
    fn default() -> Self {
        Subs {
            plain: Vec::new(),
            groups: Vec::new(),
        }
    }
}

impl<T: Clone> Subs<T> {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }

    fn insert(&mut self, queue: Option<&str>, key: u64, value: T) {
        match queue {
            None => self.plain.push((key, value)),
            Some(queue) => match self.groups.iter_mut().find(|(q, _)| &**q == queue) {
                Some((_, members)) => members.push((key, value)),
                None => self.groups.push((queue.into(), vec![(key, value)])),
            },
        }
    }

    fn remove(&mut self, queue: Option<&str>, key: u64) -> Option<T> {
        let list = match queue {
            None => &mut self.plain,
            Some(queue) => {
                let i = self.groups.iter().position(|(q, _)| &**q == queue)?;
                let members = &mut self.groups[i].1;
                let j = members.iter().position(|(k, _)| *k == key)?;
                let (_, value) = members.swap_remove(j);
                if members.is_empty() {
                    self.groups.swap_remove(i);
                }
                return Some(value);
            }
        };
        let j = list.iter().position(|(k, _)| *k == key)?;
        Some(list.swap_remove(j).1)
    }

    fn collect_into(&self, out: &mut Match<T>) {
        out.plain.extend(self.plain.iter().map(|(_, v)| v.clone()));
        for (queue, members) in &self.groups {
            let values = members.iter().map(|(_, v)| v.clone());
            match out.groups.iter_mut().find(|(q, _)| q == queue) {
                Some((_, all)) => all.extend(values),
                None => out.groups.push((queue.clone(), values.collect())),
            }
        }
    }
}

#[derive(Debug)]
struct Node<T> {
    literal: HashMap<Box<str>, Node<T>>,
    star: Option<Box<Node<T>>>,
    /// Filters ending at this node.
    here: Subs<T>,
    /// Filters ending at this node followed by `>`.
    rest: Subs<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literal: HashMap::new(),
            star: None,
            here: Subs::default(),
            rest: Subs::default(),
        }
    }
}

impl<T: Clone> Node<T> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.star.is_none()
            && self.here.is_empty()
            && self.rest.is_empty()
    }

    /// Collects what `tokens` reach; sets `by_last` if a filter names a literal last
    /// token where a walk ends (the result then depends on the subject's last token).
    fn collect(&self, tokens: &[&str], out: &mut Match<T>, by_last: &mut bool) {
        let Some((first, rest)) = tokens.split_first() else {
            self.here.collect_into(out);
            return;
        };
        // `>` here matches the one or more tokens left.
        self.rest.collect_into(out);
        if rest.is_empty() && !self.literal.is_empty() {
            *by_last = true;
        }
        if let Some(child) = self.literal.get(*first) {
            child.collect(rest, out, by_last);
        }
        if let Some(child) = &self.star {
            child.collect(rest, out, by_last);
        }
    }

    /// Removes the entry; returns it, pruning nodes left empty on the way back.
    fn remove(&mut self, tokens: &[&str], queue: Option<&str>, key: u64) -> Option<T> {
        match tokens {
            [] => self.here.remove(queue, key),
            [">"] => self.rest.remove(queue, key),
            [first, rest @ ..] => {
                if *first == "*" {
                    let child = self.star.as_mut()?;
                    let value = child.remove(rest, queue, key);
                    if child.is_empty() {
                        self.star = None;
                    }
                    value
                } else {
                    let child = self.literal.get_mut(*first)?;
                    let value = child.remove(rest, queue, key);
                    if child.is_empty() {
                        self.literal.remove(*first);
                    }
                    value
                }
            }
        }
    }
}

#[derive(Debug)]
struct Trie<T> {
    root: Node<T>,
    len: usize,
}

/// A match kept by a caller that looks one subject up again and again (a broker
/// connection's last publish subject), for [`Sublist::kept`]. Held weakly: a change that
/// evicts the match from the cache frees it, whoever keeps it.
#[derive(Debug)]
pub struct KeptMatch<T> {
    generation: u64,
    found: Weak<Match<T>>,
}

impl<T> KeptMatch<T> {
    /// Keeps `found`, got from a lookup after reading `generation`
    /// ([`Sublist::generation`]).
    pub fn new(generation: u64, found: &Arc<Match<T>>) -> Self {
        KeptMatch {
            generation,
            found: Arc::downgrade(found),
        }
    }
}

/// An index of subscriptions by filter, with a match cache.
///
/// Each subscription is a `T` (the caller's delivery handle) under a filter, an optional
/// queue group and a `key` unique among the caller's subscriptions, used to remove it.
///
/// ```
/// use mq_transport::sublist::Sublist;
///
/// let list = Sublist::new();
/// list.insert("orders.*", None, 1, "all orders").unwrap();
/// list.insert("orders.eu", Some("workers"), 2, "worker a").unwrap();
/// list.insert("orders.eu", Some("workers"), 3, "worker b").unwrap();
///
/// let m = list.matches("orders.eu");
/// assert_eq!(m.plain, vec!["all orders"]);
/// assert_eq!(m.groups[0].1.len(), 2);
/// assert!(list.matches("orders.us.east").is_empty());
/// ```
#[derive(Debug)]
pub struct Sublist<T> {
    trie: RwLock<Trie<T>>,
    cache: Mutex<HashMap<Box<str>, Arc<Match<T>>>>,
    /// Matches of reply subjects by inbox prefix (`_INBOX.<id>.`), for subjects whose
    /// match does not depend on their last token; emptied by every change.
    inboxes: Mutex<HashMap<Box<str>, Arc<Match<T>>>>,
    /// Bumped by every change, after the caches dropped what it made stale.
    generation: AtomicU64,
}

/// What a lookup keeps of its result.
enum Keep<'a> {
    Nothing,
    /// In the cache, under the subject.
    Subject,
    /// In the inboxes, under this prefix of the subject, if the match does not depend
    /// on the subject's last token.
    Inbox(&'a str),
}

impl<T: Clone> Default for Sublist<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether `filter` has no wildcard token: it matches exactly one subject, itself.
fn is_literal(filter: &str) -> bool {
    !filter.split('.').any(|token| token == "*" || token == ">")
}

/// Past this many wildcard filters in one [`Sublist::remove_many`], the match cache is
/// cleared instead of scanned once per filter.
const EVICT_SCAN_LIMIT: usize = 8;

impl<T: Clone> Sublist<T> {
    /// An empty index.
    pub fn new() -> Self {
        Sublist {
            trie: RwLock::new(Trie {
                root: Node::default(),
                len: 0,
            }),
            cache: Mutex::new(HashMap::new()),
            inboxes: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        }
    }

    /// A number that changes whenever a subscription is added or removed. A result of
    /// [`Sublist::matches`] got after reading generation `g` is still the right one
    /// while the generation is `g`: a publisher that sends to the same subject again and
    /// again (a broker connection's last subject) can keep it and skip the lookup.
    ///
    /// ```
    /// use mq_transport::sublist::Sublist;
    ///
    /// let list = Sublist::new();
    /// let before = list.generation();
    /// let found = list.matches("orders.eu");
    /// assert_eq!(list.generation(), before, "nothing changed: `found` holds");
    /// list.insert("orders.*", None, 1, "all orders").unwrap();
    /// assert_ne!(list.generation(), before, "look it up again");
    /// assert!(found.is_empty() && !list.matches("orders.eu").is_empty());
    /// ```
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// `kept`'s match, while it is still the right one: no subscription was added or
    /// removed since it was got, and the cache still holds it.
    ///
    /// ```
    /// use mq_transport::sublist::{KeptMatch, Sublist};
    ///
    /// let list = Sublist::new();
    /// let generation = list.generation(); // before the lookup
    /// let kept = KeptMatch::new(generation, &list.matches("orders.eu"));
    /// assert!(list.kept(&kept).is_some());
    /// list.insert("orders.*", None, 1, "all orders").unwrap();
    /// assert!(list.kept(&kept).is_none(), "look it up again");
    /// ```
    pub fn kept(&self, kept: &KeptMatch<T>) -> Option<Arc<Match<T>>> {
        if kept.generation != self.generation() {
            return None;
        }
        kept.found.upgrade()
    }

    /// Marks a change (the trie's write lock is held, the cache already evicted): the
    /// inboxes' matches are dropped, and a reader that sees the new generation finds no
    /// stale result in either.
    fn changed(&self) {
        let dropped = std::mem::take(&mut *lock(&self.inboxes));
        self.generation.fetch_add(1, Ordering::Release);
        drop(dropped); // (their routes let go outside the inboxes' lock)
    }

    /// Adds a subscription. The filter and queue name are validated here.
    pub fn insert(
        &self,
        filter: &str,
        queue: Option<&str>,
        key: u64,
        value: T,
    ) -> Result<(), subject::SubjectError> {
        subject::validate_filter(filter)?;
        if let Some(queue) = queue {
            subject::validate_queue(queue)?;
        }
        let mut trie = write(&self.trie);
        let mut node = &mut trie.root;
        let mut tokens = filter.split('.').peekable();
        let mut subs = None;
        while let Some(token) = tokens.next() {
            if token == ">" && tokens.peek().is_none() {
                subs = Some(&mut node.rest);
                break;
            }
            node = if token == "*" {
                node.star.get_or_insert_with(Box::default)
            } else {
                node.literal.entry(token.into()).or_default()
            };
        }
        match subs {
            Some(rest) => rest.insert(queue, key, value),
            None => node.here.insert(queue, key, value),
        }
        trie.len += 1;
        self.evict(filter);
        self.changed();
        Ok(())
    }

    /// Removes the subscription added with these `filter`, `queue` and `key`; returns its
    /// value, or `None` if there was none.
    pub fn remove(&self, filter: &str, queue: Option<&str>, key: u64) -> Option<T> {
        let tokens: Vec<&str> = filter.split('.').collect();
        let mut trie = write(&self.trie);
        let value = trie.root.remove(&tokens, queue, key)?;
        trie.len -= 1;
        self.evict(filter);
        self.changed();
        Some(value)
    }

    /// Removes several subscriptions under one write lock, evicting the match cache once:
    /// for a connection that closes with many subscriptions. Callers pass a bounded batch
    /// (see [`Sublist::REMOVE_BATCH`]) and let others run between batches, since matching
    /// waits while the lock is held. Returns how many were removed.
    pub fn remove_many<'a>(
        &self,
        subs: impl IntoIterator<Item = (&'a str, Option<&'a str>, u64)>,
    ) -> usize {
        let mut trie = write(&self.trie);
        let mut removed = 0;
        let mut wildcards = Vec::new();
        let mut literals = Vec::new();
        for (filter, queue, key) in subs {
            let tokens: Vec<&str> = filter.split('.').collect();
            if trie.root.remove(&tokens, queue, key).is_some() {
                removed += 1;
                if is_literal(filter) {
                    literals.push(filter);
                } else {
                    wildcards.push(filter);
                }
            }
        }
        trie.len -= removed;
        let mut cache = lock(&self.cache);
        if wildcards.len() > EVICT_SCAN_LIMIT {
            cache.clear(); // cheaper than a scan per filter; refilled on use
        } else {
            for filter in literals {
                cache.remove(filter);
            }
            if !wildcards.is_empty() && !cache.is_empty() {
                cache.retain(|subject, _| !wildcards.iter().any(|f| subject::matches(f, subject)));
            }
        }
        drop(cache);
        if removed > 0 {
            self.changed();
        }
        removed
    }

    /// How many subscriptions a caller of [`Sublist::remove_many`] should remove per
    /// batch: the lock is held for about that many trie removals.
    pub const REMOVE_BATCH: usize = 256;

    /// Drops cached results for the subjects `filter` matches (the trie's write lock is
    /// held by the caller). A literal filter matches one subject, its own: no scan.
    fn evict(&self, filter: &str) {
        let mut cache = lock(&self.cache);
        if cache.is_empty() {
            return;
        }
        if is_literal(filter) {
            cache.remove(filter);
        } else {
            cache.retain(|subject, _| !subject::matches(filter, subject));
        }
    }

    /// The subscriptions `subject` reaches. `subject` should be a valid publish subject
    /// (see [`subject::validate_subject`]); anything else simply matches as its tokens do.
    pub fn matches(&self, subject: &str) -> Arc<Match<T>> {
        if let Some(hit) = lock(&self.cache).get(subject) {
            return hit.clone();
        }
        self.collect(subject, Keep::Subject).0
    }

    /// [`Sublist::matches`] for a subject used once (a request's reply subject): neither
    /// looked up in the cache nor added to it, where it would only push out the subjects
    /// that come back.
    pub fn matches_once(&self, subject: &str) -> Arc<Match<T>> {
        self.collect(subject, Keep::Nothing).0
    }

    /// [`Sublist::matches_once`] for a reply subject, `<inbox>.<last token>`: the match
    /// is kept by its inbox, the subject up to its last `.`, when it does not depend on
    /// the last token (see [`Sublist::matches_reply`]), and found there for the next
    /// reply to that inbox until a subscription is added or removed. The replies to one
    /// requester (`_INBOX.<id>.1`, `_INBOX.<id>.2`, …) are then matched once. True with
    /// a match that is kept, and so right for every subject of its inbox while the
    /// [generation](Sublist::generation) read before this call holds.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use mq_transport::sublist::Sublist;
    ///
    /// let list = Sublist::new();
    /// list.insert("_INBOX.a.*", None, 1, "requester").unwrap();
    /// let (first, kept) = list.matches_inbox("_INBOX.a.1");
    /// assert!(kept);
    /// assert!(Arc::ptr_eq(&first, &list.matches_inbox("_INBOX.a.2").0), "matched once");
    /// list.insert("_INBOX.a.3", None, 2, "one reply only").unwrap();
    /// let (third, kept) = list.matches_inbox("_INBOX.a.3");
    /// assert_eq!((third.plain.len(), kept), (2, false));
    /// assert_eq!(list.matches_inbox("_INBOX.a.4").0.plain, ["requester"]);
    /// ```
    pub fn matches_inbox(&self, subject: &str) -> (Arc<Match<T>>, bool) {
        let Some(inbox) = inbox_of(subject) else {
            return (self.matches_once(subject), false);
        };
        if let Some(hit) = lock(&self.inboxes).get(inbox) {
            return (hit.clone(), true);
        }
        let (found, by_last) = self.collect(subject, Keep::Inbox(inbox));
        (found, !by_last)
    }

    /// [`Sublist::matches_once`], and whether the same subscriptions match every subject
    /// that differs from `subject` in its last token only: true unless a filter names a
    /// literal last token where `subject`'s walk ends. A batch of replies to one inbox
    /// (`_INBOX.<id>.1`, `_INBOX.<id>.2`, …) is then matched once.
    ///
    /// ```
    /// use mq_transport::sublist::Sublist;
    ///
    /// let list = Sublist::new();
    /// list.insert("_INBOX.a.*", None, 1, "requester").unwrap();
    /// let (found, any_last) = list.matches_reply("_INBOX.a.7");
    /// assert_eq!((found.plain.len(), any_last), (1, true));
    /// list.insert("_INBOX.a.9", None, 2, "one reply only").unwrap();
    /// assert!(!list.matches_reply("_INBOX.a.7").1);
    /// ```
    pub fn matches_reply(&self, subject: &str) -> (Arc<Match<T>>, bool) {
        let (found, by_last) = self.collect(subject, Keep::Nothing);
        (found, !by_last)
    }

    /// The match of `subject`, kept as `keep` says (under the trie's read lock, so that
    /// no change comes in between), and whether it depends on the subject's last token.
    fn collect(&self, subject: &str, keep: Keep<'_>) -> (Arc<Match<T>>, bool) {
        let trie = read(&self.trie);
        let tokens: Vec<&str> = subject.split('.').collect();
        let mut out = Match {
            plain: Vec::new(),
            groups: Vec::new(),
            next: AtomicUsize::new(0),
        };
        let mut by_last = false;
        trie.root.collect(&tokens, &mut out, &mut by_last);
        let out = Arc::new(out);
        let (kept, key, capacity) = match keep {
            Keep::Nothing => return (out, by_last),
            Keep::Inbox(_) if by_last => return (out, by_last),
            Keep::Inbox(inbox) => (&self.inboxes, inbox, INBOX_CAPACITY),
            Keep::Subject => (&self.cache, subject, CACHE_CAPACITY),
        };
        let mut kept = lock(kept);
        if kept.len() >= capacity {
            // Simple and bounded: start over. Hot subjects come back on their next use.
            kept.clear();
        }
        kept.insert(key.into(), out.clone());
        drop(kept);
        drop(trie);
        (out, by_last)
    }

    /// How many subscriptions the index holds.
    pub fn len(&self) -> usize {
        read(&self.trie).len
    }

    /// Whether the index holds no subscription.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sorted(mut v: Vec<u64>) -> Vec<u64> {
        v.sort_unstable();
        v
    }

    fn all_keys(m: &Match<u64>) -> Vec<u64> {
        let mut keys = m.plain.clone();
        for (_, members) in &m.groups {
            keys.extend(members);
        }
        sorted(keys)
    }

    #[test]
    fn a_kept_match_is_stale_after_any_change_even_while_someone_still_holds_it() {
        let list = Sublist::new();
        list.insert("orders.*", None, 1, 1u64).unwrap();
        let generation = list.generation();
        let found = list.matches("orders.eu");
        let kept = KeptMatch::new(generation, &found);
        assert_eq!(all_keys(&list.kept(&kept).expect("nothing changed")), [1]);
        list.insert("billing.*", None, 2, 2).unwrap();
        // `found` is still held, as by another connection routing with it: only the
        // generation tells that it may be stale (this change did not even touch it)
        assert!(list.kept(&kept).is_none());
        drop(found);
    }

    #[test]
    fn a_change_releases_the_cached_results_it_makes_stale() {
        // what a broker session's weakly held last match relies on: once a change
        // evicts a result, nothing but its holders keeps it (or the routes in it)
        let list = Sublist::new();
        list.insert("orders.*", None, 1, 1u64).unwrap();
        let found = Arc::downgrade(&list.matches("orders.eu"));
        let other = Arc::downgrade(&list.matches("billing.eu"));
        assert!(found.upgrade().is_some(), "held by the cache");
        list.insert("orders.eu", None, 2, 2).unwrap();
        assert!(found.upgrade().is_none(), "evicted and freed");
        assert!(
            other.upgrade().is_some(),
            "a subject the filter does not match stays"
        );
        assert_eq!(sorted(all_keys(&list.matches("orders.eu"))), [1, 2]);
    }

    #[test]
    fn a_subject_matched_once_finds_the_same_and_leaves_the_cache_alone() {
        let list = Sublist::new();
        list.insert("_INBOX.x.*", None, 1, 1).unwrap();
        list.insert("_INBOX.>", Some("q"), 2, 2).unwrap();
        list.insert("other", None, 3, 3).unwrap();
        let once = list.matches_once("_INBOX.x.7");
        assert_eq!(all_keys(&once), vec![1, 2]);
        assert!(lock(&list.cache).is_empty(), "nothing cached");
        assert_eq!(all_keys(&list.matches("_INBOX.x.7")), all_keys(&once));
        assert!(all_keys(&list.matches_once("_INBOX")).is_empty());
    }

    #[test]
    fn an_inbox_match_is_kept_until_any_change_and_then_let_go() {
        let list = Sublist::new();
        list.insert("_INBOX.x.*", None, 1, 1u64).unwrap();
        let (found, kept) = list.matches_inbox("_INBOX.x.1");
        assert!(kept);
        let held = Arc::downgrade(&found);
        drop(found);
        assert!(held.upgrade().is_some(), "held by the inboxes");
        let (again, _) = list.matches_inbox("_INBOX.x.2");
        assert!(Arc::ptr_eq(&again, &held.upgrade().unwrap()), "found there");
        drop(again);
        // a change that has nothing to do with the inbox still drops it (and its routes)
        list.insert("other", None, 2, 2).unwrap();
        assert!(held.upgrade().is_none(), "let go");
        assert!(lock(&list.cache).is_empty(), "never in the subject cache");
        list.remove("_INBOX.x.*", None, 1).unwrap();
        assert!(
            list.matches_inbox("_INBOX.x.3").0.is_empty(),
            "matched anew"
        );
    }

    #[test]
    fn remove_many_removes_and_leaves_no_stale_cached_match() {
        let list = Sublist::new();
        for key in 0..100u64 {
            list.insert(&format!("a.{key}"), None, key, key).unwrap();
        }
        for key in 100..120u64 {
            list.insert("a.*", None, key, key).unwrap();
        }
        // Warm the cache.
        assert_eq!(all_keys(&list.matches("a.5")).len(), 21);
        assert_eq!(all_keys(&list.matches("a.7")).len(), 21);
        let filters: Vec<String> = (0..100u64).map(|k| format!("a.{k}")).collect();
        let mut batch: Vec<(&str, Option<&str>, u64)> = filters
            .iter()
            .zip(0u64..)
            .filter(|(_, k)| k % 2 == 1)
            .map(|(f, k)| (f.as_str(), None, k))
            .collect();
        batch.extend((100..120u64).map(|k| ("a.*", None, k)));
        assert_eq!(list.remove_many(batch), 50 + 20);
        assert_eq!(list.len(), 50);
        assert_eq!(all_keys(&list.matches("a.5")), Vec::<u64>::new());
        assert_eq!(all_keys(&list.matches("a.6")), vec![6]);
    }

    #[test]
    fn a_literal_insert_or_remove_evicts_only_its_own_subject() {
        let list = Sublist::new();
        list.insert("x.1", None, 1, 1u64).unwrap();
        let before = list.matches("x.2");
        list.insert("x.3", None, 3, 3).unwrap();
        assert!(
            Arc::ptr_eq(&before, &list.matches("x.2")),
            "x.2 stays cached"
        );
        list.remove("x.1", None, 1);
        assert!(
            Arc::ptr_eq(&before, &list.matches("x.2")),
            "x.2 stays cached"
        );
        list.insert("x.*", None, 4, 4).unwrap();
        assert_eq!(
            all_keys(&list.matches("x.2")),
            vec![4],
            "a wildcard evicts x.2"
        );
    }

    #[test]
    fn plain_subscribers_all_match_and_groups_merge_across_filters() {
        let list = Sublist::new();
        list.insert("a.b", None, 1, 1).unwrap();
        list.insert("a.*", None, 2, 2).unwrap();
        list.insert("a.>", Some("g"), 3, 3).unwrap();
        list.insert("a.b", Some("g"), 4, 4).unwrap();
        list.insert("a.b", Some("h"), 5, 5).unwrap();
        let m = list.matches("a.b");
        assert_eq!(sorted(m.plain.clone()), vec![1, 2]);
        let g = &m.groups.iter().find(|(q, _)| &**q == "g").unwrap().1;
        assert_eq!(sorted(g.clone()), vec![3, 4]);
        assert_eq!(m.groups.len(), 2);
    }

    #[test]
    fn removal_evicts_cached_results_and_prunes_the_trie() {
        let list = Sublist::new();
        list.insert("a.*", None, 1, 1).unwrap();
        assert_eq!(list.matches("a.b").plain, vec![1]);
        list.insert("a.b", None, 2, 2).unwrap();
        assert_eq!(sorted(list.matches("a.b").plain.clone()), vec![1, 2]);
        assert_eq!(list.remove("a.*", None, 1), Some(1));
        assert_eq!(list.matches("a.b").plain, vec![2]);
        assert_eq!(list.remove("a.*", None, 1), None, "already removed");
        assert_eq!(list.remove("a.b", None, 2), Some(2));
        assert!(list.matches("a.b").is_empty());
        assert!(list.is_empty());
        assert!(
            list.trie.read().unwrap().root.is_empty(),
            "empty nodes are pruned"
        );
    }

    #[test]
    fn group_order_rotates_through_members() {
        let list = Sublist::new();
        for k in 0..3 {
            list.insert("q", Some("g"), k, k).unwrap();
        }
        list.insert("q", None, 9, 9).unwrap();
        let m = list.matches("q");
        let mut taken = Vec::new();
        for _ in 0..6 {
            assert_eq!(
                m.deliver(|k| {
                    taken.push(*k);
                    true
                }),
                2
            );
        }
        assert_eq!(sorted(taken), vec![0, 0, 1, 1, 2, 2, 9, 9, 9, 9, 9, 9]);
        // A member that refuses is skipped: the next one takes the message.
        let mut offered = Vec::new();
        let took = m.deliver(|k| {
            offered.push(*k);
            *k == 9 || offered.iter().filter(|o| **o != 9).count() == 2
        });
        assert_eq!(took, 2);
        assert_eq!(
            offered.len(),
            3,
            "plain, then two group members: {offered:?}"
        );
    }

    #[test]
    fn invalid_filters_are_refused() {
        let list = Sublist::<u64>::new();
        assert!(list.insert("a.>.b", None, 1, 1).is_err());
        assert!(list.insert("a", Some("bad group"), 1, 1).is_err());
        assert!(list.is_empty());
    }

    #[test]
    fn one_hundred_thousand_subscriptions_match_exactly() {
        let list = Sublist::new();
        for i in 0..100_000u64 {
            list.insert(&format!("svc.{i}.req"), None, i, i).unwrap();
        }
        list.insert("svc.*.req", None, 100_000, 100_000).unwrap();
        list.insert("svc.>", Some("all"), 100_001, 100_001).unwrap();
        assert_eq!(list.len(), 100_002);
        let m = list.matches("svc.4242.req");
        assert_eq!(sorted(m.plain.clone()), vec![4242, 100_000]);
        assert_eq!(m.groups[0].1, vec![100_001]);
        assert!(list.matches("svc.100000.req").plain == vec![100_000]);
    }

    /// Measures lookups with 100,000 subscriptions (cache misses and hits). Not a test of
    /// speed: run with `cargo test -p mq-transport --release -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_lookups_with_100k_subscriptions() {
        let list = Sublist::new();
        for i in 0..100_000u64 {
            list.insert(&format!("svc.{}.{}.req", i % 1000, i), None, i, i)
                .unwrap();
        }
        list.insert("svc.*.*.req", None, 1 << 40, 0).unwrap();
        list.insert("svc.>", Some("g"), 1 << 41, 0).unwrap();
        let subjects: Vec<String> = (0..10_000u64)
            .map(|i| format!("svc.{}.{}.req", (i * 7) % 1000, i * 7))
            .collect();
        let start = std::time::Instant::now();
        for s in &subjects {
            std::hint::black_box(list.matches(s));
        }
        let miss = start.elapsed() / subjects.len() as u32;
        let start = std::time::Instant::now();
        for _ in 0..10 {
            for s in &subjects[..1000] {
                std::hint::black_box(list.matches(s));
            }
        }
        let hit = start.elapsed() / 10_000;
        println!("100,000 subscriptions: {miss:?} per uncached lookup, {hit:?} per cached lookup");
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof!["a", "b", "c"].prop_map(String::from)
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![3 => token(), 1 => Just("*".to_string())], 1..4),
            any::<bool>(),
        )
            .prop_map(|(mut tokens, tail)| {
                if tail {
                    tokens.push(">".into());
                }
                tokens.join(".")
            })
    }

    fn subject_() -> impl Strategy<Value = String> {
        prop::collection::vec(token(), 1..5).prop_map(|t| t.join("."))
    }

    proptest! {
        #[test]
        fn the_trie_agrees_with_the_naive_matcher(
            filters in prop::collection::vec((filter(), prop::option::of(prop_oneof!["g", "h"])), 1..30),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
            subjects in prop::collection::vec(subject_(), 1..20),
        ) {
            let list = Sublist::new();
            let mut live: Vec<(u64, String, Option<String>)> = Vec::new();
            for (key, (f, q)) in filters.into_iter().enumerate() {
                let key = key as u64;
                list.insert(&f, q.as_deref(), key, key).unwrap();
                live.push((key, f, q));
                // Look something up between changes, so that the cache is exercised.
                let _ = list.matches(&subjects[key as usize % subjects.len()]);
            }
            for index in removed {
                if live.is_empty() { break; }
                let (key, f, q) = live.remove(index.index(live.len()));
                prop_assert_eq!(list.remove(&f, q.as_deref(), key), Some(key));
            }
            for s in &subjects {
                let expected: Vec<u64> = live
                    .iter()
                    .filter(|(_, f, _)| subject::matches(f, s))
                    .map(|(k, _, _)| *k)
                    .collect();
                let m = list.matches(s);
                prop_assert_eq!(all_keys(&m), sorted(expected), "subject {}", s);
            }
        }

        /// Inbox matches, looked up between changes, always find what the naive
        /// matcher finds: no change leaves one stale.
        #[test]
        fn inbox_matches_agree_with_the_naive_matcher_across_changes(
            steps in prop::collection::vec((filter(), any::<bool>()), 1..40),
            subjects in prop::collection::vec(subject_(), 1..10),
        ) {
            let list = Sublist::new();
            let mut live: Vec<(u64, String)> = Vec::new();
            for (key, (f, remove)) in steps.into_iter().enumerate() {
                if remove && !live.is_empty() {
                    let (key, f) = live.remove(key % live.len());
                    prop_assert_eq!(list.remove(&f, None, key), Some(key));
                } else {
                    list.insert(&f, None, key as u64, key as u64).unwrap();
                    live.push((key as u64, f));
                }
                for s in &subjects {
                    let expected: Vec<u64> = live
                        .iter()
                        .filter(|(_, f)| subject::matches(f, s))
                        .map(|(k, _)| *k)
                        .collect();
                    prop_assert_eq!(all_keys(&list.matches_inbox(s).0), sorted(expected), "subject {}", s);
                }
            }
        }

        /// A reply match said to hold for any last token finds, for every other last
        /// token, what matching that subject finds.
        #[test]
        fn a_reply_match_for_any_last_token_is_the_match_of_each(
            filters in prop::collection::vec(filter(), 1..30),
            subject in subject_(),
            others in prop::collection::vec(prop_oneof!["a", "b", "c", "zz"], 1..4),
        ) {
            let list = Sublist::new();
            for (key, f) in filters.iter().enumerate() {
                list.insert(f, None, key as u64, key as u64).unwrap();
            }
            let (found, any_last) = list.matches_reply(&subject);
            prop_assert_eq!(all_keys(&found), all_keys(&list.matches(&subject)));
            if any_last {
                let prefix = subject.rsplit_once('.').map_or("", |(p, _)| p);
                for last in others {
                    let other = if prefix.is_empty() { last.to_string() } else { format!("{prefix}.{last}") };
                    prop_assert_eq!(all_keys(&found), all_keys(&list.matches(&other)), "{} vs {}", subject, other);
                }
            }
        }
    }
}
