//! `sparseinfer._core`: the thin PyO3 binding of `sparseinfer-core`. It converts types, releases the GIL
//! around heavy work and maps [`sparseinfer_core::Error`] to the Python exceptions of `sparseinfer.errors`.
//! Nothing else lives here.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict};
use sparseinfer_core::formats::{budget, GivenScales, INT4_DEFAULT_GROUP};
use sparseinfer_core::runtime::{
    self, EncoderSource, Generator, LoadOptions, Model, SamplingParams, Seq2Seq, Seq2SeqGenerator, TokenRules,
};
use sparseinfer_core::{self as core, kernels, Error, Format, Layout, PackOptions, PackedMatrix};

/// The activation rows `info()["prefill_kernel"]` names the kernel for: a prompt or encoder input.
const PREFILL_ROWS: usize = 64;

/// Maps a core error to `sparseinfer.errors.InvalidInputError` / `UnsupportedError` / `SparseInferError`.
fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let class = match e {
        Error::InvalidInput { .. } => "InvalidInputError",
        Error::Unsupported { .. } => "UnsupportedError",
        Error::Io { .. } => "SparseInferError",
    };
    match py.import("sparseinfer.errors").and_then(|m| m.getattr(class)) {
        Ok(cls) => PyErr::from_type(cls.cast_into().expect("an exception class"), e.to_string()),
        Err(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

fn invalid(py: Python<'_>, op: &'static str, msg: String) -> PyErr {
    to_py(py, Error::invalid(op, msg))
}

/// Runs the body of an exported function, turning a panic into `sparseinfer.SparseInferError` (pyo3 would
/// raise `PanicException`, a BaseException that `except Exception` does not catch). Every export uses it.
fn guard<T>(py: Python<'_>, op: &'static str, body: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let err =
            to_py(py, Error::Io { op: op.into(), source: std::io::Error::other(format!("internal error: {msg}")) });
        Err(err)
    })
}

/// An integer argument (a Python int or anything with `__index__`, not a bool or a float) that fits `T`.
fn int_arg<T: TryFrom<i128> + std::fmt::Display>(
    py: Python<'_>,
    op: &'static str,
    what: &str,
    obj: &Bound<'_, PyAny>,
) -> PyResult<T> {
    let type_name = || obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
    if obj.is_instance_of::<PyBool>() || !obj.hasattr("__index__").unwrap_or(false) {
        return Err(invalid(py, op, format!("{what} must be an integer, got {} {obj}", type_name())));
    }
    let v: i128 = match obj.extract::<i64>() {
        Ok(v) => v.into(),
        Err(_) => obj
            .extract::<u64>()
            .map(i128::from)
            .map_err(|_| invalid(py, op, format!("{what} = {obj} is out of range")))?,
    };
    T::try_from(v).map_err(|_| invalid(py, op, format!("{what} = {v} is out of range")))
}

/// An optional integer argument.
fn opt_int_arg<T: TryFrom<i128> + std::fmt::Display>(
    py: Python<'_>,
    op: &'static str,
    what: &str,
    obj: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<T>> {
    obj.filter(|o| !o.is_none()).map(|o| int_arg(py, op, what, o)).transpose()
}

/// Token ids: a sequence of integers in `0..=u32::MAX` (the model checks them against its vocabulary).
fn token_ids(py: Python<'_>, op: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if obj.is_instance_of::<pyo3::types::PyString>() || obj.is_instance_of::<pyo3::types::PyBytes>() {
        return Err(invalid(py, op, "expected token ids, got a string".into()));
    }
    let items =
        obj.try_iter().map_err(|_| invalid(py, op, format!("token ids must be a sequence, got {}", describe(obj))))?;
    items.map(|t| int_arg::<u32>(py, op, "token id", &t?)).collect()
}

/// Describes an object's dtype and shape for error messages.
fn describe(obj: &Bound<'_, PyAny>) -> String {
    let attr = |name: &str| obj.getattr(name).and_then(|v| v.str().map(|s| s.to_string())).ok();
    match (attr("dtype"), attr("shape")) {
        (Some(dtype), Some(shape)) => format!("array of dtype {dtype} and shape {shape}"),
        _ => obj.get_type().name().map(|n| n.to_string()).unwrap_or_default(),
    }
}

/// Extracts a C-contiguous float32 array of `ndim` dimensions, or raises InvalidInputError.
fn f32_slice<'py, D: numpy::ndarray::Dimension>(
    py: Python<'py>,
    op: &'static str,
    what: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<numpy::PyReadonlyArray<'py, f32, D>> {
    let arr: numpy::PyReadonlyArray<'py, f32, D> = obj.extract().map_err(|_| {
        let ndim = D::NDIM.unwrap_or(0);
        invalid(py, op, format!("{what} must be a {ndim}-D float32 numpy array, got {}", describe(obj)))
    })?;
    if !arr.is_c_contiguous() {
        return Err(invalid(py, op, format!("{what} must be C-contiguous (use np.ascontiguousarray)")));
    }
    if arr.len() == 0 {
        return Err(invalid(py, op, format!("{what} is empty: shape {:?}", arr.shape())));
    }
    Ok(arr)
}

