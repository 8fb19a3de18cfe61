"""The search step's speed-ups (issue 15) keep the search's numbers.

- the weight mixture in one autograd node (quantizers._WeightMixtureSTE; its clip check from the
  per-channel absmax on [K, C]) and the activation
  quantizers' float-kernel masks on CPU (the mixture's and QAT's PACT / symmetric clip): the same
  y and gradients, bit for bit, as the graphs they replace (written out here);
- theta once per step (quantizers.theta_cache): the same values, gradients within float rounding;
- the teacher's outputs cached per sample (batches.TeacherCache): the same targets as the
  teacher's forward, the bound and the fallbacks;
- a one-width activation site (``act_bits=(8,)``) runs that width's quantizer instead of the
  mixture node: the same y and gradients, bit for bit (the logit's gradient exactly 0 in both);
- the ``size`` cost in one batched pass (Supernet._size_cost) against the per-layer cost on every
  sample: the same value and logit gradients within float32 summation order;
- every small layer's weight mixture in one node (weight_batch.WeightMixtureBatch): the same y and
  weight gradients, bit for bit, as each layer's own node, the logits' gradients within float
  rounding; the fallbacks (a sparsity mask, a frozen layer, outside a step, a weight changed in
  the step);
- a digits-sample search (2 epochs on 256 samples) with every change against one without them:
  the same per-epoch losses (rtol 1e-5) and the same plan, with searched and with fixed 8-bit
  activations.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from plugin.engine import quantizers as q
from plugin.engine import optimisers, weight_batch
from plugin.engine.batches import TeacherCache, indexed_batches, iterate_batches

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- references



@pytest.fixture(autouse=True)
def _eager_activation_mixture(monkeypatch):
    """These tests compare the eager nodes' variants bit for bit; the compiled activation
    mixture (plugin.engine.native) sums in another order and has its own tests
    (tests/test_native_mixture.py)."""
    monkeypatch.setattr(q, "_NATIVE_MIXTURE", False)


def _per_width_weight_mixture(w, theta, scale, qmax, clipped=None):
    """The graph before _WeightMixtureSTE: the STE over all widths, times theta, summed narrowest first."""
    weighted = theta * q._SymmetricRoundSTE.apply(w.unsqueeze(0), scale, qmax)
    y = weighted[-1]
    for k in range(weighted.shape[0] - 2, -1, -1):
        y = y + weighted[k]
    return y


def _grads(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    y = fn(*leaves)
    (y * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum().backward()
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (7, 4)])
def test_weight_node_is_bit_identical(shape, clipped) -> None:
    torch.manual_seed(0)
    w = torch.randn(*shape)
    c, k = shape[0], 3
    qmax = torch.tensor([127.0, 7.0, 1.0])
    view = [k, c] + [1] * (len(shape) - 1)
    scale = (w.abs().reshape(c, -1).amax(1)[None, :] / qmax[:, None])
    if clipped:  # scales too small: some rounded values fall outside their range
        scale = scale * 0.6
    scale = scale.reshape(view)
    theta = torch.softmax(torch.randn(k, c), 0).reshape(view)
    q5 = qmax.reshape([k] + [1] * len(shape))
    new = _grads(lambda a, t: q._WeightMixtureSTE.apply(a, t, scale, q5), w, theta)
    old = _grads(lambda a, t: _per_width_weight_mixture(a, t, scale, q5), w, theta)
    for a, b in zip(new, old):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["plain", "zero", "inf", "nan"])
def test_weight_mixture_clip_check_from_absmax(case, monkeypatch) -> None:
    """The quantizer tells the node whether any rounded value lies outside its range from
    ``round(max|w| / s)`` on [K, C]: the same y and gradients as the node's own K x |w| check."""
    torch.manual_seed(1)
    quant = q.SearchableWeightQuantizer(6, (0, 2, 4, 8), ch_axis=0, temperature=0.8)
    with torch.no_grad():
        quant.alpha.alpha.normal_()
    w = torch.randn(6, 4, 3, 3)
    if case == "zero":
        w[2] = 0.0
    elif case == "inf":
        w[1, 0, 0, 0] = float("inf")
    elif case == "nan":
        w[3, 1, 1, 1] = float("nan")
    seen = []
    node = q._WeightMixtureSTE.apply

    def own_check(w_, theta, scale, qmax, clipped=None):
        seen.append(clipped)
        return node(w_, theta, scale, qmax)

    def run():
        quant.alpha.alpha.grad = None
        return _grads(quant, w) + [quant.alpha.alpha.grad.clone()]

    given = run()
    monkeypatch.setattr(q._WeightMixtureSTE, "apply", staticmethod(own_check))
    checked = run()
    assert seen == [case == "inf"]  # an infinite weight's channel clips (its scale falls back to 1)
    for a, b in zip(given, checked):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("signed", [False, True])
