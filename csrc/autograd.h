// The autograd kernels that follow from the schemas (csrc/autograd.cpp).
#pragma once

#include <string>

namespace fused_optim {

// Registers, for every op of namespace `ns` the dispatcher knows (defined, so to be called once
// the schemas exist and the ops with a derivative have registered it), the Autograd kernel its
// schema decides where none is registered (a writing op refuses grad-requiring writes; any other
// takes torch's NotImplemented fallback), and for writing ops the ADInplaceOrView kernel that bumps
// versions where none is. Ops already holding a kernel for a key keep it: calling again adds nothing.
void register_autograd_for_namespace(const std::string& ns);

} // namespace fused_optim
