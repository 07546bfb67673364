"""The ops' eager route (``topk_kernels._common.define_op``): plain eager calls skip the dispatcher
and run the same Python code through one ``torch.autograd.Function``; everything else (fake
tensors, dispatch and function modes, autocast, the profiler, tensor subclasses, torch.compile)
goes through the registered ``torch.library`` op.

Each op, on both backends, at sizes that are not powers of two, with fresh random inputs: the
eager route's outputs and gradients (for every subset of inputs that needs one) are bit-identical
to the registered op's, and the route taken is read from the output's ``grad_fn``.
"""

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from helpers import BACKENDS, DEVICE
from topk_kernels import _common, expander_decode, expander_encode, sparse_decode, topk_encode

pytestmark = pytest.mark.ops
B, M, N, K, D = 13, 37, 211, 9, 5


def _expander_graph(gen):
    return torch.stack([torch.randperm(M, generator=gen)[:D] for _ in range(N)]).to(DEVICE)


def _case(op, gen):
    """(call(*float tensors, backend=...), {name: float tensor}) for one op: random inputs, the ids
    (and an expander's rows) fixed inside ``call``."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)
    idx = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)]).to(DEVICE)
    if op == "sparse_decode":
        return (lambda a, w, b, backend: sparse_decode(a, idx, w, b, backend=backend),
                {"acts": rnd(B, K).abs(), "weight": rnd(N, M), "bias": rnd(M)})
    if op == "expander_decode":
        rows = _expander_graph(gen)
        return (lambda a, v, b, backend: expander_decode(a, idx, v, rows, M, b, backend=backend),
                {"acts": rnd(B, K).abs(), "values": rnd(N, D), "bias": rnd(M)})
    if op == "topk_encode":
        return (lambda x, w, b, backend: topk_encode(x, w, b, K, backend=backend),
                {"x": rnd(B, M), "weight": rnd(N, M), "bias": rnd(N)})
    rows = _expander_graph(gen)
    return (lambda x, v, b, backend: expander_encode(x, v, rows, b, K, backend=backend),
            {"x": rnd(B, M), "values": rnd(N, D), "bias": rnd(N)})


OPS = ["sparse_decode", "expander_decode", "topk_encode", "expander_encode"]


def _route(out):
    """The name of the node that made ``out`` (under the public function's reshapes), or None."""
    fn = out.grad_fn
    while fn is not None and fn.name() in ("ViewBackward0", "UnsafeViewBackward0", "AliasBackward0"):
        fn = fn.next_functions[0][0]
    return fn.name() if fn is not None else None


def _run(call, tensors, needs, backend):
    """Outputs, the route that made the first output (``_route``), and each tensor's gradient (None
    unless named in ``needs``)."""
    leaves = [t.clone().requires_grad_(name in needs) for name, t in tensors.items()]
    out = call(*leaves, backend=backend)
    first = out[0] if isinstance(out, tuple) else out
    name = _route(first)
    if needs:
        first.backward(torch.randn(first.shape, generator=torch.Generator().manual_seed(7)).to(first))
    grads = [leaf.grad for leaf in leaves]
    return out if isinstance(out, tuple) else (out,), name, grads


def _registered(monkeypatch):
    monkeypatch.setattr(_common, "plain_eager", lambda args: False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_eager_route_matches_registered_op(op, backend, monkeypatch):
    gen = torch.Generator().manual_seed(OPS.index(op))
    call, tensors = _case(op, gen)
    names = list(tensors)
    subsets = [needs for r in range(len(names) + 1) for needs in itertools.combinations(names, r)]
    if backend == "triton" and DEVICE.type != "cuda":  # the interpreter is slow; routing is the same
        subsets = [(), (names[0],), tuple(names)]
    for needs in subsets:
        with monkeypatch.context() as mp:
            _registered(mp)
            ref_out, ref_fn, ref_grads = _run(call, tensors, needs, backend)
        out, fn, grads = _run(call, tensors, needs, backend)
        if needs:
            assert fn == "_EagerFunctionBackward", (op, needs, fn)
            assert ref_fn.startswith("GeneratedBackwardFor_topk_kernels_"), (op, needs, ref_fn)
        else:
            assert fn is None and ref_fn is None
        for a, b in zip(out, ref_out):
            assert a.dtype == b.dtype and torch.equal(a, b), (op, needs)
        for name, g, ref_g in zip(names, grads, ref_grads):
            assert (g is None) == (name not in needs) == (ref_g is None), (op, needs, name)
            if g is not None:
                assert torch.equal(g, ref_g), (op, needs, name)


class _Subclass(torch.Tensor):
    pass


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", OPS)
def test_registered_op_runs_outside_plain_eager(op):
    """Function modes, autocast, tensor subclasses and the profiler (which keeps the op's name in
    its trace) take the registered op; so does a fake tensor, which only its fake rule can run."""
    call, tensors = _case(op, torch.Generator().manual_seed(3))

    def route(*leaves):
        out = call(*leaves, backend="torch")
        return _route(out[0] if isinstance(out, tuple) else out)

    leaves = [t.clone().requires_grad_() for t in tensors.values()]
    assert route(*leaves) == "_EagerFunctionBackward"
    for mode in (_PassThrough(), torch.device(DEVICE)):  # the second: a user's default device
        with mode:
            assert route(*leaves).startswith("GeneratedBackwardFor_")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=True):
        assert route(*leaves).startswith("GeneratedBackwardFor_")
    sub = [leaves[0].detach().as_subclass(_Subclass).requires_grad_(), *leaves[1:]]
    assert route(*sub).startswith("GeneratedBackwardFor_")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert route(*leaves).startswith("GeneratedBackwardFor_")
    assert any(e.key == f"topk_kernels::{op}" for e in prof.key_averages())
    if DEVICE.type == "cpu":
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the ids stay real tensors
            fake = [mode.from_tensor(t) for t in tensors.values()]
            out = call(*fake, backend="torch")
        shape = (B, M) if op.endswith("decode") else (B, K)
        assert tuple((out[0] if isinstance(out, tuple) else out).shape) == shape


def test_eager_route_under_no_grad_and_inference_mode():
    """Without gradients the eager route calls the implementation: no graph, same numbers."""
    call, tensors = _case("topk_encode", torch.Generator().manual_seed(5))
    leaves = [t.clone().requires_grad_() for t in tensors.values()]
    with_grad = call(*leaves, backend="torch")
    with torch.no_grad():
        plain = call(*leaves, backend="torch")
    with torch.inference_mode():
        inference = call(*leaves, backend="torch")
    for out in (plain, inference):
        assert out[0].grad_fn is None and not out[0].requires_grad
        assert torch.equal(out[0], with_grad[0].detach()) and torch.equal(out[1], with_grad[1])


@pytest.mark.parametrize("op", OPS)
def test_double_backward_is_refused_on_the_eager_route(op):
    """The backward ops have no autograd rule: a gradient of a gradient is an error naming that,
    never a silent differentiation of the implementation's own torch calls."""
    call, tensors = _case(op, torch.Generator().manual_seed(11))
    leaves = [t.clone().requires_grad_() for t in tensors.values()]
    out = call(*leaves, backend="torch")
    first = out[0] if isinstance(out, tuple) else out
    assert _route(first) == "_EagerFunctionBackward"
    grads = torch.autograd.grad(first.square().sum(), leaves[:2], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        sum(g.square().sum() for g in grads).backward()


def test_registered_op_under_jit_trace_forward_ad_meta_and_below_autograd():
    """States a reviewer found the first probes missed, each with what went wrong on the eager
    route: a jit trace recorded the implementation's steps fixed to the traced batch (or an
    unsaveable Python Function); forward-mode AD ran the implementation on dual tensors (an
    error inside it, where the op has no forward rule); meta tensors ran the real implementation
    (bincount failed in the backward); a call below autograd still built a graph node."""
    from torch.autograd import forward_ad

    gen = torch.Generator().manual_seed(13)
    w = torch.randn(N, M, generator=gen)
    b = torch.randn(N, generator=gen)
    f = lambda x: topk_encode(x, w, b, K, backend="torch")[0]  # noqa: E731
    with torch.no_grad():
        traced = torch.jit.trace(f, (torch.randn(5, M, generator=gen),), check_trace=False)
    assert "topk_kernels::topk_encode" in str(traced.graph)
    x = torch.randn(B + 40, M, generator=gen)
    assert torch.equal(traced(x), f(x))  # another batch size than the traced one

    acts, idx = torch.rand(B, K, generator=gen), torch.randint(0, N, (B, K), generator=gen)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(acts, torch.randn(B, K, generator=gen))
        out = sparse_decode(dual, idx, w, backend="torch")
        assert out.shape == (B, M) and torch.equal(forward_ad.unpack_dual(out).primal,
                                                    sparse_decode(acts, idx, w, backend="torch"))

    meta = [t.to("meta").requires_grad_() for t in (acts, w)]
    out = sparse_decode(meta[0], idx.to("meta"), meta[1], backend="torch")
    out.sum().backward()
    assert meta[1].grad.shape == w.shape and meta[1].grad.is_meta

    leaf = w.clone().requires_grad_()
    with torch._C._AutoDispatchBelowAutograd():
        below = sparse_decode(acts, idx, leaf, backend="torch")
    assert not below.requires_grad and below.grad_fn is None
