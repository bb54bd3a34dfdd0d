//! `sparseinfer._core`: the thin PyO3 binding of `sparseinfer-core`. It converts types, releases the GIL
//! around heavy work and maps [`sparseinfer_core::Error`] to the Python exceptions of `sparseinfer.errors`.
//! Nothing else lives here.

use std::sync::Arc;

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use sparseinfer_core::formats::budget;
use sparseinfer_core::{self as core, kernels, Error, Format, PackOptions, PackedMatrix};

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
    /// format's default: "int8" for integer formats, else "f32"), "f32" or "int8".
    #[pyo3(signature = (x, activations = None))]
    fn matvec<'py>(
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

    /// `X @ Wᵀ` for `X` of shape `(rows, in)`, float32; returns `(rows, out)` float32. `activations` as
    /// for `matvec`.
    #[pyo3(signature = (x, activations = None))]
    fn matmul<'py>(
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

    /// The dequantized weights as a float32 `(out, in)` array (for tests and inspection).
    fn to_dense<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let m = self.inner.clone();
        let dense = py.detach(move || m.to_dense());
        PyArray1::from_vec(py, dense).reshape([self.inner.rows(), self.inner.cols()])
    }

    /// The kernel a call with `activations` runs now, e.g. "sparse_int8_i8 (avx512vnni)".
    #[pyo3(signature = (activations = None))]
    fn kernel(&self, py: Python<'_>, activations: Option<&str>) -> PyResult<String> {
        let act = parse_act(py, activations)?.unwrap_or(kernels::Activations::default_for(self.inner.format()));
        kernels::kernel_name(&self.inner, act).map_err(|e| to_py(py, e))
    }

    /// An independent copy of the packed buffers (benchmarks rotate over copies to defeat the cache).
    fn copy(&self) -> Self {
        PyPackedMatrix { inner: Arc::new((*self.inner).clone()) }
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

/// Packs a float32 `(out, in)` matrix; zeros are pruned weights for the sparse formats.
#[pyfunction]
#[pyo3(signature = (w, format = "sparse-int8", group_size = None, asymmetric = false))]
fn pack<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    format: &str,
    group_size: Option<usize>,
    asymmetric: bool,
) -> PyResult<PyPackedMatrix> {
    let fmt = Format::from_name(format).map_err(|e| to_py(py, e))?;
    let w = f32_slice::<numpy::Ix2>(py, "pack", "w", w)?;
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    let data = w.as_slice()?;
    let opts = PackOptions { group_size, asymmetric };
    let m = py.detach(|| PackedMatrix::pack(data, rows, cols, fmt, opts)).map_err(|e| to_py(py, e))?;
    Ok(PyPackedMatrix { inner: Arc::new(m) })
}

/// Version, build profile, CPU features, and the kernel ISA and thread count in use.
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", core::VERSION)?;
    d.set_item("profile", core::build_profile())?;
    d.set_item("target_arch", std::env::consts::ARCH)?;
    d.set_item("cpu_features", kernels::cpu_features())?;
    d.set_item("available_isas", kernels::available_isas().iter().map(|i| i.name()).collect::<Vec<_>>())?;
    d.set_item("isa", kernels::active_isa().map_err(|e| to_py(py, e))?.name())?;
    d.set_item("threads", core::parallel::num_threads())?;
    d.set_item("cpu_count", core::parallel::cpu_count())?;
    Ok(d)
}

/// Forces a kernel ISA ("scalar", "avx2", "avx512"); None or "auto" restores the default choice.
#[pyfunction]
#[pyo3(signature = (name = None))]
fn set_isa(py: Python<'_>, name: Option<&str>) -> PyResult<()> {
    let isa = match name {
        None | Some("auto") => None,
        Some(n) => Some(core::Isa::from_name(n).map_err(|e| to_py(py, e))?),
    };
    kernels::set_isa(isa).map_err(|e| to_py(py, e))
}

/// The ISA the kernels use now.
#[pyfunction]
fn active_isa(py: Python<'_>) -> PyResult<&'static str> {
    kernels::active_isa().map(|i| i.name()).map_err(|e| to_py(py, e))
}

/// The ISAs this CPU supports, slowest first.
#[pyfunction]
fn available_isas() -> Vec<&'static str> {
    kernels::available_isas().iter().map(|i| i.name()).collect()
}

/// Sets the kernel thread count (0 restores the default).
#[pyfunction]
fn set_num_threads(n: usize) {
    core::parallel::set_num_threads(n)
}

/// The kernel thread count.
#[pyfunction]
fn num_threads() -> usize {
    core::parallel::num_threads()
}

/// Best-of-`repeats` memory read bandwidth in GB/s over `nbytes` with `threads` threads.
#[pyfunction]
#[pyo3(signature = (nbytes = 1 << 30, threads = None, repeats = 5))]
fn measure_read_bandwidth(py: Python<'_>, nbytes: usize, threads: Option<usize>, repeats: usize) -> f64 {
    let threads = threads.unwrap_or_else(core::parallel::num_threads);
    py.detach(move || core::bandwidth::measure_read_bandwidth(nbytes, threads, repeats))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPackedMatrix>()?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add_function(wrap_pyfunction!(set_isa, m)?)?;
    m.add_function(wrap_pyfunction!(active_isa, m)?)?;
    m.add_function(wrap_pyfunction!(available_isas, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(measure_read_bandwidth, m)?)?;
    m.add("FORMATS", Format::ALL.iter().map(|f| f.name()).collect::<Vec<_>>())?;
    m.add("__version__", core::VERSION)?;
    let budgets = PyDict::new(m.py());
    budgets.set_item("sum_order", budget::SUM_ORDER)?;
    budgets.set_item("bf16_rel", budget::BF16_REL)?;
    budgets.set_item("round", budget::ROUND)?;
    budgets.set_item("sparse_round", budget::SPARSE_ROUND)?;
    budgets.set_item("act_round", budget::ACT_ROUND)?;
    m.add("ERROR_BUDGETS", budgets)?;
    Ok(())
}
