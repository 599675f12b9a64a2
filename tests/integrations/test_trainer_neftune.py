"""replace_trainer_neftune: transformers' own ``neftune_noise_alpha`` served by neft_kernels, and the
launcher that turns it on for an unchanged program. The tests that train are marked slow."""

import importlib
import importlib.abc
import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import transformers.integrations.neftune as hf_neftune  # noqa: E402
import transformers.trainer as hf_trainer  # noqa: E402

from neft_kernels import NoisyEmbedding, patch_model  # noqa: E402
from neft_kernels.integrations import (  # noqa: E402
    NEFTuneCallback,
    is_patched,
    launch,  # noqa: E402
    replace_trainer_neftune,
    restore_trainer_neftune,
    trainer_neftune_options,
)

from support import ROOT  # noqa: E402
from support.hf_models import build  # noqa: E402
from support.hf_training import ALPHA, Probe, Rows, collate, run_args  # noqa: E402


@pytest.fixture(autouse=True)
def _transformers_hook_back():
    yield
    restore_trainer_neftune()
    assert hf_trainer.activate_neftune is hf_neftune.activate_neftune


def _losses(tmp_path, model, flag: bool, callbacks=()) -> tuple[list[float], list[bool]]:
    probe = Probe()
    torch.manual_seed(1)
    trainer = transformers.Trainer(model=model, args=run_args(tmp_path, neftune_noise_alpha=ALPHA if flag else None),
                                   train_dataset=Rows(), data_collator=collate, callbacks=[probe, *callbacks])
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log], probe.patched_during


@pytest.mark.slow
def test_the_flag_trains_with_the_callbacks_noise_and_leaves_a_plain_model(tmp_path):
    replace_trainer_neftune()
    model = build("llama_tied")
    weight = model.get_input_embeddings().weight
    ours, patched_during = _losses(tmp_path, model, flag=True)
    assert patched_during == [True] * 3
    assert type(model.get_input_embeddings()) is nn.Embedding and not is_patched(model)
    assert model.get_input_embeddings().weight is weight and model.get_output_embeddings().weight is weight
    # The same noise, bit for bit, as NEFTuneCallback(alpha) gives (same seeds, same patch).
    callback, _ = _losses(tmp_path, build("llama_tied"), flag=False, callbacks=[NEFTuneCallback(ALPHA)])
    assert ours == callback
    restore_trainer_neftune()  # transformers' hook again: other noise
    theirs, patched_during = _losses(tmp_path, build("llama_tied"), flag=True)
    assert patched_during == [False] * 3 and theirs != ours


@pytest.mark.slow
def test_a_run_that_raised_is_put_back_when_the_next_begins(tmp_path):
    replace_trainer_neftune(length_mode="padded")
    model = patch_model(build("llama"), 2.0)  # the user's own patch, to be kept
    for fail in (True, False):
        trainer = transformers.Trainer(model=model, args=run_args(tmp_path, neftune_noise_alpha=ALPHA),
                                       train_dataset=Rows(), data_collator=collate,
                                       callbacks=[Probe(1 if fail else None)])
        if fail:
            with pytest.raises(RuntimeError, match="training failed"):
                trainer.train()
            emb = model.get_input_embeddings()  # as transformers' hook would be: still on
            assert emb.noise_alpha == ALPHA and emb.noise_options.length_mode == "padded"
        else:
            trainer.train()
    emb = model.get_input_embeddings()
    assert is_patched(model) and emb.noise_alpha == 2.0 and emb.noise_options.length_mode == "per_sequence"


