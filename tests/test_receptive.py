"""Receptive-field arithmetic against hand-computed values and against the layers themselves:
perturbing an input pixel changes an output exactly when the pixel lies in that output's region."""
import numpy as np
import pytest

from gpucnn import nn
from gpucnn.models import LeNet5
from gpucnn.receptive import LayerGeometry, conv_params, input_region, layer_geometry, linear_params


def by_name(rows):
    return {row.name: row for row in rows}


def test_lenet5_receptive_fields_by_hand():
    # Each axis, from rf=1, jump=1, start=0 at the input (k_eff = k, no dilation):
    #   conv1 k5 s1 p2: rf = 1 + 4*1 = 5    jump 1   start = 0   + (2   - 2)*1 = 0
    #   pool1 k2 s2 p0: rf = 5 + 1*1 = 6    jump 2   start = 0   + (0.5 - 0)*1 = 0.5
    #   conv2 k5 s1 p0: rf = 6 + 4*2 = 14   jump 2   start = 0.5 + (2   - 0)*2 = 4.5
    #   pool2 k2 s2 p0: rf = 14 + 1*2 = 16  jump 4   start = 4.5 + (0.5 - 0)*2 = 5.5
    # pool2's output (0, 0) sees input rows -2..13: 16 rows centred on 5.5.
    rows = by_name(layer_geometry(LeNet5(), (1, 28, 28)))
    expected = {"conv1": (5, 1, 0.0), "act1": (5, 1, 0.0), "pool1": (6, 2, 0.5), "conv2": (14, 2, 4.5),
                "act2": (14, 2, 4.5), "pool2": (16, 4, 5.5)}
    for name, (rf, jump, start) in expected.items():
        row = rows[name]
        assert (row.rf, row.jump, row.start) == ((rf, rf), (jump, jump), (start, start)), name
        assert row.first == (-2, -2), name
    assert input_region(rows["pool2"], 0, 0, (28, 28), clip=False) == (-2, 14, -2, 14)
    assert input_region(rows["pool2"], 0, 0, (28, 28)) == (0, 14, 0, 14)
    assert input_region(rows["pool2"], 4, 2, (28, 28)) == (14, 28, 6, 22)
    for name in ("flatten", "fc1", "act3", "fc2", "act4", "fc3"):
        assert not rows[name].spatial and rows[name].rf is None


def test_lenet5_shapes_and_parameter_counts():
    model = LeNet5()
    rows = layer_geometry(model, (8, 1, 28, 28))
    shapes = {row.name: row.output_shape for row in rows}
    assert shapes == {"conv1": (8, 6, 28, 28), "act1": (8, 6, 28, 28), "pool1": (8, 6, 14, 14),
                      "conv2": (8, 16, 10, 10), "act2": (8, 16, 10, 10), "pool2": (8, 16, 5, 5),
                      "flatten": (8, 400), "fc1": (8, 120), "act3": (8, 120), "fc2": (8, 84),
                      "act4": (8, 84), "fc3": (8, 10)}
    params = {row.name: row.num_params for row in rows if row.num_params}
    # (KW*KH*Cin + 1)*Cout and (in + 1)*out
    assert params == {"conv1": (5 * 5 * 1 + 1) * 6, "conv2": (5 * 5 * 6 + 1) * 16, "fc1": 401 * 120,
                      "fc2": 121 * 84, "fc3": 85 * 10}
    assert sum(params.values()) == 61706 == model.num_parameters()
    for row in rows:
        assert row.num_params == model[row.name].num_parameters()
    x = np.zeros((8, 1, 28, 28), np.float32)
    for row in rows:
        x = model[row.name](x)
        assert x.shape == row.output_shape, row.name


@pytest.mark.parametrize("depth", [1, 2, 3, 5, 8])
def test_stacked_3x3_convolutions_have_2n_plus_1_receptive_field(depth):
    model = nn.Sequential(*[nn.Conv2d(1, 1, 3) for _ in range(depth)])
    last = layer_geometry(model, (1, 32, 32))[-1]
    assert last.rf == (2 * depth + 1, 2 * depth + 1) and last.jump == (1, 1)
    assert last.output_shape == (1, 32 - 2 * depth, 32 - 2 * depth)


