//! `Syncer`: feed live bytes (any C-contiguous buffer), get changed blocks written.

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::Mutex;

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
    elements_changed: u64,
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
            elements_changed: r.elements_changed,
            direct_io_fallback: r.direct_io_fallback,
        }
    }
}

/// The live bytes of one segment, held for the duration of a `feed`.
enum Source {
    Buffer(PyBuffer<u8>),
    /// A borrowed descriptor: `ManuallyDrop` so that it is never closed here.
    File(ManuallyDrop<File>, u64, usize),
}

impl Source {
    fn extract(i: usize, obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok((fd, offset, len)) = obj.extract::<(i32, u64, usize)>() {
            if fd < 0 {
                return Err(PyValueError::new_err(format!(
                    "segment {i}: bad file descriptor {fd}"
                )));
            }
            // SAFETY: the descriptor is the caller's and stays open during the
            // call (documented); ManuallyDrop keeps this File from closing it.
            let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
            return Ok(Source::File(file, offset, len));
        }
        let buf = PyBuffer::<u8>::get(obj)
            .map_err(|e| PyValueError::new_err(format!("segment {i}: not a byte buffer: {e}")))?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "segment {i}: buffer is not C-contiguous"
            )));
        }
        Ok(Source::Buffer(buf))
    }

    fn live(&self) -> core::Live<'_> {
        match self {
            // SAFETY: the PyBuffer holds the exporter's buffer (PEP 3118) until
            // it is dropped after the work, so the memory stays allocated and in
            // place while the GIL is released. It is only read. A producer that
            // writes it concurrently (a training step) makes the bytes racy, not
            // the access unsound for plain bytes; the sync writes what it read.
            Source::Buffer(buf) => core::Live::Mem(unsafe {
                std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes())
            }),
            Source::File(file, offset, len) => core::Live::File {
                file,
                offset: *offset,
                len: *len,
            },
        }
    }
}

/// A sync in progress over a fixed list of shards `(path, data_start, file_len)`.
///
/// With `log=(path, generation)`, the XOR delta of every changed run is
/// appended to the generation's log at `path` (created on the first change)
/// and made durable before the run is overwritten; new bytes are held back,
/// at most `hold_bytes` at a time, until then. With `writeback_bytes`, the
/// writeback of what is written starts every that many bytes of a shard
/// (for a caller that waits for the flush; 0: not before it). `finish` then leaves the shards current through the page cache:
/// commit with `log_writer()`, then flush them. Without a log, `finish` makes every written shard durable.
#[pyclass(module = "apollo_sync._core", frozen)]
pub struct Syncer {
    /// Locked by `feed` and `finish` for the duration of the work.
    inner: Mutex<Option<core::Syncer>>,
    /// Reaches the writers without the lock, so `abort` works while another
    /// thread is inside `feed`.
    stop: core::AbortHandle,
    log: Option<std::sync::Arc<core::DeltaLog>>,
    /// Filled in by the sync's threads; read without the lock.
    timings: std::sync::Arc<core::Timings>,
}

#[pymethods]
impl Syncer {
    #[new]
    #[pyo3(signature = (
        shards, *, block_size = 4096, dry_run = false, direct_io = false, threads = 0,
        log = None, hold_bytes = core::sync::HOLD_BYTES,
        writeback_bytes = 0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        shards: Vec<(PathBuf, u64, u64)>,
        block_size: usize,
        dry_run: bool,
        direct_io: bool,
        threads: usize,
        log: Option<(PathBuf, u64)>,
        hold_bytes: usize,
        writeback_bytes: usize,
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
            log: log.map(|(path, generation)| core::LogSpec {
                path,
                generation,
                kind: core::Kind::Sync,
            }),
            hold_bytes: hold_bytes.max(1),
            writeback_bytes,
        };
        let inner = py
            .detach(|| core::Syncer::new(specs, opts))
            .map_err(to_py)?;
        let stop = inner.abort_handle();
        let log = inner.log();
        let timings = inner.timings();
        Ok(Syncer {
            inner: Mutex::new(Some(inner)),
            stop,
            log,
            timings,
        })
    }

    /// Diffs `segments` — `(shard_index, file_offset, live, width)` — and
    /// writes the blocks that changed. `live` is a C-contiguous byte buffer,
    /// compared in place, or `(fd, offset, length)`: bytes of an open file,
    /// read with `pread` (the fd stays the caller's; it must stay open during
    /// the call). `width` is the bytes per element of the tensor (1, 2, 4, 8).
    fn feed(
        &self,
        py: Python<'_>,
        segments: Vec<(usize, u64, Bound<'_, PyAny>, u8)>,
    ) -> PyResult<()> {
        let mut sources = Vec::with_capacity(segments.len());
        for (i, (_, _, obj, width)) in segments.iter().enumerate() {
            if !matches!(width, 1 | 2 | 4 | 8) {
                return Err(PyValueError::new_err(format!(
                    "segment {i}: element width {width} (1, 2, 4 or 8)"
                )));
            }
            sources.push(Source::extract(i, obj)?);
        }
        let segs: Vec<core::Segment<'_>> = segments
            .iter()
            .zip(&sources)
            .map(|((shard, offset, _, width), src)| core::Segment {
                shard: *shard,
                offset: *offset,
                data: src.live(),
                width: *width,
            })
            .collect();
        let result = py.detach(|| {
            let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_mut() {
                Some(inner) => inner.feed(&segs).map_err(to_py),
                None => Err(PyRuntimeError::new_err(
                    "this Syncer has finished or was aborted",
                )),
            }
        });
        drop(segs);
        drop(sources); // buffers are released with the GIL held
        result
    }

    /// Abandons the sync: once this returns, no write of it is in flight and
    /// none will start (what was written is in the journal, for the caller to
    /// undo). Safe to call from any thread, also while another is in `feed`.
    fn abort(&self, py: Python<'_>) {
        py.detach(|| {
            self.stop.abort();
            if let Ok(mut guard) = self.inner.try_lock() {
                if let Some(mut inner) = guard.take() {
                    inner.abort(); // joins the commit thread
                }
            }
        });
    }

    /// Wall-clock seconds per stage so far (`feed`, `release_wait`,
    /// `barrier`, `write`, `write_busiest`, `finish`) and the number of log
    /// `barriers`. Stages overlap (they run on different threads); complete
    /// once `finish` has returned.
    fn timings(&self) -> Vec<(&'static str, f64)> {
        self.timings.stages()
    }

    /// The log this sync appends to (None without one, or in a dry run).
    fn log_writer(&self) -> Option<crate::log::LogWriter> {
        self.log
            .clone()
            .map(|inner| crate::log::LogWriter { inner })
    }

    /// Writes the last pending blocks and returns one report per shard.
    /// Without a log, every written shard is fsynced first; with one, the
    /// shards are current through the page cache and the log's records are
    /// durable: commit, then flush.
    fn finish(&self, py: Python<'_>) -> PyResult<Vec<ShardReport>> {
        let reports = py.detach(|| {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
            match inner {
                Some(inner) => inner.finish().map_err(to_py),
                None => Err(PyRuntimeError::new_err(
                    "this Syncer has finished or was aborted",
                )),
            }
        })?;
        Ok(reports.into_iter().map(ShardReport::from).collect())
    }
}