/// An encoder-decoder's input, as the model's encoder reads it: a 2-D float32 log-mel spectrogram
/// `(mel bins, frames)` for an audio encoder, token ids otherwise.
fn encoder_source(
    py: Python<'_>,
    op: &'static str,
    model: &Seq2Seq,
    obj: &Bound<'_, PyAny>,
) -> PyResult<EncoderSource> {
    match model.spec.encoder_input {
        runtime::config::EncoderInput::Mel { .. } => {
            let arr = f32_slice::<numpy::Ix2>(py, op, "the spectrogram", obj)?;
            let frames = arr.shape()[1];
            let values = arr.as_slice().map_err(|e| invalid(py, op, e.to_string()))?.to_vec();
            Ok(EncoderSource::Mel { values, frames })
        }
        runtime::config::EncoderInput::Tokens => Ok(EncoderSource::Tokens(token_ids(py, op, obj)?)),
    }
}

fn parse_act(py: Python<'_>, name: Option<&str>) -> PyResult<Option<kernels::Activations>> {
    name.map(kernels::Activations::from_name).transpose().map_err(|e| to_py(py, e))
}

/// A weight matrix packed in one of the kernel formats.
#[pyclass(name = "PackedMatrix", module = "sparseinfer._core", frozen)]
struct PyPackedMatrix {
    inner: Arc<PackedMatrix>,
}

#[pymethods]
impl PyPackedMatrix {
    /// `W @ x` for `x` of shape `(in,)`, float32; returns `(out,)` float32. `activations`: None (the
    /// format's default: "int8" for integer formats, else "f32"), "f32", "int8" (per 64-column block) or
    /// "int8-token" (one scale per row).
    #[pyo3(signature = (x, activations = None))]
    fn matvec<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        activations: Option<&str>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        guard(py, "matvec", || self.matvec_impl(py, x, activations))
    }

    /// `X @ Wᵀ` for `X` of shape `(rows, in)`, float32; returns `(rows, out)` float32. `activations` as
    /// for `matvec`.
    #[pyo3(signature = (x, activations = None))]
    fn matmul<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        activations: Option<&str>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        guard(py, "matmul", || self.matmul_impl(py, x, activations))
    }

    /// The dequantized weights as a float32 `(out, in)` array (for tests and inspection).
    fn to_dense<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        guard(py, "to_dense", || {
            let m = self.inner.clone();
            let dense = py.detach(move || m.to_dense());
            PyArray1::from_vec(py, dense).reshape([self.inner.rows(), self.inner.cols()])
        })
    }

    /// The kernel a call with `activations` runs now, e.g. "sparse_int8_i8 (avx512vnni)".
    #[pyo3(signature = (activations = None))]
    fn kernel(&self, py: Python<'_>, activations: Option<&str>) -> PyResult<String> {
        guard(py, "kernel", || {
            let act = parse_act(py, activations)?.unwrap_or(kernels::Activations::default_for(self.inner.format()));
            kernels::kernel_name(&self.inner, act).map_err(|e| to_py(py, e))
        })
    }

    /// An independent copy of the packed buffers (benchmarks rotate over copies to defeat the cache).
    fn copy(&self, py: Python<'_>) -> PyResult<Self> {
        guard(py, "copy", || Ok(PyPackedMatrix { inner: Arc::new((*self.inner).clone()) }))
    }

    /// Bytes a matvec reads from memory.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }

    /// `(out, in)`.
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.inner.rows(), self.inner.cols())
    }

    /// The format name.
    #[getter]
    fn format(&self) -> &'static str {
        self.inner.format().name()
    }

    /// The in-memory layout: "rows" or "tiles".
    #[getter]
    fn layout(&self) -> &'static str {
        self.inner.layout().name()
    }

    /// Fraction of nonzero weights in the packed source.
    #[getter]
    fn density(&self) -> f64 {
        self.inner.density()
    }

    /// Columns per scale group, or None.
    #[getter]
    fn group_size(&self) -> Option<usize> {
        self.inner.group_size()
    }

    /// Whether int4 codes are asymmetric.
    #[getter]
    fn asymmetric(&self) -> bool {
        self.inner.asymmetric()
    }

    fn __repr__(&self) -> String {
        let m = &self.inner;
        format!(
            "PackedMatrix(shape=({}, {}), format={:?}, density={:.3}, nbytes={})",
            m.rows(),
            m.cols(),
            m.format().name(),
            m.density(),
            m.nbytes()
        )
    }
}

impl PyPackedMatrix {
    fn matvec_impl<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        activations: Option<&str>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let act = parse_act(py, activations)?;
        let x = f32_slice::<numpy::Ix1>(py, "matvec", "x", x)?;
        let m = self.inner.clone();
        if x.len() != m.cols() {
            return Err(invalid(
                py,
                "matvec",
                format!("x has {} values, the matrix has {} columns", x.len(), m.cols()),
            ));
        }
        let x = x.as_slice()?.to_vec();
        let y = py.detach(move || {
            let mut y = vec![0.0f32; m.rows()];
            kernels::matmul(&m, &x, 1, &mut y, act).map(|_| y)
        });
        Ok(PyArray1::from_vec(py, y.map_err(|e| to_py(py, e))?))
    }

    fn matmul_impl<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        activations: Option<&str>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let act = parse_act(py, activations)?;
        let x = f32_slice::<numpy::Ix2>(py, "matmul", "X", x)?;
        let m = self.inner.clone();
        let (k, cols) = (x.shape()[0], x.shape()[1]);
        if cols != m.cols() {
            return Err(invalid(py, "matmul", format!("X has {cols} columns, the matrix has {}", m.cols())));
        }
        let x = x.as_slice()?.to_vec();
        let y = py.detach(move || {
            let mut y = vec![0.0f32; k * m.rows()];
            kernels::matmul(&m, &x, k, &mut y, act).map(|_| y)
        });
        let y = PyArray1::from_vec(py, y.map_err(|e| to_py(py, e))?);
        y.reshape([k, self.inner.rows()])
    }
}

