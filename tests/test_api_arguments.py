"""apply's arguments: what a configuration fixes, a keep beside a schedule, the model a temperature
was fitted on, names taken in the registry, the budget each method can reach, the temperature hook."""

import copy
import json
import pickle
import re

import pytest
import torch
from conftest import tiny_bert, tiny_deit, tiny_vit
from transformers.modeling_outputs import ImageClassifierOutput

import tokenfuse
from tokenfuse.core import config as configs
from tokenfuse.core import schedule as sched
from tokenfuse.methods import Method, available, make
from tokenfuse.methods import registry as registry_module

# A calibrated configuration for tiny_bert's 4 layers.
CONFIG = {
    "method": "tome",
    "options": {"prop_attn": False},
    "schedule": [1.0, 0.8, 0.6, 0.5, 0.4],
    "keep": 0.65,
}


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"method": "mctf"}, "method='mctf' (the config: 'tome')"),
        ({"method": "tome"}, "method='tome' (the config: 'tome')"),  # even when it agrees
        ({"keep": 0.5}, "keep=0.5 (the config: 0.65)"),
        (
            {"schedule": [1.0, 0.9, 0.8, 0.7, 0.6]},
            "schedule=[1.0, 0.9, 0.8, 0.7, 0.6] (the config: [1.0, 0.8",
        ),
        ({"prop_attn": True}, "prop_attn=True (the config: False)"),
        ({"similarity": "keys"}, "similarity='keys' (the config: 'hidden')"),  # a default it was found with
    ],
)
def test_an_argument_the_config_sets_is_refused_naming_both(given, named):
    with pytest.raises(ValueError, match=re.escape(named) + ".* give the config alone"):
        tokenfuse.apply(tiny_bert(), config=CONFIG, **given)


def test_an_option_that_changes_no_decision_is_added_to_a_config():
    method = tokenfuse.patch_of(tokenfuse.apply(tiny_bert(), config=CONFIG, track_source=True)).method
    assert method.track_source and not method.prop_attn and method.schedule == CONFIG["schedule"]


def test_a_keep_beside_a_schedule_must_be_its_work():
    schedule = CONFIG["schedule"]
    work = sched.work(schedule)
    with pytest.raises(ValueError, match="keep 0.5 was given beside a schedule whose work is 0.65.*give one"):
        tokenfuse.apply(tiny_bert(), "tome", keep=0.5, schedule=schedule)
    method = tokenfuse.patch_of(
        tokenfuse.apply(tiny_bert(), "tome", keep=work + 1e-7, schedule=schedule)
    ).method
    assert method.schedule == schedule
    assert make("tome", schedule=schedule).keep == pytest.approx(work)  # what it does, not the default 0.5


def test_a_config_for_another_layer_count_is_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**CONFIG, "found": {"model": "minilm"}}))
    message = f"config {path} holds a schedule for a 4-layer model (minilm) and this model has 2 layers"
    with pytest.raises(ValueError, match=re.escape(message)):
        tokenfuse.apply(tiny_bert(layers=2), config=path)


def classifier_config(model: torch.nn.Module) -> dict:
    """A configuration for tiny_vit's 3 layers with a temperature fitted on `model`."""
    schedule = [1.0, 0.9, 0.8, 0.7]
    record = configs.model_record(model)
    return {"method": "tome", "options": {}, "schedule": schedule, "temperature": 2.0, "model": record}


def test_a_temperature_applies_to_the_model_it_was_fitted_on_only():
    model = tiny_vit()
    config = json.loads(json.dumps(classifier_config(model)))  # as read from its file
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        tokenfuse.apply(model, config={key: v for key, v in config.items() if key != "temperature"})
        plain = model(pixel_values=pixels).logits
        tokenfuse.apply(model, config=config)
        assert torch.allclose(model(pixel_values=pixels).logits * 2.0, plain)
    tokenfuse.apply(copy.deepcopy(model).to(torch.bfloat16), config=config)  # the same weights, cast

    other = tiny_vit()
    with torch.no_grad():
        other.classifier.weight.mul_(1.01)  # another head, the same architecture
    wrong = {
        other: "1 weight tensors differ, classifier.weight first",
        tiny_deit(): "this model is a DeiTModel",
    }
    for other_model, why in wrong.items():
        with pytest.raises(ValueError, match=f"temperature fitted on another model .*{why}"):
            tokenfuse.apply(other_model, config=config)
    with pytest.raises(ValueError, match="no record of the model it was fitted on"):
        tokenfuse.apply(model, config={key: v for key, v in config.items() if key != "model"})
    with pytest.raises(ValueError, match=re.escape("temperature=1 (the config: 2)")):
        tokenfuse.apply(model, config=config, temperature=1.0)


@pytest.fixture
def registry():
    """The registry, restored after the test whatever it registered."""
    saved = {kind: dict(names) for kind, names in registry_module._METHODS.items()}
    yield registry_module._METHODS["token"]
    for kind, names in saved.items():
        registry_module._METHODS[kind].clear()
        registry_module._METHODS[kind].update(names)


def test_register_refuses_a_taken_name_unless_asked(registry):
    class Mine(Method):
        name, paper = "tome", "none"

    class First(Method):
        name, paper = "test-taken", "none"

    class Second(Method):
        name, paper = "test-taken", "none"

    with pytest.raises(ValueError, match="'tome' is already registered .*ToMe.*replace=True"):
        tokenfuse.register(Mine)
    assert registry["tome"] is not Mine
    assert tokenfuse.register(First) is First
    assert tokenfuse.register(First) is First  # the same class again changes nothing
    with pytest.raises(ValueError, match="'test-taken' is already registered"):
        tokenfuse.register(Second)
    assert tokenfuse.register(Second, replace=True) is Second and registry["test-taken"] is Second

    @tokenfuse.register(replace=True)
    class Third(Method):
        name, paper = "test-taken", "none"

    assert registry["test-taken"] is Third

    class Nameless(Method):
        paper = "none"

    with pytest.raises(TypeError, match="Nameless needs a class attribute `name`"):
        tokenfuse.register(Nameless)


