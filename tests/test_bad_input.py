"""Bad input: each bad config or command line gives one error naming the problem and the valid choices,
exits with code 2, and writes nothing (no MLflow store, no Optuna study, no report)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from bench import config, run, study, tracking
from tests.conftest import NEEDS_COMPILE, shrink_args
from tests.helpers import free_port

# Study files the cases below point at, written into <tmp>/in/.
FILES = {
    "plain.yaml": "data:\n  binarize: static\n",  # one variant; likelihood and data keys left free
    "malformed.yaml": "study: [\n  grids: {\n",
    "list.yaml": "- likelihood.name: [bernoulli]\n",
    "grid_key.yaml": "study:\n  grids:\n    - train.epochz: [1, 2]\n",
    "grid_value.yaml": "study:\n  grids:\n    - train.beta: 1.0\n",
    "yaml_type.yaml": "train:\n  epochs: many\n",
    "search.yaml": "study:\n  n_trials: 2\n  search_space:\n    train.lr: {low: 0.1, high: 0.001}\n",
    "search_key.yaml": "study:\n  n_trials: 2\n  search_space:\n    train.lrr: {low: 0.0001, high: 0.01}\n",
    "search_pairing.yaml": "data:\n  binarize: static\nstudy:\n  n_trials: 2\n  search_space:\n"
                           "    likelihood.name: {kind: categorical, choices: [bernoulli, discretized_logistic]}\n",
    "search_measures.yaml": "data:\n  binarize: static\nstudy:\n  n_trials: 2\n  search_space:\n"
                            "    likelihood.name: {kind: categorical, choices: [bernoulli, continuous_bernoulli]}\n",
    "search_data.yaml": "data:\n  binarize: static\nstudy:\n  n_trials: 2\n  search_space:\n"
                        "    data.binarize: {kind: categorical, choices: [threshold, static]}\n",
    "grid_measures.yaml": "data:\n  binarize: static\nstudy:\n  grids:\n"
                          "    - likelihood.name: [bernoulli, continuous_bernoulli]\n",
    "grid_dequantize.yaml": "study:\n  grids:\n    - data.binarize: [none]\n      data.dequantize: [true, false]\n"
                            "      likelihood.name: [discretized_logistic]\n",
    "grid_seed.yaml": "study:\n  grids:\n    - train.seed: [5, 6]\n",
    "grid_repeat.yaml": "study:\n  grids:\n    - train.beta: [1, 1.0]\n",
    "grid_unread.yaml": "study:\n  grids:\n    - likelihood.name: [gaussian, bernoulli]\n"
                        "      likelihood.scale: [0.5, 1.0]\n",
    "afile": "a file where a folder is needed\n",
    "grid_placement.yaml": "study:\n  grids:\n    - tracking.artifact_location: [a, b]\n",
    "search_study_key.yaml": "study:\n  n_trials: 2\n  search_space:\n    study.n_workers: {kind: int, low: 1, high: 2}\n",
    "twice.yaml": "data:\n  binarize: static\ntrain:\n  epochs: 2\ndata:\n  name: digits\n",
    "grid_dict.yaml": "study:\n  grids:\n    likelihood.name: [bernoulli]\n",  # a mapping, not a list of them
    "bool_grid.yaml": "study:\n  grids:\n    - data.dequantize: [true, 2]\n",
    "interpolation.yaml": "data:\n  root: ${oc.env:VAEBENCH_UNSET_VARIABLE}\n",
    "search_dim.yaml": "study:\n  n_trials: 2\n  search_space:\n    train.lr: {kind: float, lo: 0.0001, high: 0.01}\n",
    "MNIST/raw/t10k-images-idx3-ubyte": "garbage, not an IDX file\n",
    "alias.yaml": "study:\n  description: &words a sweep\nreport_dir: *words\n",
    "unquoted_text.yaml": "report_dir: 0755\n",  # YAML 1.1: the octal 493
    "rep/smoke": "a file where the report's folder goes\n",
    "search_lr.yaml": "data:\n  binarize: static\nstudy:\n  n_trials: 2\n  search_space:\n"
                      "    train.lr: {low: 0.0001, high: 0.01, log: true}\n",
    "search_gridded.yaml": "data:\n  binarize: static\nstudy:\n  n_trials: 2\n  grids:\n    - train.lr: [0.001, 0.01]\n"
                           "  search_space:\n    train.lr: {low: 0.0001, high: 0.01, log: true}\n",
    "search_int.yaml": "study:\n  n_trials: 2\n  search_space:\n    train.epochs: {kind: int, low: 1.5, high: 3}\n",
    "search_list_key.yaml": "study:\n  n_trials: 2\n  search_space:\n    model.hidden: {kind: int, low: 32, high: 64}\n",
    "search_bare_range.yaml": "study:\n  n_trials: 2\n  search_space:\n    train.lr: [0.0001, 0.01]\n",
    "bare_seeds.yaml": "study:\n  seeds: 3\n",
}
BINARY_FILES = {"latin1.yaml": b"data:\n  root: \xff\xfe\n"}
PLAIN = "study={tmp}/in/plain.yaml"

# (id, arguments after the shrunk defaults, what the error must say: the problem and the valid choices)
CASES = [
    ("no study", [], ["study=NAME is required", "valid choices: aevb, beta"]),
    ("unknown study", ["study=nope"], ["unknown study 'nope'", "valid choices: aevb, beta"]),
    ("missing study file", ["study={tmp}/in/nope.yaml"], ["nope.yaml' does not exist"]),
    ("not key=value", ["study=smoke", "epochs"], ["'epochs' is not of the form key=value"]),
    ("unknown section", ["study=smoke", "trainn.epochs=1"], ["Key 'trainn'", "valid keys: data, model"]),
    ("unknown key", ["study=smoke", "train.epochz=1"], ["train.epochz", "valid keys in train: epochs"]),
    ("wrong type", ["study=smoke", "train.epochs=abc"], ["'abc'", "train.epochs expects an int"]),
    ("wrong type in YAML", ["study={tmp}/in/yaml_type.yaml"], ["'many'", "train.epochs expects an int"]),
    ("list without brackets", ["study=smoke", "study.seeds=0,1,2"],
     ["override 'study.seeds=0,1,2': study.seeds is a list, written in brackets: study.seeds=[0,1,2]"]),
    ("list without brackets in a study file", ["study={tmp}/in/bare_seeds.yaml"],
     ["bare_seeds.yaml: study.seeds is a list, written in brackets: seeds: [3] (under study:)"]),
    ("list without brackets or commas", ["study=smoke", "model.hidden=64 128"],
     ["model.hidden is a list, written in brackets: model.hidden=[64,128]"]),
    ("mapping for a list", ["study=smoke", "model.hidden={{a: 1}}"],
     ["override 'model.hidden={a: 1}'", "a value of the wrong shape", "see --help"]),
    ("grid over where results go", ["study={tmp}/in/grid_placement.yaml"],
     ["study.grids[0] key='tracking.artifact_location' is invalid", "one of data.name"]),
    ("search over a study setting", ["study={tmp}/in/search_study_key.yaml"],
     ["study.search_space key='study.n_workers' is invalid", "not of the study itself"]),
    ("section given twice in a study file", ["study={tmp}/in/twice.yaml"],
     ["twice.yaml is not valid YAML", "key 'data' is given twice", "line 5"]),
    ("grids as a mapping", ["study={tmp}/in/grid_dict.yaml"], ["grid_dict.yaml: a value of the wrong shape"]),
    ("nested list of layer sizes", ["study=smoke", "model.hidden=[[64]]"],
     ["model.hidden=[[64]] is invalid", "list of layer sizes"]),
    ("negative seed", ["study=smoke", "study.seeds=[-1]"],
     ["study.seeds=[-1] is invalid", "integers from 0 to 4294967295"]),
    ("huge data seed", ["study=smoke", "data.seed=100000000000000000000000"],
     ["data.seed=100000000000000000000000 is invalid", "from 0 to 4294967295"]),
    ("integer for a bool", ["study=smoke", "eval.figures=2"], ["eval.figures=2 is invalid", "true or false"]),
    ("integer for a bool in a grid", ["study={tmp}/in/bool_grid.yaml"],
     ["data.dequantize=2 is invalid", "true or false"]),
    ("section override sets a grid key", ["study=smoke", "likelihood={{name: gaussian}}"],
     ["likelihood.name is varied by the study's grids"]),
    ("section override sets the seed", ["study=smoke", "train={{seed: 5}}"],
     ["train.seed comes from study.seeds"]),
    ("unresolvable interpolation", ["study={tmp}/in/interpolation.yaml"],
     ["cannot resolve the config", "VAEBENCH_UNSET_VARIABLE"]),
    ("study file not UTF-8", ["study={tmp}/in/latin1.yaml"], ["latin1.yaml is not valid YAML in UTF-8"]),
    ("unknown field of a search range", ["study={tmp}/in/search_dim.yaml"],
     ["Key 'lo' not in 'SearchDim'", "maps a dotted config key to its range"]),
    ("corrupt MNIST file", ["study=smoke", "data.name=mnist_t10k", "data.root={tmp}/in"],
     ["t10k-images-idx3-ubyte is not a readable IDX file", "replace it with the original file"]),
    ("malformed YAML", ["study={tmp}/in/malformed.yaml"], ["malformed.yaml is not valid YAML"]),
    ("YAML not a mapping", ["study={tmp}/in/list.yaml"], ["must hold a mapping of sections, not list"]),
    ("unknown likelihood", [PLAIN, "likelihood.name=gausian"],
     ["likelihood.name='gausian' is invalid", "one of bernoulli, continuous_bernoulli"]),
    ("unknown dataset", ["study=smoke", "data.name=cifar"],
     ["data.name='cifar'", "one of mnist, fashion_mnist"]),
    ("latent dim 0", ["study=smoke", "model.latent_dim=0"], ["model.latent_dim=0 is invalid", "integer ≥ 1"]),
    ("no hidden layer", ["study=smoke", "model.hidden=[]"], ["model.hidden=[] is invalid", "non-empty list"]),
    ("negative beta", ["study=smoke", "train.beta=-1"], ["train.beta=-1.0 is invalid", "number ≥ 0"]),
    ("L = 0", ["study=smoke", "train.n_samples=0"], ["train.n_samples=0 is invalid", "integer ≥ 1 (L)"]),
    ("batch size 0", ["study=smoke", "train.batch_size=0"], ["train.batch_size=0 is invalid", "integer ≥ 1"]),
    ("negative epochs", ["study=smoke", "train.epochs=-3"], ["train.epochs=-3 is invalid", "integer ≥ 1"]),
    ("zero learning rate", ["study=smoke", "train.lr=0"], ["train.lr=0.0 is invalid", "number > 0"]),
    ("zero scale", ["study=smoke", "likelihood.scale=0"], ["likelihood.scale=0.0 is invalid", "number > 0"]),
    ("infinite learning rate", ["study=smoke", "train.lr=inf"], ["train.lr=inf is invalid", "a finite number > 0"]),
    ("infinite scale", ["study=smoke", "likelihood.scale=inf"],
     ["likelihood.scale=inf is invalid", "a finite number > 0"]),
    ("key the grids vary", ["study=smoke", "likelihood.name=gaussian"],
     ["override 'likelihood.name=gaussian'", "varied by the study's grids", "replace the grids instead",
      ("'study.grids=[{data.binarize: [static], likelihood.name: [gaussian]}, {data.binarize: [none], "
       "likelihood.name: [gaussian]}]'")]),
    ("seed of a study's variants", ["study=smoke", "train.seed=5"],
     ["'train.seed=5'", "train.seed comes from study.seeds ([0])", "set study.seeds=[...] instead"]),
    ("no seeds", ["study=smoke", "study.seeds=[]"], ["study.seeds=[] is invalid", "non-empty list"]),
    ("repeated seed", ["study=smoke", "study.seeds=[0,0]"], ["study.seeds=[0, 0] is invalid", "distinct integers"]),
    ("unclosed list", ["study=smoke", "model.hidden=[64"], ["override 'model.hidden=[64'", "expected ',' or ']'"]),
    ("search space on the command line", ["study=smoke", "study.search_space.train.lr.kind=float"],
     ["give study.search_space in a study file"]),
    ("unknown search key", ["study={tmp}/in/search_key.yaml"],
     ["Key 'lrr' not in 'TrainConfig'", "Did you mean: 'lr'", "in study.search_space"]),
    ("search pairs a likelihood with the wrong data", ["study={tmp}/in/search_pairing.yaml"],
     ["data.binarize='static' is invalid", "expected none", "'likelihood.name': 'discretized_logistic'"]),
    ("search across measures", ["study={tmp}/in/search_measures.yaml"],
     ["study.search_space=", "'likelihood.name': 'bernoulli'} gives 'pmf of binarized pixels'",
      "'continuous_bernoulli'} gives 'density at binary values", "is invalid",
      "choices whose ELBOs share one measure", "study.grids"]),
    ("median pruning of grids on other data", ["study=likelihoods", "study.pruner=median"],
     ["study.pruner='median' is invalid", "expected auto or none", "grid points train on different data",
      "'data.binarize': 'none'"]),
    ("median pruning of grids on other measures", ["study={tmp}/in/grid_measures.yaml", "study.pruner=median"],
     ["study.pruner='median' is invalid", "expected auto or none", "on different measures",
      "'likelihood.name': 'bernoulli'} gives 'pmf of binarized pixels'"]),
    ("search over the data", ["study={tmp}/in/search_data.yaml"],
     ["study.search_space key='data.binarize' is invalid", "vary data.* with study.grids"]),
    ("seed as a grid key", ["study={tmp}/in/grid_seed.yaml"],
     ["study.grids[0] key='train.seed' is invalid", "once per seed of study.seeds ([0])"]),
    ("grid repeats a variant", ["study={tmp}/in/grid_repeat.yaml"],
     ["study.grids=\"{'train.beta': 1} and {'train.beta': 1.0}\" is invalid", "trained twice"]),
    ("grid over a key the family ignores", ["study={tmp}/in/grid_unread.yaml"],  # bernoulli: no fixed scale
     ["'likelihood.name': 'bernoulli', 'likelihood.scale': 0.5} and", "trained twice",
      "bernoulli on this data does not read likelihood.scale: give it only in a grid of variants that do"]),
    ("grid over dequantization of an 8-bit pmf", ["study={tmp}/in/grid_dequantize.yaml"],
     ["'data.dequantize': True, 'likelihood.name': 'discretized_logistic'} and", "trained twice",
      "discretized_logistic on this data does not read data.dequantize"]),
    ("zero workers", ["study=smoke", "study.n_workers=0"], ["study.n_workers=0 is invalid", "integer ≥ 1"]),
    ("one IWAE image", ["study=smoke", "eval.iwae_examples=1"],
     ["eval.iwae_examples=1 is invalid", "0 (all) or an integer ≥ 2"]),
    ("unknown pruner", ["study=smoke", "study.pruner=hyperband"],
     ["'hyperband' is invalid", "one of auto, median, none"]),
    ("bad grid key", ["study={tmp}/in/grid_key.yaml"],
     ["key='train.epochz' is invalid", "a dotted config key: one of data.name", "train.epochs"]),
    ("non-list grid value", ["study={tmp}/in/grid_value.yaml"],
     ["study.grids[0].train.beta=1.0 is invalid", "non-empty list of values"]),
    ("empty grid value", ["study=smoke", ("study.grids=[{{likelihood.name: [bernoulli], data.binarize: [static]}}, "
                                          "{{likelihood.name: [gaussian], data.binarize: []}}]")],  # drops the grid
     ["study.grids[1].data.binarize=[] is invalid", "non-empty list of values"]),
    ("search range reversed", ["study={tmp}/in/search.yaml"], ["low=0.1, high=0.001", "low < high"]),
    ("binary pmf on 8-bit data", [PLAIN, "likelihood.name=bernoulli", "data.binarize=none"],
     ["data.binarize='none' is invalid", "threshold, static or dynamic", "continuous_bernoulli"]),
    ("8-bit pmf on binary data", [PLAIN, "likelihood.name=discretized_logistic", "data.binarize=static"],
     ["data.binarize='static' is invalid", "expected none"]),
    ("data missing offline", ["study=smoke", "data.name=mnist", "data.download=false", "data.root={tmp}/in"],
     ["files missing and data.download=false", "train-images-idx3-ubyte.gz", "offline alternatives"]),
    ("bad storage URL", ["study=smoke", "study.storage=redis://127.0.0.1/0"],
     ["study.storage='redis://127.0.0.1/0' is invalid", "sqlite:///FILE, postgresql://", "mysql://"]),
    ("unreachable PostgreSQL storage", ["study=smoke", "study.storage=postgresql://postgres@127.0.0.1:{port}/vb"],
     ["study.storage='postgresql://", "cannot connect", "expected sqlite:///FILE or a reachable postgresql://"]),
    ("unreachable tracking server", ["study=smoke", "tracking.uri=http://127.0.0.1:{port}"],
     ["tracking server unreachable", "mlflow server --host 127.0.0.1", "sqlite:///mlflow.db"]),
    ("unreachable PostgreSQL tracking", ["study=smoke", "tracking.uri=postgresql://postgres@127.0.0.1:{port}/vb",
                                         "tracking.artifact_location={tmp}/artifacts"],
     ["tracking.uri='postgresql://", "cannot connect"]),
    ("database tracking without artifacts", ["study=smoke", "tracking.uri=postgresql://postgres@127.0.0.1:{port}/vb"],
     ["is a database: set tracking.artifact_location", "tracking.uri=http://127.0.0.1:5000"]),
    ("file tracking store", ["study=smoke", "tracking.uri=file://{tmp}/in/mlruns"],
     ["does not track new runs in a file store", "sqlite:///mlflow.db"]),
    ("tracking store not SQLite", ["study=smoke", "tracking.uri=sqlite:///{tmp}/in/afile"],
     ["in/afile exists and is not an SQLite database"]),
    ("Optuna storage a folder", ["study=smoke", "study.storage=sqlite:///{tmp}/in/MNIST"],
     ["in/MNIST exists and is not an SQLite database"]),
    ("bad tracking URI", ["study=smoke", "tracking.uri=ftp://127.0.0.1/x"],
     ["tracking.uri='ftp://127.0.0.1/x'", "expected sqlite:///FILE, http://HOST:PORT or postgresql://"]),
    ("unwritable report_dir", ["study=smoke", "report_dir={tmp}/in/afile/reports"],
     ["report_dir=", "in/afile is not a writable folder"]),
    ("unwritable MLflow SQLite folder", ["study=smoke", "tracking.uri=sqlite:///{tmp}/in/afile/mlflow.db"],
     ["tracking.uri=", "in/afile is not a writable folder"]),
    ("unwritable Optuna SQLite folder", ["study=smoke", "study.storage=sqlite:///{tmp}/in/afile/optuna.db"],
     ["study.storage=", "in/afile is not a writable folder"]),
    ("worker without a study", ["study=smoke", "study.worker=true"],
     ["study.worker=true: no study 'smoke-", "start it first without study.worker"]),
    ("cuda without a GPU", ["study=smoke", "train.device=cuda"], ["train.device=cuda", "use auto or cpu"]),
    ("unknown backward", ["study=smoke", "train.backward=jax"],
     ["train.backward='jax' is invalid", "one of manual, autograd"]),
    ("compile with autograd", ["study=smoke", "train.compile=true", "train.backward=autograd"],
     ["train.compile=True is invalid", "set train.backward=manual"]),
    ("search trials without a search space", ["study=smoke", "study.n_trials=5"],
     ["study.n_trials=5 is invalid", "0 without study.search_space"]),
    ("a likelihood setting no family of the study reads", [PLAIN, "likelihood.scale=0.5"],  # bernoulli
     ["likelihood.scale=0.5 is invalid", "its default 1.0: none of the study's families (bernoulli) reads it",
      "those that do: gaussian, laplace"]),
    ("a literal interpolation start", ["study=smoke", "study.description=costs \\${{x}}"],  # {{: str.format
     ["study.description='costs ${x}': a value cannot hold '${'"]),
    ("search over a key a grid varies", ["study={tmp}/in/search_gridded.yaml"],  # Optuna crashed on it
     ["study.search_space key='train.lr' is invalid", "a key no grid varies (study.grids vary train.lr)"]),
    ("seeds of a search", ["study={tmp}/in/search_lr.yaml", "study.seeds=[0,1]"],  # it trains the first only
     ["study.seeds=[0, 1] is invalid", "one seed in a study without grids"]),
    ("int range with fractions", ["study={tmp}/in/search_int.yaml"],  # Optuna would round them
     ["study.search_space.train.epochs='low=1.5, high=3.0' is invalid", "whole numbers with kind: int"]),
    ("range over a list-valued key", ["study={tmp}/in/search_list_key.yaml"],
     ["study.search_space.model.hidden.kind='int' is invalid", "categorical: model.hidden holds a list"]),
    ("a bare list as a range", ["study={tmp}/in/search_bare_range.yaml"],
     ["study.search_space.train.lr=[0.0001, 0.01] is invalid", "a mapping: {kind, low, high, log} or", "e.g. `train.lr: {kind"]),
    ("an empty search space as an override", ["study={tmp}/in/search_lr.yaml", "study.search_space={{}}"],
     ["override 'study.search_space={}' cannot remove train.lr from the study's search space",
      "edit study.search_space in the study file"]),
    ("key the search samples", ["study={tmp}/in/search_lr.yaml", "train.lr=0.5"],
     ["override 'train.lr=0.5': train.lr is sampled by the study's search_space", "change study.search_space"]),
    ("one SQLite file for both stores", ["study=smoke", "study.storage=sqlite:///{tmp}/in/one.db",
                                         "tracking.uri=sqlite:///{tmp}/in/one.db"],
     ["study.storage='sqlite:///", "and tracking.uri='sqlite:///", "are one database", "each need their own"]),
    ("YAML alias in a study file", ["study={tmp}/in/alias.yaml"],
     ["alias.yaml is not valid YAML", "alias *words is not supported", "OmegaConf interpolation"]),
    ("unquoted text in a study file", ["study={tmp}/in/unquoted_text.yaml"],
     ["report_dir=493 is invalid: expected text", "YAML read this value as an int", "put the text in quotes"]),
    ("quote in the study name", ["study=smoke", "study.name=bob's sweep"],
     ["study.name=\"bob's sweep\" is invalid", "a name without quotes"]),
    ("a file where the study's report folder goes", ["study=smoke", "report_dir={tmp}/in/rep", "report=true"],
     ["report_dir=", "in/rep/smoke is not a writable folder"]),
    ("MLflow in the default Optuna file", ["study=smoke", "tracking.uri=sqlite:///{tmp}/in/optuna.db"],
     ["study.storage (unset: optuna.db beside the MLflow store)=", "are one database"]),
]


def _inputs(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for name, text in FILES.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(text)
    for name, content in BINARY_FILES.items():
        (tmp_path / "in" / name).write_bytes(content)


def _args(args: list[str], tmp_path: Path) -> list[str]:
    port = free_port()  # nothing listens there
    return [*shrink_args(tmp_path), *(a.format(tmp=tmp_path, port=port) for a in args)]


def _tree(tmp_path: Path) -> set[Path]:
    return set(tmp_path.rglob("*"))


def test_at_least_20_distinct_bad_inputs():
    assert len({tuple(args) for _, args, _ in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("args, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_clear_error_and_writes_nothing(args, needles, tmp_path, monkeypatch,
                                                                   capsys):
    _assert_refused(args, needles, tmp_path, monkeypatch, capsys)


def test_compile_without_a_cpp_compiler_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-c++ -O2")
    _assert_refused(["study=smoke", "train.compile=true"], ["train.compile=True is invalid",
                    "needs a C++ compiler, and 'no-such-c++ -O2' (the CXX environment variable, else g++) was not found"],
                    tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize(("cxx", "device", "gpu"), [pytest.param("env no-such-c++", "cpu", False,  # runs `env`, as inductor does
                                                                 marks=NEEDS_COMPILE),
                                                    ("no-such-c++", "auto", True),  # a GPU compiles nothing
                                                    ("no-such-c++", "cuda", True)])
def test_compile_checks_only_the_compiler_inductor_would_run(cxx, device, gpu, monkeypatch):
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert config.load(["train.compile=true", f"train.device={device}"]).train.compile


def _assert_refused(args, needles, tmp_path, monkeypatch, capsys, shrunk: bool = True) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # "no GPU", also on a machine with one
    _inputs(tmp_path)
    before = _tree(tmp_path)
    assert run.main(_args(args, tmp_path) if shrunk else args) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and out == "", err
    for needle in needles:
        assert needle in errors[0]
    assert _tree(tmp_path) == before  # no mlflow.db, optuna.db, mlartifacts or reports


@pytest.mark.parametrize("case", ["unknown study", "malformed YAML", "unreachable tracking server"])
def test_bad_input_through_the_command_line(case, tmp_path):
    _, args, needles = next(c for c in CASES if c[0] == case)
    _inputs(tmp_path)
    before = _tree(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "bench.run", *_args(args, tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert all(needle in proc.stderr for needle in needles), proc.stderr
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("key, owner", [("tracking.uri", "Optuna"), ("study.storage", "MLflow")])
def test_a_store_of_the_other_kind_is_refused(key, owner, tmp_path, monkeypatch, capsys):
    # MLflow's and Optuna's schemas in one database break both (each its own alembic_version table)
    store = tmp_path / "stores" / "other.db"
    store.parent.mkdir()
    if owner == "Optuna":
        optuna.create_study(storage=f"sqlite:///{store}")
    else:
        MlflowClient(tracking_uri=f"sqlite:///{store}").search_experiments()
    content = store.read_bytes()
    _assert_refused(["study=smoke", f"{key}=sqlite:///{store}"],
                    [f"{key}='sqlite:///{store}' holds {owner}'s store", "needs a database of its own"],
                    tmp_path, monkeypatch, capsys)
    assert store.read_bytes() == content


@pytest.mark.parametrize("key", ["tracking.uri", "study.storage"])
def test_another_applications_database_is_refused(key, tmp_path, monkeypatch, capsys):
    import sqlite3

    store = tmp_path / "stores" / "app.db"
    store.parent.mkdir()
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    db.close()
    content = store.read_bytes()
    _assert_refused(["study=smoke", f"{key}=sqlite:///{store}"],
                    [f"{key}='sqlite:///{store}' holds tables of neither MLflow nor Optuna (users)",
                     "a new or empty database"], tmp_path, monkeypatch, capsys)
    assert store.read_bytes() == content


def test_a_damaged_sqlite_store_is_refused(tmp_path, monkeypatch, capsys):
    store = tmp_path / "stores" / "damaged.db"
    store.parent.mkdir()
    store.write_bytes(b"SQLite format 3\x00" + b"\x17" * 4096)  # its header, then garbage
    _assert_refused(["study=smoke", f"study.storage=sqlite:///{store}"],
                    [f"study.storage='sqlite:///{store}': {store} cannot be read as an SQLite database"],
                    tmp_path, monkeypatch, capsys)


def test_an_address_from_the_environment_is_named_as_such(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    args = [a for a in _args(["study=smoke"], tmp_path) if not a.startswith("tracking.uri=")]
    _assert_refused(args, [f"$MLFLOW_TRACKING_URI='file://{tmp_path}/mlruns'", "does not track new runs"],
                    tmp_path, monkeypatch, capsys, shrunk=False)


def test_data_missing_for_one_grid_variant_is_refused_before_any_trains(tmp_path, monkeypatch, capsys):
    """Not after the digits variants have trained: each variant's data is read before the study starts."""
    args = ["study=smoke", "study.grids=[{data.name: [digits, mnist]}]", "data.binarize=static",
            "data.download=false", f"data.root={tmp_path}/in", "study.seeds=[0]", "train.device=cpu"]
    _assert_refused(args, ["files missing and data.download=false", "train-images-idx3-ubyte.gz"], tmp_path,
                    monkeypatch, capsys, shrunk=False)


