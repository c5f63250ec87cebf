//! The Python binding of apollo_sync_core: it converts types, holds the
//! buffers it is given, and releases the GIL around the work. Nothing else.

mod errors;
mod header;
mod log;
mod syncer;

use pyo3::prelude::*;

#[pymodule(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("ApolloSyncError", py.get_type::<errors::ApolloSyncError>())?;
    m.add("HeaderError", py.get_type::<errors::HeaderError>())?;
    m.add(
        "ShardChangedError",
        py.get_type::<errors::ShardChangedError>(),
    )?;
    m.add("SyncIOError", py.get_type::<errors::SyncIOError>())?;
    m.add("PlanError", py.get_type::<errors::PlanError>())?;
    m.add("JournalError", py.get_type::<errors::JournalError>())?;
    m.add("RollbackError", py.get_type::<errors::RollbackError>())?;
    m.add("MIN_BLOCK", apollo_sync_core::sync::MIN_BLOCK)?;
    m.add("MAX_BLOCK", apollo_sync_core::sync::MAX_BLOCK)?;
    m.add_class::<header::TensorEntry>()?;
    m.add_class::<header::Header>()?;
    m.add_function(wrap_pyfunction!(header::read_header, m)?)?;
    m.add_class::<syncer::ShardReport>()?;
    m.add_class::<syncer::Syncer>()?;
    m.add("HOLD_BYTES", apollo_sync_core::sync::HOLD_BYTES)?;
    m.add("WRITEBACK_BYTES", apollo_sync_core::sync::WRITEBACK_BYTES)?;
    m.add("LOG_MIN_BLOCK", apollo_sync_core::sync::LOG_MIN_BLOCK)?;
    m.add("FAULTS", apollo_sync_core::faults::ENABLED)?;
    m.add_class::<log::LogInfo>()?;
    m.add_class::<log::LogWriter>()?;
    m.add_class::<log::GenerationFlush>()?;
    m.add_function(wrap_pyfunction!(log::read_log, m)?)?;
    m.add_function(wrap_pyfunction!(log::rollback_generations, m)?)?;
    m.add_class::<log::Recovered>()?;
    m.add_function(wrap_pyfunction!(log::ensure_dirs, m)?)?;
    m.add_function(wrap_pyfunction!(log::load_state, m)?)?;
    m.add_function(wrap_pyfunction!(log::commit_logged, m)?)?;
    m.add_function(wrap_pyfunction!(log::commit_unlogged, m)?)?;
    m.add_function(wrap_pyfunction!(log::undo_uncommitted, m)?)?;
    m.add_function(wrap_pyfunction!(log::prune, m)?)?;
    m.add_function(wrap_pyfunction!(log::recover_generations, m)?)?;
    m.add("HISTORY_LIMIT", apollo_sync_core::log::state::HISTORY_LIMIT)?;
    Ok(())
}
