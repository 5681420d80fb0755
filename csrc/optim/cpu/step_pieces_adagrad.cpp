// The element loops of AdagradRule on the CPU (see step_pieces.h for why a file per rule).
#include "optim/cpu/step_pieces.h"

namespace fastopt::cpu {

template struct StepPieces<AdagradRule>;

}  // namespace fastopt::cpu
