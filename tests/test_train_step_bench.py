"""benchmarks/train_step.py refuses a recipe it does not know, naming it, before it trains anything."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step  # noqa: E402


def test_quality_names_an_unknown_recipe():
    with pytest.raises(ValueError, match=r"unknown recipes \['nope'\]: choose among"):
        train_step.quality(1, ["clip", "nope"])


@pytest.mark.parametrize("flag", ["--recipes", "--quality-recipes"])
def test_the_command_line_names_an_unknown_recipe(flag, capsys):
    with pytest.raises(SystemExit):
        train_step.main([flag, "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_every_default_recipe_is_known():
    assert set(train_step.QUALITY_DEFAULT) <= set(train_step.QUALITY)
