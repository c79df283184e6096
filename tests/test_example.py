"""examples/train.py end to end: trains to a sane accuracy alone and under the launcher, and
takes its settings from defaults < config file (--config or DISTRIB_CONFIG) < command line."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"


def _run(args, env=None, timeout=90):
    # A clean job: nothing inherited from a launcher or config the tests themselves run under.
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("DISTRIB_") and k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env = dict(base, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _accuracy(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.findall(r"test_accuracy=([0-9.]+)", proc.stdout)
    assert len(found) == 1, proc.stdout  # printed by rank 0 only
    return float(found[0])


@pytest.mark.timeout(120)
def test_launch_two_workers():
    if not (ROOT / "launcher" / "cli.py").exists():
        pytest.skip("launcher/cli.py not there yet")
    proc = _run(["-m", "launcher.cli", "launch", "-n", "2", str(TRAIN), "--steps", "100"])
    assert "2 worker(s)" in proc.stdout
    assert len(re.findall(r"step +\d+ +loss", proc.stdout)) == 2  # steps 50 and 100
    assert _accuracy(proc) > 0.85


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_example", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def job_of_one(monkeypatch):
    """A clean job of one in this process: other in-process tests may have left distrib
    initialised (always as a job of one here), and no launcher variables may leak in."""
    import distrib
    if distrib.is_initialized():
        if distrib.size() != 1:
            pytest.skip("this test process belongs to a multi-rank distrib job")
        distrib.shutdown()
    for var in [v for v in os.environ if v.startswith("DISTRIB_") or v in ("RANK", "WORLD_SIZE")]:
        monkeypatch.delenv(var)


@pytest.mark.timeout(60)
def test_job_of_one_reads_distrib_config(train, job_of_one, tmp_path, monkeypatch, capsys):
    import distrib
    cfg = tmp_path / "short.toml"
    cfg.write_text("[train]\nsteps = 80\nlr = 0.2\neval_every = 40\n")
    monkeypatch.setenv("DISTRIB_CONFIG", str(cfg))
    train.main(["--stats"])
    out = capsys.readouterr().out
    assert "1 worker(s)" in out and "steps=80" in out and "rank 0 stats: steps=80" in out
    assert len(re.findall(r"step +\d+ +loss", out)) == 2  # steps 40 and 80
    assert float(re.search(r"test_accuracy=([0-9.]+)", out).group(1)) > 0.85
    assert not distrib.is_initialized()


@pytest.mark.timeout(60)
def test_passes_and_amp_tables_are_applied(train, job_of_one, tmp_path, monkeypatch, capsys):
    import distrib
    cfg = tmp_path / "passes.toml"
    cfg.write_text("[train]\nsteps = 60\neval_every = 0\n[amp]\nenabled = true\n"
                   "init_scale = 256.0\n[passes.prune]\namount = 0.5\nevery = 20\n")
    result = train.main(["--config", str(cfg)])
    out = capsys.readouterr().out
    assert "with prune+amp" in out
    assert distrib.passes.sparsity(result["model"]) == pytest.approx(0.5, abs=0.01)
    assert result["optimizer"].loss_scalers  # the scaler took part in the steps
    assert result["test_accuracy"] > 0.6


def test_defaults_match_default_config(train):
    from distrib import config
    assert config.load(ROOT / "configs" / "default.toml")["train"] == train.DEFAULTS


def test_settings_priority(train, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTRIB_CONFIG", raising=False)
    settings = lambda *argv: train.settings(train.parse_args(list(argv)))  # noqa: E731
    assert settings()[0] == train.DEFAULTS
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nsteps = 7\nlr = 0.3\n[compressor]\nname = "qsgd"\nlevels = 4\n'
                   'min_numel = 16\n')
    monkeypatch.setenv("DISTRIB_CONFIG", str(cfg))
    t, c = settings("--lr", "0.05")
    assert (t["steps"], t["lr"], t["hidden"]) == (7, 0.05, train.DEFAULTS["hidden"])
    assert c["compressor"] == {"name": "qsgd", "levels": 4, "min_numel": 16}
    # --config wins over DISTRIB_CONFIG; --compressor drops the other compressor's arguments.
    other = tmp_path / "o.toml"
    other.write_text("[train]\nsteps = 9\n")
    t, c = settings("--config", str(other), "--compressor", "powersgd")
    assert t["steps"] == 9 and c["compressor"] == {"name": "powersgd"}
    t, c = settings("--compressor", "powersgd")
    assert c["compressor"] == {"name": "powersgd", "min_numel": 16}
    # top-k needs a ratio: the example's default, unless the config has a [compressor] for it.
    t, c = settings("--config", str(other), "--compressor", "topk")
    assert c["compressor"] == {"name": "topk", "ratio": 0.01, "error_feedback": True}
    cfg.write_text('[compressor]\nname = "topk"\nratio = 0.2\n')
    t, c = settings("--compressor", "topk")
    assert c["compressor"] == {"name": "topk", "ratio": 0.2}


def test_bad_settings_are_refused(train, tmp_path, monkeypatch):
    from distrib.config import ConfigError
    monkeypatch.delenv("DISTRIB_CONFIG", raising=False)
    cfg = tmp_path / "typo.toml"
    cfg.write_text("[train]\nbatchsize = 8\n")
    with pytest.raises(ConfigError, match="batchsize"):
        train.settings(train.parse_args(["--config", str(cfg)]))
    with pytest.raises(ConfigError, match="steps"):
        train.settings(train.parse_args(["--steps", "0"]))
    x, y, _, _ = train.digits.load()
    with pytest.raises(ValueError, match="batch size"):
        train.Batches(x[:4], y[:4], batch_size=8, seed=0)
