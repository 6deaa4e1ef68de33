"""The checks of nflows' own test suite (bayesiains/nflows, tests/), run on fusedlayers' classes.

Written for this project; each test names the nflows test it mirrors:
- tests/transforms/transform_test.py, `TransformTest`: `assert_tensor_is_good` -> `assert_good`,
  `assert_forward_inverse_are_consistent` -> `assert_round_trip` (inverse then forward is the identity with a
  log-det of 0). nflows' `assertEqual` with `eps` is an absolute tolerance: here `atol=eps, rtol=0`.
- tests/transforms/autoregressive_test.py, `MaskedAffineAutoregressiveTransformTest` (test_forward,
  test_inverse, test_forward_inverse_are_consistent) -> `test_maf_*`.
- tests/transforms/made_test.py, `ShapeTest` (test_conditional, test_unconditional) and `ConnectivityTest`
  (test_gradients, test_total_mask_sequential, test_total_mask_random) -> `test_made_*`.
- tests/transforms/coupling_test.py, `AffineTransformTest` (test_forward, test_inverse,
  test_forward_inverse_are_consistent) -> `test_affine_coupling_*`.
- tests/flows/base_test.py, `FlowTest` (test_log_prob, test_sample, test_sample_and_log_prob,
  test_sample_and_log_prob_with_context, test_transform_to_noise) -> `test_flow_*`.
- tests/transforms/base_test.py, `CompositeTransformTest` and `InverseTransformTest` -> `test_composite_*`,
  `test_inverse_transform_*`; tests/transforms/permutations_test.py, `PermutationTest` -> `test_permutation_*`.
- tests/distributions/normal_test.py, `StandardNormalTest` -> `test_standard_normal_*`; and the behaviour of
  nflows' `Distribution` base class that `Flow` inherits (`sample(..., batch_size)`, the row-count check of
  `log_prob`), which its tests do not exercise -> `test_flow_sample_in_batches`, `test_flow_log_prob_rows`.

Where nflows' test is weaker than it means to be, the check here is the intended one (noted at the test):
nflows' coupling `test_inverse` calls forward, and its MADE gradient test accumulates input gradients over
outputs. Beyond nflows' suite, `test_*_logabsdet_is_log_det_jacobian` checks log-dets against autograd Jacobians.
nflows' conditioners (`ResidualNet`, `ConvResidualNet`) build the coupling networks: our coupling takes any
network, as nflows' does. nflows' `AffineScalarTransform` has no equivalent in fusedlayers: `ScaleBy` stands in.
"""

import math

import pytest
import torch
from nflows.nn.nets import ConvResidualNet, ResidualNet

from fusedlayers import flows as fl
from fusedlayers.flows.made import MADE, MaskedFeedforwardBlock, MaskedResidualBlock

# nflows' MADE variants: (use_residual_blocks, random_mask); residual blocks cannot have random masks.
MADE_VARIANTS = {"feedforward": (False, False), "feedforward-random-mask": (False, True), "residual": (True, False)}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def assert_good(tensor, shape):
    """A tensor of the given shape without NaN or inf."""
    assert isinstance(tensor, torch.Tensor)
    assert torch.isfinite(tensor).all()
    assert tensor.shape == torch.Size(shape)


def assert_round_trip(transform, inputs, eps, logdet_eps=None):
    identity = fl.CompositeTransform([fl.InverseTransform(transform), transform])
    outputs, logabsdet = identity(inputs)
    assert_good(outputs, inputs.shape)
    assert_good(logabsdet, inputs.shape[:1])
    torch.testing.assert_close(outputs, inputs, rtol=0, atol=eps)
    torch.testing.assert_close(logabsdet, torch.zeros(inputs.shape[:1]), rtol=0, atol=logdet_eps or eps)


