// The extension module is empty: importing mmdcnv2._C loads the shared object, whose
// static TORCH_LIBRARY registrations put the ops under torch.ops.mmdcnv2.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