def test_strided_padded_and_dilated_stacks_by_hand():
    strided = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, padding=1), nn.Conv2d(1, 1, 3, stride=2, padding=1),
                            nn.Conv2d(1, 1, 3))
    # rf 1 -> 3 -> 3+2*2 = 7 -> 7+2*4 = 15 ; jump 1 -> 2 -> 4 -> 4
    # start 0 -> 0+(1-1)*1 = 0 -> 0+(1-1)*2 = 0 -> 0+(1-0)*4 = 4 ; first 0 -> -1 -> -1-1*2 = -3 -> -3
    rows = layer_geometry(strided, (1, 17, 17))
    assert [(r.rf[0], r.jump[0], r.start[0], r.first[0]) for r in rows] == \
        [(3, 2, 0.0, -1), (7, 4, 0.0, -3), (15, 4, 4.0, -3)]
    assert [r.output_shape for r in rows] == [(1, 9, 9), (1, 5, 5), (1, 3, 3)]

    # dilations 1, 2, 4 of a 3x3 kernel: k_eff 3, 5, 9 -> rf 3, 7, 15 (the atrous-convolution doubling)
    atrous = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3, dilation=2), nn.Conv2d(1, 1, 3, dilation=4))
    assert [r.rf for r in layer_geometry(atrous, (1, 20, 20))] == [(3, 3), (7, 7), (15, 15)]

    # non-square: kernel (3, 1), stride (2, 1), padding (1, 0), dilation (1, 3) on the second layer
    mixed = nn.Sequential(nn.Conv2d(2, 2, (3, 1), stride=(2, 1), padding=(1, 0)),
                          nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1)),
                          nn.Conv2d(2, 1, (1, 2), dilation=(1, 3)))
    rows = layer_geometry(mixed, (2, 11, 9))
    # H: rf 1 -> 3 (j 2) -> 3+1*2 = 5 (j 2) -> 5 (j 2) ; W: 1 -> 1 (j 1) -> 1+2*1 = 3 (j 2) -> 3+3*2 = 9 (j 2)
    assert [r.rf for r in rows] == [(3, 1), (5, 3), (5, 9)]
    assert [r.jump for r in rows] == [(2, 1), (2, 2), (2, 2)]
    assert [r.output_shape for r in rows] == [(2, 6, 9), (2, 7, 5), (1, 7, 2)]


def positive_weights(model, rng):
    """Weights in [0.1, 1.1): raising any input pixel strictly raises every output that depends on it,
    through ReLU, max and average pooling alike."""
    for p in model.parameters():
        p.data[...] = 0.1 + rng.random(p.shape).astype(np.float32)
    return model


def dependence(model, input_shape, rng):
    """dep[r, c] = which outputs change when input pixel (r, c) (all channels) is raised by 1e4.

    One batch holds every perturbed image plus the unperturbed one (last). A dependent
    output moves by more than 1 (the weights are at least 0.1); float32 rounding
    differences between batch rows stay far below that.
    """
    C, H, W = input_shape
    x = rng.random((1, C, H, W)).astype(np.float32)
    batch = np.repeat(x, H * W + 1, axis=0)
    batch[np.arange(H * W), :, np.repeat(np.arange(H), W), np.tile(np.arange(W), H)] += 1e4
    out = model(batch)
    changed = np.abs(out[:-1] - out[-1]) > 1.0
    return changed.any(axis=1).reshape(H, W, *out.shape[2:])


