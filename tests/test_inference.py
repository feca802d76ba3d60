"""Image inference of any size: sliding windows equal MONAI's, results at image size, arguments checked."""
import numpy as np
import pytest
import torch
from conftest import ALL_KIND_TASKS, small_model

from medexplore.analysis.inference import (
    DEFAULT_OVERLAP,
    _first_argmax,
    estimate_inference_memory,
    infer_image,
    iter_infer_image,
    window_for,
    windows_per_batch,
)
from medexplore.analysis.sliding import WindowBlender, window_starts
from medexplore.models import Domain

MRI = Domain("3d", "mri", "brain")


def _position_dependent(windows):
    """A window's output depends on its whole content, so blending order and weights matter."""
    return windows * 2 + windows.mean(dim=tuple(range(1, windows.dim())), keepdim=True) ** 2


@pytest.mark.parametrize("size,window,overlap", [((37, 29), (16, 16), 0.25), ((20, 18, 23), (8, 8, 8), 0.5)])
def test_blender_equals_monai_sliding_window_inference(size, window, overlap):
    monai = pytest.importorskip("monai.inferers")
    image = torch.rand(1, 2, *size, generator=torch.Generator().manual_seed(0))
    expected = monai.sliding_window_inference(image, window, 3, _position_dependent, overlap=overlap, mode="constant")
    blender = WindowBlender(size, window, overlap, {"out": 2}, mode="constant")
    for _, starts in blender.batches(3):
        windows = torch.stack([image[0][(slice(None), *blender.region(s))] for s in starts])
        blender.add(starts, {"out": _position_dependent(windows)})
    torch.testing.assert_close(blender.result()["out"], expected[0])


def test_window_scan_and_gaussian_blending_of_a_constant():
    assert window_starts(10, 4, 0.5) == [0, 2, 4, 6]
    assert window_starts(11, 4, 0.5) == [0, 2, 4, 6, 7]  # the last window is flush with the border
    assert window_starts(3, 4, 0.5) == [0]
    blender = WindowBlender((13, 9), (8, 8), 0.25, {"x": 1})
    for _, starts in blender.batches(2):
        blender.add(starts, {"x": torch.full((len(starts), 1, 8, 8), 3.0)})
    torch.testing.assert_close(blender.result()["x"], torch.full((1, 13, 9), 3.0))
    with pytest.raises(ValueError, match="overlap"):
        WindowBlender((8,), (4,), 1.0, {})


def test_infer_image_through_windows_gives_every_task_at_image_size():
    model = small_model(seg_channels=8)
    image = torch.rand(1, 20, 24, 18, generator=torch.Generator().manual_seed(1))
    result = infer_image(model, image, MRI, window=8, explain_methods=["rollout", "grad_cam"],
                         explain_task="presence")
    assert result.window == (8, 8, 8) and result.num_windows == 3 * 4 * 3  # starts (0, 6, 12) x (0, 6, 12, 16) x (0, 6, 10)
    assert result.segmentations["tissue"].shape == (20, 24, 18)
    assert result.maps["rollout"].shape == result.maps["grad_cam:presence"].shape == (20, 24, 18)
    assert 0 <= float(result.scores["presence"]) <= 1 and result.scores["grade"].sum() == pytest.approx(1, abs=1e-5)
    boxes, scores = result.boxes["lesions"]
    if len(boxes):  # moved to image coordinates
        assert (boxes[:, :3] >= -1).all() and (boxes[:, 3:] <= np.array([20, 24, 18]) + 1).all()
        assert (scores >= 0.5).all()


def test_default_overlap_is_half_a_window_in_2d_and_a_quarter_in_3d():
    model = small_model(seg_channels=8)
    photo = torch.rand(1, 36, 36, generator=torch.Generator().manual_seed(2))
    found = infer_image(model, photo, Domain("2d", "xray", "chest"), window=16)
    assert window_starts(36, 16, DEFAULT_OVERLAP[2]) == [0, 8, 16, 20]  # steps of 8, the last flush
    assert found.num_windows == 4 * 4
    volume = torch.rand(1, 20, 24, 18, generator=torch.Generator().manual_seed(1))
    assert infer_image(model, volume, MRI, window=8).num_windows == 3 * 4 * 3  # steps of 6, as overlap=0.25
    assert infer_image(model, volume, MRI, window=8, overlap=0.5).num_windows == 4 * 5 * 4