/// Packs a float32 `(out, in)` matrix; zeros are pruned weights for the sparse formats. `scales` (float32
/// `(out, groups)`, symmetric integer formats only) fixes the quantization grid instead of fitting it.
/// `layout`: "auto", "rows" or "tiles" (the in-memory layout; see `formats::tiles`).
#[pyfunction]
#[pyo3(signature = (w, format = "sparse-int8", group_size = None, asymmetric = false, scales = None, layout = "auto"))]
fn pack<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    format: &str,
    group_size: Option<&Bound<'py, PyAny>>,
    asymmetric: bool,
    scales: Option<&Bound<'py, PyAny>>,
    layout: &str,
) -> PyResult<PyPackedMatrix> {
    guard(py, "pack", || pack_impl(py, w, format, group_size, asymmetric, scales, layout))
}

fn pack_impl<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    format: &str,
    group_size: Option<&Bound<'py, PyAny>>,
    asymmetric: bool,
    scales: Option<&Bound<'py, PyAny>>,
    layout: &str,
) -> PyResult<PyPackedMatrix> {
    let group_size = opt_int_arg::<usize>(py, "pack", "group_size", group_size)?;
    let fmt = Format::from_name(format).map_err(|e| to_py(py, e))?;
    let layout = Layout::from_name(layout).map_err(|e| to_py(py, e))?;
    let w = f32_slice::<numpy::Ix2>(py, "pack", "w", w)?;
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    let data = w.as_slice()?;
    let opts = PackOptions { group_size, asymmetric, layout };
    let m = match scales {
        None => py.detach(|| PackedMatrix::pack(data, rows, cols, fmt, opts)),
        Some(s) => {
            let s = f32_slice::<numpy::Ix2>(py, "pack", "scales", s)?;
            if s.shape()[0] != rows {
                return Err(invalid(py, "pack", format!("scales has {} rows, w has {rows}", s.shape()[0])));
            }
            let per_row = s.shape()[1];
            let sv = s.as_slice()?;
            py.detach(|| {
                PackedMatrix::pack_with_scales(
                    data,
                    rows,
                    cols,
                    fmt,
                    opts,
                    GivenScales { scales: sv, mins: None, per_row },
                )
            })
        }
    }
    .map_err(|e| to_py(py, e))?;
    py.detach(|| {
        sparseinfer_core::kernels::prepare(&m, sparseinfer_core::kernels::Activations::default_for(m.format()))
    });
    Ok(PyPackedMatrix { inner: Arc::new(m) })
}

/// A loaded decoder (weights memory-mapped and packed in Rust). Immutable; share it across threads.
#[pyclass(name = "Model", module = "sparseinfer._core", frozen)]
struct PyModel {
    inner: Arc<Model>,
}

#[pymethods]
impl PyModel {
    /// Loads a model directory. `weights`: None keeps the stored precision, or a kernel format name packs
    /// every linear layer into it (zeros become the sparsity pattern). `activations`: None (each format's
    /// default), "f32", "int8" or "int8-token".
    #[staticmethod]
    #[pyo3(signature = (path, weights = None, group_size = None, asymmetric = false, activations = None))]
    fn load<'py>(
        py: Python<'py>,
        path: PathBuf,
        weights: Option<&str>,
        group_size: Option<&Bound<'py, PyAny>>,
        asymmetric: bool,
        activations: Option<&str>,
    ) -> PyResult<Self> {
        guard(py, "load", || {
            let opts = load_options(py, weights, group_size, asymmetric, activations, None, None)?;
            let m = py.detach(|| runtime::load_dir(&path, opts)).map_err(|e| to_py(py, e))?;
            Ok(PyModel { inner: Arc::new(m) })
        })
    }

    /// Logits `(len(tokens), vocab)` float32 of every position, from a fresh cache.
    fn logits<'py>(&self, py: Python<'py>, tokens: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        guard(py, "logits", || {
            let tokens = token_ids(py, "logits", tokens)?;
            let m = self.inner.clone();
            let n = tokens.len();
            let v = py.detach(move || runtime::logits(&m, &tokens)).map_err(|e| to_py(py, e))?;
            PyArray1::from_vec(py, v).reshape([n, self.inner.spec.vocab])
        })
    }

    /// Architecture, sizes, per-layer formats/densities, bytes per token and kernels in use.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        guard(py, "info", || self.info_impl(py))
    }

    fn __repr__(&self) -> String {
        let s = &self.inner.spec;
        let f = self.inner.layers.first().map_or("?", |l| l.attn.qkv.w.format().name());
        format!(
            "Model(arch={:?}, layers={}, hidden={}, vocab={}, format={f:?})",
            s.model_type, s.layers, s.hidden, s.vocab
        )
    }
}

