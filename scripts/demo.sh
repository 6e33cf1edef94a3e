#!/usr/bin/env bash
# The main job: set up .venv (see env.sh), then train a chat model from nothing on this machine:
# the synthetic task of rlhf.example, SFT, reward model and PPO on 2 CPU ranks (python -m rlhf.train
# --example), printing the reward curve and the SFT and PPO actors' answers to the same prompts.
# Extra arguments go to rlhf.train, e.g. `bash scripts/demo.sh --output-dir /tmp/example --force`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m rlhf.train --example "$@"
