"""What ``curate-rl fit --print_config`` shows: the values a run uses, not ``null`` for defaults
filled in later (the optimizer and the default task mix), without changing what a config means."""

from __future__ import annotations

import contextlib
import io

import yaml

from components.cli import main
from components.data.datamodule import default_tasks
from tests.runs import ROOT, resolved

GRPO = ROOT / "recipes" / "grpo.yaml"


def _print_config(*args: str) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main(["fit", "--config", str(GRPO), *args, "--print_config"])
    return yaml.safe_load(buf.getvalue())


def test_the_printed_config_shows_the_lr_and_the_default_mix():
    cfg = resolved(GRPO)
    opt = cfg["model"]["optimizer"]
    assert opt["class_path"] == "torch.optim.AdamW"
    assert opt["init_args"]["lr"] == 1e-4 and opt["init_args"]["betas"] == [0.9, 0.98] and opt["init_args"]["weight_decay"] == 0
    tasks = cfg["data"]["tasks"]
    assert [(t["name"], t["weight"], t["tag"]) for t in tasks] == [("chain_sum", w, f"d{d}") for d, w in ((1, 1), (2, 3), (3, 1))]
    assert [t["config"] for t in tasks] == [t.config for t in default_tasks()]


def test_files_alone_still_mean_no_default_tasks_and_the_print_says_so(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n')
    cfg = _print_config("--data.files", f'[{{"path": "{data}"}}]')
    assert cfg["data"]["tasks"] == [] and cfg["data"]["files"][0]["path"] == str(data)


def test_the_printed_config_runs_as_the_same_config(tmp_path):
    """Fed back as the only config, the printed one resolves to itself: showing the defaults
    changed nothing they mean."""
    printed = _print_config()
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    again = yaml.safe_load(buf.getvalue())
    printed.pop("config", None), again.pop("config", None)
    assert again == printed


def test_an_lr_alone_keeps_the_shared_base_and_an_overlay_keeps_adamws_own_betas():
    """A real default lets ``--model.optimizer.lr`` be given alone (before, it needed a class_path);
    jsonargparse merges given init_args into the default, so the GPU overlay states AdamW's own."""
    cfg = _print_config("--model.optimizer.lr", "3e-4")
    args = cfg["model"]["optimizer"]["init_args"]
    assert (args["lr"], args["betas"], args["weight_decay"]) == (3e-4, [0.9, 0.98], 0.0)
    gpu = resolved(ROOT / "configs" / "gpu-1x.yaml", GRPO)["model"]["optimizer"]["init_args"]
    assert (gpu["lr"], gpu["betas"], gpu["weight_decay"]) == (1e-6, [0.9, 0.999], 0.01)