@pytest.mark.slow
def test_after_a_run_that_raised_restore_puts_the_model_back_and_the_hook_adds_the_only_noise(tmp_path):
    replace_trainer_neftune()
    model = build("llama")
    trainer = transformers.Trainer(model=model, args=run_args(tmp_path, neftune_noise_alpha=ALPHA),
                                   train_dataset=Rows(), data_collator=collate, callbacks=[Probe(1)])
    with pytest.raises(RuntimeError, match="training failed"):
        trainer.train()
    torch.save(model, tmp_path / "mid-run.pt")  # the open run is kept beside the model, not in it
    restore_trainer_neftune()
    assert type(model.get_input_embeddings()) is nn.Embedding and not is_patched(model)
    _, patched_during = _losses(tmp_path, model, flag=True)  # transformers' hook alone
    assert patched_during == [False] * 3 and not is_patched(model)


@pytest.mark.slow
def test_a_callback_refusing_the_flag_leaves_no_patch_behind(tmp_path):
    """The replaced activation patched the model before the callback refused the flag: the refusal
    takes that patch off, so the next run (callback only) ends with a plain model."""
    replace_trainer_neftune()
    model = build("llama")
    trainer = transformers.Trainer(model=model, args=run_args(tmp_path, neftune_noise_alpha=ALPHA),
                                   train_dataset=Rows(), data_collator=collate)
    trainer.add_callback(NEFTuneCallback(2.0))
    with pytest.raises(ValueError, match="neftune_noise_alpha"):
        trainer.train()
    assert type(model.get_input_embeddings()) is nn.Embedding and not is_patched(model)
    _, patched_during = _losses(tmp_path, model, flag=False, callbacks=[NEFTuneCallback(2.0)])
    assert patched_during == [True] * 3 and not is_patched(model)


@pytest.mark.slow
def test_a_peft_model_is_patched_through_the_trainers_accelerator(tmp_path):
    replace_trainer_neftune()
    lora = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _, patched_during = _losses(tmp_path, lora, flag=True)
    assert patched_during == [True] * 3 and not is_patched(lora)


def test_options_reach_each_run_and_alpha_is_the_arguments():
    replace_trainer_neftune(length_mode="padded", noise_tokens="response")
    model = patch_model(build("llama"), 2.0, distribution="gaussian")
    handle = hf_trainer.activate_neftune(model, 3.0)
    emb = model.get_input_embeddings()
    assert isinstance(emb, NoisyEmbedding) and emb.noise_alpha == 3.0
    assert (emb.noise_options.length_mode, emb.noise_options.noise_tokens, emb.noise_options.distribution) == (
        "padded", "response", "uniform")
    hf_trainer.deactivate_neftune(model, handle)
    assert emb.noise_alpha == 2.0 and emb.noise_options.distribution == "gaussian"  # the user's patch, back
    replace_trainer_neftune(backend="torch")  # again: new options for later runs, the same swap
    assert trainer_neftune_options().backend == "torch" and trainer_neftune_options().length_mode == "per_sequence"
    model = build("llama")
    hf_trainer.deactivate_neftune(model, hf_trainer.activate_neftune(model, 1.0))
    assert type(model.get_input_embeddings()) is nn.Embedding and not is_patched(model)


def test_options_are_checked_before_anything_is_swapped():
    for options, error in (({"noise_alpha": 5.0}, TypeError), ({"lenght_mode": "padded"}, TypeError),
                           ({"length_mode": "whole"}, ValueError)):
        with pytest.raises(error, match="neftune_noise_alpha|lenght_mode|length_mode"):
            replace_trainer_neftune(**options)
        assert trainer_neftune_options() is None and hf_trainer.activate_neftune is hf_neftune.activate_neftune


def test_a_run_begun_with_transformers_hook_ends_with_it():
    model = build("llama")
    handle = hf_trainer.activate_neftune(model, ALPHA)  # transformers' own, before the swap
    replace_trainer_neftune()
    hf_trainer.deactivate_neftune(model, handle)
    emb = model.get_input_embeddings()
    assert not emb._forward_hooks and not hasattr(emb, "neftune_noise_alpha")


def _old_activate(self, model):
    """transformers' Trainer method before NEFTune moved to integrations.neftune (its 4.x code)."""
    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = self.neftune_noise_alpha
    self.neftune_hook_handle = embeddings.register_forward_hook(hf_neftune.neftune_post_forward_hook)
    return model


