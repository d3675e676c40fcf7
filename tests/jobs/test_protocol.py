"""Every registered method answers the whole protocol of `distill/spec.py`: its class variables, and
each call with the protocol's parameters (so the spine never passes something a method does not take); every
method subclasses `distill/method_base.py`'s `MethodBase`, whose optional calls behave as "not taking part".

    .venv/bin/python -m pytest tests/jobs/test_protocol.py -q
"""

from __future__ import annotations

import inspect

import pytest

from athanor.distill.method_base import REQUIRED_CALLS, MethodBase, overrides
from athanor.distill.spec import Method, RecipeError, Section, TrainSpec
from athanor.jobs.methods import METHODS, get_method

CALLS = [name for name, member in vars(Method).items() if inspect.isfunction(member) and not name.startswith("_")]
CLASS_VARS = ["name", "Args", "Student", "trains", "mlflow_flavor", "mlflow_task", "auto_class", "nan_metrics",
              "metrics"]
OPTIONAL = ["cost_notes", "lm_eval_model", "comparison_arms", "compare_arms"]


def test_the_protocol_documents_every_call():
    assert {"load_teacher", "convert", "data", "evaluate", "speed_probe", "export", *OPTIONAL} <= set(CALLS)
    undocumented = [name for name in CALLS if not (getattr(Method, name).__doc__ or "").strip()]
    assert undocumented == []


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_answers_the_protocol(name):
    method = get_method(name)
    assert isinstance(method, Method)
    missing = [var for var in CLASS_VARS if not hasattr(type(method), var)]
    assert missing == []
    assert method.name == name
    assert issubclass(method.Args, Section) and issubclass(method.Student, Section)
    assert method.mlflow_flavor in ("transformers", "artifacts")
    assert method.metrics and set(method.metrics.values()) <= {"higher", "lower", "neutral"}, method.metrics
    assert method.nan_metrics <= set(method.metrics), "a metric that may be NaN is a declared metric"
    if method.mlflow_flavor == "transformers":
        assert method.auto_class, "the registry loads transformers exports with the method's auto_class"
    for call in CALLS:
        expected = list(inspect.signature(getattr(Method, call)).parameters)
        actual = list(inspect.signature(getattr(type(method), call)).parameters)
        assert actual == expected, f"{name}.{call}{actual} does not match the protocol's {expected}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_objects_hold_no_job_state(name):
    """The spine may call any method object in any order; nothing set by one call is read by another."""
    assert vars(get_method(name)) == {}


def test_the_base_class_declares_the_protocol():
    """MethodBase has every call of the protocol with its parameters, and documents every class variable."""
    for call in CALLS:
        assert list(inspect.signature(getattr(MethodBase, call)).parameters) == \
            list(inspect.signature(getattr(Method, call)).parameters), call
    assert set(CLASS_VARS) <= set(MethodBase.__annotations__)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_subclasses_the_base(name):
    assert isinstance(get_method(name), MethodBase)


class _Bare(MethodBase):
    name = "bare"
    Args = Section
    Student = Section
    trains = False
    metrics = {"params": "neutral"}
    load_teacher = convert = data = teacher_model = evaluate = speed_probe = export = (lambda self, *a, **k: None)


def test_optional_calls_default_to_not_taking_part():
    bare = _Bare()
    assert bare.cost_notes(None, None, Section()) == []
    assert bare.comparison_arms(Section(), TrainSpec()) == {}
    assert bare.compare_arms(Section(), {}, None, {}, {}) == {}
    assert not any(overrides(bare, call) for call in OPTIONAL)
    with pytest.raises(RecipeError, match="lm-evaluation-harness"):
        bare.lm_eval_model(None, None, Section())
    assert (bare.trains, bare.mlflow_flavor, bare.auto_class, bare.nan_metrics) == (False, "artifacts", None, set())


def test_a_method_missing_its_declarations_is_refused_when_defined():
    with pytest.raises(TypeError, match="must define Args, Student, metrics"):
        type("NoArgs", (MethodBase,), {"name": "x", "trains": False})
    calls = {call: (lambda self, *a, **k: None) for call in REQUIRED_CALLS}
    with pytest.raises(TypeError, match="lightning_module, trained_student"):
        type("Trains", (MethodBase,), {"name": "x", "Args": Section, "Student": Section, "metrics": {}, **calls})
    with pytest.raises(TypeError, match="must define evaluate, speed_probe$|must define evaluate, speed_probe \\("):
        type("NoEval", (MethodBase,), {"name": "x", "Args": Section, "Student": Section, "metrics": {}, "trains": False,
                                       **{k: v for k, v in calls.items() if k not in ("evaluate", "speed_probe")}})


def test_a_registered_class_that_is_not_a_method_base_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setitem(METHODS, "plugin", "collections:OrderedDict")
    with pytest.raises(TypeError, match=r"'plugin' \(collections:OrderedDict\) is not a subclass of .*MethodBase"):
        get_method("plugin")