impl PyModel {
    fn info_impl<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = &self.inner;
        let s = &m.spec;
        let d = PyDict::new(py);
        d.set_item("arch", &s.model_type)?;
        d.set_item("hidden_size", s.hidden)?;
        d.set_item("num_layers", s.layers)?;
        d.set_item("num_heads", s.heads)?;
        d.set_item("num_kv_heads", s.kv_heads)?;
        d.set_item("head_dim", s.head_dim)?;
        d.set_item("intermediate_size", s.intermediate)?;
        d.set_item("vocab_size", s.vocab)?;
        d.set_item("max_positions", s.max_positions)?;
        let (linear_bytes, embed_bytes) = m.weight_bytes();
        d.set_item("bytes_per_token", linear_bytes)?;
        d.set_item("embedding_bytes", embed_bytes)?;
        let mut params = s.vocab * s.hidden;
        let layers = pyo3::types::PyList::empty(py);
        for (i, l) in m.layers.iter().enumerate() {
            for (name, lin) in [("qkv", &l.attn.qkv), ("o", &l.attn.o), ("up", &l.ffn.up), ("down", &l.ffn.down)] {
                let w = &lin.w;
                params += w.rows() * w.cols() + lin.bias.as_ref().map_or(0, Vec::len);
                let e = PyDict::new(py);
                e.set_item("layer", i)?;
                e.set_item("name", name)?;
                e.set_item("shape", (w.rows(), w.cols()))?;
                e.set_item("format", w.format().name())?;
                e.set_item("density", w.density())?;
                e.set_item("nbytes", w.nbytes())?;
                layers.append(e)?;
            }
        }
        // Norm weights (and biases): two per block and the final one.
        let norm_params = |n: &runtime::ops::NormW| n.w.len() + n.b.as_ref().map_or(0, Vec::len);
        params += m.layers.iter().map(|l| norm_params(&l.attn.norm) + norm_params(&l.ffn.norm)).sum::<usize>();
        params += m.final_norm().map_or(0, norm_params);
        if !s.tie_embeddings {
            params += s.vocab * s.hidden;
        }
        d.set_item("parameters", params)?;
        d.set_item("linear", layers)?;
        let head = &m.lm_head.w;
        d.set_item("lm_head_format", head.format().name())?;
        let first = m.layers.first().map(|l| &l.attn.qkv.w).unwrap_or(head);
        d.set_item("format", first.format().name())?;
        let act = m
            .layers
            .first()
            .map_or(m.lm_head.act, |l| l.attn.qkv.act)
            .unwrap_or(kernels::Activations::default_for(first.format()));
        d.set_item("activations", act.name())?;
        d.set_item("kernel", kernels::kernel_name(first, act).map_err(|e| to_py(py, e))?)?;
        let isa = kernels::active_isa().map_err(|e| to_py(py, e))?;
        d.set_item("prefill_kernel", kernels::kernel_name_on(isa, first, act, PREFILL_ROWS))?;
        d.set_item("isa", isa.name())?;
        d.set_item("threads", core::parallel::num_threads())?;
        d.set_item("load_seconds", m.load_report.seconds)?;
        d.set_item("pack_cache", m.load_report.pack_cache.describe())?;
        d.set_item("kv_cache", m.kv_format.name())?;
        d.set_item("eos_token_ids", s.eos.clone())?;
        d.set_item("bos_token_id", s.bos)?;
        Ok(d)
    }
}

/// The load options of `load`'s arguments.
fn load_options(
    py: Python<'_>,
    weights: Option<&str>,
    group_size: Option<&Bound<'_, PyAny>>,
    asymmetric: bool,
    activations: Option<&str>,
    cache: Option<runtime::pack_cache::CacheOptions>,
    kv_cache: Option<&str>,
) -> PyResult<LoadOptions> {
    let group_size = opt_int_arg::<usize>(py, "load", "group_size", group_size)?;
    let weights = weights.map(Format::from_name).transpose().map_err(|e| to_py(py, e))?;
    let activations = parse_act(py, activations)?;
    let pack = PackOptions { group_size, asymmetric, ..Default::default() };
    let kv_cache = kv_cache.map(runtime::KvFormat::from_name).transpose().map_err(|e| to_py(py, e))?;
    Ok(LoadOptions { weights, pack, activations, cache, kv_cache })
}

/// The sampling parameters of a generator's arguments.
fn sampling(
    py: Python<'_>,
    temperature: f64,
    top_k: Option<&Bound<'_, PyAny>>,
    top_p: Option<f64>,
    repetition_penalty: f64,
    seed: Option<&Bound<'_, PyAny>>,
) -> PyResult<SamplingParams> {
    const OP: &str = "generate";
    let top_k = opt_int_arg::<usize>(py, OP, "top_k", top_k)?;
    let seed = opt_int_arg::<u64>(py, OP, "seed", seed)?;
    // Checked in f64: a tiny negative temperature would round to -0.0 in f32 and pass as greedy.
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(invalid(py, OP, format!("temperature must be a finite number >= 0, got {temperature}")));
    }
    Ok(SamplingParams {
        temperature: temperature as f32,
        top_k,
        top_p: top_p.map(|p| p as f32),
        repetition_penalty: repetition_penalty as f32,
        seed,
    })
}

