// nat_ext._C as a Python module (`from nat_ext import _C`): loading it registers the ops (the
// other sources do that); this file adds the lean numpy entry point of the scipy drop-in,
// nat_ext.linear_sum_assignment. A 2-D float64 or float32 ndarray goes straight to the CPU
// solver core (lap/lsap.h): no tensors, no dispatcher, no argument parser, so a small problem
// costs about what scipy's own call costs. Anything else is left to the Python wrapper, which
// converts it or routes it to the ops; the answers, tie rule and messages are the ops'.
//
// Compiled where Python's headers are on the include path (setup.py's build of nat_ext._C); the
// CMake build of the plain op library (libnat_ext.so) has no Python and compiles nothing here.
#if __has_include(<Python.h>)
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "lap/lsap.h"
#include "ops_common.h"

namespace nat {
namespace {

namespace py = pybind11;
using py::detail::npy_api;

// Problems with at least this many entries release the GIL while they are solved.
constexpr int64_t kReleaseGilEntries = 1 << 14;

PyObject* new_int64_array(int64_t k, int64_t** data) {
  const npy_api& api = npy_api::get();
  const Py_intptr_t dims[1] = {static_cast<Py_intptr_t>(k)};
  PyObject* a = api.PyArray_NewFromDescr_(api.PyArray_Type_,
                                          api.PyArray_DescrFromType_(npy_api::NPY_INT64_), 1,
                                          dims, nullptr, nullptr, 0, nullptr);
  if (a) *data = reinterpret_cast<int64_t*>(py::detail::array_proxy(a)->data);
  return a;
}

// (row_ind, col_ind) of the n x m array at `base` (byte strides s0, s1), as scipy returns them.
template <typename T>
PyObject* solve_array(const char* base, int64_t n, int64_t m, int64_t s0, int64_t s1,
                      bool contiguous, bool maximize) {
  // The solver takes rows <= columns, row-major: transpose (n > m) or gather (other strides).
  thread_local std::vector<T> buffer;
  thread_local std::vector<int64_t> col4row, pos;
  thread_local lap::Workspace ws;
  const bool transposed = n > m;
  const int64_t rows = transposed ? m : n, cols = transposed ? n : m, k = rows;
  const T* cost = reinterpret_cast<const T*>(base);
  if (transposed || !contiguous) {
    // In 8 x 8 tiles: a plain loop writing a transpose strides by whole rows, and on power-of-two
    // sizes those writes fall in a few cache sets (256 x 128 took 4x the solve).
    buffer.resize(rows * cols);
    constexpr int64_t kTile = 8;
    for (int64_t i0 = 0; i0 < n; i0 += kTile) {
      for (int64_t j0 = 0; j0 < m; j0 += kTile) {
        for (int64_t i = i0; i < std::min(i0 + kTile, n); ++i) {
          for (int64_t j = j0; j < std::min(j0 + kTile, m); ++j) {
            const T x = *reinterpret_cast<const T*>(base + i * s0 + j * s1);
            buffer[transposed ? j * n + i : i * m + j] = x;
          }
        }
      }
    }
    cost = buffer.data();
  }
  col4row.resize(rows);
  int64_t bad = -1;
  lap::Status status = lap::kSolved;
  {
    PyThreadState* released = rows * cols >= kReleaseGilEntries ? PyEval_SaveThread() : nullptr;
    bad = lap::find_invalid_entry(cost, rows * cols, maximize);
    if (bad < 0) status = lap::solve(rows, cols, cost, maximize, col4row.data(), nullptr, nullptr, ws);
    if (released) PyEval_RestoreThread(released);
  }
  if (bad >= 0) {
    const int64_t i = transposed ? bad % cols : bad / cols, j = transposed ? bad / cols : bad % cols;
    const std::string msg = invalid_entry_message("linear_sum_assignment", "", i, j,
                                                  static_cast<double>(cost[bad]), maximize);
    PyErr_SetString(PyExc_ValueError, msg.c_str());
    return nullptr;
  }
  if (status != lap::kSolved) {
    PyErr_SetString(PyExc_ValueError, infeasible_message("linear_sum_assignment", -1).c_str());
    return nullptr;
  }
  int64_t *r = nullptr, *c = nullptr;
  PyObject* row_ind = new_int64_array(k, &r);
  PyObject* col_ind = row_ind ? new_int64_array(k, &c) : nullptr;
  if (!col_ind) {
    Py_XDECREF(row_ind);
    return nullptr;
  }
  if (!transposed) {
    for (int64_t i = 0; i < k; ++i) {
      r[i] = i;
      c[i] = col4row[i];
    }
  } else {
    // col4row[j] is the row of column j; scipy lists the pairs in row order.
    pos.assign(n, -1);
    for (int64_t j = 0; j < m; ++j) pos[col4row[j]] = j;
    for (int64_t i = 0, t = 0; i < n; ++i) {
      if (pos[i] < 0) continue;
      r[t] = i;
      c[t++] = pos[i];
    }
  }
  PyObject* result = PyTuple_Pack(2, row_ind, col_ind);  // new references to both
  Py_DECREF(row_ind);
  Py_DECREF(col_ind);
  return result;
}

// _lsa_numpy(cost, maximize) -> (row_ind, col_ind), or None when cost is not a 2-D, aligned,
// native-byte-order float64/float32 ndarray (the caller converts it or takes another route).
PyObject* lsa_numpy(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "_lsa_numpy takes (cost, maximize)");
    return nullptr;
  }
  const npy_api& api = npy_api::get();
  PyObject* arr = args[0];
  if (!PyObject_TypeCheck(arr, api.PyArray_Type_)) Py_RETURN_NONE;
  const py::detail::PyArray_Proxy* a = py::detail::array_proxy(arr);
  if (a->nd != 2 || !(a->flags & npy_api::NPY_ARRAY_ALIGNED_)) Py_RETURN_NONE;
  const py::detail::PyArrayDescr_Proxy* d = py::detail::array_descriptor_proxy(a->descr);
  const bool native = d->byteorder == '=' || d->byteorder == '|' ||
                      d->byteorder == (PY_BIG_ENDIAN ? '>' : '<');
  const bool f64 = d->type_num == npy_api::NPY_DOUBLE_, f32 = d->type_num == npy_api::NPY_FLOAT_;
  if (!native || !(f64 || f32)) Py_RETURN_NONE;
  const int maximize = PyObject_IsTrue(args[1]);
  if (maximize < 0) return nullptr;
  const int64_t n = a->dimensions[0], m = a->dimensions[1];
  const bool contiguous = a->flags & npy_api::NPY_ARRAY_C_CONTIGUOUS_;
  return f64 ? solve_array<double>(a->data, n, m, a->strides[0], a->strides[1], contiguous,
                                   maximize)
             : solve_array<float>(a->data, n, m, a->strides[0], a->strides[1], contiguous,
                                  maximize);
}

