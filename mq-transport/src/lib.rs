//! mq-transport: courier's message bus.
//!
//! * [`subject`]: subjects, wildcard filters and their validation;
//! * [`sublist`]: the subscription index (a trie with a match cache).

pub mod subject;
pub mod sublist;
