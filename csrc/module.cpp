// The Python module fedspa_kernels._C. It holds no Python functions: importing it runs the static
// TORCH_LIBRARY_IMPL registrations of the CPU (and CUDA) kernels. Schemas are defined in Python
// (fedspa_kernels/ops/), never here.
#include <Python.h>

// PyMODINIT_FUNC is extern "C" with default visibility (the rest of the library is built -fvisibility=hidden).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "fedspa_kernels native kernels (registered with torch.library on import)",
      -1,    // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
