"""distrib.config: every shipped config loads, and bad input is refused with a helpful message."""

from pathlib import Path

import pytest

from distrib import config
from distrib.errors import DistribError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_configs_present():
    assert any(p.name == "default.toml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = config.load(path)
    assert set(cfg) <= set(config.SCHEMA)
    opts = config.optimizer_options(cfg)
    assert set(opts) <= set(config.SCHEMA["optimizer"]) | {"min_compress_numel"}
    compress = _compress_or_none()
    if compress is not None:
        c = config.build_compressor(cfg)
        name = cfg.get("compressor", {}).get("name", "none")
        assert (c is None) == (name == "none")


def _compress_or_none():
    try:
        import distrib.compress as compress
    except ImportError:
        return None
    return compress if hasattr(compress, "get") else None


def test_default_values_and_types():
    cfg = config.load(next(p for p in CONFIGS if p.name == "default.toml"))
    assert cfg["train"]["steps"] == 300 and isinstance(cfg["train"]["lr"], float)
    assert cfg["launch"]["transport"] == "zmq"
    assert config.build_compressor(cfg) is None  # name = "none": plain all-reduce


def test_ints_become_floats_and_nested_passes():
    cfg = config.loads("""
        [train]
        lr = 1
        [passes.prune]
        amount = 0.5
        every = 10
        [passes.compile]
        enabled = true
        mode = "reduce-overhead"
    """)
    assert cfg["train"]["lr"] == 1.0 and isinstance(cfg["train"]["lr"], float)
    assert cfg["passes"]["prune"] == {"amount": 0.5, "every": 10}


def test_optimizer_options_only_given_keys():
    cfg = config.loads("""
        [optimizer]
        topology = "ps"
        mode = "ssp"
        staleness = 2
        [compressor]
        name = "topk"
        ratio = 0.01
        min_numel = 1024
    """)
    assert config.optimizer_options(cfg) == {
        "topology": "ps", "mode": "ssp", "staleness": 2, "min_compress_numel": 1024}
    assert config.optimizer_options({}) == {}


def _error(text):
    with pytest.raises(config.ConfigError) as info:
        config.loads(text, source="bad.toml")
    assert isinstance(info.value, DistribError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith("bad.toml: ")
    return message


def test_unknown_table():
    message = _error("[trian]\nsteps = 3\n")
    assert "'trian'" in message and "train" in message and "compressor" in message


def test_unknown_key_names_table_and_choices():
    message = _error("[train]\nstep = 3\n")
    assert "'step'" in message and "[train]" in message and "batch_size" in message


def test_unknown_pass():
    message = _error("[passes.pruning]\namount = 0.5\n")
    assert "'pruning'" in message and "[passes]" in message and "prune" in message


def test_unknown_key_in_pass():
    message = _error("[passes.qat]\nbit = 8\n")
    assert "'bit'" in message and "[passes.qat]" in message and "bits" in message


@pytest.mark.parametrize("text, key, expected", [
    ('[train]\nsteps = "100"\n', "steps", "an integer"),
    ("[train]\nsteps = 1.5\n", "steps", "an integer"),
    ("[train]\nsteps = true\n", "steps", "an integer"),  # TOML booleans are not numbers
    ('[train]\nlr = "fast"\n', "lr", "a number"),
    ("[compressor]\nerror_feedback = 1\n", "error_feedback", "true or false"),
    ("[launch]\ntimeout = nan\n", "timeout", "a number"),
    ("[train]\nsteps = 0\n", "steps", ">= 1"),
    ("[train]\nlr = -0.1\n", "lr", "> 0"),
    ("[compressor]\nname = \"topk\"\nratio = 1.5\n", "ratio", "<= 1"),
])
def test_wrong_type_or_range(text, key, expected):
    message = _error(text)
    assert key in message and expected in message


@pytest.mark.parametrize("text, key, choice", [
    ('[launch]\ntransport = "tcp"\n', "transport", "'mpi'"),
    ('[optimizer]\ntopology = "tree"\n', "topology", "'ring'"),
    ('[optimizer]\nmode = "lazy"\n', "mode", "'ssp'"),
    ('[compressor]\nname = "zip"\n', "name", "'powersgd'"),
])
def test_bad_enum(text, key, choice):
    message = _error(text)
    assert key in message and choice in message and "one of" in message


def test_compressor_sizes_and_required_args():
    cfg = config.loads('[compressor]\nname = "countsketch"\ncols = 0.05\nk = 100\nmomentum = 0.9\n')
    assert cfg["compressor"]["cols"] == 0.05 and cfg["compressor"]["k"] == 100
    for bad in ("0", "1.5", "0.0", "true"):
        message = _error(f'[compressor]\nname = "countsketch"\nk = {bad}\n')
        assert "k must be an integer >= 1 (a count) or a number in (0, 1)" in message
    assert "momentum must be a number >= 0 and < 1" in _error(
        '[compressor]\nname = "countsketch"\nmomentum = 1.0\n')
    assert "needs key 'ratio'" in _error('[compressor]\nname = "topk"\n')


def test_argument_of_another_compressor():
    message = _error('[compressor]\nname = "qsgd"\nratio = 0.1\n')
    assert "'ratio'" in message and "qsgd" in message and "levels" in message


def test_key_outside_table_and_scalar_table():
    assert "'train' must be a table" in _error("train = 3\n")
    assert "unknown table 'steps'" in _error("steps = 3\n")
    assert "'passes.prune' must be a table" in _error("[passes]\nprune = true\n")


def test_file_errors(tmp_path):
    with pytest.raises(config.ConfigError, match="no such configuration file"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    with pytest.raises(config.ConfigError, match="bad.toml: not valid TOML"):
        config.load(bad)
    bad.write_text('[train]\nsteps = "x"\n')
    with pytest.raises(config.ConfigError, match=r"bad\.toml: \[train\] steps"):
        config.load(bad)


def test_compressor_args_match_constructors():
    import inspect
    compress = _compress_or_none()
    if compress is None:
        pytest.skip("distrib.compress.get not there yet")
    assert set(config.COMPRESSOR_ARGS) == set(config.COMPRESSORS) == set(compress.REGISTRY)
    for name, args in config.COMPRESSOR_ARGS.items():
        params = inspect.signature(compress.REGISTRY[name].__init__).parameters
        assert set(args) <= set(params) - {"self"}, name
        assert set(args) <= set(config.SCHEMA["compressor"]), name


def test_build_compressor():
    compress = _compress_or_none()
    if compress is None:
        pytest.skip("distrib.compress.get not there yet")
    cfg = config.loads('[compressor]\nname = "topk"\nratio = 0.05\nerror_feedback = true\n')
    c = config.build_compressor(cfg)
    assert isinstance(c, compress.ErrorFeedback)
    cfg = config.loads('[compressor]\nname = "qsgd"\nlevels = 16\n')
    c = config.build_compressor(cfg)
    assert isinstance(c, compress.QSGD) and c.levels == 16
    # PowerSGD's error feedback is its own constructor argument, not a wrapper.
    cfg = config.loads('[compressor]\nname = "powersgd"\nrank = 4\nerror_feedback = false\n')
    c = config.build_compressor(cfg)
    assert isinstance(c, compress.PowerSGD) and c.rank == 4 and c.error_feedback is False
    assert config.build_compressor(config.loads('[compressor]\nname = "none"\n')) is None
