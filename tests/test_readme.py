"""The README's commands and figures against what the code prints, so the README cannot drift:
the memory plans it quotes, the options its commands pass, the paths and config keys it
names, the evaluation summary it shows, and the learning ranges it derives from the seed
results in benchmarks/results/.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def _commands() -> list[list[str]]:
    """Every command line of the README's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in _bash_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line.replace("$HEAD", "head")))
    return commands


def _section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + len(title))
    return README[start:] if end < 0 else README[start:end]


def _table(text: str, header_start: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose header begins with ``header_start``."""
    lines = text[text.index(header_start):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


# --------------------------------------------------------------------------- commands


def test_every_command_uses_the_environments_programs():
    for command in _commands():
        program = command[0]
        assert program not in ("python", "python3", "torchrun", "pip"), \
            f"{shlex.join(command)}: use .venv/bin/{program} (the README says so at the top)"


def _script_and_options(command: list[str]) -> tuple[str, list[str]] | None:
    scripts = [arg for arg in command if arg.endswith(".py")]
    if not scripts or not command[0].startswith(".venv/bin/"):
        return None
    return scripts[0], [arg.split("=")[0] for arg in command[command.index(scripts[0]) + 1:]
                        if arg.startswith("--")]


@pytest.mark.slow
def test_every_script_the_readme_runs_has_the_options_it_passes():
    wanted: dict[str, set[str]] = {}
    for command in _commands():
        found = _script_and_options(command)
        if found:
            wanted.setdefault(found[0], set()).update(found[1])
    # the tables' commands too (plan_check.py's)
    for script, options in re.findall(r"`(benchmarks/\w+\.py)((?: --[\w-]+(?: [\w.=-]+)?)*)`", README):
        wanted.setdefault(script, set()).update(re.findall(r"--[\w-]+", options))
    assert {"train.py", "evaluate.py", "scripts/prepare_avqa.py", "benchmarks/seeds.py"} <= set(wanted)
    helps = _helps(sorted(wanted))
    for script, options in sorted(wanted.items()):
        status, text = helps[script]
        assert status == 0, f"{script} --help exited {status}: {text[-2000:]}"
        missing = [o for o in sorted(options) if not re.search(rf"{re.escape(o)}\b", text)]
        assert not missing, f"the README passes {missing} to {script}, which has no such option"


# each script's `--help` as its command line runs it, in one process: torch is imported once, not per script
_HELP_ALL = """
import contextlib, io, json, runpy, sys
helps = {}
for script in sys.argv[1:]:
    sys.argv, out, status = [script, "--help"], io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            status = stop.code or 0
    helps[script] = [status, out.getvalue()]
print("HELPS " + json.dumps(helps))
"""


def _helps(scripts: list[str]) -> dict[str, tuple[int, str]]:
    """script -> (the exit status of ``script --help``, what it printed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _HELP_ALL, *scripts], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("HELPS ")] or [proc.stderr[-2000:]]
    return json.loads(line[len("HELPS "):])


def test_every_path_the_readme_names_exists():
    named = set(re.findall(r"(?<![\w/.<-])((?:configs|benchmarks|docs|scripts|tests|grpo|models|data|evaluation)"
                           r"/[\w./-]*\w)", README))
    assert len(named) > 20
    missing = sorted(p for p in named if "<" not in p and not (REPO / p).exists())
    assert not missing, f"the README names paths that do not exist: {missing}"


def test_every_config_key_the_readme_names_exists():
    import dataclasses

    from evaluation.config import EvalConfig
    from grpo.config import Config

    def keys(config) -> set[str]:
        return {f"{s.name}.{k.name}" for s in dataclasses.fields(config)
                for k in dataclasses.fields(getattr(config, s.name))}

    known = keys(Config()) | keys(EvalConfig())
    sections = {key.split(".")[0] for key in known}
    files = ("py", "lock", "yaml", "json", "jsonl", "md", "txt", "safetensors", "bin")  # grpo/algorithm.py, run.lock: file names
    named = {m for m in re.findall(r"(?<![\w/.])([a-z_]+\.[a-z_0-9]+)(?==|`|:| )", README)
             if m.split(".")[0] in sections and m.split(".")[1] not in files}
    assert len(named) > 15
    unknown = sorted(named - known)
    assert not unknown, f"the README names config keys that do not exist: {unknown}"


