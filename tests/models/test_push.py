"""`oodpl push` and `--push-to-hub`, against a fake hub: a stand-in for huggingface_hub.HfApi that stores each upload
in a local directory, from which the pushed models load with plain transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from oodpl.cli.main import main


class FakeHub:
    """huggingface_hub.HfApi's create_repo / upload_folder, writing to `root/<repo_id>/<path_in_repo>`."""

    calls: list = []

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, token=None):  # stands in for hub_push.hub_client
        return self

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        FakeHub.calls.append(("create_repo", repo_id, private))
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, folder_path, repo_id, repo_type=None, path_in_repo=None, commit_message=None):
        FakeHub.calls.append(("upload_folder", repo_id, path_in_repo))
        target = self.root / repo_id / (path_in_repo or "")
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        return type("CommitInfo", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    from oodpl.models import hub_push
    from oodpl.data import records

    hub = FakeHub(tmp_path / "hub")
    FakeHub.calls = []
    monkeypatch.setattr(hub_push, "hub_client", hub)
    monkeypatch.setattr(records, "hub_available", lambda timeout=3.0: True)
    return hub


def test_push_a_reward_model_and_meta_train_push_to_hub(tmp_path, fake_hub, capsys):
    from transformers import AutoModelForSequenceClassification

    from oodpl.config import RewardConfig
    from oodpl.models.reward import load_reward_model
    from test_metatrain import tiny_args

    rm = load_reward_model(RewardConfig(name_or_path="tiny-random"))
    rm.save(tmp_path / "rm")
    assert main(["--quiet", "push", str(tmp_path / "rm"), "me/my-rm", "--private"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "https://hub.example/me/my-rm/commit/1"
    assert FakeHub.calls == [("create_repo", "me/my-rm", True), ("upload_folder", "me/my-rm", None)]
    pushed = AutoModelForSequenceClassification.from_pretrained(fake_hub.root / "me" / "my-rm").eval()
    enc = rm.encode(["the film was"], [" great"])
    with torch.no_grad():
        torch.testing.assert_close(pushed(**enc).logits[:, 0], rm.score(["the film was"], [" great"]))
    # --push-to-hub on meta-train uploads the meta-trained reward model
    out = tmp_path / "meta"
    assert main(["--quiet", "meta-train", "-o", str(out), *tiny_args(tmp_path, steps=1), "--push-to-hub",
                 "me/meta-rm"]) == 0
    assert (fake_hub.root / "me" / "meta-rm" / "oodpl_reward.json").is_file()
    assert json.loads((fake_hub.root / "me" / "meta-rm" / "config.json").read_text())["id2label"] == {"0": "reward"}


def test_push_refuses_adapters_of_machine_local_bases_before_any_work(tmp_path, fake_hub, capsys):
    from test_journey import _perturbed_policy

    from oodpl.models.export import save_policy

    adapter = save_policy(_perturbed_policy(), tmp_path / "p", base_dir=tmp_path / "base")
    assert main(["--quiet", "push", str(adapter), "me/policy"]) == 2
    assert "a model on this machine only" in capsys.readouterr().err and FakeHub.calls == []
    assert main(["--quiet", "push", str(tmp_path), "me/x"]) == 2  # not a model directory
    assert "not a model directory" in capsys.readouterr().err
    from oodpl.config import RewardConfig
    from oodpl.models.reward import load_reward_model

    rm_dir = tmp_path / "rm"  # a complete reward model: the refusal is the push's, not the input checks'
    load_reward_model(RewardConfig(name_or_path="tiny-random")).save(rm_dir)
    out = tmp_path / "align"
    assert main(["--quiet", "meta-test", "--reward-model", str(rm_dir), "--prompts", str(tmp_path / "none.jsonl"),
                 "-o", str(out), "--set", "policy.name_or_path=tiny-random", "--push-to-hub", "me/p"]) == 2
    assert "exists on this machine only" in capsys.readouterr().err and not out.exists()
