// tailorkit._kernels: merge_kernels.h's weighted sum on plain buffers, as a
// CPython extension that does not link torch.
//
// Why a second extension: a build whose merges are all fixed linear
// combinations (the commonest recipe) needs nothing else from torch, and
// importing torch takes longer than such a build's merges (1.4 s against
// 0.9 s on the benchmark job, benchmarks/RESULTS.md). With this module the
// merges start at once, beside the copies, on memoryviews of the mapped shards
// and into the build's chunk buffer. The arithmetic is merge_kernels.h's, the
// same code tailorkit._C's weighted_sum runs, so both write the same bits; the
// tests compare this function with the PyTorch reference in tailorkit/ops.py.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <exception>
#include <thread>
#include <vector>

#include "merge_kernels.h"

namespace {

using tailorkit::Dtype;
using tailorkit::Operand;

// A safetensors dtype name ("F32", "BF16", "F16") as the kernels' dtype and its size.
bool parse_dtype(PyObject* name, const char* what, Dtype* dtype, Py_ssize_t* itemsize) {
  const char* text = PyUnicode_Check(name) ? PyUnicode_AsUTF8(name) : nullptr;
  if (text != nullptr && std::strcmp(text, "F32") == 0) {
    *dtype = Dtype::Float32;
    *itemsize = 4;
  } else if (text != nullptr && std::strcmp(text, "BF16") == 0) {
    *dtype = Dtype::BFloat16;
    *itemsize = 2;
  } else if (text != nullptr && std::strcmp(text, "F16") == 0) {
    *dtype = Dtype::Float16;
    *itemsize = 2;
  } else {
    if (!PyErr_Occurred()) {
      PyErr_Format(PyExc_ValueError, "%s dtype must be 'F32', 'BF16' or 'F16', got %R", what, name);
    }
    return false;
  }
  return true;
}

// The buffers a call holds, released however it ends.
class Views {
 public:
  Views() = default;
  Views(const Views&) = delete;
  Views& operator=(const Views&) = delete;
  ~Views() {
    for (Py_buffer& view : views_) {
      PyBuffer_Release(&view);
    }
  }

  // A C-contiguous view of obj, aligned to its `itemsize`-byte elements and holding
  // `count` of them (any whole number of them if count < 0); nullptr with a Python
  // error set otherwise. The view stays where it is until the call ends.
  const Py_buffer* add(
      PyObject* obj, bool writable, Py_ssize_t itemsize, Py_ssize_t count, const char* what) {
    Py_buffer view;
    const int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &view, flags) != 0) {
      return nullptr;
    }
    views_.push_back(view);
    if (count < 0 && view.len % itemsize != 0) {
      PyErr_Format(
          PyExc_ValueError,
          "%s holds %zd bytes, not a whole number of %zd-byte elements",
          what,
          view.len,
          itemsize);
      return nullptr;
    }
    if (count >= 0 && view.len != count * itemsize) {
      PyErr_Format(
          PyExc_ValueError,
          "%s holds %zd bytes, but %zd elements of %zd bytes were expected",
          what,
          view.len,
          count,
          itemsize);
      return nullptr;
    }
    if (reinterpret_cast<uintptr_t>(view.buf) % static_cast<uintptr_t>(itemsize) != 0) {
      PyErr_Format(PyExc_ValueError, "%s is not aligned to its %zd-byte elements", what, itemsize);
      return nullptr;
    }
    return &views_.back();
  }

 private:
  std::deque<Py_buffer> views_;  // a deque: adding one moves none of the others
};

// Runs the weighted sum over [0, n) on up to `threads` threads (the calling one
// included), each on a contiguous range of whole blocks; returns the non-finite count.
int64_t run_split(
    const std::vector<Operand>& in, void* dst, Dtype out_dtype, int64_t n, int64_t threads) {
  const int64_t by_size = (n + tailorkit::kGrain - 1) / tailorkit::kGrain;
  const int64_t parts = std::max<int64_t>(1, std::min(threads, by_size));
  int64_t step = (n + parts - 1) / parts;
  step = (step + tailorkit::kBlock - 1) / tailorkit::kBlock * tailorkit::kBlock;
  std::vector<int64_t> counts(static_cast<size_t>(parts), 0);
  std::vector<std::thread> workers;
  auto work = [&](int64_t part) {
    const int64_t begin = part * step;
    const int64_t end = std::min(n, begin + step);
    if (begin < end) {
      counts[part] = tailorkit::weighted_sum_range(in.data(), in.size(), dst, out_dtype, begin, end);
    }
  };
  int64_t part = 1;
  try {
    for (; part < parts; ++part) {
      workers.emplace_back(work, part);
    }
  } catch (const std::exception&) {  // no more threads to be had: the rest runs here
  }
  for (int64_t rest = part; rest < parts; ++rest) {
    work(rest);
  }
  work(0);
  for (std::thread& worker : workers) {
    worker.join();
  }
  int64_t total = 0;
  for (int64_t c : counts) {
    total += c;
  }
  return total;
}

