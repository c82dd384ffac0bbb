"""Publishing saved models to the Hugging Face hub: `oodpl push DIR REPO_ID`, and `--push-to-hub REPO_ID` on the
commands that save (meta-train, train-rm: the reward model; meta-test: the aligned policies).

A directory is pushed as it is (huggingface_hub's `create_repo` + `upload_folder`): a reward model (config.json) or
a policy adapter (adapter_config.json). An adapter whose base model was saved inside the run (a base that exists
only in code, or a GGUF file given by path) is refused: its adapter_config.json names a path on this machine, and
nobody who downloads it could load it."""

from __future__ import annotations

import json
from pathlib import Path

from oodpl.errors import UserError


def check_pushable(directory: str | Path) -> Path:
    """A model directory whose base (for an adapter) resolves on other machines; UserError otherwise."""
    d = Path(directory).expanduser()
    if not d.is_dir() or not ((d / "config.json").is_file() or (d / "adapter_config.json").is_file()):
        raise UserError(f"push: {d} is not a model directory (no config.json or adapter_config.json); pass a "
                        "reward_model/ directory or a policies/<domain>/beta_<beta>/ directory")
    if (d / "adapter_config.json").is_file():
        try:
            base = str(json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
                       .get("base_model_name_or_path") or "")
        except (OSError, ValueError) as e:
            raise UserError(f"{d / 'adapter_config.json'}: unreadable ({str(e).splitlines()[0]})") from None
        if base.startswith("/") or not base:
            raise UserError(f"push: the adapter {d} adapts {base or 'an unnamed base'}, a model on this machine only; "
                            "push its merged model instead (meta-test --merge writes merged/), or align a hub model")
    return d


def hub_client(token: str | None = None):
    """The hub client (huggingface_hub.HfApi); the tests put a local fake hub here."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def push_directory(directory: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                   path_in_repo: str | None = None, api=None) -> str:
    """Upload `directory` to the model repo `repo_id` (created when missing); returns the commit URL."""
    from oodpl.data.records import require_hub

    d = check_pushable(directory)
    if "/" not in repo_id.strip("/"):
        raise UserError(f"push: repo id {repo_id!r} needs an owner: OWNER/NAME")
    if api is None:
        require_hub(f"pushing {d} to {repo_id}")
        api = hub_client(token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(d), repo_id=repo_id, repo_type="model", path_in_repo=path_in_repo,
                                 commit_message=f"oodpl: {d.name}")
    except Exception as e:  # huggingface_hub raises its HTTP errors (401, 403, 404...) and network errors
        if isinstance(e, UserError):
            raise
        raise UserError(f"push to {repo_id} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); check "
                        "the repo id and your token (huggingface-cli login, or HF_TOKEN)") from None
    return str(getattr(info, "commit_url", info))


def push_outputs(directories: list[str | Path], repo_id: str, private: bool = False, api=None) -> list[str]:
    """--push-to-hub of a command: one directory goes to the repo's root, several to <domain>/beta_<beta>/."""
    dirs = [Path(p) for p in directories]
    for d in dirs:
        check_pushable(d)  # every one, before anything is uploaded
    if len(dirs) == 1:
        return [push_directory(dirs[0], repo_id, private, api=api)]
    return [push_directory(d, repo_id, private, path_in_repo=f"{d.parent.name}/{d.name}", api=api) for d in dirs]
