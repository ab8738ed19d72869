// The extension module is empty: importing mmdcnv2._C loads the shared object, whose
// static TORCH_LIBRARY registrations put the ops under torch.ops.mmdcnv2.
#include <Python.h>

// Exported explicitly: we build with -fvisibility=hidden, and Python 3.8's PyMODINIT_FUNC does not mark the
// init function visible (3.9's does).
extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