/// Generator statistics as a dict.
fn stats_dict(py: Python<'_>, s: runtime::GenStats) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("prompt_tokens", s.prompt_tokens)?;
    d.set_item("prefill_s", s.prefill_s)?;
    d.set_item("decode_tokens", s.decode_tokens)?;
    d.set_item("decode_s", s.decode_s)?;
    d.set_item("cross_kv_bytes", s.cross_kv_bytes)?;
    Ok(d)
}

/// A generation of either kind of model.
enum Gen {
    Decoder(Generator),
    Seq2Seq(Seq2SeqGenerator),
}

/// One sequence being generated. For a `Model`, the first `next_token()` prefills the prompt and later calls
/// decode one token; for a `Seq2SeqModel`, the prompt is the encoder input: the first call encodes it and
/// decodes the start token.
#[pyclass(name = "Generator", module = "sparseinfer._core", frozen)]
struct PyGenerator {
    inner: Mutex<Gen>,
}

#[pymethods]
impl PyGenerator {
    #[new]
    #[pyo3(signature = (model, prompt, max_new_tokens, temperature = 0.0, top_k = None, top_p = None, repetition_penalty = 1.0, seed = None, decoder_prompt = None, suppress_tokens = None, begin_suppress_tokens = None))]
    #[allow(clippy::too_many_arguments)]
    fn new<'py>(
        py: Python<'py>,
        model: &Bound<'py, PyAny>,
        prompt: &Bound<'py, PyAny>,
        max_new_tokens: &Bound<'py, PyAny>,
        temperature: f64,
        top_k: Option<&Bound<'py, PyAny>>,
        top_p: Option<f64>,
        repetition_penalty: f64,
        seed: Option<&Bound<'py, PyAny>>,
        decoder_prompt: Option<&Bound<'py, PyAny>>,
        suppress_tokens: Option<&Bound<'py, PyAny>>,
        begin_suppress_tokens: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Self> {
        const OP: &str = "generate";
        guard(py, OP, || {
            let max_new_tokens = int_arg::<usize>(py, OP, "max_new_tokens", max_new_tokens)?;
            let params = sampling(py, temperature, top_k, top_p, repetition_penalty, seed)?;
            let ids =
                |o: Option<&Bound<'py, PyAny>>| o.filter(|o| !o.is_none()).map(|o| token_ids(py, OP, o)).transpose();
            let (decoder_prompt, suppress, begin_suppress) =
                (ids(decoder_prompt)?, ids(suppress_tokens)?, ids(begin_suppress_tokens)?);
            let g = if let Ok(m) = model.cast::<PyModel>() {
                if decoder_prompt.is_some() || suppress.is_some() || begin_suppress.is_some() {
                    return Err(invalid(
                        py,
                        OP,
                        "decoder_prompt and suppress tokens apply to encoder-decoder models only".into(),
                    ));
                }
                let prompt = token_ids(py, OP, prompt)?;
                let m = m.get().inner.clone();
                py.detach(|| Generator::new(m, &prompt, max_new_tokens, params)).map(Gen::Decoder)
            } else if let Ok(m) = model.cast::<PySeq2SeqModel>() {
                let input = encoder_source(py, OP, &m.get().inner, prompt)?;
                let rules = TokenRules {
                    suppress: suppress.unwrap_or_default(),
                    begin_suppress: begin_suppress.unwrap_or_default(),
                };
                let dp = decoder_prompt.unwrap_or_default();
                Seq2SeqGenerator::new(m.get().inner.clone(), input, &dp, max_new_tokens, params, rules)
                    .map(Gen::Seq2Seq)
            } else {
                return Err(invalid(
                    py,
                    OP,
                    format!("model must be a Model or a Seq2SeqModel, got {}", describe(model)),
                ));
            };
            Ok(PyGenerator { inner: Mutex::new(g.map_err(|e| to_py(py, e))?) })
        })
    }

    /// Encoder-decoder only: appends `tokens` to the decoder's input (they are not counted as generated).
    fn force(&self, py: Python<'_>, tokens: &Bound<'_, PyAny>) -> PyResult<()> {
        guard(py, "generate", || {
            let ids = token_ids(py, "generate", tokens)?;
            match &mut *self.inner.lock().unwrap_or_else(|e| e.into_inner()) {
                Gen::Seq2Seq(g) => g.force(&ids).map_err(|e| to_py(py, e)),
                Gen::Decoder(_) => Err(invalid(py, "generate", "force() applies to encoder-decoder models".into())),
            }
        })
    }

    /// Encoder-decoder only: the most likely of `candidates` as the next decoder token, which is then forced
    /// (language detection); None when the decoder's context is full. Releases the GIL while it computes.
    fn choose(&self, py: Python<'_>, candidates: &Bound<'_, PyAny>) -> PyResult<Option<u32>> {
        guard(py, "generate", || {
            let ids = token_ids(py, "generate", candidates)?;
            let r = py.detach(|| match &mut *self.inner.lock().unwrap_or_else(|e| e.into_inner()) {
                Gen::Seq2Seq(g) => g.choose(&ids),
                Gen::Decoder(_) => Err(Error::invalid("generate", "choose() applies to encoder-decoder models")),
            });
            r.map_err(|e| to_py(py, e))
        })
    }

