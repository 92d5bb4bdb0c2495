import copy

import open_clip
import pytest
import torch
from torch import nn

from diki_model import DikiConfig, Route, create_diki_model, inject_residual_kv, load_backbone
from diki_model.adapters import ResidualKVAttention, RoutingState

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


# --- the branch against a direct implementation of its formula -----------------------------------


def reference_attention(mha, x, keys, values, task, gate, mask, mode):
    """O = softmax(Q K^T / sqrt(d_h) + M) V + w softmax(Q K_r^T / sqrt(d_h)) V_r (residual), or one softmax
    over [K; K_r] (prefix), then out_proj; written out with plain matmuls, per sample. x: (B, N, D)."""
    bsz, n, dim = x.shape
    h = mha.num_heads
    dh = dim // h
    tasks = task.tolist() if isinstance(task, torch.Tensor) else [task] * bsz
    gates = gate.tolist() if isinstance(gate, torch.Tensor) else [gate] * bsz
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape).masked_fill(mask, float("-inf"))  # True = not allowed
    outs = []
    for b in range(bsz):
        q, k, v = (x[b] @ mha.in_proj_weight.T + mha.in_proj_bias).chunk(3, dim=-1)
        heads = []
        for i in range(h):
            s = slice(i * dh, (i + 1) * dh)
            kr, vr = keys[tasks[b]][:, s], values[tasks[b]][:, s]
            logits = q[:, s] @ k[:, s].T / dh**0.5 + (0 if mask is None else mask)
            prompt_logits = q[:, s] @ kr.T / dh**0.5
            if mode == "residual":
                out = logits.softmax(-1) @ v[:, s] + gates[b] * (prompt_logits.softmax(-1) @ vr)
            else:
                out = torch.cat([logits, prompt_logits], dim=-1).softmax(-1) @ torch.cat([v[:, s], vr])
            heads.append(out)
        outs.append(torch.cat(heads, dim=-1) @ mha.out_proj.weight.T + mha.out_proj.bias)
    return torch.stack(outs)


def branch_layer(mode: str, batch_first: bool = True, tasks: int = 3, length: int = 4):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    with torch.no_grad():  # non-zero biases, so that dropping one shows
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    state = RoutingState()
    layer = ResidualKVAttention(mha, "text", length, state, mode)
    g = torch.Generator().manual_seed(2)
    for _ in range(tasks):
        layer.add_task(g)
    with torch.no_grad():
        for v in layer.values:
            v.copy_(torch.randn(v.shape, generator=g))
    return mha, state, layer


def causal(n: int, kind: str):
    if kind == "bool":
        return torch.ones(n, n, dtype=torch.bool).triu(1)  # True above the diagonal: masked
    return torch.full((n, n), float("-inf")).triu(1)


