"""The op table of the multi-tensor optimizer ops, one entry each.

An entry names the op's per-param state lists and its own arguments (with their defaults and
what they mean); from it follow the op's schema (`fastopt._library`) and its functional wrapper
(`fastopt.functional`). Its kernels, the meta one that torch.compile traces with included,
follow from the matching update rule in the C++ op table (csrc/optim/step_ops.h), whose checks
(which state lists an option needs, ...) run on every device; torch checks at import that the
kernels fit the schema.

Every op's arguments are a shared head and tail around its own (`schema` below):
``params, grads, <state lists>, steps, lr, lr_tensor, <own arguments>, grad_scale, found_inf,
masters, grad_norm, max_grad_norm, rounding_seeds``.
An argument every optimizer takes is added there, once, and to csrc/optim/step_op.h.
"""

from __future__ import annotations

from dataclasses import dataclass

# What the shared arguments mean, for every op's docstring.
SHARED_ARGUMENTS_DOC = """\
    params, grads, <state lists>: one entry per param; each grad and state tensor has its
        param's shape, device and memory layout, and each grad its dtype. All params are on one
        device; their dtypes (float32, float64, float16, bfloat16) may differ. A param's state
        is kept in its dtype, in float32 (for a float16 or bfloat16 param), or in bfloat16 (for a
        float32 or bfloat16 param, or a float16 one with a master copy); the math is float32
        (float64 for float64 params) whatever the storage.
    steps: one float32 one-element tensor per param on the params' device, the number of steps
        taken so far; each is incremented.
    lr: the learning rate, a float or a one-element tensor. A CUDA tensor is read from device
        memory, so a captured CUDA graph sees later changes to it; a float or a CPU tensor is
        read when the step is launched (or captured).
    grad_scale: a loss scale to divide the grads by (``torch.amp.GradScaler``); the grads are
        stored back unscaled, as torch's fused optimizers do.
    found_inf: nonzero means an inf/NaN gradient was found: nothing at all is changed.
    masters: empty, or one entry per param: None, or the param's master copy (float16 and
        bfloat16 params): a float32 tensor, or for a bfloat16 param an int16 remainder (the
        param and the remainder together hold a float32 master exactly). The step updates the
        master and stores it, rounded to nearest, into the param.
    grad_norm, max_grad_norm: with a grad norm (a one-element float32/float64 tensor on the
        params' device, e.g. from :func:`fastopt.functional.grad_norm`), the grads are clipped
        as ``torch.nn.utils.clip_grad_norm_`` clips them, by ``min(max_grad_norm / (grad_norm
        + 1e-6), 1)``, inside the step; the grads themselves are left as they are (unscaled
        with ``grad_scale``). Read from device memory on CUDA: no host synchronization.
    rounding_seeds: empty, or one int per param: bfloat16 state is then rounded stochastically
        on store, with random bits that follow from the seed, the step count and the element's
        place (the same on every device, and after resuming a checkpoint); else to nearest."""


@dataclass(frozen=True)
class Argument:
    """One of an op's own arguments: a float or a bool, required where `default` is None."""

    name: str
    type: type  # float or bool
    default: float | bool | None = None

    @property
    def schema(self) -> str:
        return f"{'float' if self.type is float else 'bool'} {self.name}"


@dataclass(frozen=True)
class StepOp:
    """One multi-tensor optimizer op."""

    name: str
    summary: str  # the first lines of the functional wrapper's docstring
    states: tuple[str, ...]  # the per-param state lists, in the rule's slot order
    own: tuple[Argument, ...]
    own_doc: str  # what the own arguments (and state lists) mean
    example: str  # a doctest of the functional wrapper, after `p, g = torch.randn(3), ...`

    @property
    def schema(self) -> str:
        # Each mutated list gets its own alias set: a, b for params and grads, then one a state.
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        mutated = [f"Tensor({next(letters)}!)[] {name}" for name in self.list_names]
        arguments = [
            *mutated,
            "float lr",
            "Tensor? lr_tensor",
            *(a.schema for a in self.own),
            "Tensor? grad_scale",
            "Tensor? found_inf",
            f"Tensor({next(letters)}!)?[] masters",
            "Tensor? grad_norm",
            "float max_grad_norm",
            "int[] rounding_seeds",
        ]
        return f"{self.name}({', '.join(arguments)}) -> ()"

    @property
    def list_names(self) -> tuple[str, ...]:
        """The tensor-list arguments, in schema order."""
        return ("params", "grads", *self.states, "steps")