# --------------------------------------------------------------------------- the memory plans


def _plan(argv: list[str], capsys) -> str:
    """What ``--plan`` prints; its exit status says the verdict (0 fits, 1 does not)."""
    import train

    status = train.main([*argv, "--plan"])
    out = capsys.readouterr().out
    assert status == (1 if "does not fit" in out else 0), f"{' '.join(argv)} --plan exited {status}"
    return out


def _plan_rows() -> list[tuple[list[str], str, str]]:
    """(train.py arguments, the quoted per-GPU peak, the verdict) of each 7B row of the GPU table."""
    rows, base = [], None
    for setup, command, peak, verdict, _ in _table(_section("## Which GPU do I need"), "| setup |"):
        command = command.strip("`")
        if "plan_check.py" in command:
            continue
        words = shlex.split(command)
        if words[0] == "...":
            words = [*base, *words[1:]]
        else:
            base = words[:1]
        rows.append((["--config", f"configs/{words[0]}", *words[1:]], peak, verdict))
    return rows


def _same_figure(quoted: str, planned_gb: float) -> bool:
    """``quoted`` ("41.2 GB", "164 GB") is ``planned_gb`` (as printed, to 0.01 GB) to the README's precision."""
    number, unit = quoted.split()
    decimals = len(number.split(".")[1]) if "." in number else 0
    return abs(planned_gb - float(number)) <= 0.5 * 10 ** -decimals + 0.005


@pytest.mark.slow
def test_the_gpu_tables_peaks_and_verdicts_are_what_plan_prints(capsys):
    rows = _plan_rows()
    assert len(rows) >= 8
    for argv, peak, verdict in rows:
        out = _plan(argv, capsys)
        planned = float(re.search(r"peak: ([\d.]+) GB", out).group(1))
        assert _same_figure(peak, planned), f"{' '.join(argv)} --plan: peak {planned} GB, the README says {peak}"
        fits = "does not fit" not in out
        assert verdict.startswith("fits") == fits, f"{' '.join(argv)} --plan: the README says '{verdict}'"


@pytest.mark.slow
def test_the_plan_commands_in_the_readme_print_what_their_comments_say(capsys):
    checked = 0
    for block in _bash_blocks():
        for line in block.splitlines():
            if "--plan" in line and "# fits with" in line:
                command, comment = line.split("#", 1)
                words = shlex.split(command)
                out = _plan(words[words.index("train.py") + 1:], capsys)
                assert comment.strip() in out, f"{command}: prints\n{out}"
                checked += 1
    assert checked >= 1


# --------------------------------------------------------------------------- what evaluate.py prints


def test_the_evaluation_summary_shown_is_what_evaluate_prints():
    from evaluation.report import format_summary

    block = re.search(r"```\n(synthetic-tiny\n.*?)```", README, flags=re.S).group(1).rstrip("\n")
    lines = block.splitlines()
    tasks = lines[1].split()[2:-2]
    assert lines[1].split()[-2:] == ["total", "count"]
    results = []
    for row in lines[3:]:
        if row.startswith("*"):
            continue
        name, step, *cells = row.split()
        cells = [c for c in cells if c != "*"]
        count = int(cells[-1])
        scores = {"task": {t: {"accuracy": float(v)} for t, v in zip(tasks, cells)},
                  "total": {"accuracy": float(cells[-2]), "count": count}}
        results.append(SimpleNamespace(checkpoint=SimpleNamespace(name=name, step=int(step)), scores=scores,
                                       missing_audio=[], left_out=0))
    assert format_summary(results, lines[0]) == block


# --------------------------------------------------------------------------- what the tiny recipe learns


SEED_RESULTS = ["seeds-cpu.json", "seeds-cpu-10-19.json", "seeds-cpu-emulated.json"]


