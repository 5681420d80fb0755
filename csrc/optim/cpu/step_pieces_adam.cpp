// The element loops of AdamRule on the CPU (see step_pieces.h for why a file per rule).
#include "optim/cpu/step_pieces.h"

namespace fastopt::cpu {

template struct StepPieces<AdamRule>;

}  // namespace fastopt::cpu