@pytest.mark.parametrize("mode", ["residual", "prefix"])
@pytest.mark.parametrize("mask_kind", [None, "float", "bool"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_branch_matches_its_formula(mode, mask_kind, batch_first):
    mha, state, layer = branch_layer(mode, batch_first)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    mask = None if mask_kind is None else causal(5, mask_kind)
    keys, values = list(layer.keys), list(layer.values)
    for task, gate in ((1, 1.0), (2, 0.3), (torch.tensor([2, 0, 2]), torch.tensor([0.5, 1.0, 0.0]))):
        state.routes["text"] = Route(task=task, gate=gate)
        inp = x if batch_first else x.transpose(0, 1)
        with torch.no_grad():
            got, weights = layer(inp, inp, inp, need_weights=False, attn_mask=mask)
        got = got if batch_first else got.transpose(0, 1)
        gate_used = gate if mode == "residual" else 1.0
        want = reference_attention(mha, x, keys, values, task, gate_used, mask, mode)
        assert weights is None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_branch_falls_back_to_the_frozen_attention():
    mha, state, layer = branch_layer("residual")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        frozen, _ = mha(x, x, x, need_weights=False)
        # No route: the base layer, bit for bit.
        assert torch.equal(layer(x, x, x, need_weights=False)[0], frozen)
        state.routes["text"] = Route(task=1, gate=1.0)
        assert not torch.allclose(layer(x, x, x, need_weights=False)[0], frozen, atol=1e-3)
        # Attention weights or a padding mask asked for: the base layer answers, with its weights.
        out, weights = layer(x, x, x, need_weights=True)
        want_out, want_weights = mha(x, x, x, need_weights=True)
        assert torch.equal(out, want_out) and torch.equal(weights, want_weights)
        pad = torch.tensor([[False] * 4 + [True], [False] * 5])
        want = mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        assert torch.equal(layer(x, x, x, key_padding_mask=pad)[0], want)
        # Another tower's route does not switch this layer on.
        state.routes["text"], state.routes["vision"] = None, Route(task=1, gate=1.0)
        assert torch.equal(layer(x, x, x, need_weights=False)[0], frozen)
    empty = ResidualKVAttention(nn.MultiheadAttention(16, 4, batch_first=True), "text", 4, RoutingState())
    empty._state.routes["text"] = Route(task=0, gate=1.0)
    with torch.no_grad():
        assert torch.equal(empty(x, x, x)[0], empty.base_layer(x, x, x, need_weights=False)[0])  # no task: frozen


def test_route_indices_are_checked_and_grouped_once():
    _, state, layer = branch_layer("residual", tasks=2)
    x = torch.randn(3, 5, 16)
    for task, message in ((torch.tensor([0, 1]), "route has 2 task indices for a batch of 3"),):
        state.routes["text"] = Route(task=task)
        with pytest.raises(ValueError, match=f"^{message}$"):
            layer(x, x, x)
    for task in (2, -1, torch.tensor([0, 2, 1])):
        state.routes["text"] = Route(task=task)
        with pytest.raises(IndexError, match=r"task index (2|-1) out of range: this layer holds 2 tasks"):
            layer(x, x, x)
    route = Route(task=torch.tensor([1, 0, 1, 1]))
    tasks, inverse = route.groups()
    assert tasks == [0, 1] and inverse.tolist() == [1, 0, 1, 1]
    assert route.groups() is route.groups()  # computed once per route


def test_new_tasks_start_frozen_with_zero_values_and_uniform_keys():
    _, _, layer = branch_layer("residual", tasks=0, length=6)
    g = torch.Generator().manual_seed(7)
    layer.add_task(g)
    key, value = layer.keys[0], layer.values[0]
    want = torch.empty(6, 16).uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(key, want) and key.dtype == torch.float32
    assert torch.equal(value, torch.zeros(6, 16)) and not key.requires_grad and not value.requires_grad
    assert layer.num_tasks == 1 and (layer.embed_dim, layer.num_heads, layer.head_dim) == (16, 4, 4)


def test_layer_selection_and_injection_errors():
    from diki_model.adapters import resolve_layers

    assert resolve_layers(None, 12, 8, "vision") == tuple(range(8))
    assert resolve_layers(None, 3, 8, "vision") == (0, 1, 2)
    assert resolve_layers((2, 0, 2), 3, 8, "text") == (0, 2)
    with pytest.raises(ValueError, match=r"^text tower has 3 layers; cannot inject into layers \[-1, 3\]$"):
        resolve_layers((3, 1, -1), 3, 8, "text")
    model = load_backbone("diki-test-tiny", seed=0).model
    for p in model.parameters():
        p.requires_grad_(True)
    state, injected = inject_residual_kv(model, 4, vision_layers=(1,), default_layer_count=2)
    assert sorted(injected) == ["text", "vision"]
    assert sorted(injected["vision"]) == [1] and sorted(injected["text"]) == [0, 1]
    assert all(not p.requires_grad for p in model.parameters()), "the whole backbone is frozen"
    for tower, layers in injected.items():
        for i, layer in layers.items():
            blocks = model.visual.transformer.resblocks if tower == "vision" else model.transformer.resblocks
            assert blocks[i].attn is layer and layer.tower == tower and layer.prompt_length == 4
            assert layer._state is state
    assert state.routes == {"vision": None, "text": None}
    model = load_backbone("diki-test-tiny", seed=0).model
    model.visual.transformer.resblocks[0].attn = nn.Identity()
    with pytest.raises(
        TypeError, match="^vision block 0 has an unsupported attention \\(Identity\\); expected open_clip's"
    ):
        inject_residual_kv(model, 4)
    model = load_backbone("diki-test-tiny", seed=0).model
    model.visual = None
    with pytest.raises(
        TypeError, match=r"^unsupported image tower \(missing\): expected open_clip's VisionTransformer$"
    ):
        inject_residual_kv(model, 4)
    with pytest.raises(TypeError, match=r"^expected nn.MultiheadAttention, got Linear$"):
        ResidualKVAttention(nn.Linear(4, 4), "vision", 4, RoutingState())


def test_frozen_path_passes_the_mask_and_a_scalar_task_tensor_routes_the_batch():
    mha, state, layer = branch_layer("residual")
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for mask in (causal(5, "float"), causal(5, "bool")):
            want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
            assert torch.equal(layer(x, x, x, need_weights=False, attn_mask=mask)[0], want)
        state.routes["text"] = Route(task=torch.tensor(2), gate=0.5)  # a 0-d tensor: one task for all
        got = layer(x, x, x)[0]
    want = reference_attention(mha, x, list(layer.keys), list(layer.values), 2, 0.5, None, "residual")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _, one_state, one = branch_layer("residual", tasks=1)
    one_state.routes["text"] = Route(task=torch.tensor([0, 0, 0]), gate=torch.tensor([1.0, 0.5, 0.0]))
    with torch.no_grad():
        assert one(x, x, x)[0].shape == (3, 5, 16)


def test_unsupported_towers_are_named_in_the_error():
    cases = []
    model = load_backbone("diki-test-tiny", seed=0).model
    model.visual = nn.Identity()
    cases.append((model, "unsupported image tower (Identity): expected open_clip's VisionTransformer"))
    model = load_backbone("diki-test-tiny", seed=0).model
    del model.visual
    cases.append((model, "unsupported image tower (missing): expected open_clip's VisionTransformer"))
    model = load_backbone("diki-test-tiny", seed=0).model
    model.transformer = nn.Identity()
    model.text = nn.Linear(2, 2)  # what a Hugging Face text tower looks like from here
    cases.append((model, "unsupported text tower (Linear): expected open_clip's own text transformer "
                         "(Hugging Face text towers are not supported)"))  # fmt: skip
    model = load_backbone("diki-test-tiny", seed=0).model
    del model.transformer
    cases.append((model, "unsupported text tower (NoneType): expected open_clip's own text transformer "
                         "(Hugging Face text towers are not supported)"))  # fmt: skip
    for model, message in cases:
        with pytest.raises(TypeError) as err:
            inject_residual_kv(model, 4)
        assert str(err.value) == message
    model = load_backbone("diki-test-tiny", seed=0).model
    model.transformer.resblocks[1].ln_1_kv = nn.LayerNorm(64)  # a cross-attention block
    with pytest.raises(TypeError) as err:
        inject_residual_kv(model, 4)
    assert str(err.value) == (
        "text block 1 has an unsupported attention (MultiheadAttention); "
        "expected open_clip's ResidualAttentionBlock with nn.MultiheadAttention"
    )
    with pytest.raises(ValueError) as err:
        inject_residual_kv(load_backbone("diki-test-tiny", seed=0).model, 4, vision_layers=(5,))
    assert str(err.value) == "vision tower has 3 layers; cannot inject into layers [5]"


def test_frozen_path_passes_other_keyword_arguments_on():
    mha, state, layer = branch_layer("residual")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        _, weights = layer(x, x, x, need_weights=True, average_attn_weights=False)
    assert weights.shape == (2, 4, 5, 5)  # one map per head, not their average


def test_a_foreign_text_tower_without_a_text_attribute_is_named():
    model = load_backbone("diki-test-tiny", seed=0).model
    model.transformer = nn.Identity()
    with pytest.raises(TypeError) as err:
        inject_residual_kv(model, 4)
    assert str(err.value) == (
        "unsupported text tower (Identity): expected open_clip's own text transformer "
        "(Hugging Face text towers are not supported)"
    )
