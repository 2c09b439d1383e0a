"""The trainer: the platform's reference tiny LM (aifactory.tasks.payloads.train_lm),
written on the job runtime. Given the feature set, it trains on the train split's text,
reports val_bits_per_byte on the val split and saves model/ for model.py:ReviewLM."""

import sys

from aifactory.tasks.payloads.train_lm import main

if __name__ == "__main__":
    sys.exit(main())