def test_activation_float_masks_are_bit_identical(signed, monkeypatch) -> None:
    torch.manual_seed(3)
    quant = q.SearchableActivationQuantizer((2, 4, 8), signed=signed, init_clip=1.3, temperature=0.7)
    with torch.no_grad():
        quant.alpha.alpha.normal_()
    x = torch.randn(4, 5, 6, 6) * 2
    x[0, 0, 0, :6] = torch.tensor([1.3, -1.3, 0.0, -0.0, 1.2999999, -1.3000001])  # the edges

    def run():
        for p in quant.parameters():
            p.grad = None
        out = _grads(quant, x)
        return out + [p.grad.clone() for p in quant.parameters()]

    fast = run()
    monkeypatch.setattr(q, "_FLOAT_MASKS_ON_CPU", False)
    masks = run()
    assert len(fast) == len(masks) == 4  # y, x, alpha, clip
    for a, b in zip(fast, masks):
        assert torch.equal(a, b)
    if torch.set_flush_denormal(True):  # denormals flushed: the fallback selection, same numbers
        try:
            monkeypatch.setattr(q, "_FLOAT_MASKS_ON_CPU", True)
            flushed = run()
        finally:
            torch.set_flush_denormal(False)
        for a, b in zip(flushed, masks):
            assert torch.equal(a, b)


@pytest.mark.parametrize("signed", [False, True])
def test_frozen_activation_float_masks_are_bit_identical(signed, monkeypatch) -> None:
    """The QAT quantizers (PACT / symmetric clip at one width): the same y and gradients."""
    quant = q.FrozenActivationQuantizer(4, signed=signed, init_clip=1.3)
    x = torch.randn(4, 5, 6, 6) * 2
    x[0, 0, 0, :4] = torch.tensor([1.3, -1.3, 0.0, -0.0])

    def run():
        quant.clip.grad = None
        return _grads(quant, x) + [quant.clip.grad.clone()]

    fast = run()
    monkeypatch.setattr(q, "_FLOAT_MASKS_ON_CPU", False)
    for a, b in zip(fast, run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [8, 2])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("float_masks", [True, False])
def test_single_width_activation_is_the_mixture_bit_for_bit(signed, bits, float_masks, monkeypatch) -> None:
    monkeypatch.setattr(q, "_FLOAT_MASKS_ON_CPU", float_masks)
    torch.manual_seed(4)
    quant = q.SearchableActivationQuantizer((bits,), signed=signed, init_clip=1.3, temperature=0.7)
    x = torch.randn(4, 5, 6, 6) * 2
    x[0, 0, 0, :6] = torch.tensor([1.3, -1.3, 0.0, -0.0, 1.2999999, -1.3000001])

    def run(shortcut: bool):
        monkeypatch.setattr(q, "_SINGLE_WIDTH_SHORTCUT", shortcut)
        for p in quant.parameters():
            p.grad = None
        out = _grads(quant, x)
        return out, quant.clip.grad.clone(), quant.alpha.alpha.grad

    (y, gx), gclip, galpha = run(True)
    (y0, gx0), gclip0, galpha0 = run(False)
    assert torch.equal(y, y0) and torch.equal(gx, gx0) and torch.equal(gclip, gclip0)
    assert torch.equal(galpha0, torch.zeros_like(galpha0)) and torch.equal(galpha, galpha0)
    assert torch.equal(quant.quant(x).y, y)  # quant() runs the same path
    assert torch.equal(y, q._activation_quantize(x, quant.clip, bits, signed).y)  # the frozen quantizer's y


def _sample_supernet(sample: str, act_bits=None, **overrides):
    from graph_passes.prepare import prepare_model
    from plugin.engine import supernet as sn
    from plugin.engine.config import SearchConfig
    from plugin.space import Precisions, SearchSpace

    prepared = prepare_model(str(ROOT / "samples" / sample / "model.onnx"))
    config = SearchConfig(batch_size=64, progress=False, seed=0, act_bits=act_bits, **overrides)
    space = SearchSpace(prepared.analysis, Precisions(config.weight_precisions, config.site_precisions))
    return sn.Supernet.build(prepared.model, config, space=space)


