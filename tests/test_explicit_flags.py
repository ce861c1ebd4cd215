"""A flag the user typed always wins over an exit artifact's values, even when it equals the default."""
from __future__ import annotations

import pytest

from harness.cli import make_parser
from harness.config import GenerationConfig, for_strategy, from_args
from harness.generators import build_generator
from harness.trained_exits import attach


@pytest.fixture()
def trained(model):
    art = attach(model, "auto")
    assert art is not None, "the shipped exit artifact must attach to the embedded model"
    yield model
    model.set_exits(None)


def test_the_parser_records_which_flags_were_typed():
    args = make_parser("t").parse_args(["--generation_strategy", "calm", "--threshold", "0.9", "--no-sample"])
    assert {"generation_strategy", "threshold", "sample"} <= args._explicit
    assert "min_exit_layer" not in args._explicit and "max_steps" not in args._explicit
    cfg = from_args(GenerationConfig, args)
    assert "threshold" in cfg.explicit and cfg.threshold == 0.9


def test_typed_default_value_beats_the_calibrated_one(trained):
    cal = trained.exits.thresholds["calm"]["knobs"]["threshold"]
    assert cal != 0.9  # otherwise this test could not tell the two apart
    typed = from_args(GenerationConfig, make_parser("t").parse_args(["--generation_strategy", "calm",
                                                                     "--threshold", "0.9"]))
    gen = build_generator(trained, typed)
    assert gen.config.threshold == 0.9 and "threshold" not in gen.trained_knobs
    untouched = build_generator(trained, GenerationConfig(generation_strategy="calm"))
    assert untouched.config.threshold == cal and untouched.trained_knobs["threshold"] == cal


def test_strategy_specs_and_shared_flags_stay_explicit(trained):
    base = from_args(GenerationConfig, make_parser("t").parse_args(["--threshold", "0.9"]))
    calm = for_strategy(base, "calm")
    assert "threshold" in calm.explicit
    assert build_generator(trained, calm).config.threshold == 0.9
    spec = for_strategy(GenerationConfig(), "calm", min_exit_layer=6)  # named, and equal to the artifact's value
    gen = build_generator(trained, spec)
    assert gen.config.min_exit_layer == 6 and "min_exit_layer" not in gen.trained_knobs
    assert "threshold" in gen.trained_knobs  # the knob not named still comes from the artifact


def test_explicit_is_not_a_flag_or_a_knob():
    from harness.config import UsageError, parse_value

    assert "--explicit" not in make_parser("t").format_help()
    with pytest.raises(UsageError):
        parse_value("explicit", "threshold")


@pytest.mark.parametrize("strategies,flag,value,reaches", [
    ("eagle", "exit_layer", "3", False),  # EAGLE drafts from the last layer: no draft depth to take
    ("prompt_lookup", "threshold", "0.9", False),
    ("dynamic:criteria=cosine_similarity", "vocab_k", "10", False),  # a sub-mode that ignores it
    ("eagle,self_speculative", "exit_layer", "3", True),  # reaches self_speculative
    ("calm,free", "threshold", "0.9", True),
])
def test_a_typed_shared_flag_that_reaches_no_strategy_is_refused(strategies, flag, value, reaches):
    from harness.config import UsageError
    from harness.plan import expand_strategies

    base = from_args(GenerationConfig, make_parser("t").parse_args([f"--{flag}", value]))
    if reaches:
        configs = expand_strategies(strategies, base, 30)
        assert any(flag in c.explicit and str(getattr(c, flag)) == value for c in configs)
        return
    with pytest.raises(UsageError, match=f"--{flag} reaches none of --strategies"):
        expand_strategies(strategies, base, 30)