    /// The next token id, or None when the context (or, for a Seq2SeqModel, max_new_tokens) is reached.
    /// Releases the GIL while it computes.
    fn next_token(&self, py: Python<'_>) -> PyResult<Option<u32>> {
        guard(py, "generate", || {
            let r = py.detach(|| match &mut *self.inner.lock().unwrap_or_else(|e| e.into_inner()) {
                Gen::Decoder(g) => g.next_token(),
                Gen::Seq2Seq(g) => g.next_token(),
            });
            r.map_err(|e| to_py(py, e))
        })
    }

    /// Prompt tokens, prefill seconds, decode tokens and decode seconds so far.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        guard(py, "stats", || {
            let s = match &*self.inner.lock().unwrap_or_else(|e| e.into_inner()) {
                Gen::Decoder(g) => g.stats(),
                Gen::Seq2Seq(g) => g.stats(),
            };
            stats_dict(py, s)
        })
    }
}

/// A loaded encoder-decoder (T5, Whisper). Immutable; share it across threads.
#[pyclass(name = "Seq2SeqModel", module = "sparseinfer._core", frozen)]
struct PySeq2SeqModel {
    inner: Arc<Seq2Seq>,
}

#[pymethods]
impl PySeq2SeqModel {
    /// The encoder output `(positions, hidden)` float32 (after the encoder's final norm) of `input`: token
    /// ids, or a float32 log-mel spectrogram `(mel bins, frames)` for an audio encoder.
    fn encode<'py>(&self, py: Python<'py>, input: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        guard(py, "encode", || {
            let src = encoder_source(py, "encode", &self.inner, input)?;
            let m = self.inner.clone();
            let v = py.detach(move || src.encode(&m)).map_err(|e| to_py(py, e))?;
            let d = self.inner.spec.hidden;
            let n = v.len() / d;
            PyArray1::from_vec(py, v).reshape([n, d])
        })
    }

    /// Decoder logits `(len(decoder_ids), vocab)` float32 of every decoder position for the encoder input
    /// `input` (ids or a spectrogram, as for `encode`; the decoder ids start with the decoder start token, as
    /// the model was trained).
    fn logits<'py>(
        &self,
        py: Python<'py>,
        input: &Bound<'py, PyAny>,
        decoder_ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        guard(py, "logits", || {
            let src = encoder_source(py, "logits", &self.inner, input)?;
            let dec = token_ids(py, "logits", decoder_ids)?;
            let (m, k) = (self.inner.clone(), dec.len());
            let v = py
                .detach(move || {
                    let enc = src.encode(&m)?;
                    let mut st = m.start(&enc, dec.len())?;
                    m.decode(&mut st, &dec, true)
                })
                .map_err(|e| to_py(py, e))?;
            PyArray1::from_vec(py, v).reshape([k, self.inner.spec.vocab])
        })
    }

    /// Architecture, sizes, formats, bytes per decoded token and kernels in use.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        guard(py, "info", || {
            let (m, s) = (&self.inner, &self.inner.spec);
            let d = PyDict::new(py);
            d.set_item("arch", &s.model_type)?;
            d.set_item("encoder_decoder", true)?;
            d.set_item("hidden_size", s.hidden)?;
            d.set_item("num_layers", s.layers)?;
            d.set_item("num_encoder_layers", s.encoder_layers)?;
            d.set_item("num_heads", s.heads)?;
            d.set_item("head_dim", s.head_dim)?;
            d.set_item("intermediate_size", s.intermediate)?;
            d.set_item("vocab_size", s.vocab)?;
            let (encoder_bytes, decoder_bytes, embed_bytes) = m.weight_bytes();
            d.set_item("encoder_bytes", encoder_bytes)?;
            d.set_item("bytes_per_token", decoder_bytes)?;
            d.set_item("embedding_bytes", embed_bytes)?;
            let layers = pyo3::types::PyList::empty(py);
            for (stack, i, name, lin) in m.linears() {
                let (w, e) = (&lin.w, PyDict::new(py));
                e.set_item("stack", stack)?;
                e.set_item("layer", i)?;
                e.set_item("name", name)?;
                e.set_item("shape", (w.rows(), w.cols()))?;
                e.set_item("format", w.format().name())?;
                e.set_item("density", w.density())?;
                e.set_item("nbytes", w.nbytes())?;
                layers.append(e)?;
            }
            d.set_item("linear", layers)?;
            let head = &m.lm_head().w;
            d.set_item("lm_head_format", head.format().name())?;
            let first = m.linears().first().map_or(m.lm_head(), |l| l.3);
            d.set_item("format", first.w.format().name())?;
            let act = first.act.unwrap_or(kernels::Activations::default_for(first.w.format()));
            d.set_item("activations", act.name())?;
            d.set_item("kernel", kernels::kernel_name(&first.w, act).map_err(|e| to_py(py, e))?)?;
            let isa = kernels::active_isa().map_err(|e| to_py(py, e))?;
            d.set_item("prefill_kernel", kernels::kernel_name_on(isa, &first.w, act, PREFILL_ROWS))?;
            d.set_item("isa", isa.name())?;
            d.set_item("threads", core::parallel::num_threads())?;
            d.set_item("load_seconds", m.load_report.seconds)?;
            d.set_item("pack_cache", m.load_report.pack_cache.describe())?;
            d.set_item("kv_cache", m.kv_format.name())?;
            d.set_item("eos_token_ids", s.eos.clone())?;
            d.set_item("decoder_start_token_id", s.bos)?;
            d.set_item("max_positions", s.max_positions)?;
            match s.encoder_input {
                runtime::config::EncoderInput::Tokens => d.set_item("encoder_input", "tokens")?,
                runtime::config::EncoderInput::Mel { bins, positions } => {
                    d.set_item("encoder_input", "mel")?;
                    d.set_item("num_mel_bins", bins)?;
                    d.set_item("max_source_positions", positions)?;
                }
            }
            Ok(d)
        })
    }

    fn __repr__(&self) -> String {
        let s = &self.inner.spec;
        format!(
            "Seq2SeqModel(arch={:?}, encoder_layers={}, decoder_layers={}, hidden={}, vocab={})",
            s.model_type, s.encoder_layers, s.layers, s.hidden, s.vocab
        )
    }
}