PyObject* weighted_sum(PyObject*, PyObject* args) {
  PyObject *out_obj, *out_name, *sources_obj, *names_obj, *weights_obj;
  Py_ssize_t threads = 1;
  if (!PyArg_ParseTuple(
          args,
          "OOOOO|n:weighted_sum",
          &out_obj,
          &out_name,
          &sources_obj,
          &names_obj,
          &weights_obj,
          &threads)) {
    return nullptr;
  }
  Dtype out_dtype;
  Py_ssize_t out_size;
  if (!parse_dtype(out_name, "out", &out_dtype, &out_size)) {
    return nullptr;
  }
  Views views;
  const Py_buffer* out = views.add(out_obj, true, out_size, -1, "out");
  if (out == nullptr) {
    return nullptr;
  }
  const Py_ssize_t n = out->len / out_size;

  PyObject* sources = PySequence_Fast(sources_obj, "sources must be a sequence of buffers");
  if (sources == nullptr) {
    return nullptr;
  }
  PyObject* names = PySequence_Fast(names_obj, "dtypes must be a sequence of dtype names");
  PyObject* weights = names ? PySequence_Fast(weights_obj, "weights must be a sequence") : nullptr;
  std::vector<Operand> in;
  const Py_ssize_t k = PySequence_Fast_GET_SIZE(sources);
  bool ok = names != nullptr && weights != nullptr;
  if (ok && (k == 0 || PySequence_Fast_GET_SIZE(names) != k ||
             PySequence_Fast_GET_SIZE(weights) != k)) {
    PyErr_Format(
        PyExc_ValueError,
        "need at least one source, and one dtype and one weight per source; got %zd sources, "
        "%zd dtypes, %zd weights",
        k,
        PySequence_Fast_GET_SIZE(names),
        PySequence_Fast_GET_SIZE(weights));
    ok = false;
  }
  for (Py_ssize_t i = 0; ok && i < k; ++i) {
    Dtype dtype;
    Py_ssize_t size;
    char what[32];
    std::snprintf(what, sizeof(what), "source %zd", i);
    const double w = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(weights, i));
    const Py_buffer* view = nullptr;
    ok = !(w == -1.0 && PyErr_Occurred()) &&
         parse_dtype(PySequence_Fast_GET_ITEM(names, i), what, &dtype, &size) &&
         (view = views.add(PySequence_Fast_GET_ITEM(sources, i), false, size, n, what)) != nullptr;
    if (ok) {
      in.push_back({view->buf, dtype, static_cast<float>(w)});
    }
  }
  Py_XDECREF(weights);
  Py_XDECREF(names);
  Py_DECREF(sources);
  if (!ok) {
    return nullptr;
  }
  PyThreadState* saved = PyEval_SaveThread();  // the copies run meanwhile
  const int64_t nonfinite = run_split(in, out->buf, out_dtype, n, std::max<Py_ssize_t>(1, threads));
  PyEval_RestoreThread(saved);
  return PyLong_FromLongLong(nonfinite);
}

PyMethodDef methods[] = {
    {"weighted_sum",
     weighted_sum,
     METH_VARARGS,
     "weighted_sum(out, out_dtype, sources, dtypes, weights, threads=1) -> int\n\n"
     "out = sum_i weights[i] * sources[i], elementwise, accumulated in float32 in source\n"
     "order and rounded once to out_dtype; every buffer holds the same number of elements\n"
     "of its dtype ('F32', 'BF16' or 'F16'). The GIL is released while it runs on up to\n"
     "`threads` threads. Returns how many of the values written are NaN or inf."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "tailorkit._kernels",
    "tailorkit's merge arithmetic on plain buffers, without torch; used by the build.",
    -1,
    methods,
    nullptr,
    nullptr,
    nullptr,
    nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__kernels() {
  PyObject* m = PyModule_Create(&module);
  // The interface version tailorkit/combine.py checks (KERNELS_VERSION): bump both together.
  if (m != nullptr && PyModule_AddIntConstant(m, "VERSION", 1) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