def _cost_and_grads(net, batched: bool, monkeypatch):
    from plugin.engine import supernet as sn

    monkeypatch.setattr(sn, "_VECTORISED_SIZE_COST", batched)
    params = net.nas_parameters()
    for p in params:
        p.grad = None
    with q.theta_cache():
        cost = net.cost("size")
        assert cost.requires_grad and cost.ndim == 0
        (cost * 3.0).backward()
    return cost.detach(), [p.grad for p in params]


@pytest.mark.parametrize("sample", ["digits", "mnist1d", "sequence", "transformer"])
def test_batched_size_cost_is_the_per_layer_cost(sample, monkeypatch) -> None:
    torch.manual_seed(5)
    net = _sample_supernet(sample)
    with torch.no_grad():  # logits away from the start, some columns likely pruned
        for alpha in net.alphas:
            alpha.alpha.normal_(0.0, 1.5)
    layout = net._size_layout(torch.device("cpu"))
    assert layout is not None and int(layout.out_columns.numel()) == sum(len(e.info.columns) for e in net._layers.values())
    for ordered in (0.0, 0.5):
        net.set_ordered_cost(ordered)
        for temperature in (1.0, 0.3):
            net.set_temperature(temperature)
            fast, fast_grads = _cost_and_grads(net, True, monkeypatch)
            slow, slow_grads = _cost_and_grads(net, False, monkeypatch)
            torch.testing.assert_close(fast, slow, rtol=2e-6, atol=0.0)
            for p, a, b in zip(net.nas_parameters(), fast_grads, slow_grads):
                if b is None:  # a site's logits (the size model does not read activations)
                    assert a is None or not bool(a.any())
                    continue
                assert a is not None
                # the softmax backward cancels: small entries carry the large ones' rounding
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    # a quantizer at another temperature than the supernet's: the per-layer cost, same value
    entry = next(iter(net._layers.values()))
    entry.quantizer.temperature = 0.5
    assert net._size_cost() is None
    torch.testing.assert_close(_cost_and_grads(net, True, monkeypatch)[0], _cost_and_grads(net, False, monkeypatch)[0])


def test_theta_cache_shares_one_tensor_per_step() -> None:
    torch.manual_seed(0)
    alpha = q.SharedAlpha((0, 2, 4, 8), 5)
    w1 = q.SearchableWeightQuantizer(5, (0, 2, 4, 8), alpha=alpha)
    w2 = q.SearchableWeightQuantizer(5, (0, 2, 4, 8), alpha=alpha, channel_to_group_index=torch.tensor([4, 3, 2, 1, 0]))
    with torch.no_grad():
        alpha.alpha.normal_()
    x = torch.randn(5, 3)

    def loss():
        return (w1(x) * 2).sum() + (w2(x) ** 2).sum() + w1.expected_bit_width().sum()

    plain = torch.autograd.grad(loss(), alpha.alpha)[0]
    with q.theta_cache():
        assert alpha.theta(1.0) is alpha.theta(1.0)
        assert w1.theta() is w1.theta()
        assert alpha.theta(0.5) is not alpha.theta(1.0)
        cached = torch.autograd.grad(loss(), alpha.alpha)[0]
        with torch.no_grad():
            alpha.alpha.add_(0.1)  # a step: the next theta is new
        assert torch.equal(alpha.theta(1.0), alpha._theta(1.0)) and alpha.theta(1.0) is alpha.theta(1.0)
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-6)  # float32 summation order
    assert alpha.theta(1.0) is not alpha.theta(1.0)  # outside the block: computed every call


# ----------------------------------------------------------------------------- teacher cache


class _Data:
    """A minimal Dataset: arrays, labels, batch_indices, len."""

    def __init__(self, n: int, per_sample: bool = False) -> None:
        self.arrays = {"x": np.random.default_rng(0).standard_normal((n, 3)).astype(np.float32)}
        self.labels = None
        self.per_sample = per_sample

    def __len__(self) -> int:
        return len(self.arrays["x"])

    def batch_indices(self, batch_size, shuffle=False, seed=0):
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size]


