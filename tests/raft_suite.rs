//! openraft storage suite against the redb store.