// The fallback warning as a Python UserWarning (solver_faults.h). A warnings filter that turns
// it into an error makes the op raise a RuntimeError with the warning's text.
void python_user_warning(const std::string& message) {
  const PyGILState_STATE gil = PyGILState_Ensure();
  if (PyErr_WarnEx(PyExc_UserWarning, message.c_str(), 1) == 0) {
    PyGILState_Release(gil);
    return;
  }
  PyErr_Clear();
  PyGILState_Release(gil);
  TORCH_CHECK(false, message, " (raised: a warnings filter made this warning an error)");
}

PyMethodDef lsa_numpy_def = {
    "_lsa_numpy", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&lsa_numpy)),
    METH_FASTCALL,
    "_lsa_numpy(cost, maximize) -> (row_ind, col_ind) or None: the numpy fast path of "
    "nat_ext.linear_sum_assignment (2-D aligned native float64/float32 arrays only)."};

}  // namespace
}  // namespace nat

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nat_ext's compiled ops (registered with torch.ops.nat on import) and numpy entry point";
  m.add_object("_lsa_numpy", pybind11::reinterpret_steal<pybind11::object>(
                                 PyCFunction_NewEx(&nat::lsa_numpy_def, nullptr, m.ptr())));
  nat::set_warning_reporter(&nat::python_user_warning);
  m.def("_fallback_count", &nat::fallback_count,
        "Problems re-solved on the CPU after a solver fault in this process (solver_faults.h).");
  m.def("_reset_fallback_warning", &nat::reset_fallback_warning,
        "Test hook: the next solver fault warns again.");
}
#endif  // __has_include(<Python.h>)