class ScaleBy(fl.Transform):
    """y = scale * x on tensors of any shape; log|det| = (elements per row) * log|scale|."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def _apply(self, inputs, scale):
        per_row = inputs[0].numel()
        return inputs * scale, inputs.new_full(inputs.shape[:1], per_row * math.log(abs(scale)))

    def forward(self, inputs, context=None):
        return self._apply(inputs, self.scale)

    def inverse(self, inputs, context=None):
        return self._apply(inputs, 1.0 / self.scale)


def jacobian_logdet(fn, row):
    return torch.linalg.slogdet(torch.autograd.functional.jacobian(fn, row))[1]


# --------------------------------------------------------------------------------------------------------------
# tests/transforms/autoregressive_test.py: MaskedAffineAutoregressiveTransformTest


def make_maf(variant, features=20):
    residual, random_mask = MADE_VARIANTS[variant]
    return fl.MaskedAffineAutoregressiveTransform(features=features, hidden_features=30, num_blocks=5,
                                                  use_residual_blocks=residual, random_mask=random_mask)


@pytest.mark.parametrize("variant", list(MADE_VARIANTS))
@pytest.mark.parametrize("method", ["forward", "inverse"])
def test_maf_forward_and_inverse_shapes(variant, method):  # test_forward, test_inverse
    inputs = torch.randn(10, 20)
    outputs, logabsdet = getattr(make_maf(variant), method)(inputs)
    assert_good(outputs, [10, 20])
    assert_good(logabsdet, [10])


@pytest.mark.parametrize("variant", list(MADE_VARIANTS))
def test_maf_forward_inverse_are_consistent(variant):  # test_forward_inverse_are_consistent, eps 1e-6
    # The log-dets to 4e-6: with gradients recorded, our forward is the fused C++ pass and our inverse the
    # composed one, and each rounds its float32 sum of 20 log-scales (about -7) on its own, about 1e-6 each
    # (measured against float64); nflows' 1e-6 holds there only because both directions run the same ops.
    assert_round_trip(make_maf(variant), torch.randn(10, 20), eps=1e-6, logdet_eps=4e-6)


@pytest.mark.parametrize("variant", list(MADE_VARIANTS))
@pytest.mark.parametrize("method", ["forward", "inverse"])
def test_maf_logabsdet_is_log_det_jacobian(variant, method):  # beyond nflows' suite
    maf = make_maf(variant, features=6).double()
    with torch.no_grad():
        for p in maf.parameters():
            p.add_(0.1 * torch.randn_like(p))  # move the residual branches off their near-zero start
    inputs = torch.randn(3, 6, dtype=torch.float64)
    _, logabsdet = getattr(maf, method)(inputs)
    for b in range(3):
        expected = jacobian_logdet(lambda row: getattr(maf, method)(row[None])[0][0], inputs[b])
        torch.testing.assert_close(logabsdet[b], expected, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------------------------
# tests/transforms/made_test.py: ShapeTest and ConnectivityTest


@pytest.mark.parametrize("variant", list(MADE_VARIANTS))
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_made_output_shape(variant, conditional):  # ShapeTest.test_conditional, test_unconditional
    residual, random_mask = MADE_VARIANTS[variant]
    model = MADE(features=100, hidden_features=200, num_blocks=5, output_multiplier=3,
                 context_features=50 if conditional else None, use_residual_blocks=residual,
                 random_mask=random_mask)
    inputs = torch.randn(16, 100)
    outputs = model(inputs, torch.randn(16, 50)) if conditional else model(inputs)
    assert outputs.dim() == 2 and outputs.shape == (16, 300)


@pytest.mark.parametrize("variant", list(MADE_VARIANTS))
def test_made_outputs_get_no_gradient_from_their_own_or_later_inputs(variant):  # ConnectivityTest.test_gradients
    # nflows lets the input gradient accumulate over outputs; here each output's own gradient is checked.
    residual, random_mask = MADE_VARIANTS[variant]
    features, multiplier = 10, 3
    model = MADE(features=features, hidden_features=256, num_blocks=20, output_multiplier=multiplier,
                 use_residual_blocks=residual, random_mask=random_mask)
    inputs = torch.randn(1, features, requires_grad=True)
    outputs = model(inputs)
    for k in range(features * multiplier):
        (grad,) = torch.autograd.grad(outputs[0, k], inputs, retain_graph=True)
        dim = k // multiplier
        assert torch.all(grad[0, dim:] == 0), f"output {k} (feature {dim}) depends on input {dim} or later"


def total_mask(model):
    """Product of the layers' masks (residual skips left out, as nflows' test does), then > 0."""
    mask = model.initial_layer.mask
    for block in model.blocks:
        if isinstance(block, MaskedResidualBlock):
            mask = block.linear_layers[1].mask @ (block.linear_layers[0].mask @ mask)
        else:
            assert isinstance(block, MaskedFeedforwardBlock)
            mask = block.linear.mask @ mask
    return (model.final_layer.mask @ mask > 0).float()


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "feedforward"])
def test_made_total_mask_sequential(residual):  # ConnectivityTest.test_total_mask_sequential
    model = MADE(features=10, hidden_features=50, num_blocks=5, output_multiplier=1,
                 use_residual_blocks=residual, random_mask=False)
    expected_type = MaskedResidualBlock if residual else MaskedFeedforwardBlock
    assert all(isinstance(block, expected_type) for block in model.blocks)
    assert torch.equal(total_mask(model), torch.tril(torch.ones(10, 10), -1))


def test_made_total_mask_random():  # ConnectivityTest.test_total_mask_random
    model = MADE(features=10, hidden_features=50, num_blocks=5, output_multiplier=1,
                 use_residual_blocks=False, random_mask=True)
    assert torch.equal(torch.triu(total_mask(model)), torch.zeros(10, 10))


# --------------------------------------------------------------------------------------------------------------
# tests/transforms/coupling_test.py: AffineTransformTest

COUPLING_SHAPES = {"vector": [20], "image": [2, 4, 4]}


def mid_split_mask(features):
    """Ones on the first ceil(features / 2) features (those transformed), zeros after."""
    mask = torch.zeros(features, dtype=torch.long)
    mask[:(features + 1) // 2] = 1
    return mask


def make_coupling(shape):
    if len(shape) == 1:
        def create_net(in_features, out_features):
            return ResidualNet(in_features, out_features, hidden_features=30, num_blocks=5)
    else:
        def create_net(in_channels, out_channels):
            return ConvResidualNet(in_channels=in_channels, out_channels=out_channels, hidden_channels=16)
    mask = mid_split_mask(shape[0])
    return fl.AffineCouplingTransform(mask=mask, transform_net_create_fn=create_net), mask


@pytest.mark.parametrize("shape", list(COUPLING_SHAPES))
@pytest.mark.parametrize("method", ["forward", "inverse"])
def test_affine_coupling_keeps_identity_features(shape, method):  # test_forward, test_inverse
    # nflows' test_inverse calls the forward direction; here each method is called.
    shape = COUPLING_SHAPES[shape]
    inputs = torch.randn(10, *shape)
    transform, mask = make_coupling(shape)
    outputs, logabsdet = getattr(transform, method)(inputs)
    assert_good(outputs, [10] + shape)
    assert_good(logabsdet, [10])
    torch.testing.assert_close(outputs[:, mask <= 0, ...], inputs[:, mask <= 0, ...], rtol=0, atol=0)
    assert not torch.allclose(outputs[:, mask > 0, ...], inputs[:, mask > 0, ...])


@pytest.mark.parametrize("shape", list(COUPLING_SHAPES))
def test_affine_coupling_forward_inverse_are_consistent(shape):  # test_forward_inverse_are_consistent
    shape = COUPLING_SHAPES[shape]
    transform, _ = make_coupling(shape)
    assert_round_trip(transform, torch.randn(10, *shape), eps=1e-6)


@pytest.mark.parametrize("method", ["forward", "inverse"])
def test_affine_coupling_logabsdet_is_log_det_jacobian(method):  # beyond nflows' suite
    transform, _ = make_coupling([6])
    transform.double()
    inputs = torch.randn(3, 6, dtype=torch.float64)
    _, logabsdet = getattr(transform, method)(inputs)
    for b in range(3):
        expected = jacobian_logdet(lambda row: getattr(transform, method)(row[None])[0][0], inputs[b])
        torch.testing.assert_close(logabsdet[b], expected, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------------------------
# tests/flows/base_test.py: FlowTest (input shape [2, 3, 4], context shape [5, 6])

INPUT_SHAPE = [2, 3, 4]
CONTEXT_SHAPE = [5, 6]


def make_flow():
    return fl.Flow(transform=ScaleBy(2.0), distribution=fl.StandardNormal(INPUT_SHAPE))


@pytest.mark.parametrize("with_context", [False, True], ids=["unconditional", "conditional"])
def test_flow_log_prob_shape(with_context):  # test_log_prob
    context = torch.randn(10, *CONTEXT_SHAPE) if with_context else None
    log_prob = make_flow().log_prob(torch.randn(10, *INPUT_SHAPE), context=context)
    assert isinstance(log_prob, torch.Tensor) and log_prob.shape == (10,)


@pytest.mark.parametrize("with_context", [False, True], ids=["unconditional", "conditional"])
def test_flow_sample_shape(with_context):  # test_sample
    context = torch.randn(20, *CONTEXT_SHAPE) if with_context else None
    samples = make_flow().sample(10, context=context)
    expected = [10] + INPUT_SHAPE if context is None else [20, 10] + INPUT_SHAPE
    assert isinstance(samples, torch.Tensor) and samples.shape == torch.Size(expected)


def test_flow_sample_and_log_prob():  # test_sample_and_log_prob
    flow = make_flow()
    samples, log_prob = flow.sample_and_log_prob(10)
    assert samples.shape == torch.Size([10] + INPUT_SHAPE) and log_prob.shape == (10,)
    torch.testing.assert_close(log_prob, flow.log_prob(samples))


def test_flow_sample_and_log_prob_with_context():  # test_sample_and_log_prob_with_context
    samples, log_prob = make_flow().sample_and_log_prob(10, context=torch.randn(20, *CONTEXT_SHAPE))
    assert samples.shape == torch.Size([20, 10] + INPUT_SHAPE) and log_prob.shape == (20, 10)


@pytest.mark.parametrize("with_context", [False, True], ids=["unconditional", "conditional"])
def test_flow_transform_to_noise_shape(with_context):  # test_transform_to_noise
    # As in nflows' test, the context has another batch size: the transform ignores it.
    context = torch.randn(20, *CONTEXT_SHAPE) if with_context else None
    noise = make_flow().transform_to_noise(torch.randn(10, *INPUT_SHAPE), context=context)
    assert noise.shape == torch.Size([10] + INPUT_SHAPE)


@pytest.mark.parametrize("with_context", [False, True], ids=["unconditional", "conditional"])
def test_flow_of_a_maf_sample_and_log_prob(with_context):  # test_sample_and_log_prob with our MAF layer
    context_features = 3 if with_context else None
    flow = fl.Flow(fl.CompositeTransform([
        fl.MaskedAffineAutoregressiveTransform(4, 16, context_features=context_features),
        fl.ReversePermutation(4),
        fl.MaskedAffineAutoregressiveTransform(4, 16, context_features=context_features)]),
        fl.StandardNormal([4]))
    context = torch.randn(5, 3) if with_context else None
    samples, log_prob = flow.sample_and_log_prob(10, context=context)
    if context is None:
        assert samples.shape == (10, 4) and log_prob.shape == (10,)
        torch.testing.assert_close(log_prob, flow.log_prob(samples), rtol=1e-4, atol=1e-4)
    else:
        assert samples.shape == (5, 10, 4) and log_prob.shape == (5, 10)
        expected = flow.log_prob(samples.reshape(50, 4), context.repeat_interleave(10, dim=0))
        torch.testing.assert_close(log_prob, expected.reshape(5, 10), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# tests/transforms/base_test.py: CompositeTransformTest, InverseTransformTest


@pytest.mark.parametrize("method", ["forward", "inverse"])
def test_composite_equals_the_product_of_its_scales(method):  # CompositeTransformTest.test_forward, test_inverse
    inputs = torch.randn(10, *INPUT_SHAPE)
    composite = fl.CompositeTransform([ScaleBy(2.0), fl.CompositeTransform([]), ScaleBy(0.25)])
    outputs, logabsdet = getattr(composite, method)(inputs)
    expected, expected_logabsdet = getattr(ScaleBy(0.5), method)(inputs)
    assert_good(outputs, [10] + INPUT_SHAPE)
    assert_good(logabsdet, [10])
    torch.testing.assert_close(outputs, expected)
    torch.testing.assert_close(logabsdet, expected_logabsdet)


@pytest.mark.parametrize("method", ["forward", "inverse"])
def test_inverse_transform_swaps_directions(method):  # InverseTransformTest.test_forward, test_inverse
    inputs = torch.randn(10, *INPUT_SHAPE)
    outputs, logabsdet = getattr(fl.InverseTransform(ScaleBy(2.0)), method)(inputs)
    expected, expected_logabsdet = getattr(ScaleBy(0.5), method)(inputs)
    torch.testing.assert_close(outputs, expected)
    torch.testing.assert_close(logabsdet, expected_logabsdet)


# --------------------------------------------------------------------------------------------------------------
# tests/transforms/permutations_test.py: PermutationTest


def test_permutation_forward_and_inverse():  # test_forward, test_inverse
    inputs = torch.randn(10, 100)
    permutation = torch.randperm(100)
    transform = fl.Permutation(permutation)
    outputs, logabsdet = transform(inputs)
    assert_good(outputs, [10, 100])
    assert torch.equal(outputs, inputs[:, permutation]) and torch.equal(logabsdet, torch.zeros(10))
    back, logabsdet = transform.inverse(outputs)
    assert torch.equal(back, inputs) and torch.equal(logabsdet, torch.zeros(10))


@pytest.mark.parametrize("kind", ["given", "random", "reverse"])
def test_permutation_forward_inverse_are_consistent(kind):  # test_forward_inverse_are_consistent
    transform = {"given": lambda: fl.Permutation(torch.randperm(100)),
                 "random": lambda: fl.RandomPermutation(100),
                 "reverse": lambda: fl.ReversePermutation(100)}[kind]()
    assert_round_trip(transform, torch.randn(10, 100), eps=0)


# --------------------------------------------------------------------------------------------------------------
# tests/distributions/normal_test.py: StandardNormalTest; nflows.distributions.base.Distribution's behaviour


@pytest.mark.parametrize("with_context", [False, True], ids=["unconditional", "conditional"])
def test_standard_normal_log_prob_and_sample(with_context):  # test_log_prob, test_sample
    dist = fl.StandardNormal(INPUT_SHAPE)
    context = torch.randn(10, *CONTEXT_SHAPE) if with_context else None
    assert_good(dist.log_prob(torch.randn(10, *INPUT_SHAPE), context=context), [10])
    context = torch.randn(20, *CONTEXT_SHAPE) if with_context else None
    expected = [10] + INPUT_SHAPE if context is None else [20, 10] + INPUT_SHAPE
    assert_good(dist.sample(10, context=context), expected)


def test_standard_normal_sample_and_log_prob():  # test_sample_and_log_prob, ..._with_context
    dist = fl.StandardNormal(INPUT_SHAPE)
    samples, log_prob = dist.sample_and_log_prob(10)
    assert samples.shape == torch.Size([10] + INPUT_SHAPE) and log_prob.shape == (10,)
    torch.testing.assert_close(log_prob, dist.log_prob(samples))
    samples, log_prob = dist.sample_and_log_prob(10, context=torch.randn(20, *CONTEXT_SHAPE))
    assert samples.shape == torch.Size([20, 10] + INPUT_SHAPE) and log_prob.shape == (20, 10)


@pytest.mark.parametrize("with_context", [False, True], ids=["unconditional", "conditional"])
def test_standard_normal_mean(with_context):  # test_mean
    context = torch.randn(20, *CONTEXT_SHAPE) if with_context else None
    means = fl.StandardNormal(INPUT_SHAPE).mean(context=context)
    assert_good(means, INPUT_SHAPE if context is None else [20] + INPUT_SHAPE)
    assert torch.equal(means, torch.zeros_like(means))


@pytest.mark.parametrize("with_context", [False, True], ids=["unconditional", "conditional"])
def test_flow_sample_in_batches(with_context):  # Distribution.sample(num_samples, context, batch_size)
    # nflows concatenates the batches on dim 0 also with a context, which gives [rows * batches, batch_size,
    # ...] instead of the documented [rows, num_samples, ...]; ours keeps the documented shape.
    flow = make_flow()
    context = torch.randn(3, *CONTEXT_SHAPE) if with_context else None
    torch.manual_seed(4)
    whole = flow.sample(10, context=context)
    assert flow.sample(10, context=context, batch_size=4).shape == whole.shape
    if context is None:
        torch.manual_seed(4)
        torch.testing.assert_close(flow.sample(10, batch_size=10), whole)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        flow.sample(10, context=context, batch_size=0)


def test_flow_log_prob_rows():  # Distribution.log_prob: inputs and context must have as many rows
    with pytest.raises(ValueError, match="same number of rows, got 10 and 20"):
        make_flow().log_prob(torch.randn(10, *INPUT_SHAPE), context=torch.randn(20, *CONTEXT_SHAPE))
