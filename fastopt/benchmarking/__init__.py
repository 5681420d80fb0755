"""fastopt's benchmarks, one module per feature, each timing fastopt and its anchors (torch's
paths) in one process on the same inputs, beside a roofline or peak measured on the same machine:

- `optimizers`: the optimizer steps against torch.optim's fused / foreach / single-tensor paths,
  with a traffic probe of each optimizer's exact memory traffic (and sparse Adagrad);
- `int8_linear`: Int8Linear against fp32 nn.Linear and torch.ao's dynamic int8, with the
  machine's memory read bandwidth;
- `blocksparse_linear`: BlockSparseLinear against dense F.linear and torch BSR, with the dense
  GEMM's GFLOP/s.

`python -m fastopt bench` runs them (`cli`), the pytest-benchmark files in `benchmarks/` share
their cases, and `figure` draws either's results (`pytest_json` reads pytest-benchmark's JSON).
The optimizer benchmark's names are also importable from here, as before the split.
"""

from .machine import machine_description
from .optimizers import (
    CASES,
    FAMILIES,
    ROOFLINE,
    Case,
    Family,
    Row,
    SparseRow,
    copy_roofline,
    format_sparse_table,
    format_table,
    make_params,
    mixed_sizes,
    roofline_ms,
    run_case,
    run_sparse_adagrad,
)
from .timing import interleaved_medians, median_ms

__all__ = [
    "CASES",
    "FAMILIES",
    "ROOFLINE",
    "Case",
    "Family",
    "Row",
    "SparseRow",
    "copy_roofline",
    "format_sparse_table",
    "format_table",
    "interleaved_medians",
    "machine_description",
    "make_params",
    "median_ms",
    "mixed_sizes",
    "roofline_ms",
    "run_case",
    "run_sparse_adagrad",
]
