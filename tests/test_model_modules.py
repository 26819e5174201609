"""Shapes and gradients of every module of reenact.model, at 64x64 and 128x128 (small widths),
fused against reference ops, the flow, the gates, channels_last and bfloat16 autocast."""
import pytest
import torch

from model_fixtures import single_thread, synthetic_batch  # noqa: F401 (autouse fixture)
from reenact.model import (
    AppearanceEncoder,
    Correspondence,
    GeometryAwareGate,
    GeometryEncoder,
    MultiScaleDiscriminator,
    Reenactor,
    ReenactorConfig,
    SourceEncoding,
    SPADEDecoder,
    pixel_grid,
    preview_panels,
    resize_flow,
    warp_image,
    warp_with_flow,
)

RESOLUTIONS = [64, 128]
OPS = ["fused", "reference"]


def random_like(x, seed):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)


def backward_random(tensors, seed=0):
    """Backpropagate a random projection of every tensor, so no gradient is 0 by symmetry."""
    loss = sum((t.float() * random_like(t.float(), seed + i)).sum() for i, t in enumerate(tensors))
    loss.backward()


def assert_every_parameter_learns(module):
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"
        assert parameter.grad.abs().max() > 0, f"{name} has an all-zero gradient"


def assert_input_gradient(x, name):
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0, name


def leaf(*shape, seed=0, low=-1.0, high=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=generator) * (high - low) + low).requires_grad_()


