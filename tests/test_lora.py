"""LoRA with many adapters: equal to peft's LoRA for every adapter and shape, per-sample adapters equal the per-sample
loop, merge/unmerge are exact, the base stays frozen, init is peft's, bad input fails naming the value, and
add_lora + use_adapter on the zoo tower leave adapter None equal to the original tower."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn

from mmbridge_ref.bridges.lora import LoRALinear, add_lora, set_adapter, use_adapter

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self, d_in, d_out, bias=True): super().__init__(); self.fc = nn.Linear(d_in, d_out, bias=bias)
    def forward(self, x): return self.fc(x)


def trained_layer(d_in=6, d_out=5, r=2, alpha=4.0, k=3, bias=True, seed=0)->LoRALinear:
    "A LoRALinear whose B is moved away from zero, as after training."
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(d_in, d_out, bias=bias), r=r, alpha=alpha, num_adapters=k)
    nn.init.normal_(layer.lora_B)
    return layer


# --- against peft ------------------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 9), d_out=st.integers(1, 9), r=st.integers(1, 5), alpha=st.sampled_from([1.0, 2.0, 8.0, 16.0]),
       k=st.integers(1, 4), b=st.integers(1, 3), n=st.one_of(st.none(), st.integers(1, 4)), bias=st.booleans())
def test_equals_peft_for_every_adapter(d_in, d_out, r, alpha, k, b, n, bias):
    ours = trained_layer(d_in, d_out, r, alpha, k, bias)
    ref = Net(d_in, d_out, bias).requires_grad_(False)
    ref.fc.load_state_dict(ours.base.state_dict())
    peft_model = get_peft_model(ref, LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc"]))
    pl = peft_model.base_model.model.fc
    assert pl.scaling["default"] == pytest.approx(ours.scaling)
    x = torch.randn(b, d_in) if n is None else torch.randn(b, n, d_in)
    for a in range(k):
        with torch.no_grad():
            pl.lora_A["default"].weight.copy_(ours.lora_A[a]); pl.lora_B["default"].weight.copy_(ours.lora_B[a])
        torch.testing.assert_close(ours(x, a), peft_model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x, torch.full((b,), a)), peft_model(x), atol=1e-5, rtol=1e-5)
    with peft_model.disable_adapter():
        torch.testing.assert_close(ours(x, None), peft_model(x))


def test_init_is_peft_kaiming_uniform_and_zero_b():
    torch.manual_seed(0)
    d_in = 64
    ours = LoRALinear(nn.Linear(d_in, 32), r=8, alpha=16, num_adapters=4)
    pl = get_peft_model(Net(d_in, 32), LoraConfig(r=8, lora_alpha=16, target_modules=["fc"])).base_model.model.fc
    bound = 1 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt 5) on [r, in]: gain sqrt(1/3) * sqrt(3 / in)
    for A in [*ours.lora_A, pl.lora_A["default"].weight]:
        assert A.abs().max() <= bound
        assert A.abs().max() > 0.9 * bound  # per adapter: a fan_in of r*in would give a bound sqrt(r) times smaller
    assert (ours.lora_B == 0).all() and (pl.lora_B["default"].weight == 0).all()
    assert not torch.equal(ours.lora_A[0], ours.lora_A[1])  # adapters start different
    x = torch.randn(3, d_in)
    for a in range(4): torch.testing.assert_close(ours(x, a), ours.base(x))


# --- per-sample adapters -----------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 4), b=st.integers(1, 5), n=st.one_of(st.none(), st.integers(1, 3)), seed=st.integers(0, 100))
def test_per_sample_adapters_equal_the_loop(k, b, n, seed):
    layer = trained_layer(k=k, seed=seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, k, (b,), generator=g)
    x = torch.randn(b, 6, generator=g) if n is None else torch.randn(b, n, 6, generator=g)
    y = layer(x, idx)
    for i in range(b):
        torch.testing.assert_close(y[i], layer(x[i:i + 1], int(idx[i]))[0], atol=1e-6, rtol=1e-5)


def test_adapters_differ_and_none_is_the_base():
    layer, x = trained_layer(), torch.randn(4, 6)
    torch.testing.assert_close(layer(x, None), layer.base(x))
    torch.testing.assert_close(layer(x), layer.base(x))  # nothing active
    assert not torch.allclose(layer(x, 0), layer(x, 1))
    assert not torch.allclose(layer(x, 0), layer.base(x))


# --- frozen base, merge, unmerge ---------------------------------------------------------------------------------------

def test_base_is_frozen_and_only_lora_gets_gradients():
    layer = trained_layer()
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    layer(torch.randn(4, 6), torch.tensor([0, 2, 2, 0])).sum().backward()
    assert layer.lora_B.grad[1].abs().sum() == 0  # adapter 1 was not used
    assert layer.lora_B.grad[0].abs().sum() > 0 and layer.lora_B.grad[2].abs().sum() > 0


@pytest.mark.parametrize("bias", [True, False])
def test_merge_and_unmerge(bias):
    layer, x = trained_layer(bias=bias), torch.randn(3, 4, 6)
    for a in range(3):
        merged = layer.merge(a)
        assert type(merged) is nn.Linear and (merged.bias is None) == (not bias)
        torch.testing.assert_close(merged(x), layer(x, a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.unmerge(merged, a)(x), layer.base(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(1), layer.scaling * layer.lora_B[1] @ layer.lora_A[1])
    assert torch.linalg.matrix_rank(layer.delta_weight(1)) <= layer.r


# --- errors ------------------------------------------------------------------------------------------------------------

def test_bad_input_names_the_value():
    layer, x = trained_layer(), torch.randn(4, 6)
    with pytest.raises(ValueError, match="adapter=3 is out of range for num_adapters=3"): layer(x, 3)
    with pytest.raises(ValueError, match="adapter=-1 is out of range"): layer(x, -1)
    with pytest.raises(ValueError, match="adapter=-1 is out of range"): layer.merge(-1)
    with pytest.raises(ValueError, match="adapter has 3 indices but the batch has b=4"): layer(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"indices \[3\] are out of range"): layer(x, torch.tensor([0, 1, 3, 2]))
    with pytest.raises(ValueError, match="dtype=torch.float32"): layer(x, torch.zeros(4))
    with pytest.raises(ValueError, match="adapter=1.5"): layer(x, 1.5)
    with pytest.raises(ValueError, match="r=0 must be >= 1"): LoRALinear(nn.Linear(2, 2), r=0, alpha=1)
    with pytest.raises(ValueError, match="num_adapters=0"): LoRALinear(nn.Linear(2, 2), r=1, alpha=1, num_adapters=0)
    with pytest.raises(ValueError, match="Conv2d"): LoRALinear(nn.Conv2d(2, 2, 1), r=1, alpha=1)


# --- a whole tower -----------------------------------------------------------------------------------------------------

def test_add_lora_matches_names_like_peft():
    net = nn.Sequential(nn.Linear(3, 3), nn.ModuleDict({"qkv": nn.Linear(3, 3), "fc1": nn.Linear(3, 3), "xfc1": nn.Linear(3, 3)}))
    names = add_lora(net, ["qkv", "fc1"], r=1, alpha=1, num_adapters=2)
    assert names == ["1.qkv", "1.fc1"]  # a suffix matches after a dot, not inside a name ("xfc1")
    assert isinstance(net[1]["fc1"], LoRALinear) and type(net[1]["xfc1"]) is nn.Linear
    with pytest.raises(ValueError, match=r"targets=\['nope'\]"): add_lora(net, ["nope"], r=1, alpha=1)
    with pytest.raises(ValueError, match="no LoRALinear"): set_adapter(nn.Linear(2, 2), 0)


def test_zoo_tower_with_three_adapters():
    from mmbridge_ref.backbones.towers import load_zoo_vision
    tower, ref = load_zoo_vision(), load_zoo_vision()
    names = add_lora(tower, ["to_q", "to_kv", "to_out", "proj_in", "proj_out"], r=4, alpha=8, num_adapters=3)
    assert len(names) == 10 and "proj" not in names
    assert all(not p.requires_grad for n, p in tower.named_parameters() if "lora_" not in n)
    torch.manual_seed(0)
    for m in tower.modules():
        if isinstance(m, LoRALinear): nn.init.normal_(m.lora_B, std=0.05)
    img = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(img), ref(img))
        with use_adapter(tower, None): torch.testing.assert_close(tower(img), ref(img))
        idx = [2, 0, 1]
        with use_adapter(tower, torch.tensor(idx)): per_sample = tower(img)
        outs = []
        for a in range(3):
            with use_adapter(tower, a): outs.append(tower(img))
        assert not torch.allclose(outs[0], ref(img), atol=1e-3)
        assert not torch.allclose(outs[0], outs[1], atol=1e-3)
        for i, a in enumerate(idx): torch.testing.assert_close(per_sample[i], outs[a][i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tower(img), ref(img))  # the context restored "nothing active"
        assert set_adapter(tower, 1) == 10
        torch.testing.assert_close(tower(img), outs[1])
