"""Every registered method answers the whole protocol of `distill/spec.py`: its class variables, and
each call with the protocol's parameters (so the spine never passes something a method does not take).

    .venv/bin/python -m pytest tests/jobs/test_protocol.py -q
"""

from __future__ import annotations

import inspect

import pytest

from athanor.distill.spec import Method, Section
from athanor.jobs.methods import METHODS, get_method

CALLS = [name for name, member in vars(Method).items() if inspect.isfunction(member) and not name.startswith("_")]
CLASS_VARS = ["name", "Args", "Student", "trains", "mlflow_flavor", "mlflow_task", "auto_class", "nan_metrics",
              "metrics"]


def test_the_protocol_documents_every_call():
    assert {"load_teacher", "convert", "data", "evaluate", "speed_probe", "export"} <= set(CALLS)
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
