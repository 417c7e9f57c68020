"""The one declaration of every option (productd.config.OPTIONS) against what is written about the
options elsewhere: the README's option table, deploy/productd.env, and the limits derived from
them (pure logic, no processes)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from productd.actors import protocol
from productd.cli import build_parser
from productd.config import DEFAULT_SHARDS, OPTION, OPTIONS, Settings
from productd.http import stats, validation

ROOT = Path(__file__).resolve().parent.parent
# The table is found by its header row, wherever the README's sections move.
TABLE_HEADER = "| option | env | default | meaning |"


def readme_options() -> dict[str, tuple[str, str]]:
    """{option name: (env cell, default cell)} from the README's option table."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines.count(TABLE_HEADER) == 1, f"the README has no single option table headed {TABLE_HEADER!r}"
    start = lines.index(TABLE_HEADER) + 2  # after the |---| row
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        option, env, default, _meaning = (cell.strip() for cell in line.strip("|").split("|", 3))
        name = re.fullmatch(r"`--([a-z-]+)(?: [A-Z:]+)?`", option)
        assert name, f"README option cell {option!r} is not `--name` or `--name VALUE`"
        assert name.group(1) not in rows, f"--{name.group(1)} is twice in the README's option table"
        rows[name.group(1)] = (env, default)
    return rows


def readme_default(option) -> str:
    """The default as the README's table writes it."""
    if option.flag:
        return "off"
    if option.default_doc is not None:
        return option.default_doc
    if option.default is None:
        return "none"
    if isinstance(option.default, str):
        return f"`{option.default}`"
    return str(option.default)


def test_the_readme_table_lists_exactly_the_declared_options_with_their_defaults():
    rows = readme_options()
    assert sorted(rows) == sorted(OPTION), "README option table and productd.config.OPTIONS differ"
    for option in OPTIONS:
        env, default = rows[option.name]
        assert env == f"`{option.env}=1`" if option.flag else f"`{option.env}`", option.name
        assert default == readme_default(option), f"--{option.name}: README says {default!r}"


# deploy/productd.env: `#PRODUCTD_X=default` for each option, except those the unit sets, which
# its header lists indented (`#   PRODUCTD_DATA_DIR=/var/lib/productd ...`) with the unit's value.
DEFAULT_LINE = re.compile(r"#(PRODUCTD_[A-Z_]+)=(.*)")
UNIT_LINE = re.compile(r"#\s+(PRODUCTD_[A-Z_]+)=")


def env_file_entries() -> tuple[dict[str, str], list[str]]:
    defaults: dict[str, str] = {}
    unit_set: list[str] = []
    for line in (ROOT / "deploy" / "productd.env").read_text(encoding="utf-8").splitlines():
        if m := DEFAULT_LINE.fullmatch(line):
            assert m.group(1) not in defaults, f"{m.group(1)} is twice in deploy/productd.env"
            defaults[m.group(1)] = m.group(2)
        elif m := UNIT_LINE.match(line):
            unit_set.append(m.group(1))
    return defaults, unit_set


def test_the_env_file_lists_exactly_the_declared_options_with_their_defaults():
    defaults, unit_set = env_file_entries()
    assert sorted([*defaults, *unit_set]) == sorted(option.env for option in OPTIONS)
    for option in OPTIONS:
        if option.env not in defaults:
            continue  # set by the unit; its value there is the unit's
        value = defaults[option.env]
        if option.flag:
            assert value == "0", f"{option.env}={value}: a flag is off by default"
        elif option.default is None and option.default_doc is None:
            assert value == "", f"{option.env}={value}: the option has no default"
        else:
            parsed = option.parse(value)  # a bad value would be refused at start
            if option.name == "shards":  # the count with no data dir yet
                assert parsed == DEFAULT_SHARDS
            elif option.default_doc is None:
                assert parsed == option.default, f"{option.env}={value}, declared default {option.default!r}"
            # else the default depends on the machine (workers): the file shows a valid example


def test_settings_has_a_field_per_option_with_its_default():
    declared = {option.dest: option.default for option in OPTIONS}
    settings = Settings()
    assert [f.name for f in fields(Settings)] == [*declared, "auth_token"]
    assert {name: getattr(settings, name) for name in declared} == declared
    assert settings.auth_token is None and "secret" not in repr(Settings(auth_token="secret"))  # never logged


def test_the_parser_has_an_argument_per_option():
    args = vars(build_parser().parse_args(["serve"]))
    assert args.pop("command") == "serve"
    assert args == {option.dest: option.default for option in OPTIONS}


def test_every_image_setting_is_an_option_with_the_same_default():
    from productd.images.settings import ImageSettings

    for f in fields(ImageSettings):
        if f.name == "data_dir":
            assert OPTION["data-dir"].default == f.default
            continue
        option = OPTION["image-" + f.name.replace("_", "-")]
        assert (option.default if option.default is not None else ()) == f.default, option.name
    images = {o.name for o in OPTIONS if o.name.startswith("image-")}
    assert images == {"image-" + f.name.replace("_", "-") for f in fields(ImageSettings) if f.name != "data_dir"}


def test_derived_limits_read_the_declaration():
    assert stats.MAX_SHARDS == OPTION["shards"].parse.high
    assert validation.DEFAULT_MAX_EVENTS == OPTION["max-events"].default
    assert OPTION["inbox-bytes"].parse.low == protocol.PIPE_BUF  # an inbox holds at least one frame


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.gunicorn], ids=lambda o: o.name)
def test_options_handed_to_gunicorn_are_valid_there(option):
    from gunicorn.config import Config

    cfg = Config()
    cfg.set(option.gunicorn, option.to_gunicorn(option.default))
    assert option.gunicorn in cfg.settings
