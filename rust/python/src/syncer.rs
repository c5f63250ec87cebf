//! `Syncer`: feed live bytes (any C-contiguous buffer), get changed blocks written.

use std::path::PathBuf;

use apollo_sync_core as core;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::errors::to_py;

/// What a sync did to one shard.
#[pyclass(module = "apollo_sync._core", frozen, get_all)]
pub struct ShardReport {
    path: PathBuf,
    bytes_compared: u64,
    bytes_changed: u64,
    blocks_changed: u64,
    bytes_written_direct: u64,
    bytes_written_buffered: u64,
    writes: u64,
    direct_io_fallback: Option<String>,
}

impl From<core::ShardReport> for ShardReport {
    fn from(r: core::ShardReport) -> Self {
        ShardReport {
            path: r.path,
            bytes_compared: r.bytes_compared,
            bytes_changed: r.bytes_changed,
            blocks_changed: r.blocks_changed,
            bytes_written_direct: r.bytes_written_direct,
            bytes_written_buffered: r.bytes_written_buffered,
            writes: r.writes,
            direct_io_fallback: r.direct_io_fallback,
        }
    }
}

/// A sync in progress over a fixed list of shards `(path, data_start, file_len)`.
#[pyclass(module = "apollo_sync._core")]
pub struct Syncer {
    inner: Option<core::Syncer>,
}

#[pymethods]
impl Syncer {
    #[new]
    #[pyo3(signature = (shards, *, block_size = 4096, dry_run = false, direct_io = true, threads = 0))]
    fn new(
        py: Python<'_>,
        shards: Vec<(PathBuf, u64, u64)>,
        block_size: usize,
        dry_run: bool,
        direct_io: bool,
        threads: usize,
    ) -> PyResult<Self> {
        let specs = shards
            .into_iter()
            .map(|(path, data_start, file_len)| core::ShardSpec {
                path,
                data_start,
                file_len,
            })
            .collect();
        let opts = core::Options {
            block_size,
            dry_run,
            direct_io,
            threads,
        };
        let inner = py
            .detach(|| core::Syncer::new(specs, opts))
            .map_err(to_py)?;
        Ok(Syncer { inner: Some(inner) })
    }

    /// Diffs `segments` — `(shard_index, file_offset, buffer)` — and writes the
    /// blocks that changed. Each buffer must be C-contiguous bytes.
    fn feed(
        &mut self,
        py: Python<'_>,
        segments: Vec<(usize, u64, Bound<'_, PyAny>)>,
    ) -> PyResult<()> {
        let inner = self
            .inner
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("this Syncer has already finished"))?;
        let mut buffers = Vec::with_capacity(segments.len());
        for (i, (_, _, obj)) in segments.iter().enumerate() {
            let buf = PyBuffer::<u8>::get(obj).map_err(|e| {
                PyValueError::new_err(format!("segment {i}: not a byte buffer: {e}"))
            })?;
            if !buf.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "segment {i}: buffer is not C-contiguous"
                )));
            }
            buffers.push(buf);
        }
        let segs: Vec<core::Segment<'_>> = segments
            .iter()
            .zip(&buffers)
            .map(|((shard, offset, _), buf)| core::Segment {
                shard: *shard,
                offset: *offset,
                // SAFETY: `buffers` holds each exporter's buffer (PEP 3118) until
                // it is dropped below, after the work, so the memory stays
                // allocated and in place while the GIL is released. It is only
                // read. A producer that writes it concurrently (a training step)
                // makes the bytes racy, not the access unsound for plain bytes;
                // the sync then writes whichever values it read.
                data: unsafe {
                    std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes())
                },
            })
            .collect();
        let result = py.detach(|| inner.feed(&segs));
        drop(segs);
        drop(buffers); // released with the GIL held
        result.map_err(to_py)
    }

    /// Writes the last pending blocks, fsyncs every written shard, and
    /// returns one report per shard.
    fn finish(&mut self, py: Python<'_>) -> PyResult<Vec<ShardReport>> {
        let inner = self
            .inner
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this Syncer has already finished"))?;
        let reports = py.detach(|| inner.finish()).map_err(to_py)?;
        Ok(reports.into_iter().map(ShardReport::from).collect())
    }
}
