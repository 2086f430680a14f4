// The flat-buffer helpers of fused_optim._C (csrc/flat_views.cpp), added to the module at import.
#pragma once

#include <Python.h>

extern PyMethodDef fused_optim_flat_methods[];