def test_an_explicit_tracking_uri_wins_over_the_environment(tmp_path, monkeypatch):
    """A team's $MLFLOW_TRACKING_URI in the shell must not take the runs (and the Optuna store beside
    them) of a user who named another store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/team.db")
    cfg = config.load(["study=smoke", f"tracking.uri=sqlite:///{tmp_path}/mine.db"])
    assert config.tracking_uri(cfg) == f"sqlite:///{tmp_path}/mine.db"
    assert study.storage_url(cfg) == f"sqlite:///{tmp_path}/optuna.db"
    assert config.tracking_uri(config.load(["study=smoke"])) == f"sqlite:///{tmp_path}/team.db"


@pytest.mark.parametrize("a, b, same", [
    ("sqlite:///x/../one.db", "sqlite:///one.db", True),
    ("sqlite:///one.db", "sqlite:///two.db", False),
    ("postgresql://alice@db.lan:5432/vb", "postgresql+psycopg://bob:secret@db.lan:5432/vb", True),
    ("postgresql://alice@db.lan/vb", "postgresql://alice@db.lan:5432/vb", True),  # the default port
    ("sqlite:///one.db?timeout=30", "sqlite:///one.db", True),
    ("postgresql://alice@db.lan:abc/vb", "postgresql://alice@db.lan:5432/vb", False),  # refused elsewhere
    ("postgresql://alice@db.lan:5432/vb", "postgresql://alice@db.lan:5432/optuna", False),
    ("postgresql://alice@db.lan/vb", "sqlite:///vb", False),
    ("http://127.0.0.1:5000", "sqlite:///optuna.db", False)])
def test_same_database(a, b, same, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.same_database(a, b) is same and tracking.same_database(b, a) is same


@pytest.mark.parametrize("value", ["0755", "1e3", "1_000", "out #1", "yes", "null", "Test: beta sweep", "[a, b]"])
def test_a_text_setting_takes_the_text_as_given(value):
    # YAML would read these as 493, 1000.0, 1000, "out", True, None, a mapping and a list
    cfg = config.load(["study=smoke", f"report_dir={value}", f"study.description={value}", "tracking.uri="])
    assert (cfg.report_dir, cfg.study.description, cfg.tracking.uri) == (value, value, "")
    assert config.load(["study=smoke", f"study.description='{value}'"]).study.description == value  # as YAML


def test_a_home_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config.load(["study=smoke", "report_dir=~/reports", "data.root=~/data", "tracking.artifact_location=~/art"])
    assert (cfg.report_dir, cfg.data.root, cfg.tracking.artifact_location) == \
        (f"{tmp_path}/reports", f"{tmp_path}/data", f"{tmp_path}/art")
    assert config.load(["study=smoke", "tracking.artifact_location=s3://bucket/~x"]).tracking.artifact_location == \
        "s3://bucket/~x"


def test_a_search_over_families_on_one_measure_is_valid(tmp_path):
    # 8-bit data: the dequantized densities' bounds and the discretized logistic share the 8-bit pmf scale
    study = tmp_path / "search.yaml"
    study.write_text("data:\n  binarize: none\nstudy:\n  n_trials: 3\n  search_space:\n    likelihood.name: "
                     "{kind: categorical, choices: [gaussian, laplace, discretized_logistic]}\n")
    cfg = config.load(study=str(study))
    assert cfg.study.search_space["likelihood.name"].choices == ["gaussian", "laplace", "discretized_logistic"]


@pytest.mark.parametrize("varied", ["grids:\n    - train.device: [cpu, auto]",
                                    "n_trials: 2\n  search_space:\n    train.device: {kind: categorical, choices: [cpu, auto]}"])
def test_the_device_is_not_a_variant(varied, tmp_path):
    # the report would pool the devices' runs in one row (and their samples/s in one mean)
    study = tmp_path / "devices.yaml"
    study.write_text(f"study:\n  {varied}\n")
    with pytest.raises(config.ConfigError, match="key='train.device' is invalid.*compare devices with the speed"):
        config.validate(config.load(study=str(study)))


def test_windows_is_refused_with_what_to_use_instead():
    # Without this, Windows fails on `import fcntl`, naming no way out
    script = ("import runpy, sys; sys.platform = 'win32'; sys.argv = ['bench.run', 'study=smoke']; "
              "runpy.run_module('bench.run', run_name='__main__', alter_sys=True)")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert done.returncode != 0
    assert "vaebench runs on Linux and macOS; on Windows, run it under WSL 2" in done.stderr


def test_compile_with_a_torch_older_than_2_12_is_refused(tmp_path, monkeypatch, capsys):
    # torch 2.4 to 2.11 run everything else; 2.11 has the dynamo options the compiled gradient sets, but
    # breaks its graph at autograd.grad (torch 2.11.0+cu130)
    monkeypatch.setattr(torch, "__version__", "2.11.0")
    _assert_refused(["study=smoke", "train.compile=true"], ["train.compile=True is invalid",
                    "false with torch 2.11.0: the compiled gradient needs torch 2.12 or newer"],
                    tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize(("version", "supported"), [("2.4.1", False), ("2.11.0+cu130", False), ("2.12.0", True),
                                                    ("2.12.0a0+git1f2e3d4", True), ("2.14.1+cpu", True),
                                                    ("3.0.0", True), ("10.1", True)])
def test_compile_is_supported_from_torch_2_12(version, supported):
    # by release number: a 2.12 pre-release is a 2.12, and 10.1 is not older than 2.12
    assert config.compile_supported(version) is supported


def test_an_override_that_leaves_the_search_space_as_it_is_is_taken(tmp_path):
    # refused only where it would remove a key: `{}` on a study without a search space sets what is there
    assert config.load(["study=smoke", "study.search_space={}"]) == config.load(["study=smoke"])
    (tmp_path / "search.yaml").write_text(FILES["search_lr.yaml"])
    same = "study.search_space={train.lr: {low: 0.0001, high: 0.01, log: true}}"
    assert config.load([f"study={tmp_path / 'search.yaml'}", same]) == config.load([f"study={tmp_path / 'search.yaml'}"])



@pytest.mark.parametrize("study_name, override", [("latent", "model.latent_dim=10"), ("aevb", "likelihood.name=bernoulli"),
                                                  ("smoke", "likelihood.name=laplace")])
def test_the_grids_a_refused_override_suggests_are_the_studys_with_that_value(study_name, override):
    """Following the suggestion keeps the study's other grid keys (a fixed example dropped latent's grid)."""
    grid_keys = {key for grid in config.load([f"study={study_name}"]).study.grids for key in grid}
    with pytest.raises(config.ConfigError) as refused:
        config.load([f"study={study_name}", override])
    suggested = re.search(r"'(study\.grids=.+)'$", str(refused.value)).group(1)
    cfg = config.load([f"study={study_name}", suggested])
    config.validate(cfg)
    key, value = override.split("=")
    points = config.grid_points(cfg)
    assert {str(p[key]) for p in points} == {value}
    assert {k for p in points for k in p} == grid_keys