def _ranges() -> dict[int, tuple[list[float], list[float]]]:
    """step -> (overall accuracies, pitch accuracies) of every GRPO run in the seed results."""
    found: dict[int, tuple[list[float], list[float]]] = {}
    for name in SEED_RESULTS:
        for run in json.loads((REPO / "benchmarks" / "results" / name).read_text())["runs"]:
            if run["mode"] != "grpo":
                continue
            for h in run["history"]:
                if "eval/greedy_accuracy" in h:
                    overall, pitch = found.setdefault(h["step"], ([], []))
                    overall.append(h["eval/greedy_accuracy"])
                    pitch.append(h["eval/greedy_accuracy/pitch"])
    return found


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}" if low == high else f"{low:.2f}-{high:.2f}"


def test_the_learning_ranges_are_those_of_the_seed_results():
    ranges = _ranges()
    runs = len(ranges[100][0])
    assert f"over {runs} runs" in README
    rows = _table(_section("### What to expect"), "| step |")
    assert len(rows) >= 5
    for step_cell, _, overall, pitch, reached in rows:
        steps = [int(s) for s in re.findall(r"\d+", step_cell)]
        steps = [s for s in sorted(ranges) if steps[0] <= s <= steps[-1]]
        every = [v for s in steps for v in ranges[s][0]]
        every_pitch = [v for s in steps for v in ranges[s][1]]
        assert overall.split()[0] == _span(every), f"step {step_cell}"
        assert pitch.split()[0] == _span(every_pitch), f"step {step_cell}"
        at_least = min(sum(v >= 0.95 for v in ranges[s][0]) for s in steps)
        assert reached == f"{at_least} of {runs}", f"step {step_cell}"