/// Loads a model directory of either kind: a `Model` (decoder-only) or a `Seq2SeqModel` (encoder-decoder).
/// Arguments as for `Model.load`, plus the load cache: `pack_cache` a directory (None: no cache) that keeps
/// at most `pack_cache_max_bytes` of packed models; `kv_cache`: "f32", "f16" or "int8" self-attention caches
/// (None: f16 where the linear layers take int8 activations, else f32).
#[pyfunction]
#[pyo3(signature = (
    path, weights = None, group_size = None, asymmetric = false, activations = None, pack_cache = None,
    pack_cache_max_bytes = 0, kv_cache = None
))]
#[allow(clippy::too_many_arguments)]
fn load_model<'py>(
    py: Python<'py>,
    path: PathBuf,
    weights: Option<&str>,
    group_size: Option<&Bound<'py, PyAny>>,
    asymmetric: bool,
    activations: Option<&str>,
    pack_cache: Option<PathBuf>,
    pack_cache_max_bytes: u64,
    kv_cache: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    guard(py, "load", || {
        let cache = pack_cache.map(|dir| runtime::pack_cache::CacheOptions { dir, max_bytes: pack_cache_max_bytes });
        let opts = load_options(py, weights, group_size, asymmetric, activations, cache, kv_cache)?;
        match py.detach(|| runtime::load_any(&path, opts)).map_err(|e| to_py(py, e))? {
            runtime::AnyModel::Decoder(m) => Ok(Bound::new(py, PyModel { inner: Arc::from(m) })?.into_any()),
            runtime::AnyModel::Seq2Seq(m) => Ok(Bound::new(py, PySeq2SeqModel { inner: Arc::from(m) })?.into_any()),
        }
    })
}

/// The `model_type`s the runtime supports.
#[pyfunction]
fn supported_architectures(py: Python<'_>) -> PyResult<Vec<&'static str>> {
    guard(py, "supported_architectures", || Ok(runtime::arch::supported()))
}

/// Version, build profile, CPU features, and the kernel ISA and thread count in use.
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    guard(py, "build_info", || build_info_impl(py))
}

fn build_info_impl(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", core::VERSION)?;
    d.set_item("profile", core::build_profile())?;
    d.set_item("target_arch", std::env::consts::ARCH)?;
    d.set_item("cpu_features", kernels::cpu_features())?;
    d.set_item("available_isas", kernels::available_isas().iter().map(|i| i.name()).collect::<Vec<_>>())?;
    d.set_item("isa", kernels::active_isa().map_err(|e| to_py(py, e))?.name())?;
    d.set_item("threads", core::parallel::num_threads())?;
    d.set_item("prefill_rows", kernels::prefill_rows())?;
    d.set_item("cpu_count", core::parallel::cpu_count())?;
    Ok(d)
}

/// Forces a kernel ISA ("scalar", "avx2", "avxvnni", "avx512", "neon"); None or "auto" restores the default choice.
#[pyfunction]
#[pyo3(signature = (name = None))]
fn set_isa(py: Python<'_>, name: Option<&str>) -> PyResult<()> {
    guard(py, "set_isa", || {
        let isa = match name {
            None | Some("auto") => None,
            Some(n) => Some(core::Isa::from_name(n).map_err(|e| to_py(py, e))?),
        };
        kernels::set_isa(isa).map_err(|e| to_py(py, e))
    })
}

