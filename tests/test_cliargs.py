"""dsv3/cliargs.py: flags from a dataclass's fields (names, renames, types, bools, lists, choices,
help, defaults) and the dataclass back from the parsed arguments. Pure argparse, instant.

Run: python -m pytest tests/test_cliargs.py -q
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from dsv3.cliargs import add_fields, cli_default, from_args, selected_fields, setting


@dataclass
class Toy:
    seq_len: int = setting(256, "tokens per sequence")
    lr: float = setting(3e-3, "peak learning rate")
    name: str = setting("tiny", "which one", choices=("tiny", "small"))
    data: str | None = setting(None, "corpus (default: the stdlib)")
    limit: int | None = setting(None, "cap")
    compile: bool = setting(False, "torch.compile it")
    progress: bool = setting(True, "no progress bars")
    extra: list[str] = setting(factory=list, help="more data (repeatable)", metavar="PATH")
    ids: list[int] = setting(factory=list, help="token ids (repeatable)")
    warmup: int = setting(-1, "-1: 5% of the steps")
    out_dir: str = setting("runs/x", "run directory (default: runs/PRESET)", cli_default=None)
    plain: int = 7


def parser_for(cls=Toy, **kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy")
    add_fields(p, cls, **kw)
    return p


def actions(p) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions if a.dest != "help"}


def test_defaults_round_trip():
    args = parser_for().parse_args([])
    assert from_args(Toy, args, out_dir="runs/x") == Toy()
    assert args.out_dir is None  # the documented cli_default, not the library's value
    assert cli_default(next(f for f in selected_fields(Toy) if f.name == "out_dir")) is None


def test_flag_names_types_and_values():
    p = parser_for(rename={"out_dir": "--out"})
    args = p.parse_args(["--seq-len", "64", "--lr", "1e-4", "--name", "small", "--data", "d", "--limit", "3",
                         "--compile", "--no-progress", "--extra", "a", "--extra", "b", "--ids", "5", "--ids", "6",
                         "--warmup", "0", "--out", "o", "--plain", "8"])
    t = from_args(Toy, args)
    assert t == Toy(seq_len=64, lr=1e-4, name="small", data="d", limit=3, compile=True, progress=False,
                    extra=["a", "b"], ids=[5, 6], warmup=0, out_dir="o", plain=8)
    assert type(t.seq_len) is int and type(t.lr) is float and t.ids == [5, 6]
    flags = {a.dest: a.option_strings for a in p._actions}
    assert flags["out_dir"] == ["--out"] and flags["progress"] == ["--no-progress"]
    assert flags["compile"] == ["--compile", "--no-compile"]  # a False-default bool can be turned off again (resume)
    assert from_args(Toy, p.parse_args(["--compile", "--no-compile"])).compile is False  # the last one wins
    assert actions(p)["out_dir"].metavar == "OUT" and actions(p)["extra"].metavar == "PATH"


def test_renamed_flag_with_an_alias():
    """rename = (flag, alias, ...): one action, the first name for the metavar and the help, every name parses."""
    p = parser_for(rename={"out_dir": ("--out", "--out-dir"), "compile": ("--compile", "-c")})
    assert actions(p)["out_dir"].option_strings == ["--out", "--out-dir"] and actions(p)["out_dir"].metavar == "OUT"
    assert from_args(Toy, p.parse_args(["--out", "a"])).out_dir == "a"
    assert from_args(Toy, p.parse_args(["--out-dir", "b", "-c"])) == Toy(out_dir="b", compile=True)


def test_lists_are_fresh_each_parse():
    p = parser_for()
    a = from_args(Toy, p.parse_args(["--extra", "x"]), out_dir="o")
    b = from_args(Toy, p.parse_args([]), out_dir="o")
    assert a.extra == ["x"] and b.extra == [] and Toy().extra == []
    b.extra.append("y")
    assert from_args(Toy, p.parse_args([]), out_dir="o").extra == []


def test_help_from_metadata_and_defaults_shown():
    acts = actions(parser_for())
    assert acts["seq_len"].help == "tokens per sequence (default: %(default)s)"
    assert acts["data"].help == "corpus (default: the stdlib)"  # says its default itself: kept as is
    assert acts["compile"].help == "torch.compile it" and acts["progress"].help == "no progress bars"
    assert acts["warmup"].help.startswith("-1: 5%% of the steps")  # % escaped for argparse
    assert acts["plain"].help == "default: %(default)s"
    text = parser_for().format_help()
    assert "tokens per sequence (default: 256)" in text and "-1: 5% of the steps (default: -1)" in text
    assert acts["name"].choices == ["tiny", "small"]


def test_only_and_exclude():
    p = parser_for(only=("seq_len", "compile"))
    assert set(actions(p)) == {"seq_len", "compile"}
    t = from_args(Toy, p.parse_args(["--seq-len", "9"]), only=("seq_len", "compile"))
    assert t == Toy(seq_len=9)
    p = parser_for(exclude=("ids", "extra", "out_dir"))
    assert "ids" not in actions(p) and "seq_len" in actions(p)
    with pytest.raises(ValueError, match="Toy has no field 'nope'"):
        parser_for(only=("nope",))
    with pytest.raises(ValueError, match="Toy has no field 'optim_state'"):
        parser_for(rename={"optim_state": "--optim"})
    with pytest.raises(AttributeError, match="'lr'"):  # built back with a wider selection than was added
        from_args(Toy, argparse.Namespace(seq_len=1), only=("seq_len", "lr"))


def test_bad_values_are_argparse_errors(capsys):
    p = parser_for()
    for argv, msg in ((["--seq-len", "abc"], "argument --seq-len: invalid int value: 'abc'"),
                      (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
                      (["--name", "huge"], "argument --name: invalid choice: 'huge'"),
                      (["--ids", "x"], "argument --ids: invalid int value: 'x'"),
                      (["--compile", "yes"], "unrecognized arguments: yes")):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


def test_unsupported_types_and_missing_defaults_are_refused():
    @dataclass
    class Tup:
        shape: tuple[int, ...] = (1, 2)

    with pytest.raises(TypeError, match=r"Tup.shape: no command-line form"):
        parser_for(Tup)
    assert actions(parser_for(Tup, exclude=("shape",))) == {}

    @dataclass
    class NoDefault:
        n: int

    with pytest.raises(TypeError, match="'n' has no default"):
        parser_for(NoDefault)