@pytest.mark.slow
def test_the_tiny_plan_check_row_is_what_plan_check_prints():
    [row] = [r for r in _table(_section("## Which GPU do I need"), "| setup |") if "--shape tiny" in r[1]]
    command = shlex.split(row[1].strip("`"))
    plans = [float(x) for x in re.findall(r"[\d.]+", row[2])]  # "63.5 / 59.2 MB": full, LoRA
    measured = [float(x) for x in re.findall(r"measured\*\* ([\d.]+) / ([\d.]+) MB", row[4])[0]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = re.findall(r"lora=(off|on) .*measured tensor peak ([\d.]+) MB, plan ([\d.]+) MB", proc.stdout)
    assert [p[0] for p in printed] == ["off", "on"], proc.stdout  # both columns, as the table shows
    assert [float(p[2]) for p in printed] == plans
    for (_, peak, _), quoted in zip(printed, measured):  # counted tensors: the same on any machine
        assert float(peak) == pytest.approx(quoted, rel=0.02)
    # the plan is within 15 % of the measured peak of live tensors, full fine-tuning and LoRA
    # (this run is the measurement: no second one elsewhere)
    ratios = [float(r) for r in re.findall(r"plan/measured ([\d.]+)", proc.stdout)]
    assert len(ratios) == 2 and all(0.85 <= r <= 1.15 for r in ratios), ratios


def test_a_readme_run_of_another_recipe_on_the_tiny_config_has_its_own_run_directory():
    """After `make train`, runs/tiny holds the GRPO run that the "Score it" commands read: a
    README command that trains something else there would stop ("already holds a run") or, with
    run.overwrite, move that run aside."""
    import yaml

    tiny_dir = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["run"]["output_dir"]
    inline = [shlex.split(c) for c in re.findall(r"`(\.venv/bin/python train\.py [^`]*)`", README)]
    others = [c for c in _commands() + inline if "train.py" in " ".join(c) and "configs/tiny.yaml" in c
              and any(a.startswith("algorithm.name=") and a != "algorithm.name=grpo" for a in c)]
    assert others, "the README's one-SFT-run command was not found"
    for command in others:
        dirs = [a.split("=", 1)[1] for a in command if a.startswith("run.output_dir=")]
        assert dirs and dirs[-1] != tiny_dir, " ".join(command)




# --------------------------------------------------------------------------- the real run's inputs


def test_the_real_run_names_its_inputs_and_the_fields_prepare_avqa_needs():
    sys.path.insert(0, str(REPO / "scripts"))
    import prepare_avqa

    section = _section("## A real run")
    for name in ("Qwen2-Audio-7B-Instruct", "train_qa.json", "mmau-test-mini.json", "test-mini-audios"):
        assert name in section, name
    for field in prepare_avqa.REQUIRED:
        assert f"`{field}`" in section, f"the README does not list prepare_avqa.py's field {field}"
    from evaluation.config import load_eval_config

    mmau = load_eval_config(REPO / "configs" / "eval_mmau_testmini.yaml")
    expected = mmau.data.path.replace("{version}", mmau.data.version)
    assert f"`{expected}`" in section  # the file name the evaluation config reads


def test_a_run_missing_several_inputs_names_every_one(tmp_path):
    from grpo.config import load_config
    from grpo.setup import check_inputs

    cfg = load_config(REPO / "configs" / "r1_aqa.yaml", [f"model.path={tmp_path / 'no_model'}",
                                                         f"data.train_path={tmp_path / 'no_train.jsonl'}",
                                                         f"run.output_dir={tmp_path / 'run'}"])
    from data.datasets import DataError

    with pytest.raises(DataError) as err:
        check_inputs(cfg, None)
    message = str(err.value)
    assert f"model.path {tmp_path / 'no_model'}: directory not found" in message
    assert f"data.train_path {tmp_path / 'no_train.jsonl'}: file not found" in message
    assert "\n" not in message


# --------------------------------------------------------------------------- the command line


def test_help_shows_the_commands_as_the_readme_writes_them():
    import train

    assert ".venv/bin/python train.py --config" in train.__doc__
    assert "python train.py" not in train.__doc__.replace(".venv/bin/python train.py", "")
    assert "--resume latest" not in train.__doc__
    assert "--resume\n" in train.__doc__ and "--resume" in README


def test_a_bare_key_value_gets_the_section_key_hint(capsys):
    import train

    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--config", "configs/tiny.yaml", "group_size=4"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "an override is section.key=value; did you mean rollout.group_size=4?" in err
    with pytest.raises(SystemExit):
        train.parse_args(["--config", "configs/tiny.yaml", "stpes=4"])
    assert "did you mean run.steps=4?" in capsys.readouterr().err
    import evaluate

    with pytest.raises(SystemExit):
        evaluate.parse_args(["--config", "configs/eval_tiny.yaml", "--checkpoint", "runs/tiny", "batch_size=4"])
    assert "did you mean generation.batch_size=4?" in capsys.readouterr().err


def test_resume_from_a_path_that_does_not_exist_says_not_found(tmp_path, capsys):
    import train

    status = train.main(["--config", "configs/tiny.yaml", f"run.output_dir={tmp_path / 'run'}",
                         "--resume", str(tmp_path / "nope")])
    assert status == 1
    assert f"--resume {tmp_path / 'nope'}: not found" in capsys.readouterr().err


def test_plan_without_a_gpu_says_its_memory_is_assumed_and_exits_1_when_it_does_not_fit(capsys, monkeypatch):
    import train

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    status = train.main(["--config", "configs/r1_aqa.yaml", "--plan"])
    out = capsys.readouterr().out
    assert "per GPU (1 x 80 GB assumed: no GPU visible" in out
    assert ("does not fit" in out) == (status == 1)
    assert train.main(["--config", "configs/r1_aqa.yaml", "--plan", "--gpu-memory-gb", "1"]) == 1
    assert "does not fit" in capsys.readouterr().out


def test_the_plan_of_a_cpu_run_is_against_this_machines_ram():
    from grpo.config import load_config
    from grpo.memory_plan import host_memory_gb, plan_memory

    ram = host_memory_gb()
    assert 0.5 < ram < 100_000
    plan = plan_memory(load_config(REPO / "configs" / "tiny.yaml"), world_size=1, device_type="cpu", gpu_memory_gb=ram)
    out = plan.render()
    assert f"of {ram:.0f} GB" in out and "80 GB" not in out.replace(f"{ram:.0f} GB", "")
