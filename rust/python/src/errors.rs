//! Python exception classes, one per core error variant, under one base.
//! Defined with their full dotted module path so they pickle.

use apollo_sync_core::Error;
use pyo3::exceptions::PyException;
use pyo3::{create_exception, PyErr};

create_exception!(
    apollo_sync._core,
    ApolloSyncError,
    PyException,
    "Base class of every error apollo_sync raises."
);
create_exception!(
    apollo_sync._core,
    HeaderError,
    ApolloSyncError,
    "A safetensors file whose header cannot be trusted."
);
create_exception!(
    apollo_sync._core,
    ShardChangedError,
    ApolloSyncError,
    "A shard changed on disk between planning and syncing."
);
create_exception!(
    apollo_sync._core,
    SyncIOError,
    ApolloSyncError,
    "An operating-system I/O failure on a named file."
);
create_exception!(
    apollo_sync._core,
    PlanError,
    ApolloSyncError,
    "An inconsistent request (segment out of range or order, bad block size)."
);

create_exception!(
    apollo_sync._core,
    JournalError,
    ApolloSyncError,
    "A damaged log (or state file): nothing was applied from it."
);

create_exception!(
    apollo_sync._core,
    RollbackError,
    ApolloSyncError,
    "A rollback that cannot be done (no such generation, undo data pruned)."
);

/// Maps a core error onto its Python class, keeping the message.
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Header { .. } => HeaderError::new_err(msg),
        Error::Changed { .. } => ShardChangedError::new_err(msg),
        Error::Io { .. } => SyncIOError::new_err(msg),
        Error::Plan(_) => PlanError::new_err(msg),
        Error::Rollback(_) => RollbackError::new_err(msg),
        Error::Log { .. } | Error::State { .. } => JournalError::new_err(msg),
    }
}
