"""Config files: TOML and JSON, validation messages, rule order."""

from __future__ import annotations

import json

import pytest

from onnx_magprune.config import PruneConfig, Rule, Scope, config_from_dict, load_config
from onnx_magprune.errors import ConfigError

TOML = """
sparsity = 0.7
scope = "local"
min_numel = 64
exclude = ["head*"]

[[rules]]
name = "*attn*"
op = "MatMul"
sparsity = 0.5

[[rules]]
name = "conv*"
min_sparsity = 0.2
max_sparsity = 0.6
"""


def test_toml_and_json_give_the_same_config(tmp_path):
    t = tmp_path / "c.toml"
    t.write_text(TOML)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({
        "sparsity": 0.7, "scope": "local", "min_numel": 64, "exclude": ["head*"],
        "rules": [{"name": "*attn*", "op": "MatMul", "sparsity": 0.5},
                  {"name": "conv*", "min_sparsity": 0.2, "max_sparsity": 0.6}],
    }))
    a, b = load_config(t), load_config(j)
    assert a.sparsity == b.sparsity == 0.7 and a.scope is b.scope is Scope.LOCAL and a.min_numel == 64
    strip = lambda c: [(r.name, r.op, r.exclude, r.sparsity, r.min_sparsity, r.max_sparsity) for r in c.rules]  # noqa
    assert strip(a) == strip(b) == [("head*", None, True, None, None, None), ("*attn*", "MatMul", False, 0.5, None, None),
                                    ("conv*", None, False, None, 0.2, 0.6)]


def test_first_matching_rule_wins_and_cli_excludes_come_first():
    cfg = PruneConfig(rules=(Rule(name="a*", sparsity=0.1), Rule(name="ab*", sparsity=0.9)))
    assert cfg.rule_for("abc", ["MatMul"]).sparsity == 0.1
    cfg = cfg.with_overrides(exclude=["abc"])
    assert cfg.rule_for("abc", ["MatMul"]).exclude
    assert cfg.rule_for("abd", ["MatMul"]).sparsity == 0.1
    assert Rule(name="*", op="Conv").matches("w", ["MatMul", "Conv"])
    assert not Rule(name="*", op="Conv").matches("w", ["MatMul"])


@pytest.mark.parametrize("raw,message", [
    ({"sparsity": 2}, "sparsity must be in [0, 1], got 2.0"),
    ({"sparsity": "high"}, "sparsity must be a number in [0, 1], got 'high'"),
    ({"scope": "sideways"}, "scope must be one of 'global', 'local', 'output', got 'sideways'"),
    ({"speed": 1}, "unknown key(s) speed"),
    ({"rules": [{"name": "x", "amount": 0.5}]}, "rules[0]: unknown key(s) amount"),
    ({"rules": [{"name": "x", "exclude": True, "sparsity": 0.5}]}, "an excluding rule cannot also set a sparsity"),
    ({"rules": [{"name": "x", "sparsity": 0.5, "max_sparsity": 0.6}]}, "set either sparsity or min/max bounds"),
    ({"rules": [{"min_sparsity": 0.7, "max_sparsity": 0.6}]}, "min_sparsity is above max_sparsity"),
    ({"exclude": "x"}, "exclude must be a list of name globs"),
    ({"min_numel": -1}, "min_numel must be a non-negative integer"),
    ({"nonfinite": "ignore"}, "nonfinite must be one of 'error', 'keep'"),
])
def test_bad_configs_say_what_is_wrong(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, "c.json")
    assert message in str(info.value)
    assert str(info.value).startswith("c.json")


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("sparsity = = 1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(bad)
    other = tmp_path / "c.yaml"
    other.write_text("x: 1")
    with pytest.raises(ConfigError, match="must end in .toml or .json"):
        load_config(other)
