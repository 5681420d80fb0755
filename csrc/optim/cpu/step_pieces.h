// The element loops of every rule's op on the CPU: StepPieces<Rule>::piece runs one piece of a
// call (optim/cpu/multi_tensor_step.h) with the loop compiled for the active instruction set.
//
// A rule has one loop per storage layout, variant and instruction set: hundreds, which make the
// longest compile of the build. Each rule's are therefore compiled in a file of their own
// (step_pieces_<rule>.cpp), declared here, so that a build compiles them in parallel. A rule
// without such a file still works: its loops are then compiled where it is registered.
#pragma once

#include "cpu/isa.h"
#include "optim/cpu/multi_tensor_step.h"
#include "optim/step_ops.h"

namespace fastopt::cpu {

template <typename Rule>
struct StepPieces {
  // AVX-512 and AVX2 run the hand-vectorized loops (16 and 8 float lanes), the baseline level
  // the compiler's.
  FASTOPT_DISPATCH_BY_VECTOR_WIDTH(piece, StepPiece<Rule>,
                                   (step_piece_body<Rule, StepLanes::kAvx512>(args)),
                                   (step_piece_body<Rule, StepLanes::kAvx2>(args)),
                                   (step_piece_body<Rule, StepLanes::kCompilerVectorized>(args)))
};

extern template struct StepPieces<AdamRule>;
extern template struct StepPieces<RmspropRule>;
extern template struct StepPieces<AdagradRule>;
extern template struct StepPieces<AdadeltaRule>;

}  // namespace fastopt::cpu
