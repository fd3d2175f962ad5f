"""Library messages name options in the API's words; the CLI renders them as its flags."""

from splice.errors import CheckpointError, option, render_options


def test_option_reference_renders_for_api_and_cli():
    e = CheckpointError(f"output x exists; pass {option('force')} to overwrite it")
    assert str(e) == "output x exists; pass force=True to overwrite it"
    assert e.cli_message({"force", "seed"}) == "output x exists; pass --force to overwrite it"


def test_option_with_value_and_unknown_flag():
    msg = f"{option('drop', 8)}: too many; try {option('allow_pickle')}"
    assert render_options(msg) == "drop=8: too many; try allow_pickle=True"
    assert render_options(msg, {"drop"}) == "--drop 8: too many; try allow_pickle=True"
