"""The spent chute bar kept on disk: written whole, read back only for the same model, plan and prior."""

from __future__ import annotations

import json

import pytest

from edge_agent import chute_bar

KEY = chute_bar.bar_key("ab" * 32, 1.198, "cd" * 32, 0.05)


def test_kept_posteriors_come_back_for_the_same_key_only(tmp_path):
    path = tmp_path / "chute-bar.json"
    assert chute_bar.kept(path, KEY) is None  # nothing kept yet
    chute_bar.keep(path, KEY, [0.99999, 0.995, 1.0])
    assert chute_bar.kept(path, KEY) == [0.99999, 0.995, 1.0]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert not list(tmp_path.glob("*.partial"))
    for other in (chute_bar.bar_key("ef" * 32, 1.198, "cd" * 32, 0.05),  # another model
                  chute_bar.bar_key("ab" * 32, 1.0, "cd" * 32, 0.05),  # another calibration
                  chute_bar.bar_key("ab" * 32, 1.198, "00" * 32, 0.05),  # another plan
                  chute_bar.bar_key("ab" * 32, 1.198, "cd" * 32, 0.02)):  # another prior
        assert chute_bar.kept(path, other) is None


@pytest.mark.parametrize("text, message", [
    ("{half", "not JSON"),
    ("[1, 2]", "not a chute bar file"),
    (json.dumps({"format": 99, "key": KEY, "posteriors": []}), "not a chute bar file"),
    (json.dumps({"format": 1, "key": KEY, "posteriors": [0.9, "x"]}), "must be numbers"),
    (json.dumps({"format": 1, "key": KEY, "posteriors": [True]}), "must be numbers"),
])
def test_a_damaged_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "chute-bar.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        chute_bar.kept(path, KEY)
