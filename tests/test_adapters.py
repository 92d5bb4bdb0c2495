import copy

import open_clip
import pytest
import torch
from torch import nn

from diki_model import DikiConfig, Route, create_diki_model, inject_residual_kv, load_backbone
from diki_model.adapters import ResidualKVAttention

CONFIGS = ["diki-test-tiny", "diki-test-tiny-b"]


def frozen_and_injected(name: str, tasks: int = 2):
    ref = load_backbone(name, seed=0).model
    model = copy.deepcopy(ref)
    state, injected = inject_residual_kv(model, prompt_length=4)
    for layers in injected.values():
        for layer in layers.values():
            for _ in range(tasks):
                layer.add_task(torch.Generator().manual_seed(1))
    return ref, model, state, injected


def inputs(model):
    size = model.visual.image_size[0]
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(1, 49000, (4, model.context_length), generator=torch.Generator().manual_seed(1))
    return images, tokens


@pytest.mark.parametrize("name", CONFIGS)
def test_zero_values_give_the_untouched_model_in_both_towers(name):
    ref, model, state, _ = frozen_and_injected(name)
    images, tokens = inputs(ref)
    with torch.no_grad():
        want_i, want_t = ref.encode_image(images), ref.encode_text(tokens)
        state.routes["vision"] = Route(task=torch.tensor([0, 1, 1]), gate=torch.tensor([1.0, 0.3, 1.0]))
        state.routes["text"] = Route(task=1, gate=1.0)
        torch.testing.assert_close(model.encode_image(images), want_i, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), want_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_gate_zero_gives_the_untouched_model_even_with_trained_values(name):
    ref, model, state, injected = frozen_and_injected(name)
    for layers in injected.values():
        for layer in layers.values():
            for v in layer.values:
                v.data.normal_()
    images, tokens = inputs(ref)
    with torch.no_grad():
        want_i, want_t = ref.encode_image(images), ref.encode_text(tokens)
        state.routes["vision"] = Route(task=0, gate=1.0)
        state.routes["text"] = Route(task=0, gate=1.0)
        assert (model.encode_image(images) - want_i).abs().max() > 1e-2, "non-zero V must change the image tower"
        assert (model.encode_text(tokens) - want_t).abs().max() > 1e-2, "non-zero V must change the text tower"
        state.routes["vision"] = Route(task=0, gate=0.0)
        state.routes["text"] = Route(task=torch.tensor([1, 0, 0, 1]), gate=torch.zeros(4))
        torch.testing.assert_close(model.encode_image(images), want_i, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), want_t, rtol=1e-5, atol=1e-5)
        state.routes["vision"] = state.routes["text"] = None
        assert torch.equal(model.encode_image(images), want_i), "no route must be the frozen model bit for bit"


def test_per_sample_route_equals_one_route_per_sample():
    _, model, state, injected = frozen_and_injected("diki-test-tiny")
    for layers in injected.values():
        for layer in layers.values():
            for v in layer.values:
                v.data.normal_()
    images, _ = inputs(model)
    with torch.no_grad():
        state.routes["vision"] = Route(task=torch.tensor([1, 0, 1]), gate=torch.tensor([0.5, 1.0, 0.2]))
        mixed = model.encode_image(images)
        for i, (t, g) in enumerate([(1, 0.5), (0, 1.0), (1, 0.2)]):
            state.routes["vision"] = Route(task=t, gate=g)
            torch.testing.assert_close(model.encode_image(images[i : i + 1])[0], mixed[i], rtol=1e-5, atol=1e-5)


def test_base_weights_frozen_and_only_adapters_trainable():
    model = create_diki_model("diki-test-tiny", seed=0)
    t = model.add_task("a", ["x", "y"])
    assert all(not p.requires_grad for p in model.clip.parameters())
    params = model.adapter_parameters(t)
    cfg = model.config
    assert len(params) == 2 * (len(model.vision_layers) + len(model.text_layers))
    assert all(p.shape == (cfg.prompt_length, p.shape[1]) for p in params)


def test_default_layers_first_eight_or_all_and_configurable():
    model = create_diki_model("diki-test-tiny", seed=0)  # 3 layers per tower
    assert model.vision_layers == (0, 1, 2) and model.text_layers == (0, 1, 2)
    model = create_diki_model("diki-test-tiny", seed=0, config=DikiConfig(vision_layers=(1,), text_layers=(0, 2)))
    assert model.vision_layers == (1,) and model.text_layers == (0, 2)
    with pytest.raises(ValueError, match="cannot inject into layers"):
        create_diki_model("diki-test-tiny", seed=0, config=DikiConfig(vision_layers=(5,)))


def test_initialisation_follows_the_authors():
    model = create_diki_model("diki-test-tiny", seed=0)
    model.add_task("a", ["x", "y"])
    for _, _, layer in model.adapter_layers():
        assert torch.count_nonzero(layer.values[0]) == 0
        k = layer.keys[0]
        assert k.min() >= -1 and k.max() <= 1 and k.std() > 0.4


def test_pool_grows_without_a_fixed_size():
    model = create_diki_model("diki-test-tiny", seed=0)
    for i in range(13):
        model.add_task(f"t{i}", ["x", "y"])
    assert all(layer.num_tasks == 13 for _, _, layer in model.adapter_layers())


def test_modified_resnet_gets_a_clear_error():
    rn = open_clip.create_model("RN50")
    with pytest.raises(TypeError, match="ModifiedResNet"):
        inject_residual_kv(rn, 8)


def test_foreign_text_tower_gets_a_clear_error():
    model = load_backbone("diki-test-tiny", seed=0).model
    model.transformer = nn.Identity()  # e.g. a Hugging Face text tower
    with pytest.raises(TypeError, match="unsupported text tower"):
        inject_residual_kv(model, 8)


def test_double_injection_refused():
    model = load_backbone("diki-test-tiny", seed=0).model
    inject_residual_kv(model, 8)
    with pytest.raises(ValueError, match="already carries"):
        inject_residual_kv(model, 8)


def test_wrapper_requires_self_attention():
    cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
    with pytest.raises(TypeError, match="packed in_proj"):
        ResidualKVAttention(cross, "vision", 4, None)


def test_prefix_branch_is_one_softmax_and_interferes_even_at_zero_values():
    """The prompt-prepending baseline: zero V still changes the output (it dilutes attention)."""
    ref = load_backbone("diki-test-tiny", seed=0).model
    model = copy.deepcopy(ref)
    state, injected = inject_residual_kv(model, prompt_length=4, mode="prefix")
    for layers in injected.values():
        for layer in layers.values():
            layer.add_task(torch.Generator().manual_seed(1))
    images, tokens = inputs(ref)
    with torch.no_grad():
        state.routes["vision"] = Route(task=0, gate=1.0)
        state.routes["text"] = Route(task=0, gate=1.0)
        assert (model.encode_image(images) - ref.encode_image(images)).abs().max() > 1e-4
        assert (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unknown branch mode"):
        ResidualKVAttention(nn.MultiheadAttention(8, 2, batch_first=True), "vision", 4, None, mode="nope")
