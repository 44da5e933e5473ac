"""``lowbit train --nproc N``, the launcher: ``WORLD_SIZE=1`` in the environment is a
single process; messages name the command line's options."""

from __future__ import annotations

import pytest

from lowbit.experiments import train as train_cli


def test_world_size_1_in_the_environment_is_not_a_launch(tmp_path, monkeypatch, capsys):
    """A review: WORLD_SIZE=1 left in the environment made `--nproc 2` refuse with
    "--world-size is 2 but this process was not launched on several ranks" (no such
    option). One rank is not a launch: the ranks are started."""
    from lowbit.cli import main

    launched = []
    monkeypatch.setattr(train_cli, "_torchrun", lambda args, nproc, out: launched.append(nproc) or 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train", "--nproc", "2", "--malloc", "default", "--out", str(tmp_path / "run")]) == 0
    assert launched == [2]
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["train", "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    assert "WORLD_SIZE must be an integer" in capsys.readouterr().err


@pytest.mark.parametrize("message, shown", [
    ("world_size is 2 but this process was not launched on several ranks: use torchrun or "
     "lowbit train --nproc", "--nproc is 2 but this process was not launched on several ranks"),
    ("batch_size (33) must be a multiple of world_size (2): it is the global batch",
     "--batch-size (33) must be a multiple of --nproc (2)"),
    ("model_kwargs must be a dict", "--model-arg must be a dict"),
])
def test_messages_name_the_options_of_the_command_line(message, shown):
    assert train_cli._as_option(message).startswith(shown)
