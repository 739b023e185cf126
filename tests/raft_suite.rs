//! openraft storage suite against the redb store.
//!
//! The 0.9 suite builds a tokio runtime per case, so it runs from a plain `#[test]`.

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use pickbox::raft::storage::{LogStore, StateMachine};
use pickbox::raft::TypeConfig;
use pickbox::store::Store;

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RedbBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open store");
        Ok((dir, LogStore::new(store.clone()), StateMachine::new(store)))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(RedbBuilder) {
        panic!("storage suite failed: {e}");
    }
}
