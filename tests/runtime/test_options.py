"""InferenceOptions: one validated, picklable, JSON round-trippable options object."""

from __future__ import annotations

import json
import pickle

import pytest

from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.options import InferenceOptions
from dunet_deploy.spec import InferenceDefaults


def test_round_trips_through_json_and_pickle():
    opts = InferenceOptions(backend="onnxruntime", batch_size=4, tta="flip", min_lesion_mm3=5,
                            save_prob=True, prob_dtype="uint16", workers=2, threads=3)
    assert InferenceOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    assert pickle.loads(pickle.dumps(opts)) == opts
    assert opts.min_lesion_mm3 == 5.0 and isinstance(opts.min_lesion_mm3, float)


@pytest.mark.parametrize(("changes", "message"), [
    ({"backend": "foo"}, "backend 'foo': choose one of auto, onnxruntime"),
    ({"precision": "fp8"}, "precision 'fp8': choose one of auto, fp32"),
    ({"tta": "rotate"}, "tta 'rotate': choose one of none, flip"),
    ({"resample": "always"}, "resample 'always': choose one of auto, never"),
    ({"batch_size": 0}, "batch_size 0: must be >= 1"),
    ({"batch_size": True}, "batch_size True: must be an integer >= 1"),
    ({"workers": -1}, "workers -1: must be >= 0"),
    ({"min_lesion_mm3": float("nan")}, "min_lesion_mm3 nan: must be a finite number >= 0"),
    ({"save_prob": "yes"}, "save_prob 'yes': must be True or False"),
])
def test_bad_values_fail_at_construction_naming_the_parameter(changes, message):
    with pytest.raises(DunetError) as err:
        InferenceOptions(**changes)
    assert str(err.value).startswith(message)
    name = next(iter(changes))
    assert err.value.option == name
    assert err.value.for_command().startswith("--" + name.replace("_", "-"))


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(DunetError, match="unknown key"):
        InferenceOptions.from_dict({"batch_size": 2, "bogus": 1})


def test_model_defaults_fill_only_what_was_not_given():
    model = InferenceDefaults(tta="flip", min_lesion_mm3=10.0)
    run, sources = InferenceOptions(min_lesion_mm3=0).with_model_defaults(model)
    assert (run.tta, run.min_lesion_mm3) == ("flip", 0.0)
    assert sources == {"tta": "model", "min_lesion_mm3": "argument", "register": "model"}
    assert run.register == "auto"  # the model's default
    model = InferenceDefaults(register="never")
    run, sources = InferenceOptions(register="always").with_model_defaults(model)
    assert run.register == "always" and sources["register"] == "argument"
    assert InferenceOptions().with_model_defaults(model)[0].register == "never"


def test_fingerprint_follows_outputs_not_speed():
    base = InferenceOptions()
    assert base.fingerprint() == base.replace(workers=3, batch_size=2, threads=1).fingerprint()
    assert base.fingerprint() != base.replace(tta="flip").fingerprint()
    assert base.fingerprint() != base.replace(save_prob=True).fingerprint()