STACKS = {
    "lenet5-features": lambda: LeNet5()[:6],
    "strided": lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.Conv2d(2, 2, 3)),
    "pools": lambda: nn.Sequential(nn.Conv2d(2, 2, (3, 2), padding=(1, 0)), nn.AvgPool2d(3, stride=2, padding=1),
                                   nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1)), nn.Conv2d(2, 1, 2)),
    "dilated": lambda: nn.Sequential(nn.Conv2d(2, 2, 3, dilation=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(2, 1, (2, 3), stride=(2, 1), dilation=(3, 2))),
}
INPUTS = {"lenet5-features": (1, 28, 28), "strided": (2, 17, 15), "pools": (2, 13, 16), "dilated": (2, 16, 18)}


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_input_region_matches_perturbation(stack):
    rng = np.random.default_rng(0)
    model = positive_weights(STACKS[stack](), rng)
    input_shape = INPUTS[stack]
    H, W = input_shape[1:]
    dilated = stack == "dilated"
    for depth, row in enumerate(layer_geometry(model, input_shape), start=1):
        if isinstance(model[depth - 1], nn.ReLU):
            continue
        dep = dependence(model[:depth], input_shape, rng)
        OH, OW = dep.shape[2:]
        for oy in sorted({0, OH // 2, OH - 1}):
            for ox in sorted({0, OW // 2, OW - 1}):
                y0, y1, x0, x1 = input_region(row, oy, ox, (H, W))
                inside = np.zeros((H, W), bool)
                inside[y0:y1, x0:x1] = True
                feeds = dep[:, :, oy, ox]
                where = f"{stack} layer {row.name} output ({oy}, {ox})"
                assert not feeds[~inside].any(), f"{where}: a pixel outside the region changed it"
                if dilated:
                    # holes between dilated taps lie inside the box; a tap cut off by the border can leave
                    # the clipped box wider than the pixels that feed it, so compare only unclipped boxes
                    if input_region(row, oy, ox, (H, W), clip=False) != (y0, y1, x0, x1):
                        continue
                else:
                    assert feeds[inside].all(), f"{where}: a pixel inside the region did not change it"
                rows_hit, cols_hit = np.nonzero(feeds)
                assert (rows_hit.min(), rows_hit.max() + 1, cols_hit.min(), cols_hit.max() + 1) == \
                    (y0, y1, x0, x1), f"{where}: the region is not the bounding box of the pixels that feed it"


def test_input_region_validation():
    row = by_name(layer_geometry(LeNet5(), (1, 28, 28)))["pool1"]
    assert isinstance(row, LayerGeometry)
    with pytest.raises(ValueError, match="outside"):
        input_region(row, 14, 0, (28, 28))
    with pytest.raises(TypeError, match="oy must be an int"):
        input_region(row, 1.5, 0, (28, 28))
    fc = by_name(layer_geometry(LeNet5(), (1, 28, 28)))["fc1"]
    with pytest.raises(ValueError, match="no spatial layout"):
        input_region(fc, 0, 0, (28, 28))
    with pytest.raises(TypeError, match="LayerGeometry"):
        input_region({"rf": 5}, 0, 0, (28, 28))


def test_layer_geometry_validation():
    with pytest.raises(ValueError, match="expects 1 channels"):
        layer_geometry(LeNet5(), (3, 28, 28))
    with pytest.raises(ValueError, match="expects 400 features"):
        layer_geometry(LeNet5(), (1, 32, 32))
    with pytest.raises(ValueError, match="too small"):
        layer_geometry(nn.Sequential(nn.Conv2d(1, 1, 5)), (1, 4, 4))
    with pytest.raises(ValueError, match="input_shape"):
        layer_geometry(LeNet5(), (28, 28))
    with pytest.raises(TypeError, match="Sequential"):
        layer_geometry(nn.Conv2d(1, 1, 3), (1, 8, 8))

    class Custom(nn.Module):
        pass

    with pytest.raises(TypeError, match="does not know"):
        layer_geometry(nn.Sequential(Custom()), (1, 8, 8))


def test_nested_sequentials_get_dotted_names_and_formula_helpers():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), nn.Conv2d(2, 2, 3, bias=False))
    rows = layer_geometry(model, (1, 9, 9))
    assert [r.name for r in rows] == ["0.0", "0.1", "1"]
    assert rows[-1].rf == (5, 5) and rows[-1].num_params == 3 * 3 * 2 * 2
    assert conv_params((5, 5), 6, 16) == 2416 and linear_params(400, 120) == 48120
    assert linear_params(84, 10, bias=False) == 840
