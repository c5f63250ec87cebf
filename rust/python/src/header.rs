//! `read_header`: a validated safetensors header as Python objects.

use std::collections::HashMap;
use std::path::PathBuf;

use apollo_sync_core as core;
use pyo3::prelude::*;

use crate::errors::to_py;

/// One tensor of a shard; `start`/`end` are absolute file offsets.
#[pyclass(module = "apollo_sync._core", frozen, get_all)]
pub struct TensorEntry {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

#[pymethods]
impl TensorEntry {
    fn __repr__(&self) -> String {
        format!(
            "TensorEntry(name={:?}, dtype={:?}, shape={:?}, start={}, end={})",
            self.name, self.dtype, self.shape, self.start, self.end
        )
    }
}

/// A validated safetensors header.
#[pyclass(module = "apollo_sync._core", frozen, get_all)]
pub struct Header {
    path: PathBuf,
    data_start: u64,
    file_len: u64,
    metadata: Option<HashMap<String, String>>,
    tensors: Vec<Py<TensorEntry>>,
}

#[pymethods]
impl Header {
    fn __repr__(&self) -> String {
        format!(
            "Header(path={:?}, data_start={}, file_len={}, tensors={})",
            self.path,
            self.data_start,
            self.file_len,
            self.tensors.len()
        )
    }
}

/// Reads and validates the header of a safetensors file (tensor data is not read).
#[pyfunction]
pub fn read_header(py: Python<'_>, path: PathBuf) -> PyResult<Header> {
    let h = py.detach(|| core::Header::read(&path)).map_err(to_py)?;
    let tensors = h
        .tensors
        .into_iter()
        .map(|t| {
            Py::new(
                py,
                TensorEntry {
                    name: t.name,
                    dtype: t.dtype,
                    shape: t.shape,
                    start: t.start,
                    end: t.end,
                },
            )
        })
        .collect::<PyResult<Vec<_>>>()?;
    Ok(Header {
        path: h.path,
        data_start: h.data_start,
        file_len: h.file_len,
        metadata: h.metadata,
        tensors,
    })
}