@pytest.mark.parametrize("correspondence_level", [2, 1])
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_geometry_encoder(resolution, correspondence_level):
    torch.manual_seed(0)
    encoder = GeometryEncoder((4, 8, 12), correspondence_channels=10, blocks=1,
                              correspondence_level=correspondence_level)
    pncc = leaf(2, 3, resolution, resolution, low=0.0)
    features = encoder(pncc)
    assert [tuple(f.shape) for f in features.pyramid] == [
        (2, 4, resolution, resolution), (2, 8, resolution // 2, resolution // 2),
        (2, 12, resolution // 4, resolution // 4)]
    side = resolution >> correspondence_level
    assert features.correspondence.shape == (2, 10, side, side)
    backward_random(list(features.pyramid) + [features.correspondence])
    assert_every_parameter_learns(encoder)
    assert_input_gradient(pncc, "pncc")


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_appearance_encoder(resolution):
    torch.manual_seed(0)
    encoder = AppearanceEncoder((4, 8, 12))
    image, pncc = leaf(2, 3, resolution, resolution), leaf(2, 3, resolution, resolution, low=0.0)
    pyramid = encoder(image, pncc)
    assert [tuple(f.shape) for f in pyramid] == [
        (2, 4, resolution, resolution), (2, 8, resolution // 2, resolution // 2),
        (2, 12, resolution // 4, resolution // 4)]
    backward_random(pyramid)
    assert_every_parameter_learns(encoder)
    assert_input_gradient(image, "image")


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_correspondence_shapes_and_gradients(resolution, ops):
    size = resolution // 4
    driving, source = leaf(2, 6, size, size, seed=1), leaf(2, 6, size, size, seed=2)
    values = leaf(2, 5, size, size, seed=3)
    warped, flow = Correspondence(0.01, ops)(driving, source, values)
    assert warped.shape == (2, 5, size, size) and flow.shape == (2, 2, size, size)
    # The flow is a convex combination of pixel centres, so it lies inside their range.
    inner = 1 - 1 / size
    assert flow.abs().max() <= inner + 1e-5
    backward_random([warped, flow])
    for x, name in ((driving, "driving"), (source, "source"), (values, "values")):
        assert_input_gradient(x, name)


def distinct_features(batch, channels, size, seed):
    """Features whose rows are far apart in cosine similarity: one-hot-like random codes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=generator)


@pytest.mark.parametrize("ops", OPS)
def test_flow_is_identity_when_query_equals_key(ops):
    size = 12
    features = distinct_features(2, 64, size, seed=4)
    values = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    warped, flow = Correspondence(0.01, ops)(features, features, values)
    torch.testing.assert_close(flow, pixel_grid(size, size).expand(2, -1, -1, -1),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(warped, values, rtol=0, atol=1e-4)


@pytest.mark.parametrize("ops", OPS)
def test_flow_follows_a_shift(ops):
    # key = query moved one column right: driving column j is found at source column j + 1
    # (wrapping round), and the flow must say so in grid_sample coordinates.
    size = 12
    query = distinct_features(1, 64, size, seed=6)
    key = torch.roll(query, shifts=1, dims=3)
    values = torch.zeros(1, 1, size, size)
    _, flow = Correspondence(0.01, ops)(query, key, values)
    grid = pixel_grid(size, size)
    expected = grid.clone()
    expected[:, 0] = torch.roll(grid[:, 0], shifts=-1, dims=2)
    torch.testing.assert_close(flow, expected, rtol=0, atol=1e-4)


def test_flow_helpers():
    grid = pixel_grid(4, 6)
    # An identity flow stays the identity at every scale, up to the border.
    torch.testing.assert_close(resize_flow(grid, (8, 12)), pixel_grid(8, 12))
    torch.testing.assert_close(resize_flow(pixel_grid(8, 12), (4, 6)), grid)
    # A constant displacement survives resizing both ways.
    shift = torch.tensor([0.1, -0.2]).view(1, 2, 1, 1)
    torch.testing.assert_close(resize_flow(grid + shift, (8, 12)), pixel_grid(8, 12) + shift)
    torch.testing.assert_close(resize_flow(pixel_grid(8, 12) + shift, (4, 6)), grid + shift)
    features = torch.randn(1, 3, 4, 6)
    torch.testing.assert_close(warp_with_flow(features, grid), features, rtol=0, atol=1e-6)
    shifted = grid.clone()
    shifted[:, 0] += 2 / 6  # one pixel to the right
    torch.testing.assert_close(warp_with_flow(features, shifted)[..., :-1], features[..., 1:],
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="features and flow"):
        warp_with_flow(features, pixel_grid(5, 6))
    image = torch.randn(1, 3, 8, 12)
    torch.testing.assert_close(warp_image(image, grid), image, rtol=0, atol=1e-5)


def test_correspondence_rejects_bad_shapes():
    correspondence = Correspondence(0.01, "reference")
    x = torch.zeros(1, 4, 6, 6)
    with pytest.raises(ValueError, match="source_features"):
        correspondence(x, torch.zeros(1, 4, 6, 5), x)
    with pytest.raises(ValueError, match="source_values"):
        correspondence(x, x, torch.zeros(2, 3, 6, 6))


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_gate(resolution):
    torch.manual_seed(0)
    gate_module = GeometryAwareGate(4, 6, 5)
    geometry, features = leaf(2, 4, resolution, resolution), leaf(2, 6, resolution, resolution)
    disagreement = leaf(2, 3, resolution, resolution, low=0.0)
    gate = gate_module(geometry, features * 10, disagreement)
    assert gate.shape == (2, 1, resolution, resolution)
    assert ((gate > 0) & (gate < 1)).all()
    backward_random([gate])
    assert_every_parameter_learns(gate_module)
    assert_input_gradient(disagreement, "disagreement")


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_spade_decoder(resolution):
    torch.manual_seed(0)
    decoder = SPADEDecoder(skip_channels=(3, 5, 7), geometry_channels=6, channels=(12, 8, 4),
                           hidden_channels=5, blocks=2)
    skips = [leaf(2, c, resolution >> level, resolution >> level, seed=level)
             for level, c in enumerate((3, 5, 7))]
    geometry = leaf(2, 6, resolution // 4, resolution // 4, seed=3)
    pncc = leaf(2, 3, resolution, resolution, seed=4, low=0.0)
    image = decoder(skips, geometry, pncc)
    assert image.shape == (2, 3, resolution, resolution)
    assert image.abs().max() <= 1
    backward_random([image])
    assert_every_parameter_learns(decoder)
    for level, skip in enumerate(skips):
        assert_input_gradient(skip, f"skip {level}")
    assert_input_gradient(pncc, "pncc")


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_discriminator(resolution):
    torch.manual_seed(0)
    discriminator = MultiScaleDiscriminator(channels=4, layers=3, scales=2)
    image, pncc = leaf(2, 3, resolution, resolution), leaf(2, 3, resolution, resolution, low=0.0)
    outputs = discriminator(image, pncc)
    assert len(outputs) == 2
    for scale, features in enumerate(outputs):
        assert len(features) == 5  # first conv, 3 normalised convs, logits
        logits = features[-1]
        assert logits.shape[:2] == (2, 1)
        # Three stride-2 convs of the (resolution / 2^scale) input, each k4 p2: n // 2 + 1.
        side = resolution >> scale
        for _ in range(3):
            side = side // 2 + 1
        assert logits.shape[-2:] == (side + 2, side + 2)
    backward_random([features[-1] for features in outputs] + outputs[0][:-1])
    assert_every_parameter_learns(discriminator)
    assert_input_gradient(image, "image")
    with pytest.raises(ValueError, match="image and pncc"):
        discriminator(image, pncc[:, :2])


@pytest.fixture(scope="module", params=[(64, 2), (128, 2), (64, 1)],
                ids=["64-quarter", "128-quarter", "64-half"])
def reenactor_run(request):
    """A small Reenactor, its inputs, outputs and parameter gradients (run once per module);
    parametrised by resolution and correspondence level."""
    resolution, correspondence_level = request.param
    torch.manual_seed(0)
    config = ReenactorConfig.small(resolution)
    config.model.correspondence_level = correspondence_level
    model = Reenactor(config.model)
    batch = synthetic_batch(2, resolution, seed=1)
    source_image = batch["source_image"].requires_grad_()
    outputs = model(source_image, batch["source_pncc"], batch["driving_pncc"])
    backward_random([outputs["output"], outputs["warped"]])
    return resolution, model, source_image, outputs


def test_reenactor_shapes(reenactor_run):
    resolution, model, _, outputs = reenactor_run
    side = resolution >> model.config.correspondence_level
    assert outputs["output"].shape == (2, 3, resolution, resolution)
    assert outputs["output"].abs().max() <= 1
    assert outputs["warped"].shape == (2, 3, side, side)
    assert outputs["warped_pncc"].shape == (2, 3, side, side)
    assert outputs["flow"].shape == (2, 2, side, side)
    assert outputs["flow"].abs().max() <= 1
    assert [tuple(g.shape) for g in outputs["gates"]] == [
        (2, 1, resolution >> level, resolution >> level) for level in range(3)]


def test_preview_panels(reenactor_run):
    resolution, _, source_image, outputs = reenactor_run
    driving_image = torch.zeros(2, 3, resolution, resolution)
    driving_pncc = torch.full((2, 3, resolution, resolution), 0.25)
    panels = preview_panels(source_image, driving_image, driving_pncc, outputs)
    assert panels.shape == (2, 3, resolution, 5 * resolution) and not panels.requires_grad
    torch.testing.assert_close(panels[..., :resolution], (source_image.detach() + 1) / 2)
    assert (panels[..., resolution:2 * resolution] == 0.5).all()
    assert (panels[..., 2 * resolution:3 * resolution] == 0.25).all()
    torch.testing.assert_close(panels[..., 4 * resolution:],
                               (outputs["output"].detach() + 1) / 2)


def test_reenactor_gates_are_in_open_interval(reenactor_run):
    for gate in reenactor_run[3]["gates"]:
        assert ((gate > 0) & (gate < 1)).all()


def test_reenactor_every_parameter_learns(reenactor_run):
    _, model, source_image, _ = reenactor_run
    assert_every_parameter_learns(model)
    assert_input_gradient(source_image, "source_image")


class RecordingOps:
    """Wraps an Ops object and keeps the arguments and the result of every corr_warp call."""

    def __init__(self, ops):
        self.ops, self.name, self.calls = ops, ops.name, []

    def corr_warp(self, query, key, value, temperature, normalize=True, eps=1e-6):
        out = self.ops.corr_warp(query, key, value, temperature, normalize, eps)
        self.calls.append((query, key, value, temperature, out))
        return out


def test_reenactor_makes_one_corr_warp_call_with_rgb_pncc_and_grid():
    torch.manual_seed(0)
    config = ReenactorConfig.small(64)
    model = Reenactor(config.model)
    recorder = RecordingOps(model.correspondence.ops)
    model.correspondence.ops = recorder
    batch = synthetic_batch(1, 64, seed=6)
    with torch.no_grad():
        outputs = model(batch["source_image"], batch["source_pncc"], batch["driving_pncc"])
    assert len(recorder.calls) == 1
    query, key, value, temperature, out = recorder.calls[0]
    assert temperature == config.model.temperature
    channels = config.model.appearance_channels[2]
    assert query.shape == key.shape == (1, 16 * 16, config.model.correspondence_channels)
    assert value.shape == (1, 16 * 16, channels + 3 + 3 + 2)

    def rows(x):
        return x.permute(0, 2, 3, 1).reshape(1, 16 * 16, -1)

    # value = [A_s at 1/4, source RGB at 1/4, P_s at 1/4, pixel grid]; the outputs are its slices.
    pooled_image = torch.nn.functional.avg_pool2d(batch["source_image"], 4)
    pooled_pncc = torch.nn.functional.avg_pool2d(batch["source_pncc"], 4)
    torch.testing.assert_close(value[..., channels:channels + 3], rows(pooled_image))
    torch.testing.assert_close(value[..., channels + 3:channels + 6], rows(pooled_pncc))
    torch.testing.assert_close(value[..., -2:], rows(pixel_grid(16, 16)))
    torch.testing.assert_close(rows(outputs["warped"]), out[..., channels:channels + 3])
    torch.testing.assert_close(rows(outputs["warped_pncc"]), out[..., channels + 3:channels + 6])
    torch.testing.assert_close(rows(outputs["flow"]), out[..., -2:])


def test_reenactor_rejects_bad_input():
    model = Reenactor(ReenactorConfig.small(64).model)
    image, pncc = torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match="source_image"):
        model(torch.zeros(1, 3, 32, 32), pncc, pncc)
    with pytest.raises(ValueError, match="driving_pncc"):
        model(image, pncc, torch.zeros(2, 3, 64, 64))
    with pytest.raises(TypeError, match="source_pncc"):
        model(image, pncc.long(), pncc)
    with pytest.raises(TypeError, match="config"):
        Reenactor(ReenactorConfig.small(64))


def test_geometric_input_blends_the_warp_and_learns_where():
    """ModelConfig.geometric_input: the decoder sees [warped source, holes] and blends the warp into
    its output. It starts mostly on the warp (the blend mask's bias), every parameter and the warp
    input get gradients, drive() takes it too, and a model refuses the input it was not built for."""
    torch.manual_seed(0)
    config = ReenactorConfig.small(64)
    config.model.geometric_input = True
    model = Reenactor(config.model)
    batch = synthetic_batch(2, 64, seed=3)
    holes = torch.zeros(2, 1, 64, 64)
    holes[..., 20:30, 20:40] = 1
    warped = batch["driving_image"].flip(-1).requires_grad_()  # far from the source image
    geometric = torch.cat([warped, holes], 1)
    outputs = model(batch["source_image"], batch["source_pncc"], batch["driving_pncc"], geometric)
    output = outputs["output"]
    assert output.shape == (2, 3, 64, 64) and output.abs().max() <= 1
    # sigmoid(BLEND_BIAS) = 0.88 of the warp at the start: much closer to it than to the source.
    to_warp = (output - warped).abs().mean()
    assert to_warp < 0.5 * (output - batch["source_image"]).abs().mean()
    assert to_warp < 0.25
    backward_random([output, outputs["warped"]])
    assert_every_parameter_learns(model)
    assert_input_gradient(warped, "the warped source")
    with torch.no_grad():
        encoding = model.encode_source(batch["source_image"][:1], batch["source_pncc"][:1])
        driven = model.drive(encoding, batch["driving_pncc"][:1], geometric[:1].detach())["output"]
        torch.testing.assert_close(driven, output[:1].detach(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="geometric_input=True"):
        model(batch["source_image"], batch["source_pncc"], batch["driving_pncc"])
    with pytest.raises(ValueError, match="geometric must have shape"):
        model(batch["source_image"], batch["source_pncc"], batch["driving_pncc"], geometric[:, :3])
    plain = Reenactor(ReenactorConfig.small(64).model)
    with pytest.raises(ValueError, match="geometric_input=False"):
        plain(batch["source_image"], batch["source_pncc"], batch["driving_pncc"], geometric)


OUTPUT_KEYS = ("output", "warped", "warped_pncc", "flow")


def assert_outputs_close(actual, expected, atol):
    for name in OUTPUT_KEYS:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol,
                                   msg=lambda m: f"{name}: {m}")
    for level, (gate, expected_gate) in enumerate(zip(actual["gates"], expected["gates"])):
        torch.testing.assert_close(gate, expected_gate, rtol=0, atol=atol,
                                   msg=lambda m: f"gate {level}: {m}")


@pytest.mark.parametrize("correspondence_level", [2, 1], ids=["quarter", "half"])
def test_drive_of_the_source_encoding_equals_forward(correspondence_level):
    """drive(encode_source(...)) is forward: per sample in float32, and with one source encoding
    (batch 1) serving every driving frame against forward on the expanded source, outputs and
    gradients, in float64. (In float32 the two sum the batch's gradients in different orders;
    softmax at temperature 0.01 amplifies that rounding to 1e-4 of the largest gradient with the
    fused ops and 3e-2 with the reference ops, while float64 agrees to 1e-14.)"""
    torch.manual_seed(0)
    config = ReenactorConfig.small(64)
    config.model.correspondence_level = correspondence_level
    model = Reenactor(config.model)
    batch = synthetic_batch(3, 64, seed=7)
    source_image, source_pncc = batch["source_image"], batch["source_pncc"]
    driving_pncc = batch["driving_pncc"]
    with torch.no_grad():
        expected = model(source_image, source_pncc, driving_pncc)
        encoding = model.encode_source(source_image, source_pncc)
        assert isinstance(encoding, SourceEncoding) and encoding.batch == 3
        assert_outputs_close(model.drive(encoding, driving_pncc), expected, atol=1e-5)

    model = model.double()
    source_image, source_pncc, driving_pncc = (
        x.double() for x in (source_image, source_pncc, driving_pncc))
    expanded = [x[:1].expand(3, -1, -1, -1) for x in (source_image, source_pncc)]
    outputs = model(*expanded, driving_pncc)
    backward_random([outputs["output"], outputs["warped"], outputs["flow"]])
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    encoding = model.encode_source(source_image[:1], source_pncc[:1])
    assert encoding.batch == 1
    driven = model.drive(encoding, driving_pncc)
    assert driven["output"].shape == (3, 3, 64, 64)
    # The driving frames differ, so agreeing frame by frame is more than one broadcast frame.
    assert (driven["output"][0] - driven["output"][1]).abs().max() > 1e-3
    assert_outputs_close(driven, outputs, atol=1e-10)
    backward_random([driven["output"], driven["warped"], driven["flow"]])
    for name, parameter in model.named_parameters():
        scale = expected_grads[name].abs().max()
        torch.testing.assert_close(parameter.grad / scale, expected_grads[name] / scale,
                                   rtol=0, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_source_encoding_and_drive_reject_bad_input():
    model = Reenactor(ReenactorConfig.small(64).model)
    image, pncc = torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"source_image must have shape \(B, 3, 64, 64\)"):
        model.encode_source(torch.zeros(2, 3, 32, 32), pncc)
    with pytest.raises(ValueError, match=r"source_pncc must have shape \(2, 3, 64, 64\)"):
        model.encode_source(image, pncc[:1])
    with pytest.raises(TypeError, match="source_pncc must be a floating-point"):
        model.encode_source(image, pncc.long())
    with torch.no_grad():
        encoding = model.encode_source(image, pncc)
    with pytest.raises(ValueError, match=r"driving_pncc must have shape \(B, 3, 64, 64\)"):
        model.drive(encoding, torch.zeros(2, 3, 48, 48))
    with pytest.raises(TypeError, match="encoding must be a SourceEncoding"):
        model.drive((image, pncc), pncc)
    with pytest.raises(ValueError, match=r"batch of the source encoding \(2\)"):
        model.drive(encoding, torch.zeros(3, 3, 64, 64))
    half = ReenactorConfig.small(64)
    half.model.correspondence_level = 1
    with torch.no_grad():
        other = Reenactor(half.model).encode_source(image, pncc)
    with pytest.raises(ValueError, match="encoding.correspondence .* another config"):
        model.drive(other, pncc)


COMPARED_OUTPUTS = ("output", "warped", "warped_pncc", "flow")


def _outputs_and_gradients_per_ops(dtype):
    """{ops: (outputs, parameter gradients)} of one model (the same weights and inputs) under the
    fused and the reference ops, computed in `dtype`. The backward projections are drawn in
    float64 and rounded, so runs in different dtypes differentiate the same loss."""
    torch.manual_seed(0)
    model = Reenactor(ReenactorConfig.small(64).model).to(dtype)
    batch = {name: x.to(dtype) for name, x in synthetic_batch(1, 64, seed=2).items()}
    results = {}
    for ops in OPS:
        model.set_ops(ops)
        assert model.ops == ops
        model.zero_grad()
        outputs = model(batch["source_image"], batch["source_pncc"], batch["driving_pncc"])
        projected = [outputs["output"], outputs["warped"], outputs["flow"]]
        loss = sum((t * random_like(t.double(), i).to(dtype)).sum() for i, t in enumerate(projected))
        loss.backward()
        assert_every_parameter_learns(model)
        results[ops] = ({name: outputs[name].detach() for name in COMPARED_OUTPUTS},
                        {name: p.grad.clone() for name, p in model.named_parameters()})
    return results


def _relative_error(value, exact):
    return ((value.double() - exact).abs().max() / exact.abs().max()).item()


def test_fused_and_reference_ops_agree_in_float64():
    # In float64 the two op sets compute the same maths to ~1e-15, so any disagreement is a
    # defect in an op (its forward or backward), whatever the CPU and its BLAS.
    results = _outputs_and_gradients_per_ops(torch.float64)
    (fused, fused_grads), (reference, reference_grads) = results["fused"], results["reference"]
    for name in COMPARED_OUTPUTS:
        assert _relative_error(fused[name], reference[name]) < 1e-9, name
    for name, grad in reference_grads.items():
        assert _relative_error(fused_grads[name], grad) < 1e-8, name


def test_fused_ops_in_float32_are_as_accurate_as_the_reference():
    # In float32 the correspondence softmax (temperature 0.01) amplifies rounding on its way back
    # to the first layers, by an amount that depends on the CPU's BLAS: a fixed bound of 1e-3
    # between the two op sets held on AMD Zen 5 (largest difference 1.5e-4) and failed on Intel
    # Sapphire Rapids (2.2e-3, geometry_encoder.stem.0.weight). So both float32 runs are measured
    # against float64, and the fused ops may err at most twice as much as the reference's largest
    # error on the same machine (flash-attention's rule, over the model: a single tensor's
    # rounding error is too random to be its own yardstick).
    exact_outputs, exact_grads = _outputs_and_gradients_per_ops(torch.float64)["reference"]
    results = _outputs_and_gradients_per_ops(torch.float32)
    for part, exact in (("outputs", exact_outputs), ("gradients", exact_grads)):
        index = 0 if part == "outputs" else 1
        fused = {name: _relative_error(results["fused"][index][name], x) for name, x in exact.items()}
        reference = {name: _relative_error(results["reference"][index][name], x)
                     for name, x in exact.items()}
        budget = 2 * max(reference.values())
        worst = max(fused, key=fused.get)
        assert fused[worst] <= budget, (
            f"{part}: fused error of {worst} {fused[worst]:.2e} > 2 x the reference's largest "
            f"error {budget / 2:.2e}")


def test_channels_last_and_bfloat16_autocast():
    torch.manual_seed(0)
    model = Reenactor(ReenactorConfig.small(64).model)
    batch = synthetic_batch(2, 64, seed=3)
    inputs = (batch["source_image"], batch["source_pncc"], batch["driving_pncc"])
    with torch.no_grad():
        expected = model(*inputs)["output"]

    model = model.to(memory_format=torch.channels_last)
    channels_last = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    with torch.no_grad():
        output = model(*channels_last)["output"]
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-4)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(*channels_last)
    assert outputs["output"].dtype == torch.bfloat16
    assert (outputs["output"].float() - expected).abs().max() < 0.1
    backward_random([outputs["output"], outputs["warped"]])
    assert_every_parameter_learns(model)


@pytest.mark.slow
def test_compiles_as_one_graph():
    # fullgraph=True fails on any graph break, e.g. an op without a fake kernel; aot_eager traces
    # forward and backward like inductor does, without its minutes of C++ compilation.
    torch.manual_seed(0)
    model = Reenactor(ReenactorConfig.small(64).model)
    batch = synthetic_batch(1, 64, seed=5)
    inputs = (batch["source_image"], batch["source_pncc"], batch["driving_pncc"])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    try:
        outputs = compiled(*inputs)
        outputs["output"].mean().backward()
    finally:
        torch._dynamo.reset()
    assert_every_parameter_learns(model)
    with torch.no_grad():
        torch.testing.assert_close(outputs["output"].detach(), model(*inputs)["output"],
                                   rtol=0, atol=1e-5)


def test_a_nan_flow_backpropagates_without_crashing():
    # torch's CPU grid_sample backward segfaults on NaN positions (border padding), so the check
    # runs in a child process: a regression fails this test instead of killing the test session.
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from reenact.model.correspondence import warp_with_flow\n"
        "features = torch.randn(2, 64, 64, 64, requires_grad=True)\n"
        "flow = torch.full((2, 2, 64, 64), float('nan'), requires_grad=True)\n"
        "warp_with_flow(features, flow).sum().backward()\n"
        "assert torch.isfinite(features.grad).all()\n"
    )
    env = {"PYTHONPATH": ":".join(sys.path), "OMP_NUM_THREADS": "1", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