/// The ISA the kernels use now.
#[pyfunction]
fn active_isa(py: Python<'_>) -> PyResult<&'static str> {
    guard(py, "active_isa", || kernels::active_isa().map(|i| i.name()).map_err(|e| to_py(py, e)))
}

/// The ISAs this CPU supports, slowest first.
#[pyfunction]
fn available_isas(py: Python<'_>) -> PyResult<Vec<&'static str>> {
    guard(py, "available_isas", || Ok(kernels::available_isas().iter().map(|i| i.name()).collect()))
}

/// Sets the kernel thread count (0 restores the default).
#[pyfunction]
fn set_num_threads(py: Python<'_>, n: &Bound<'_, PyAny>) -> PyResult<()> {
    guard(py, "set_num_threads", || {
        let n = int_arg::<usize>(py, "set_num_threads", "n", n)?;
        if n > core::bandwidth::MAX_THREADS {
            let max = core::bandwidth::MAX_THREADS;
            return Err(invalid(py, "set_num_threads", format!("{n} threads is over the limit of {max}")));
        }
        core::parallel::set_num_threads(n);
        Ok(())
    })
}

/// The kernel thread count.
#[pyfunction]
fn num_threads(py: Python<'_>) -> PyResult<usize> {
    guard(py, "num_threads", || Ok(core::parallel::num_threads()))
}

/// Best-of-`repeats` memory read bandwidth in GB/s over `nbytes` (default: four times the last-level cache, at
/// least 1 GiB; `bandwidth::default_probe_bytes`) with `threads` threads
/// (default: the kernel thread count), `repeats` (default 5) times.
#[pyfunction]
#[pyo3(signature = (nbytes = None, threads = None, repeats = None))]
fn measure_read_bandwidth<'py>(
    py: Python<'py>,
    nbytes: Option<&Bound<'py, PyAny>>,
    threads: Option<&Bound<'py, PyAny>>,
    repeats: Option<&Bound<'py, PyAny>>,
) -> PyResult<f64> {
    const OP: &str = "measure_read_bandwidth";
    guard(py, OP, || {
        let nbytes =
            opt_int_arg::<usize>(py, OP, "nbytes", nbytes)?.unwrap_or_else(core::bandwidth::default_probe_bytes);
        let threads = opt_int_arg::<usize>(py, OP, "threads", threads)?.unwrap_or_else(core::parallel::num_threads);
        let repeats = opt_int_arg::<usize>(py, OP, "repeats", repeats)?.unwrap_or(5);
        py.detach(move || core::bandwidth::measure_read_bandwidth(nbytes, threads, repeats)).map_err(|e| to_py(py, e))
    })
}

/// A bandwidth probe whose buffer (nbytes, by default as measure_read_bandwidth's: four times the last-level
/// caches, at least 1 GiB; rounded down to whole 8-byte words, at least 32 KiB) is allocated and touched once,
/// for benchmarks that probe between many timed rounds.
#[pyclass(name = "BandwidthProbe", module = "sparseinfer._core", frozen)]
struct PyBandwidthProbe {
    inner: core::bandwidth::Probe,
}

#[pymethods]
impl PyBandwidthProbe {
    #[new]
    #[pyo3(signature = (nbytes = None))]
    fn new<'py>(py: Python<'py>, nbytes: Option<&Bound<'py, PyAny>>) -> PyResult<Self> {
        const OP: &str = "BandwidthProbe";
        guard(py, OP, || {
            let nbytes =
                opt_int_arg::<usize>(py, OP, "nbytes", nbytes)?.unwrap_or_else(core::bandwidth::default_probe_bytes);
            let inner = py.detach(move || core::bandwidth::Probe::new(nbytes)).map_err(|e| to_py(py, e))?;
            Ok(PyBandwidthProbe { inner })
        })
    }

    /// The buffer's size in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes()
    }

    /// Best-of-`repeats` (default 5) read bandwidth in GB/s over the buffer with `threads` threads (default:
    /// the kernel thread count).
    #[pyo3(signature = (threads = None, repeats = None))]
    fn measure<'py>(
        &self,
        py: Python<'py>,
        threads: Option<&Bound<'py, PyAny>>,
        repeats: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<f64> {
        const OP: &str = "BandwidthProbe.measure";
        guard(py, OP, || {
            let threads = opt_int_arg::<usize>(py, OP, "threads", threads)?.unwrap_or_else(core::parallel::num_threads);
            let repeats = opt_int_arg::<usize>(py, OP, "repeats", repeats)?.unwrap_or(5);
            let probe = &self.inner;
            py.detach(move || probe.measure(threads, repeats)).map_err(|e| to_py(py, e))
        })
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPackedMatrix>()?;
    m.add_class::<PyModel>()?;
    m.add_class::<PyGenerator>()?;
    m.add_class::<PySeq2SeqModel>()?;
    m.add_class::<PyBandwidthProbe>()?;
    m.add_function(wrap_pyfunction!(load_model, m)?)?;
    m.add_function(wrap_pyfunction!(supported_architectures, m)?)?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add_function(wrap_pyfunction!(set_isa, m)?)?;
    m.add_function(wrap_pyfunction!(active_isa, m)?)?;
    m.add_function(wrap_pyfunction!(available_isas, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(measure_read_bandwidth, m)?)?;
    m.add("FORMATS", Format::ALL.iter().map(|f| f.name()).collect::<Vec<_>>())?;
    m.add("INT4_DEFAULT_GROUP", INT4_DEFAULT_GROUP)?;
    m.add("__version__", core::VERSION)?;
    let budgets = PyDict::new(m.py());
    budgets.set_item("sum_order", budget::SUM_ORDER)?;
    budgets.set_item("bf16_rel", budget::BF16_REL)?;
    budgets.set_item("round", budget::ROUND)?;
    budgets.set_item("sparse_round", budget::SPARSE_ROUND)?;
    budgets.set_item("int4_fit", budget::INT4_FIT)?;
    budgets.set_item("act_round", budget::ACT_ROUND)?;
    m.add("ERROR_BUDGETS", budgets)?;
    Ok(())
}