def test_teacher_cache_reads_back_what_the_teacher_computed() -> None:
    data = _Data(50)
    layer = torch.nn.Linear(3, 4)
    calls = []

    def teacher(x):
        calls.append(len(x))
        with torch.no_grad():
            return layer(x), layer(x).sum(1, keepdim=True)

    cache = TeacherCache.for_data(teacher, data)
    for epoch in range(3):
        batches = list(indexed_batches(data, ["x"], 16, epoch, torch.device("cpu")))
        plain = [b for b in iterate_batches(data, ["x"], 16, epoch, torch.device("cpu"))]
        for (indices, (inputs, _)), (inputs2, _) in zip(batches, plain):
            assert torch.equal(inputs[0], inputs2[0])
            got = cache(indices, inputs)
            want = teacher(*inputs)
            assert isinstance(got, tuple) and len(got) == 2
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert cache.misses == 4 and cache.hits == 8  # 4 batches per epoch, computed in the first only
    assert cache.nbytes == 50 * 5 * 4


def test_teacher_cache_bound_and_fallbacks(monkeypatch) -> None:
    data = _Data(20)
    teacher = lambda x: x * 2  # noqa: E731
    small = TeacherCache.for_data(teacher, data, max_bytes=100)  # 20 x 3 floats do not fit
    for _ in range(2):
        for indices, (inputs, _) in indexed_batches(data, ["x"], 8, 0, torch.device("cpu")):
            assert torch.equal(small(indices, inputs), inputs[0] * 2)
    assert not small.enabled and small.hits == 0
    monkeypatch.setenv("PRUNEQUANT_TEACHER_CACHE_MB", "0")
    assert not TeacherCache.for_data(teacher, data).enabled
    sequence = [np.ones((4, 3), np.float32)]
    off = TeacherCache.for_data(teacher, sequence)
    (indices, (inputs, _)), = indexed_batches(sequence, ["x"], 4, 0, torch.device("cpu"))
    assert indices is None and torch.equal(off(indices, inputs), inputs[0] * 2)
    per = TeacherCache.for_data(teacher, _Data(3, per_sample=True), max_bytes=1 << 20)
    x = torch.ones(1, 3)
    first = per(np.array([1]), (x,))
    assert per(np.array([1]), (x * 5,)) is first and per.hits == 1


# ----------------------------------------------------------------------------- a digits search


class _PerWidthActivationMixture:
    """The activation mixture as the per-width sum ``sum_j theta_j * Q_j(x)`` of the one-width
    straight-through quantizers (the reference the one-node mixture replaces)."""

    @staticmethod
    def apply(x, clip, theta, levels, signed):
        ste = q._SymmetricClipSTE if signed else q._PactSTE
        return sum(theta[j] * ste.apply(x, clip, n) for j, n in enumerate(levels))


def _digits_search(fast: bool, monkeypatch, act_bits=None) -> tuple[list[float], dict]:
    from graph_passes.prepare import prepare_model
    from plugin.data import Dataset
    from plugin.engine import supernet as sn
    from plugin.engine.config import SearchConfig
    from plugin.space import Precisions, SearchSpace

    with monkeypatch.context() as m:
        if not fast:  # every speed-up off: per-width weight graph, bool masks, no caches
            m.setattr(q, "_FLOAT_MASKS_ON_CPU", False)
            m.setattr(q._WeightMixtureSTE, "apply", staticmethod(_per_width_weight_mixture))
            m.setattr(sn, "theta_cache", contextlib.nullcontext)
            m.setenv("PRUNEQUANT_TEACHER_CACHE_MB", "0")
            m.setattr(q, "_SINGLE_WIDTH_SHORTCUT", False)
            m.setattr(sn, "_VECTORISED_SIZE_COST", False)
            m.setattr(weight_batch, "ENABLED", False)
            m.setattr(optimisers, "FUSED", False)
            m.setattr(q, "_ActivationMixtureSTE", _PerWidthActivationMixture)
        torch.manual_seed(0)
        prepared = prepare_model(str(ROOT / "samples/digits/model.onnx"))
        z = np.load(ROOT / "samples/digits/train.npz")
        name = prepared.model.graph.input[0].name
        data = Dataset({name: z["input"][:256].astype(np.float32)}, None)
        config = SearchConfig(batch_size=64, progress=False, seed=0, lam=300.0, epochs=2, act_bits=act_bits)
        space = SearchSpace(prepared.analysis, Precisions(config.weight_precisions, config.site_precisions))
        net = sn.Supernet.build(prepared.model, config, space=space)
        runner = sn.SearchRunner(net, data, config)
        losses = [runner.run_epoch(config.lam).task_loss for _ in range(config.epochs)]
        cache = getattr(runner, "_teacher_cache", None)
        assert (cache is not None and cache.hits == 4) == fast  # epoch 2 read every target back
        plan = net.discretise(with_scales=False)
    return losses, {k: tuple(v.bits) for k, v in plan.layers.items()} | {
        k: v.bits for k, v in plan.activations.items()}