@pytest.mark.parametrize(
    ("name", "kind", "close"),
    [("tomee", "token", "tome"), ("ToMe", "token", "tome"), ("visonzip", "visual", "visionzip")],
)
def test_an_unknown_name_suggests_the_close_one(name, kind, close):
    with pytest.raises(ValueError, match=rf"unknown .*'{name}' \(did you mean '{close}'\?\); choose one of"):
        make(name, kind)


def test_an_unknown_name_far_from_every_name_lists_them_without_a_guess():
    with pytest.raises(ValueError) as err:
        tokenfuse.apply(tiny_bert(), "nope")
    assert "did you mean" not in str(err.value) and "choose one of: ats" in str(err.value)


def test_available_names_the_visual_operators_apart():
    assert "visionzip" in tokenfuse.available("visual") and "visionzip" not in tokenfuse.available()
    with pytest.raises(ValueError, match="kind must be 'token' .* or 'visual'"):
        tokenfuse.available("visuals")


def test_a_keep_that_is_no_number_is_told_to_be_one():
    with pytest.raises(ValueError, match=r"keep must be a number .*got '0\.5', a str: pass a number"):
        tokenfuse.apply(tiny_bert(), "tome", keep="0.5")


LAYERS, LENGTH, PROTECTED = 4, 64, 2  # tiny_bert's layers; [CLS] + 62 tokens + [SEP]
# the methods tiny_bert takes: those that cluster an image's patch grid (Expedite) are refused there
TEXT_METHODS = sorted(n for n, cls in available().items() if "grid" not in cls.needs)


def least_keep(name: str) -> float:
    """What the method's declaration allows on tiny_bert, by the schedule's own rule."""
    method = make(name)
    return sched.least_work(LAYERS, not (method.needs & Method.ATTENTION_INPUTS), method.max_removal)


def test_bipartite_methods_cannot_remove_more_than_half_per_point():
    halving = sched.work([0.5 ** (i + 1) for i in range(LAYERS + 1)])
    assert {n for n in available() if least_keep(n) == pytest.approx(halving)} == {
        "tome",
        "random",
        "pool",
        "pitome",
        "transforming",
    }
    assert least_keep("tome") == pytest.approx(0.75 * (1 - 0.5**LAYERS) / LAYERS)
    assert make("mctf", bidirectional=False).max_removal == 0.5
    assert make("transforming", targets="attention").max_removal == 1.0


def test_the_issues_keep_is_refused_before_any_forward():
    """keep=1e-6 used to run and do 0.195 of the work on MiniLM: ToMe halves at most per point."""
    with pytest.raises(ValueError, match=r"tome: keep 1e-06 is below .* must be above 0\.175781"):
        tokenfuse.apply(tiny_bert(layers=LAYERS), "tome", keep=1e-6)


@pytest.mark.parametrize("name", TEXT_METHODS)
def test_a_keep_below_what_a_method_reaches_is_refused_with_the_least(name):
    least = least_keep(name)
    with pytest.raises(ValueError, match=rf"{name}: keep .* must be above {re.escape(f'{least:.6g}')}"):
        tokenfuse.apply(tiny_bert(layers=LAYERS), name, keep=least * 0.95)
    below = [f * 0.9 for f in sched.geometric(least + 0.01, LAYERS)]  # a schedule asking as little
    with pytest.raises(ValueError, match=rf"{name} \(the given schedule's work\): keep"):
        tokenfuse.apply(tiny_bert(layers=LAYERS), name, schedule=below)


@pytest.mark.parametrize("name", TEXT_METHODS)
def test_a_keep_just_above_what_a_method_reaches_is_done(name):
    """Measured work is within (protected + 2) / length of the keep: the idealised reach ignores
    the protected tokens a point cannot remove and the rounding to whole tokens."""
    keep = least_keep(name) + 0.01
    model = tokenfuse.apply(tiny_bert(layers=LAYERS), name, keep=keep)
    ids = torch.randint(1000, 30000, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 101, 102
    with torch.inference_mode():
        model(input_ids=ids)
    done = tokenfuse.patch_of(model).layer_tokens().float().mean(1).mean(0) / LENGTH  # (B,)
    assert (done <= keep + (PROTECTED + 2) / LENGTH).all(), done
    if not available()[name].adaptive:  # adaptive methods may remove more than asked
        assert (done >= keep - 1e-6).all(), done


def test_the_temperature_hook_survives_deepcopy_and_pickle():
    model = tiny_vit()
    hooks = len(tokenfuse.apply(model, "tome", keep=0.9)._forward_hooks)
    tokenfuse.apply(model, "tome", keep=0.9, temperature=2.0)
    assert len(model._forward_hooks) == hooks + 1
    hook = list(model._forward_hooks.values())[-1]  # registered last
    logits = torch.randn(3, 5)
    for copied in (copy.deepcopy(hook), pickle.loads(pickle.dumps(hook))):
        assert torch.equal(copied(model, (), ImageClassifierOutput(logits=logits)).logits, logits / 2.0)
        assert torch.equal(copied(model, (), logits), logits / 2.0)  # timm returns the logits
