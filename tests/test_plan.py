import pytest

from flowblend.runtime.plan import BlendPlan


def test_paper_default_is_20_large_20_small_10_large():
    plan = BlendPlan.parse("LSL:0.4,0.2", 50)
    assert plan.models == ("large",) * 20 + ("small",) * 20 + ("large",) * 10
    assert plan.label == "L20,S20,L10"
    assert plan.count("large") == 30 and plan.count("small") == 20


@pytest.mark.parametrize("spec,expected", [
    ("LLL", "L50"), ("SSS", "S50"), ("LSS:0.4", "L20,S30"), ("SLL:0.4", "S20,L30"), ("LSL", "L20,S20,L10"),
    ("L20,S20,L10", "L20,S20,L10"), ("L25,S25", "L25,S25"),
])
def test_spellings(spec, expected):
    assert BlendPlan.parse(spec, 50).label == expected


def test_per_step_list_and_string():
    assert BlendPlan.from_steps("LLSSL").models == ("large", "large", "small", "small", "large")
    assert BlendPlan.parse("LSSSL", 5).label == "L1,S3,L1"
    assert BlendPlan.from_steps(["large", "small"]).label == "L1,S1"


def test_json_round_trip():
    plan = BlendPlan.parse("LSL:0.3,0.1", 20)
    assert BlendPlan.from_json(plan.to_json()) == plan


def test_cost_from_per_step_flops():
    plan = BlendPlan.parse("LSL:0.4,0.2", 50)
    assert plan.flops({"large": 10.0, "small": 1.0}) == 30 * 10.0 + 20 * 1.0


@pytest.mark.parametrize("spec,steps,match", [
    ("LSL:1.2,0.1", 50, "outside"), ("LSL:-0.1,0.1", 50, "outside"), ("LSL:0.7,0.5", 50, "exceed 1"),
    ("L20,S20", 50, "sum to 40"), ("LXL", 50, "cannot read|unknown"), ("LSL", 0, "positive"),
    ("L20,Q5", 25, "not of the form"), ("LLSS", 5, "has 4 steps"),
])
def test_invalid_plans_raise_with_fix(spec, steps, match):
    with pytest.raises(ValueError, match=match):
        BlendPlan.parse(spec, steps)


def test_unknown_model_name_and_empty_plan():
    with pytest.raises(ValueError, match="unknown model"):
        BlendPlan.from_steps(["large", "medium"])
    with pytest.raises(ValueError, match="at least one step"):
        BlendPlan(())