@pytest.mark.parametrize("act_bits", [None, (8,)])
def test_digits_search_same_losses_and_plan(act_bits, monkeypatch) -> None:
    torch.set_num_threads(1)
    fast_losses, fast_plan = _digits_search(True, monkeypatch, act_bits)
    slow_losses, slow_plan = _digits_search(False, monkeypatch, act_bits)
    np.testing.assert_allclose(fast_losses, slow_losses, rtol=1e-5)
    assert fast_plan == slow_plan


# ----------------------------------------------------------------------------- weight mixtures in one node


@pytest.mark.parametrize("clipped", [False, True])
def test_batched_weight_node_is_each_layers_node(clipped) -> None:
    torch.manual_seed(3)
    shapes = [(6, 5, 3, 3), (7, 4), (3, 1, 3, 3), (5, 2, 1, 1)]
    k = 3
    qmax = torch.tensor([127.0, 7.0, 1.0])
    weights = [torch.randn(*shape) for shape in shapes]
    scales = [w.abs().reshape(w.shape[0], -1).amax(1)[None, :] / qmax[:, None] * (0.6 if clipped else 1.0)
              for w in weights]
    thetas = [torch.softmax(torch.randn(k, w.shape[0]), 0) for w in weights]
    probes = [torch.linspace(-1, 2, w.numel()).reshape(w.shape) for w in weights]

    def per_layer():
        leaves_w = [w.clone().requires_grad_(True) for w in weights]
        leaves_t = [t.clone().requires_grad_(True) for t in thetas]
        ys = []
        for w, t, s in zip(leaves_w, leaves_t, scales):
            view = [k, w.shape[0]] + [1] * (w.ndim - 1)
            ys.append(q._WeightMixtureSTE.apply(w, t.reshape(view), s.reshape(view), qmax.reshape([k] + [1] * w.ndim)))
        sum((y * p).sum() for y, p in zip(ys, probes)).backward()
        return [y.detach() for y in ys], [w.grad for w in leaves_w], [t.grad for t in leaves_t]

    def batched():
        leaves_w = [w.clone().requires_grad_(True) for w in weights]
        leaves_t = [t.clone().requires_grad_(True) for t in thetas]
        layout = tuple((w.shape[0], w.numel() // w.shape[0]) for w in weights)
        ys = weight_batch._BatchedMixtureSTE.apply(torch.cat(leaves_t, 1), torch.cat(scales, 1), qmax.reshape(-1, 1),
                                                   clipped, layout, *leaves_w)
        sum((y * p).sum() for y, p in zip(ys, probes)).backward()
        return [y.detach() for y in ys], [w.grad for w in leaves_w], [t.grad for t in leaves_t]

    (y0, gw0, gt0), (y1, gw1, gt1) = per_layer(), batched()
    for a, b in zip(y0 + gw0, y1 + gw1):
        assert a.shape == b.shape and torch.equal(a, b)
    for a, b in zip(gt0, gt1):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)


def _step_grads(net, x, enabled: bool, monkeypatch):
    monkeypatch.setattr(weight_batch, "ENABLED", enabled)
    net.zero_grad(set_to_none=True)
    with q.theta_cache():
        out = net(x)
        ((out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum() + net.cost("size")).backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sample", ["digits", "mnist1d"])
def test_weight_batch_in_a_step_is_each_layers_mixture(sample, monkeypatch) -> None:
    torch.manual_seed(4)
    net = _sample_supernet(sample)
    with torch.no_grad():
        for alpha in net.alphas:
            alpha.alpha.normal_(0.0, 1.0)
    batch = next(iter(net._layers.values())).quantizer.__dict__["_weight_batch"]
    with q.theta_cache():
        assert len(batch._compute()) == len(batch.members) > 1  # every layer in the node
    z = np.load(ROOT / "samples" / sample / "train.npz")
    x = torch.as_tensor(z["input"][:32].astype(np.float32))
    (out1, g1), (out0, g0) = _step_grads(net, x, True, monkeypatch), _step_grads(net, x, False, monkeypatch)
    assert torch.equal(out1, out0) and g1.keys() == g0.keys()
    for name, grad in g0.items():
        if "alpha" in name:  # the logits' gradient: the same sum in another order
            torch.testing.assert_close(g1[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()))
        else:
            assert torch.equal(g1[name], grad), name


def test_weight_batch_fallbacks(monkeypatch) -> None:
    torch.manual_seed(6)
    net = _sample_supernet("digits")
    entries = list(net._layers.values())
    batch = entries[0].quantizer.__dict__["_weight_batch"]
    first, second = entries[0], entries[1]
    raw = net._raw(first, first.weight_attr)
    assert batch.lookup(first.quantizer, raw) is None  # outside a step: each layer its own
    assert batch.keep_mass(first.quantizer) is None
    with q.theta_cache():  # the bias gates' factors: the per-layer values, bit for bit
        for entry in entries:
            quant = entry.quantizer
            if 0 in quant.precisions:
                assert torch.equal(batch.keep_mass(quant), 1 - quant.theta()[quant.precisions.index(0)])
    with q.theta_cache():
        y = batch.lookup(first.quantizer, raw)
        assert y is not None and torch.equal(y, first.quantizer._mixture(raw, y_only=True).y)
        assert batch.lookup(first.quantizer, raw.detach().clone()) is None  # not the layer's own weight
        with torch.no_grad():
            raw.mul_(1.5)  # the weights moved within the block: the batch is computed again
        y2 = batch.lookup(first.quantizer, raw)
        assert y2 is not y and torch.equal(y2, first.quantizer._mixture(raw, y_only=True).y)
    second.sparsity_mask.set(0.5, None)  # a masked layer keeps its own node
    first.quantizer.freeze([8] * first.quantizer.c_out)  # so does a frozen one
    with q.theta_cache():
        computed = batch._compute()
    assert id(second.quantizer) not in computed and id(first.quantizer) not in computed
    assert len(computed) == len(batch.members) - 2


@pytest.mark.parametrize("clip", [3.0, 1e-8, -0.5])
@pytest.mark.parametrize("signed", [False, True])
def test_activation_forward_floors_the_clip_inside_the_node(clip, signed) -> None:
    """The activation quantizers' forward passes the raw clip and floors it at _MIN_CLIP inside the
    autograd function (no graph for the floor; QAT's forward builds no scale / zero-point / bits
    tensors): the same y and gradients, bit for bit, as flooring it outside as before."""
    torch.manual_seed(2)
    x = torch.randn(4, 6, 3) * 2 + (0.0 if signed else 1.0)
    probe = torch.linspace(-1, 2, x.numel()).reshape(x.shape)

    def run(fn, clip_param):
        xs = x.clone().requires_grad_(True)
        y = fn(xs, clip_param)
        (y * probe).sum().backward()
        return y.detach(), xs.grad, clip_param.grad

    def positive(c):  # the floor outside the node, as before: the gradient passes unchanged
        return c + (c.clamp_min(q._MIN_CLIP) - c).detach()

    ste, n4 = (q._SymmetricClipSTE, 7) if signed else (q._PactSTE, 15)
    frozen = q.FrozenActivationQuantizer(4, signed=signed, init_clip=1.0)
    fixed = (q.SymmetricClipQuantizer if signed else q.PACTQuantizer)(4, init_clip=1.0)
    one = q.SearchableActivationQuantizer((8,), signed=signed, init_clip=1.0)
    mix = q.SearchableActivationQuantizer((2, 4, 8), signed=signed, init_clip=1.0)
    levels = tuple(2 ** (b - 1) - 1 if signed else 2 ** b - 1 for b in mix.precisions)
    n8 = 127 if signed else 255
    cases = [
        (frozen, lambda a, c: ste.apply(a, positive(c), n4)),
        (fixed, lambda a, c: ste.apply(a, positive(c), n4)),
        (one, lambda a, c: q._OneWidthMixtureSTE.apply(a, positive(c), one.alpha.alpha, n8, signed)),
        (mix, lambda a, c: q._ActivationMixtureSTE.apply(a, positive(c), mix.theta(), levels, signed)),
    ]
    for module, reference in cases:
        with torch.no_grad():
            module.clip.fill_(clip)
        module.clip.grad = None
        new = run(lambda a, _c: module(a), module.clip)
        module.clip.grad = None
        old = run(reference, module.clip)
        for a, b in zip(new, old):
            assert torch.equal(a, b), type(module).__name__
        if module in (frozen, fixed):  # quant() too: the same y, and the scale of the floored clip
            out = module.quant(x.clone())
            assert torch.equal(out.y, new[0]) and torch.equal(out.scale, positive(module.clip).detach() / n4)
