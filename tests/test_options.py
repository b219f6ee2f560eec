"""The config dataclasses are the one source of the CLI options and of the Python API's signatures
(rankest.options): no model is loaded here."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Optional

import pytest

import rankest
from rankest import cli
from rankest.diagnostics.config import AnisotropyConfig, HeadSpectrumConfig
from rankest.errors import UserError
from rankest.estimator.config import EstimateConfig
from rankest.estimator.pipeline import run_estimate
from rankest.heads.config import HeadsConfig
from rankest.options import (
    MODEL_OPTIONS,
    add_arguments,
    config_from_args,
    keyword_options,
    option,
    option_fields,
    parse_passes,
    parse_positions,
    parse_tokens,
    positive_int,
    shared_option,
    to_kwargs,
)

#: command → (config, its Python API, the shared options its parser accepts without using them).
COMMANDS = {
    "estimate": (EstimateConfig, rankest.estimate, ()),
    "heads": (HeadsConfig, rankest.fit_heads, ("max_memory",)),
    "anisotropy": (AnisotropyConfig, rankest.anisotropy, ("max_memory",)),
    "head-spectrum": (HeadSpectrumConfig, rankest.head_spectrum,
                      ("corpus", "tokens", "seq_len", "positions", "sample", "batch_size", "max_memory", "seed")),
}


def subparser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def option_actions(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.dest not in ("help", "debug")]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_cli_field_is_one_option_with_the_field_default(command):
    config, _, unused = COMMANDS[command]
    actions = option_actions(subparser(command))
    for name, default, spec in option_fields(config):
        mine = [a for a in actions if a.dest == name]
        if not spec.cli:
            assert not mine, f"{command}: the Python-only option {name} has a flag"
            continue
        assert len(mine) == 1, f"{command} --{name}: {len(mine)} argparse options"
        assert mine[0].default == default, (command, name, mine[0].default, default)
        assert mine[0].help == spec.help
    # and the parser has nothing else: every option comes from the config (or is a shared one it ignores)
    cli_fields = {name for name, _, spec in option_fields(config, cli=True)}
    assert sorted(a.dest for a in actions) == sorted(cli_fields | set(unused))
    assert not cli_fields & set(unused)


def test_flags_of_bool_fields():
    p = subparser("estimate")
    flags = {a.dest: a.option_strings for a in option_actions(p)}
    assert flags["convergence"] == ["--no-convergence"] and flags["diagnostics"] == ["--diagnostics"]
    assert flags["seq_len"] == ["--seq-len"] and flags["checkpoint_every"] == ["--checkpoint-every"]
    assert {a.dest: a.option_strings for a in option_actions(subparser("anisotropy"))}["pca"] == ["--no-pca"]


@pytest.mark.parametrize("command", COMMANDS)
def test_the_python_api_signature_is_the_config(command):
    config, fn, _ = COMMANDS[command]
    params = inspect.signature(fn).parameters
    names = [f.name for f in dataclasses.fields(config)]
    extra = ["return_summary"] if fn is rankest.estimate else []
    assert list(params) == names + extra
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    for name, default, _ in option_fields(config):
        assert params[name].default == default
        assert params[name].annotation is not inspect.Parameter.empty
        assert f"    {name} = {default!r}" in fn.__doc__


def test_estimate_has_return_summary_like_run_estimate():
    assert "return_summary" in inspect.signature(run_estimate).parameters
    assert inspect.signature(rankest.estimate).parameters["return_summary"].default is False


@pytest.mark.parametrize("fn", [rankest.estimate, rankest.fit_heads, rankest.anisotropy, rankest.head_spectrum])
def test_an_unknown_keyword_is_a_type_error(fn):
    with pytest.raises(TypeError, match="unknown options"):
        fn(no_such_option=1)


def test_estimate_command_line_round_trips_into_the_config():
    args = cli.build_parser().parse_args(["estimate", "--tokens", "all", "--no-convergence", "--corpus", "a.txt"])
    cfg = config_from_args(EstimateConfig, args)
    assert cfg.tokens is None and cfg.convergence is False and cfg.corpus == "a.txt"
    assert cfg == EstimateConfig(tokens=None, convergence=False, corpus="a.txt")

    args = cli.build_parser().parse_args(["estimate", "--corpus", "a.txt", "b.txt", "--tokens", "1e3", "--passes",
                                          "3", "--positions", "stride:4", "--seq-len", "64", "--space", "prob",
                                          "--checkpoint-every", "2", "--teacher", "ngram:3"])
    cfg = config_from_args(EstimateConfig, args)
    assert cfg == EstimateConfig(corpus=["a.txt", "b.txt"], tokens=1000, passes=3, positions="stride:4", seq_len=64,
                                 space="prob", checkpoint_every=2, teacher="ngram:3")
    assert to_kwargs(cfg)["rows"] is None and set(to_kwargs(cfg)) == set(EstimateConfig.__dataclass_fields__)


def test_heads_and_diagnostics_command_lines_round_trip():
    parse = cli.build_parser().parse_args
    cfg = config_from_args(HeadsConfig, parse(["heads", "--ranks", "8,full", "--lr", "0.5", "--val-tokens", "128",
                                               "--max-memory", "1GB", "--cache-features", "f.h5"]))
    assert cfg == HeadsConfig(ranks="8,full", lr=0.5, val_tokens=128, cache_features="f.h5")

    cfg = config_from_args(AnisotropyConfig, parse(["anisotropy", "--no-pca", "--revisions", "a,b", "--tokens", "64"]))
    assert cfg == AnisotropyConfig(pca=False, revisions="a,b", tokens=64)
    assert AnisotropyConfig.from_kwargs(to_kwargs(cfg)).revisions == ["a", "b"]

    # head-spectrum accepts the corpus options like every model command, and ignores them
    cfg = config_from_args(HeadSpectrumConfig, parse(["head-spectrum", "--tokens", "64", "--corpus", "x", "--resume"]))
    assert cfg == HeadSpectrumConfig(resume=True)


def test_diagnostics_revision_rules_and_checks():
    assert AnisotropyConfig.from_kwargs({"revision": "step1"}).revisions == ["step1"]
    assert HeadSpectrumConfig.from_kwargs({"revisions": " step1, ,step2 "}).revisions == ["step1", "step2"]
    assert HeadSpectrumConfig.from_kwargs({"revisions": ["a"]}).revisions == ["a"]
    assert HeadSpectrumConfig.from_kwargs({}).revisions is None
    with pytest.raises(UserError, match="either --revision or --revisions"):
        AnisotropyConfig.from_kwargs({"revision": "a", "revisions": "b"})
    with pytest.raises(UserError, match="at least 2 representations"):
        AnisotropyConfig.from_kwargs({"tokens": 1})
    with pytest.raises(UserError, match="--batch-size"):
        AnisotropyConfig.from_kwargs({"batch_size": 0})
    with pytest.raises(UserError, match="top must be a positive integer"):
        HeadSpectrumConfig.from_kwargs({"top": 0})
    with pytest.raises(TypeError, match="head-spectrum: unknown options"):
        HeadSpectrumConfig.from_kwargs({"corpus": "lee"})


def test_shared_options_are_the_same_everywhere():
    for config, _, _ in COMMANDS.values():
        for name, default, spec in option_fields(config):
            if name in MODEL_OPTIONS:
                assert (default, spec) == MODEL_OPTIONS[name], (config.__name__, name)


# ---- the helper itself, on a toy config -------------------------------------------------------------
@dataclass
class Toy:
    teacher: Optional[str] = shared_option("teacher")
    size: int = option(3, type=positive_int, group="toy", help="a size")
    fast: bool = option(True, group="toy", help="go slowly")
    loud: bool = option(False, group="other", help="shout")
    name: Optional[str] = option(None, flag="--called", metavar="NAME", group="toy", help="a name")
    obj: object = option(None, cli=False, help="a Python object")
    plain: int = 0  # no option(): Python only


def test_add_arguments_groups_flags_and_exclude():
    p = argparse.ArgumentParser()
    add_arguments(p, Toy)
    titles = [g.title for g in p._action_groups][2:]
    assert titles == ["teacher and corpus", "toy", "other"]
    assert "plain" not in vars(p.parse_args([])) and "obj" not in vars(p.parse_args([]))
    args = p.parse_args(["--size", "5", "--no-fast", "--called", "x"])
    assert config_from_args(Toy, args) == Toy(size=5, fast=False, name="x")
    with pytest.raises(SystemExit):
        p.parse_args(["--size", "0"])

    p = argparse.ArgumentParser()
    add_arguments(p, Toy, groups=["other", "toy"], exclude=["name"])
    assert [a.dest for a in p._actions][1:] == ["loud", "size", "fast"]
    with pytest.raises(ValueError, match="shared options it lacks"):
        add_arguments(argparse.ArgumentParser(), Toy, unused=["teacher"])


def test_keyword_options_signature_and_doc():
    @keyword_options(Toy)
    def run(*, extra: int = 1, **kwargs):
        """Run the toy."""
        return kwargs, extra

    params = inspect.signature(run).parameters
    assert list(params) == ["teacher", "size", "fast", "loud", "name", "obj", "plain", "extra"]
    assert params["size"].annotation is int and params["fast"].default is True
    assert run.__doc__.startswith("Run the toy.") and "fast = True  [--no-fast]" in run.__doc__
    assert "obj = None\n        a Python object" in run.__doc__
    assert run(size=2) == ({"size": 2}, 1)


def test_parser_functions():
    assert parse_tokens("all") is None and parse_tokens("1e3") == 1000 and parse_tokens("2") == 2
    assert parse_passes("auto") == "auto" and parse_passes("3") == 3
    assert parse_positions("stride:2") == "stride:2"
    for fn, bad in ((parse_tokens, "1"), (parse_tokens, "x"), (parse_passes, "0"), (parse_positions, "stride:0"),
                    (positive_int, "0"), (positive_int, "x")):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)