STEP_OPS: tuple[StepOp, ...] = (
    StepOp(
        name="adam_step_",
        summary="""One Adam (or, with ``decoupled_weight_decay=True``, AdamW) step over many
tensors, in place: what ``torch.optim.Adam`` / ``AdamW`` compute (fp32 and fp64 to rounding; bf16
and fp16 rounded once per element rather than after every operation), in one pass over memory.""",
        states=("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
        own=(
            Argument("beta1", float),
            Argument("beta2", float),
            Argument("eps", float),
            Argument("weight_decay", float, 0.0),
            Argument("decoupled_weight_decay", bool, False),
            Argument("amsgrad", bool, False),
            Argument("maximize", bool, False),
        ),
        own_doc="""\
    exp_avgs, exp_avg_sqs: the running averages of the gradient and its square.
    max_exp_avg_sqs: one per param with ``amsgrad=True``, else empty.
    beta1, beta2, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.Adam``.
    decoupled_weight_decay: apply weight decay as ``torch.optim.AdamW`` does.""",
        example=""">>> exp_avg, exp_avg_sq, step = torch.zeros(3), torch.zeros(3), torch.zeros(())
>>> fastopt.functional.adam_step_([p], [g], [exp_avg], [exp_avg_sq], [], [step], lr=1e-3,
...                               beta1=0.9, beta2=0.999, eps=1e-8)
>>> step
tensor(1.)""",
    ),
    StepOp(
        name="rmsprop_step_",
        summary="""One RMSprop step over many tensors, in place: what ``torch.optim.RMSprop``
computes, in one pass over memory.""",
        states=("square_avgs", "momentum_buffers", "grad_avgs"),
        own=(
            Argument("alpha", float),
            Argument("eps", float),
            Argument("weight_decay", float, 0.0),
            Argument("momentum", float, 0.0),
            Argument("centered", bool, False),
            Argument("maximize", bool, False),
        ),
        own_doc="""\
    square_avgs: the running averages of the squared gradient.
    momentum_buffers: one per param with ``momentum > 0``, else empty.
    grad_avgs: one per param with ``centered=True``, else empty.
    alpha, eps, weight_decay, momentum, centered, maximize: as in ``torch.optim.RMSprop``.""",
        example=""">>> square_avg, step = torch.zeros(3), torch.zeros(())
>>> fastopt.functional.rmsprop_step_([p], [g], [square_avg], [], [], [step], lr=1e-2,
...                                  alpha=0.99, eps=1e-8)""",
    ),
    StepOp(
        name="adagrad_step_",
        summary="""One Adagrad step over many tensors with dense grads, in place: what
``torch.optim.Adagrad`` computes, in one pass over memory. For a sparse grad see
:func:`sparse_adagrad_step_`.""",
        states=("state_sums",),
        own=(
            Argument("lr_decay", float, 0.0),
            Argument("weight_decay", float, 0.0),
            Argument("eps", float, 1e-10),
            Argument("maximize", bool, False),
        ),
        own_doc="""\
    state_sums: the running sums of squared grads.
    lr_decay, weight_decay, eps, maximize: as in ``torch.optim.Adagrad``.""",
        example=""">>> state_sum, step = torch.zeros(3), torch.zeros(())
>>> fastopt.functional.adagrad_step_([p], [g], [state_sum], [step], lr=1e-2)
>>> torch.equal(state_sum, g * g)
True""",
    ),
    StepOp(
        name="adadelta_step_",
        summary="""One Adadelta step over many tensors, in place: what ``torch.optim.Adadelta``
computes, in one pass over memory.""",
        states=("square_avgs", "acc_deltas"),
        own=(
            Argument("rho", float),
            Argument("eps", float),
            Argument("weight_decay", float, 0.0),
            Argument("maximize", bool, False),
        ),
        own_doc="""\
    square_avgs: the running averages of the squared gradient.
    acc_deltas: the running averages of squared updates.
    rho, eps, weight_decay, maximize: as in ``torch.optim.Adadelta``.""",
        example=""">>> square_avg, acc_delta, step = torch.zeros(3), torch.zeros(3), torch.zeros(())
>>> fastopt.functional.adadelta_step_([p], [g], [square_avg], [acc_delta], [step], lr=1.0,
...                                   rho=0.9, eps=1e-6)""",
    ),
)
