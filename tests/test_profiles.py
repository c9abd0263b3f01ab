"""Several EMA profiles updated in one step: each against its own float64 reference, swaps,
state dicts and checkpoints per profile, and post-hoc synthesis from two profiles."""

from types import MappingProxyType

import pytest
import torch
from conftest import DEVICE, assert_ulps
from models import batches, make_base, make_model, roundtrip, train_step

from triton_ema import EMAOptimizer, posthoc
from triton_ema.checkpoint import profile_state
from triton_ema.schedules import Cosine, PowerFunction

PROFILES = {"fast": 0.3, "cosine": Cosine(0.1, 0.01, total_steps=8), "power": PowerFunction(gamma=5.0)}


def wrapper(backend, dtype=torch.float32, momentum=PROFILES, **kw):
    model = make_model(dtype=dtype, device=DEVICE)
    return model, EMAOptimizer(make_base("adamw", model.parameters()), momentum=momentum, model=model,
                               backend=backend, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_profile_follows_its_float64_reference(backend, dtype):
    model, opt = wrapper(backend, dtype)
    schedules = {name: (lambda t, m=m: m) if isinstance(m, float) else m for name, m in PROFILES.items()}
    for t, batch in enumerate(batches(10, dtype=dtype, device=DEVICE)):
        stored = {name: [v.detach().double().clone() for v in profile_state(opt.core, k)["shadow"].values()]
                  for k, name in enumerate(PROFILES)}
        train_step(model, opt, batch)
        for k, name in enumerate(PROFILES):
            m = schedules[name](t)
            for s, old, p in zip(profile_state(opt.core, k)["shadow"].values(), stored[name], model.parameters()):
                p64 = p.detach().double()
                assert_ulps(s, old + m * (p64 - old), scale=torch.maximum(old.abs(), p64.abs()))  # one rounding
    # The stored shadows are float32 for every profile, as with one profile.
    assert all(v.dtype == torch.float32 for k in range(3) for v in profile_state(opt.core, k)["shadow"].values())


def test_one_profile_keeps_its_memory_and_two_cost_two(backend):
    _, one = wrapper(backend, momentum=0.1)
    _, two = wrapper(backend, momentum={"a": 0.1, "b": 0.2})
    sizes = [b.shadows.numel() for b in one.core.store.buckets]
    assert [b.shadows.shape[0] for b in one.core.store.buckets] == [1] * len(sizes)
    assert [b.shadows.numel() for b in two.core.store.buckets] == [2 * n for n in sizes]


def test_swap_puts_the_named_profile_in_and_takes_it_out_bitwise(backend):
    model, opt = wrapper(backend)
    for batch in batches(3, device=DEVICE):
        train_step(model, opt, batch)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    emas = {name: {k: v.clone() for k, v in opt.ema_state_dict(name).items()} for name in PROFILES}
    assert not torch.equal(emas["fast"]["fc.weight"], emas["power"]["fc.weight"])
    for name in PROFILES:
        with opt.swap_ema(name):
            assert all(torch.equal(v, emas[name][k]) for k, v in model.state_dict().items())
            for other in PROFILES:  # every profile's EMA reads right while one is swapped in
                assert all(torch.equal(v, emas[other][k]) for k, v in opt.ema_state_dict(other).items())
        assert all(torch.equal(v, training[k]) for k, v in model.state_dict().items())


def test_a_name_is_needed_with_several_profiles(backend):
    _, opt = wrapper(backend)
    with pytest.raises(ValueError, match="several profiles \\['fast', 'cosine', 'power'\\]: name the one"):
        opt.ema_state_dict()
    with pytest.raises(ValueError, match="no EMA profile named 'slow'"):
        with opt.swap_ema("slow"):
            pass


@pytest.mark.parametrize("stop", [2, 5])
def test_resume_continues_bitwise(backend, stop):
    data = batches(8, device=DEVICE)
    model, straight = wrapper(backend)
    for batch in data:
        train_step(model, straight, batch)

    model2, first = wrapper(backend)
    for batch in data[:stop]:
        train_step(model2, first, batch)
    sd = roundtrip(first.state_dict())
    model_sd = {k: v.clone() for k, v in model2.state_dict().items()}
    model3, resumed = wrapper(backend)
    model3.load_state_dict(model_sd)
    resumed.load_state_dict(sd)
    for batch in data[stop:]:
        train_step(model3, resumed, batch)
    for name in PROFILES:
        a, b = straight.ema_state_dict(name), resumed.ema_state_dict(name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_profile_names_are_checked_on_load(backend):
    _, saved = wrapper(backend, momentum={"a": 0.1, "b": 0.2})
    _, other = wrapper(backend, momentum={"a": 0.1, "c": 0.2})
    with pytest.raises(ValueError, match="holds \\['a', 'b'\\]; this EMA has profiles \\['a', 'c'\\]"):
        other.load_state_dict(saved.state_dict())
    _, single = wrapper(backend, momentum=0.1)
    with pytest.raises(ValueError, match="lacks \\['buffers', 'shadow'\\] \\(it was saved with profiles \\['a', 'b'\\]; "
                                         "this EMA has one unnamed profile\\)"):
        single.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="lacks \\['profiles'\\] \\(it was saved with one unnamed profile; "
                                         "this EMA has profiles \\['a', 'c'\\]\\)"):
        other.load_state_dict(single.state_dict())


def test_decay_dict_is_one_minus_momentum(backend):
    model, by_decay = wrapper(backend, momentum=None, decay={"a": 0.75, "b": 0.5})
    model2, by_momentum = wrapper(backend, momentum={"a": 0.25, "b": 0.5})
    for batch in batches(3, device=DEVICE):
        train_step(model, by_decay, batch)
        train_step(model2, by_momentum, batch)
    for name in "ab":
        a, b = by_decay.ema_state_dict(name), by_momentum.ema_state_dict(name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_mapping_that_is_no_dict_gives_the_same_profiles(backend):
    model, from_dict = wrapper(backend)
    model2, from_mapping = wrapper(backend, momentum=MappingProxyType(PROFILES))
    model3, from_decay = wrapper(backend, momentum=None, decay=MappingProxyType({"a": 0.75, "b": 0.5}))
    assert list(from_mapping.schedules) == list(PROFILES) and list(from_decay.schedules) == ["a", "b"]
    for batch in batches(3, device=DEVICE):
        for m, opt in ((model, from_dict), (model2, from_mapping), (model3, from_decay)):
            train_step(m, opt, batch)
    for name in PROFILES:
        a, b = from_dict.ema_state_dict(name), from_mapping.ema_state_dict(name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(from_mapping.state_dict()["ema"]["profiles"]) == set(PROFILES)


def test_skip_nonfinite_skips_every_profile(backend):
    p = torch.nn.Parameter(torch.zeros(4, device=DEVICE))
    opt = EMAOptimizer(torch.optim.SGD([p], lr=1.0), momentum={"a": 0.5, "b": 0.25}, backend=backend,
                       skip_nonfinite=True)
    p.grad = torch.full_like(p, -1.0)
    opt.step()  # p = 1: both profiles move
    p.grad = torch.full_like(p, float("nan"))
    opt.step()  # p = NaN: neither moves
    state = opt.state_dict()["ema"]["profiles"]
    assert torch.all(state["a"]["shadow"][0] == 0.5) and torch.all(state["b"]["shadow"][0] == 0.25)
    assert opt.skipped_updates == 1


def test_synthesis_from_two_profiles_is_close_to_a_profile_tracked_directly(tmp_path):
    """EDM2's claim: sigma_rel 0.08 synthesized from 0.05 and 0.10 snapshots comes much closer
    to the EMA tracked at 0.08 than either profile does."""
    def run(momentum):
        model = make_model()
        return model, EMAOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), momentum=momentum, model=model)

    model, opt = run({"short": PowerFunction(sigma_rel=0.05), "long": PowerFunction(sigma_rel=0.10)})
    model_ref, tracked = run(PowerFunction(sigma_rel=0.08))
    for batch in batches(200):
        train_step(model, opt, batch)
        train_step(model_ref, tracked, batch)
        if opt.num_steps % 20 == 0:
            posthoc.save_snapshot(opt, tmp_path)
    direct = tracked.ema_state_dict()
    got = posthoc.synthesize(tmp_path, sigma_rel=0.08)

    def distance(sd):
        return sum((sd[k].double() - direct[k].double()).square().sum() for k, _ in model.named_parameters()).sqrt()

    d_synth, d_short, d_long = distance(got), distance(opt.ema_state_dict("short")), distance(opt.ema_state_dict("long"))
    assert d_synth < min(d_short, d_long) / 5, (d_synth, d_short, d_long)


def test_load_ema_state_dict_starts_every_profile_from_the_weights(backend):
    model, opt = wrapper(backend)
    elsewhere = make_model(seed=9, device=DEVICE).state_dict()
    opt.load_ema_state_dict(elsewhere, num_steps=5)
    assert opt.num_steps == 5
    for name in PROFILES:
        ema = opt.ema_state_dict(name)
        assert all(torch.equal(ema[k], elsewhere[k]) for k, _ in model.named_parameters())