def _old_deactivate(self, model):
    self.neftune_hook_handle.remove()
    del model.get_input_embeddings().neftune_noise_alpha


def test_trainers_with_neftune_methods_are_served_too(monkeypatch):
    monkeypatch.delattr(hf_trainer, "activate_neftune")
    monkeypatch.setattr(hf_trainer.Trainer, "_activate_neftune", _old_activate, raising=False)
    monkeypatch.setattr(hf_trainer.Trainer, "_deactivate_neftune", _old_deactivate, raising=False)
    trainer = type("Trainer", (), {"neftune_noise_alpha": ALPHA, "accelerator": None})()
    model = build("llama")
    replace_trainer_neftune()
    assert hf_trainer.Trainer._activate_neftune(trainer, model) is model
    emb = model.get_input_embeddings()
    assert isinstance(emb, NoisyEmbedding) and emb.noise_alpha == ALPHA
    hf_trainer.Trainer._deactivate_neftune(trainer, model)
    assert type(model.get_input_embeddings()) is nn.Embedding
    restore_trainer_neftune()
    assert hf_trainer.Trainer._activate_neftune is _old_activate
    monkeypatch.undo()


def test_a_trainer_without_neftune_activation_is_refused(monkeypatch):
    monkeypatch.delattr(hf_trainer, "activate_neftune")
    with pytest.raises(RuntimeError, match="no NEFTune activation.*NEFTuneCallback"):
        replace_trainer_neftune()
    assert trainer_neftune_options() is None


_PROGRAM = """
import sys
before = "transformers" in sys.modules
import transformers.trainer as t
from torch import nn
from neft_kernels.integrations import trainer_neftune_options
import beside  # a module next to the script: sys.path[0] is the script's folder

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def get_input_embeddings(self):
        return self.emb

model = Model()
t.activate_neftune(model, 3.0)
emb = model.get_input_embeddings()
print(__name__, __file__ == beside.SCRIPT, sys.argv[1:], before, type(emb).__name__, emb.noise_alpha,
      emb.noise_options.length_mode, trainer_neftune_options().backend)
"""


@pytest.fixture
def program(tmp_path, monkeypatch):
    """A program (in its own folder, beside a module it imports) that activates transformers' NEFTune
    and prints what the embedding became; the launcher runs it in-process, replacing argv and
    sys.path[0] as python would (restored after each test), from another working directory."""
    folder = tmp_path / "program"
    folder.mkdir()
    (folder / "program.py").write_text(_PROGRAM)
    (folder / "beside.py").write_text(f"SCRIPT = {str(folder / 'program.py')!r}\n")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "beside", raising=False)
    monkeypatch.chdir(tmp_path)
    return folder / "program.py"


def test_launcher_runs_a_script_with_our_options_and_its_arguments(program, capsys):
    launch.main(["--length-mode", "padded", "--backend=torch", "program/program.py", "--lr", "1", "-m", "x"])
    assert capsys.readouterr().out.split() == ["__main__", "True", "['--lr',", "'1',", "'-m',", "'x']", "True",
                                               "NoisyEmbedding", "3.0", "padded", "torch"]


def test_launcher_runs_a_module(program, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(program.parent))  # as python -m's working directory on sys.path
    launch.main(["--", "-m", "program", "--length-mode", "padded"])  # after -m: the program's arguments
    assert capsys.readouterr().out.split() == ["__main__", "True", "['--length-mode',", "'padded']", "True",
                                               "NoisyEmbedding", "3.0", "per_sequence", "auto"]


def test_launcher_refuses_a_bad_option_or_no_program(program):
    for argv in (["--length-mode", "whole", str(program)], ["--length", "padded", str(program)], [],
                 ["--backend", "cpu"], ["-m"], ["missing.py"]):
        with pytest.raises(SystemExit) as info:
            launch.main(argv)
        assert info.value.code == 2, argv
    assert trainer_neftune_options() is None


