"""lm-eval's own command line with ouro-lab models registered as `--model ouro-lab`.

    python -m ouro_lab.lm_eval_cli --model ouro-lab --model_args path=ckpt,steps=2 \
        --tasks loop_demo_mc --include_path tasks --batch_size 8
    ouro-lab lm-eval --model ouro-lab --model_args path=ckpt,strategy=threshold,q=0.7 ...

Every argument goes to lm-eval unchanged (`lm-eval run --help`). Model args are
`ouro_lab.lm.OuroLM`'s: path, steps, strategy (+ its parameters), kv_policy, live,
batch_size, device, dtype, max_length, max_gen_toks. Note that lm-eval resolves a task
YAML's relative `data_files` against the working directory (`ouro-lab eval` resolves
them against the YAML's folder).
"""

from __future__ import annotations

import os
import sys

NAME = "ouro-lab"


def register() -> None:
    """Register `OuroLM` with lm-eval's model registry under the name `ouro-lab`."""
    from lm_eval.api.registry import get_model, register_model

    from ouro_lab.lm import OuroLM

    try:
        if get_model(NAME) is OuroLM:
            return
    except (KeyError, ValueError):
        pass
    register_model(NAME)(OuroLM)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.__main__ import cli_evaluate

    register()
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