def test_one_window_equals_the_plain_forward():
    from medexplore.analysis.predictions import predict_samples
    from medexplore.data.sample import Sample
    from medexplore.data.transforms import normalize_intensity

    model = small_model(seg_channels=8)
    image = torch.rand(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    result = infer_image(model, image, MRI)
    assert result.num_windows == 1
    plain = predict_samples(model, [Sample(normalize_intensity(image, "mri"), MRI)])[0]["predictions"]
    np.testing.assert_array_equal(result.segmentations["tissue"], plain["tissue"])
    np.testing.assert_allclose(result.scores["presence"], plain["presence"], rtol=1e-5)


def test_arguments_are_checked_before_any_step():
    model = small_model()
    image = torch.rand(1, 16, 16, 16)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        iter_infer_image(model, image, MRI, window=6)
    with pytest.raises(ValueError, match="explain_task"):
        iter_infer_image(model, image, MRI, explain_methods=["grad_cam"])
    with pytest.raises(ValueError, match="unknown explanation"):
        iter_infer_image(model, image, MRI, explain_methods=["saliency"])
    with pytest.raises(ValueError, match=r"shape \(C, D, H, W\)"):
        iter_infer_image(model, torch.rand(1, 16, 16), MRI)
    bad = image.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        iter_infer_image(model, bad, MRI)
    with pytest.raises(ValueError, match="does not apply"):
        iter_infer_image(model, image, MRI, tasks=["nonexistent"])
    assert window_for(model, (100, 100, 100)) == (32, 32, 32)  # 8^3 = 512 tokens of patch 4: the CPU budget
    assert window_for(model, (100, 100, 100), device="cuda:0") == (48, 48, 48)  # 12^3 = 1,728 <= 2,048
    assert window_for(model, (100, 100, 100), max_tokens=4096) == (64, 64, 64)
    assert window_for(model, (20, 24, 28)) == (20, 24, 28)  # 5 x 6 x 7 = 210 tokens: the whole image
    small, large = (estimate_inference_memory(model, (1, 64, 64, 64), w, ["rollout"]) for w in ((16,) * 3, (64,) * 3))
    assert large > small > 64 ** 3 * 4
    assert {t.name for t in ALL_KIND_TASKS} >= set(infer_image(model, image, MRI).segmentations)
    for bad_count in (0, 2.5, True):
        with pytest.raises(ValueError, match="batch_windows"):
            iter_infer_image(model, image, MRI, batch_windows=bad_count)


def test_windows_go_through_the_model_in_batches_by_tokens_with_the_same_result():
    model = small_model(seg_channels=8)
    assert windows_per_batch(model, (32, 32, 32)) == 4  # 512 tokens of patch 4: 4 windows in 2,048 tokens
    assert windows_per_batch(model, (8, 8, 8)) == 256 and windows_per_batch(model, (256,) * 3) == 1
    image = torch.rand(1, 20, 24, 18, generator=torch.Generator().manual_seed(2))
    options = dict(window=8, explain_methods=["rollout", "grad_cam"], explain_task="presence")
    steps = iter_infer_image(model, image, MRI, **options)
    assert [done for done, _ in steps] == [0, 36]  # the 36 windows of 8 tokens: one pass by default
    batched, one_by_one = infer_image(model, image, MRI, **options), infer_image(model, image, MRI, batch_windows=1, **options)
    for key in batched.maps:
        np.testing.assert_allclose(batched.maps[key], one_by_one.maps[key], atol=1e-5)
    np.testing.assert_array_equal(batched.segmentations["tissue"], one_by_one.segmentations["tissue"])
    for name in batched.scores:
        np.testing.assert_allclose(batched.scores[name], one_by_one.scores[name], atol=1e-5)


def test_gradient_maps_take_their_targets_from_the_windows_pass_and_equal_explaining_the_image():
    """Grad-CAM of each window explains its predicted class and rollout reads the attention, both taken from
    the pass that ran the tasks (two forward passes per batch of windows: tasks with attention, Grad-CAM), and
    each map equals ``explain`` on that window."""
    from medexplore.analysis.attribution import explain
    from medexplore.data.sample import Sample
    from medexplore.models import TaskSpec

    model = small_model(tasks=[TaskSpec("grade", "multiclass", 4)])
    image = torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        result = infer_image(model, image, MRI, explain_methods=["rollout", "grad_cam"], explain_task="grade",
                             normalize=False)
    finally:
        handle.remove()
    assert result.num_windows == 1 and len(calls) == 1
    for method, key in (("grad_cam", "grad_cam:grade"), ("rollout", "rollout")):
        alone = explain(model, Sample(image, MRI), method, task="grade")
        np.testing.assert_allclose(result.maps[key], alone.values, rtol=1e-4, atol=1e-6)
    chosen = infer_image(model, image, MRI, explain_methods=["grad_cam"], explain_task="grade", normalize=False,
                         explain_options={"grad_cam": {"target": 3}})  # a caller's target still wins
    other = explain(model, Sample(image, MRI), "grad_cam", task="grade", target=3)
    np.testing.assert_allclose(chosen.maps["grad_cam:grade"], other.values, rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_first_argmax_equals_torchs_argmax_ties_and_nans_included():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 3, (4, 6, 7, 5), generator=g).float()  # many ties: the first channel wins
    assert torch.equal(_first_argmax(values), values.argmax(0))
    values[2, 1, 1, 1] = float("nan")
    assert torch.equal(_first_argmax(values), values.argmax(0))