def test_launcher_runs_as_python_dash_m_and_replaces_once_the_program_imports_the_trainer(program):
    """In a fresh process: transformers is not imported before the program starts (what it sets
    first, HF_HOME say, is set before transformers reads it)."""
    res = subprocess.run([sys.executable, "-m", "neft_kernels.integrations.launch", "--noise-tokens", "response",
                          str(program), "a"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["__main__", "True", "['a']", "False", "NoisyEmbedding", "3.0", "per_sequence",
                                  "auto"]


def test_launcher_hook_runs_after_a_module_that_another_finder_imports(monkeypatch):
    """The hook finds the module as the import would (any finder on sys.meta_path, not only the file
    system's): a package served by a custom finder still gets the replacement after its import."""

    class Served(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname in ("neft_served_pkg", "neft_served_pkg.trainer"):
                return importlib.util.spec_from_loader(fullname, self, is_package=fullname == "neft_served_pkg")
            return None

        def exec_module(self, module):
            module.executed = True

    ran = []
    monkeypatch.setattr(sys, "meta_path", [launch._AfterImport("neft_served_pkg.trainer", lambda: ran.append(
        sys.modules["neft_served_pkg.trainer"].executed)), *sys.meta_path, Served()])
    for name in ("neft_served_pkg", "neft_served_pkg.trainer"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.import_module("neft_served_pkg.trainer")
    assert ran == [True]


@pytest.mark.slow  # six fresh interpreters that import torch
@pytest.mark.parametrize("safe_path", [False, pytest.param(True, marks=pytest.mark.skipif(
    sys.version_info < (3, 11), reason="python -P is Python 3.11+"))])
def test_launcher_runs_a_script_a_folder_and_a_zip_archive_with_sys_path_as_python_does(tmp_path, safe_path):
    """sys.path[0] and argv as under plain python, also for a folder or zip archive with __main__.py
    (python runs those) and under -P (which puts no folder first)."""
    code = "import sys\nprint(repr(sys.path[0]), sys.argv[1:])\n"
    (tmp_path / "script.py").write_text(code)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "__main__.py").write_text(code)
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as archive:
        archive.writestr("__main__.py", code)
    flags = ["-P"] if safe_path else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # neft_kernels for the launcher, both runs alike
    for target in ("script.py", "folder", "archive.zip"):
        plain, launched = (subprocess.run([sys.executable, *flags, *launcher, target, "a"], capture_output=True,
                                          text=True, timeout=300, cwd=tmp_path, env=env)
                           for launcher in ([], ["-m", "neft_kernels.integrations.launch"]))
        assert launched.returncode == 0, launched.stderr[-3000:]
        assert launched.stdout == plain.stdout, target


_TRAINING = """
import sys
import torch
import transformers
from neft_kernels import NoisyEmbedding
from neft_kernels.integrations import is_patched
from support.hf_models import build
from support.hf_training import Rows, collate

class Noisy(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kw):
        print("step", isinstance(model.get_input_embeddings(), NoisyEmbedding))

model = build("llama")
args = transformers.TrainingArguments(output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=4,
                                      report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                      neftune_noise_alpha=5.0)
transformers.Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate, callbacks=[Noisy()]).train()
print("after", is_patched(model))
"""


@pytest.mark.slow  # two fresh interpreters, each training two steps
def test_an_unchanged_training_script_under_the_launcher_trains_with_our_noise(tmp_path):
    """The config-driven case end to end: a script that sets only neftune_noise_alpha."""
    (tmp_path / "train.py").write_text(_TRAINING)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    outputs = []
    for launcher in (["-m", "neft_kernels.integrations.launch"], []):
        res = subprocess.run([sys.executable, *launcher, str(tmp_path / "train.py"), str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        outputs.append([line for line in res.stdout.splitlines() if line.startswith(("step", "after"))])
    assert outputs == [["step True", "step True", "after False"], ["step False", "step False", "after False"]]
