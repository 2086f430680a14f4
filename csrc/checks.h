// The argument checks of fused_optim._C (csrc/checks.cpp), added to the module at import.
#pragma once

#include <Python.h>

extern PyMethodDef fused_optim_check_methods[];
