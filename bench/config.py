"""Typed configuration: dataclass defaults, `studies/NAME.yaml`, then `key=value` overrides.

Unknown keys, wrong types and invalid values raise `ConfigError`, which names the key, the bad value
and the valid choices; the CLI turns it into exit code 2 before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import shlex
import shutil
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from models import likelihoods

# bench/studies of an installed wheel (pyproject.toml), or studies/ beside bench/ in a clone (an editable install)
_BENCH = Path(__file__).resolve().parent
STUDIES_DIR = _BENCH / "studies" if (_BENCH / "studies").is_dir() else _BENCH.parent / "studies"
DATASETS = ("mnist", "fashion_mnist", "digits", "mnist_t10k")
BINARIZE = ("none", "threshold", "static", "dynamic")
DEVICES = ("auto", "cpu", "cuda")
BACKWARDS = ("manual", "autograd")
PRUNERS = ("auto", "median", "none")
SEARCH_KINDS = ("float", "int", "categorical")


class ConfigError(ValueError):
    """A bad config or command line; the message names the key, the value and the valid choices."""


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | fashion_mnist | digits (offline) | mnist_t10k (the 10k test files only)
    root: str = "data"  # torchvision's folder; MNIST lives in <root>/MNIST/raw
    download: bool = True  # fetch missing files through torchvision
    binarize: str = "dynamic"  # none (8-bit) | threshold (static, at ½) | static (one fixed draw) | dynamic
    dequantize: bool = True  # 8-bit data: densities see y = (k + u)/256, pmfs see k/255
    n_val: int = 10000  # validation examples held out from the training split (at most a fifth of it)
    limit: int = 0  # keep at most this many examples per split (0: all); for quick runs and tests
    seed: int = 0  # the split, the static binarization and the evaluation draws


@dataclass
class ModelConfig:
    hidden: list[int] = field(default_factory=lambda: [400])  # encoder sizes; the decoder mirrors them
    latent_dim: int = 20  # units of z


@dataclass
class LikelihoodConfig:
    name: str = "bernoulli"  # a family of models/likelihoods.py
    scale: float = 1.0  # fixed σ (gaussian) or b (laplace)
    min_scale: float = 0.0  # floor on a learned scale (0: off); > 0 makes the family bounded


# a family that does not read a key (models.likelihoods.Family.reads) trains the same model at any value
LIKELIHOOD_DEFAULTS = {"likelihood.scale": LikelihoodConfig.scale, "likelihood.min_scale": LikelihoodConfig.min_scale}
# keys a variant may leave unread: its family's unused likelihood settings, and data.dequantize where no
# density sees the pixels (binarized data, an 8-bit pmf)
UNREAD_DEFAULTS = {**LIKELIHOOD_DEFAULTS, "data.dequantize": DataConfig.dequantize}


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the training split
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # Adam
    beta: float = 1.0  # weight of the KL in the training objective
    n_samples: int = 1  # L reparameterised samples per datapoint
    seed: int = 0  # initialisation, shuffles and draws (set per variant by study.seeds)
    device: str = "auto"  # auto | cpu | cuda
    # manual: the MLPs' backward written out (models/manual_grad.py), a faster step with the same gradient
    # | autograd: torch.autograd through the whole loss, the reference it is tested against
    backward: str = "manual"
    cuda_graph: bool = True  # on a GPU, capture the step once as a CUDA graph and replay it per batch
    # on a CPU, run the manual gradient through torch.compile: fused loops for its small operations; the
    # first step compiles (seconds; needs a C++ compiler); not used on a GPU (there: train.cuda_graph)
    compile: bool = False
    # A learned scale below this fraction of the pixel quantum (1 for binarized data, 1/256 for 8-bit)
    # ends an unbounded family's run as diverged where its objective can run away (binarized or raw 8-bit
    # pixels: the density has become a spike on discrete values; the σ-VAE's per-image σ); not on
    # dequantized pixels, where a density's cannot
    scale_collapse: float = 0.01


@dataclass
class EvalConfig:
    iwae_k: int = 1000  # importance samples of the final IWAE estimate (Burda et al. use 5000)
    iwae_examples: int = 1000  # test examples it is computed on (0: all)
    chunk: int = 250  # samples per chunk, so large k fits in memory
    figures: bool = True  # reconstruction, samples and manifold grids, ELBO curve


@dataclass
class SearchDim:
    kind: str = "float"  # float | int | categorical
    low: float | None = None  # float and int: the range's ends
    high: float | None = None
    log: bool = False  # sample on a log scale (low > 0)
    choices: list[Any] | None = None  # categorical: the values


@dataclass
class StudyConfig:
    name: str = ""  # set from the study file
    description: str = ""  # shown in MLflow and the report
    grids: list[dict[str, Any]] = field(default_factory=list)  # each: dotted key -> list of values
    seeds: list[int] = field(default_factory=lambda: [0])  # every variant runs once per seed
    # sampled by TPE: dotted key -> {kind: float | int | categorical, low, high, log, choices}
    search_space: dict[str, SearchDim] = field(default_factory=dict)
    n_trials: int = 0  # TPE trials (with a search space)
    # Prunes on the validation ELBO reported each epoch: auto = median for a search space, none for grid
    # variants (every one of them must finish) | median | none
    pruner: str = "auto"
    n_workers: int = 1  # local worker processes
    storage: str = ""  # Optuna storage URL; "" = sqlite file beside the MLflow store
    worker: bool = False  # join the existing study (from another machine) instead of creating it


@dataclass
class TrackingConfig:
    uri: str = ""  # MLflow tracking URI; "" = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    # Where a new experiment keeps its artifacts when `uri` is a database (postgresql://): a folder or an
    # s3:// URL every worker can write. Unused otherwise: SQLite keeps them beside its file, a tracking
    # server where its --artifacts-destination says.
    artifact_location: str = ""
    system_metrics: bool = True  # CPU/GPU usage through psutil (and pynvml on GPUs)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report_dir: str = "reports"  # reports are written to <report_dir>/<study>/
    report: bool = True  # bench.run writes the study's report there when it ends (bench.report: on demand)


SEED_RANGE = 2**32  # seeds are integers in [0, 2³²): what Optuna's samplers and NumPy accept
# Keys whose values are nested mappings of their own, not sections of the config
OPEN_MAPPINGS = ("study.grids", "study.search_space")
SEARCH_EXAMPLE = ("`train.lr: {kind: float, low: 1.0e-4, high: 1.0e-2, log: true}` or "
                  "`model.hidden: {kind: categorical, choices: [[400], [400, 150]]}`")


def _keys_of_type(cls: type, type_name: str, prefix: str = "") -> set[str]:
    """Dotted keys of the fields of a type (as annotated) of a config dataclass and its nested sections."""
    keys = set()
    for f in fields(cls):
        if f.type == type_name:
            keys.add(prefix + f.name)
        elif f.default_factory is not MISSING and is_dataclass(f.default_factory):
            keys |= _keys_of_type(f.default_factory, type_name, f"{prefix}{f.name}.")
    return keys


BOOL_KEYS = _keys_of_type(Config, "bool")
# Given on the command line, these take the text as it is: YAML would read `report_dir=0755` as 493,
# `study.description=yes` as True and `study.description=run #3` as "run"
STR_KEYS = _keys_of_type(Config, "str")
PATH_KEYS = ("report_dir", "data.root", "tracking.artifact_location")  # `~` is the home folder


def _leaves(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A nested mapping's (dotted key, value) pairs, down to the config's keys."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _leaves(v, key + ".") if isinstance(v, dict) and key not in OPEN_MAPPINGS else [(key, v)]
    return out


def _check_types(content: dict[str, Any], where: str, from_file: bool = False) -> None:
    """OmegaConf reads 2 or -1 given to a bool as true: only booleans (YAML's true/false, yes/no) are
    accepted, in the config and in the grids. In a file, a text setting must be YAML text: OmegaConf
    would turn what YAML read as a number or boolean back into other text (0755 into '493', no into
    'False'); on the command line text settings take the text as given."""
    values = []
    for key, value in _leaves(content):
        if key == "study.grids" and isinstance(value, list):
            values += [(k, v) for grid in value if isinstance(grid, dict) for k, vs in grid.items()
                       for v in (vs if isinstance(vs, list) else [vs])]
        else:
            values.append((key, value))
    for key, value in values:
        if key in BOOL_KEYS and not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}={value!r} is invalid: expected true or false")
        if from_file and key in STR_KEYS and isinstance(value, (bool, int, float)):
            raise ConfigError(f"{where}: {key}={value!r} is invalid: expected text, and YAML read this value as "
                              f"{_article(type(value).__name__)} (as it reads 0755 as 493, no as false, 12:30 as 750): "
                              "put the text in quotes")


class _StudyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error: PyYAML would keep the last
    silently, and a study file's second `data:` section would replace its first. Aliases (*name) are
    refused: ten lines of nested aliases expand to billions of values, and a run's config.yaml, which a
    tracking server's other users can replace, is read with this loader too."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is not supported: repeat the value, or refer to a key with an "
                "OmegaConf interpolation ${section.key}", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _article(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def check_writable(key: str, value: str, folder: Path, create: bool = False) -> None:
    """Raises ConfigError unless `folder` is a directory this process can write in; with `create`, the
    nearest existing folder above it must be (the rest is made when results are written)."""
    while create and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value!r}: {folder} is not a writable folder; expected a path in a folder "
                          "you can write to")


def available_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def study_path(study: str) -> Path:
    path = Path(study)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"study file {study!r} does not exist")
        return path
    path = STUDIES_DIR / f"{study}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown study {study!r}; valid choices: {', '.join(available_studies())} "
                          "(or a path to a .yaml file)")
    return path


def _grids_with(grids: list[dict[str, list[Any]]], key: str, value: Any) -> str:
    """study.grids=[...] as one writes it on the command line, with `key` set to `value` in every grid."""
    def flow(v: Any) -> str:  # YAML's flow style, as the override reads it
        return json.dumps(v).replace('"', "") if isinstance(v, (list, dict)) else str(v)

    written = ["{" + ", ".join(f"{k}: [{flow(value) if k == key else ', '.join(flow(v) for v in values)}]"
                               for k, values in grid.items()) + "}" for grid in grids]
    return f"study.grids=[{', '.join(written)}]"


def _merge(base: DictConfig, other: Any, where: str) -> DictConfig:
    """OmegaConf.merge, with its errors turned into a ConfigError; an unknown key lists the valid ones."""
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        if (e.full_key or "").startswith("study.search_space."):  # its keys hold dots themselves
            hint = ("give study.search_space in a study file" if where.startswith("override") else
                    "study.search_space maps a dotted config key to its range")
            raise ConfigError(f"{where}: {e.msg.splitlines()[0]}; {hint}, e.g. {SEARCH_EXAMPLE}") from None
        parent = e.full_key.rsplit(".", 1)[0] if "." in (e.full_key or "") else ""
        section = OmegaConf.select(base, parent) if parent else base
        valid = ", ".join(str(k) for k in section)
        raise ConfigError(f"{where}: {e.msg.splitlines()[0]}; valid keys{' in ' + parent if parent else ''}: "
                          f"{valid}") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        current = OmegaConf.select(base, key) if key else None
        if OmegaConf.is_list(current):
            current = OmegaConf.to_container(current)
            if "is not a ListConfig" in str(e):  # e.g. study.seeds=0,1,2; OmegaConf's words name its AnyNode
                given = OmegaConf.select(OmegaConf.create(other), key) if isinstance(other, (dict, DictConfig)) else None
                items = [item for item in re.split(r"[,\s]+", str(given or "")) if item]  # "0,1,2", "64 128"
                as_list = f"[{','.join(items)}]" if items else json.dumps(current).replace(" ", "")
                section, leaf = key.rsplit(".", 1)
                written = f"{key}={as_list}" if where.startswith("override") else f"{leaf}: {as_list} (under {section}:)"
                raise ConfigError(f"{where}: {key} is a list, written in brackets: {written}") from None
        expected = f"{key} expects {_article(type(current).__name__)} like {current!r}: " \
            if key and current is not None else ""
        raise ConfigError(f"{where}: {expected}{str(e).splitlines()[0]}") from None
    except TypeError as e:  # OmegaConf's: a mapping given where a list goes, or the reverse
        raise ConfigError(f"{where}: a value of the wrong shape ({e}): a mapping where the config holds a list "
                          "or a value, or a list where it holds a mapping; see --help for each key's "
                          "default") from None


def _parse_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    study, overrides = None, []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form key=value (e.g. study=likelihoods "
                              "train.epochs=3); see --help")
        key, value = arg.split("=", 1)
        if key == "study":
            study = value
        else:
            overrides.append(arg)
    return study, overrides


def load(args: list[str] | None = None, study: str | None = None) -> Config:
    """Defaults <- study YAML <- dotted overrides, validated. Returns a plain `Config` dataclass."""
    cli_study, overrides = _parse_overrides(list(args or []))
    study = cli_study or study
    cfg = OmegaConf.structured(Config)
    if study:
        path = study_path(study)
        try:
            content = yaml.load(path.read_text(encoding="utf-8"), Loader=_StudyLoader) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"study file {path} is not valid YAML in UTF-8: {' '.join(str(e).split())}") from None
        if not isinstance(content, dict):
            raise ConfigError(f"study file {path} must hold a mapping of sections, not {type(content).__name__}")
        _check_types(content, str(path), from_file=True)
        searched = content.get("study", {}).get("search_space") if isinstance(content.get("study"), dict) else None
        for key, dim in (searched.items() if isinstance(searched, dict) else ()):
            _check(isinstance(dim, dict), f"{path}: study.search_space.{key}", dim,
                   f"a mapping: {{kind, low, high, log}} or {{kind: categorical, choices: [...]}}, e.g. {SEARCH_EXAMPLE}")
        cfg = _merge(cfg, content, str(path))
        if not cfg.study.name:
            cfg.study.name = path.stem
    given: dict[str, list[str]] = {}  # each override -> the dotted keys it sets
    for arg in overrides:
        key, value = arg.split("=", 1)
        try:
            if key in STR_KEYS:  # the text as given, but for quotes around it, which YAML drops too
                quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
                dot = OmegaConf.create()
                OmegaConf.update(dot, key, value[1:-1] if quoted else value)
            else:  # `key=` sets an empty string (YAML would read it as null)
                dot = OmegaConf.from_dotlist([arg if value else f"{key}=''"])
        except (OmegaConfBaseException, yaml.YAMLError) as e:  # a value YAML cannot read: `[64`
            raise ConfigError(f"override {arg!r}: {' '.join(str(e).split())}") from None
        content = OmegaConf.to_container(dot)
        _check_types(content, f"override {arg!r}")
        given_space = dict(_leaves(content)).get("study.search_space")
        kept = sorted(set(cfg.study.search_space) - set(given_space)) if isinstance(given_space, dict) else []
        if kept:  # `study.search_space={}` would leave them all
            raise ConfigError(f"override {arg!r} cannot remove {', '.join(kept)} from the study's search space: an "
                              "override merges into it (it can add a key or change a key's range); edit "
                              "study.search_space in the study file")
        cfg = _merge(cfg, dot, f"override {arg!r}")
        given[arg] = [key for key, _ in _leaves(content)]  # `train={seed: 1}` sets train.seed
    try:
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # an interpolation that cannot be resolved: ${oc.env:UNSET}
        raise ConfigError(f"cannot resolve the config: {' '.join(str(e).split())}") from None
    varied = {key for grid in config.study.grids for key in grid}
    for arg, keys in given.items():
        for key in keys:
            if key in varied:
                wanted = OmegaConf.select(OmegaConf.structured(config), key)
                raise ConfigError(f"override {arg!r}: {key} is varied by the study's grids "
                                  f"({', '.join(sorted(varied))}); replace the grids instead, in the study file or with "
                                  "a study.grids=[...] override (it replaces all of them), e.g. the study's with "
                                  f"{key} set: '{_grids_with(config.study.grids, key, wanted)}'")
            if key == "train.seed":  # grid variants run once per seed; search trials use the first
                raise ConfigError(f"override {arg!r}: every variant's train.seed comes from study.seeds "
                                  f"({config.study.seeds}); set study.seeds=[...] instead")
    for key, value in _leaves(dataclasses.asdict(config)):  # an escaped \${ resolves to one, read again by apply
        if "${" in str(value):
            raise ConfigError(f"{key}={value!r}: a value cannot hold '${{', where OmegaConf's interpolations start")
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        owner = getattr(config, section) if section else config
        if "://" not in getattr(owner, name):
            setattr(owner, name, os.path.expanduser(getattr(owner, name)))
    validate(config)
    sampled = sorted(config.study.search_space)  # valid keys by now
    for arg, keys in given.items():
        for key in set(keys) & set(sampled):
            raise ConfigError(f"override {arg!r}: {key} is sampled by the study's search_space ({', '.join(sampled)}); "
                              "change study.search_space in the study file instead")
    return config


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def compile_supported(version: str | None = None) -> bool:
    """Whether this torch (or `version`) compiles the manual gradient whole: 2.12 or newer. torch 2.11
    has the dynamo options the compiled gradient sets, but breaks the graph at its requires_grad_ and
    autograd.grad, which the families without a closed-form score (a learned scale, the discretized
    logistic) go through: their gradient ran as five graphs."""
    major, minor = re.match(r"(\d+)\.(\d+)", version or torch.__version__).groups()
    return (int(major), int(minor)) >= (2, 12)


def validate_run(cfg: Config, combination: bool = True) -> None:
    """Checks that one variant's config can run (with `combination`, also that its likelihood fits its
    data protocol); raises ConfigError naming the key."""
    d, m, lk, t, e = cfg.data, cfg.model, cfg.likelihood, cfg.train, cfg.eval
    _check(d.name in DATASETS, "data.name", d.name, f"one of {', '.join(DATASETS)}")
    _check(d.binarize in BINARIZE, "data.binarize", d.binarize, f"one of {', '.join(BINARIZE)}")
    _check(d.n_val >= 1, "data.n_val", d.n_val, "an integer ≥ 1")
    _check(d.limit >= 0, "data.limit", d.limit, "an integer ≥ 0 (0: all)")
    _check(0 <= d.seed < SEED_RANGE, "data.seed", d.seed, f"an integer from 0 to {SEED_RANGE - 1}")
    _check(len(m.hidden) >= 1 and all(_is_int(h) and h >= 1 for h in m.hidden), "model.hidden", m.hidden,
           "a non-empty list of layer sizes ≥ 1")
    _check(m.latent_dim >= 1, "model.latent_dim", m.latent_dim, "an integer ≥ 1")
    _check(lk.name in likelihoods.FAMILIES, "likelihood.name", lk.name,
           f"one of {', '.join(likelihoods.NAMES)}")
    _check(math.isfinite(lk.scale) and lk.scale > 0, "likelihood.scale", lk.scale, "a finite number > 0")
    _check(math.isfinite(lk.min_scale) and lk.min_scale >= 0, "likelihood.min_scale", lk.min_scale,
           "a finite number ≥ 0 (0: no floor)")
    support = likelihoods.FAMILIES[lk.name].support if combination else None
    if support == likelihoods.BINARY:
        _check(d.binarize != "none", "data.binarize", d.binarize,
               f"threshold, static or dynamic: likelihood {lk.name} is a pmf of binary pixels "
               "(for 8-bit data use continuous_bernoulli or discretized_logistic)")
    if support == likelihoods.EIGHT_BIT:
        _check(d.binarize == "none", "data.binarize", d.binarize,
               f"none: likelihood {lk.name} is a pmf of 8-bit pixels (for binary data use bernoulli)")
    _check(t.epochs >= 1, "train.epochs", t.epochs, "an integer ≥ 1")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer ≥ 1")
    _check(math.isfinite(t.lr) and t.lr > 0, "train.lr", t.lr, "a finite number > 0")
    _check(math.isfinite(t.beta) and t.beta >= 0, "train.beta", t.beta, "a finite number ≥ 0")
    _check(t.n_samples >= 1, "train.n_samples", t.n_samples, "an integer ≥ 1 (L)")
    _check(t.device in DEVICES, "train.device", t.device, f"one of {', '.join(DEVICES)}")
    _check(t.backward in BACKWARDS, "train.backward", t.backward, f"one of {', '.join(BACKWARDS)}")
    if t.compile:
        _check(t.backward == "manual", "train.compile", t.compile,
               "false with train.backward=autograd (it compiles the written-out gradient: set train.backward=manual)")
        if t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available()):  # on a GPU: not used
            cxx = os.environ.get("CXX", "g++")
            program = (shlex.split(cxx) or [""])[0]  # as inductor runs it: CXX="ccache g++" runs ccache
            _check(shutil.which(program) is not None, "train.compile", t.compile,
                   f"false on this machine: torch.compile's CPU code needs a C++ compiler, and {cxx!r} (the CXX "
                   "environment variable, else g++) was not found")
            _check(compile_supported(), "train.compile", t.compile, f"false with torch {torch.__version__}: "
                   "the compiled gradient needs torch 2.12 or newer")
    _check(math.isfinite(t.scale_collapse) and t.scale_collapse >= 0, "train.scale_collapse", t.scale_collapse,
           "a finite number ≥ 0")
    _check(e.iwae_k >= 1, "eval.iwae_k", e.iwae_k, "an integer ≥ 1")
    _check(e.iwae_examples == 0 or e.iwae_examples >= 2, "eval.iwae_examples", e.iwae_examples,
           "0 (all) or an integer ≥ 2 (one image has no standard error over images)")
    _check(e.chunk >= 1, "eval.chunk", e.chunk, "an integer ≥ 1")


def validate(cfg: Config) -> None:
    s = cfg.study
    _check(not any(quote in s.name for quote in "'\""), "study.name", s.name,
           "a name without quotes: MLflow's search filters, which find the study's runs, cannot hold them "
           "(a study file's name is the study's unless it sets study.name)")
    _check(s.pruner in PRUNERS, "study.pruner", s.pruner, f"one of {', '.join(PRUNERS)}")
    _check(s.n_workers >= 1, "study.n_workers", s.n_workers, "an integer ≥ 1")
    _check(len(s.seeds) >= 1 and all(_is_int(x) and 0 <= x < SEED_RANGE for x in s.seeds), "study.seeds", s.seeds,
           f"a non-empty list of integers from 0 to {SEED_RANGE - 1}")
    _check(len(set(s.seeds)) == len(s.seeds), "study.seeds", s.seeds,
           "distinct integers (a repeated seed trains the same run twice, and its interval would be 0)")
    _check(s.n_trials >= 0, "study.n_trials", s.n_trials, "an integer ≥ 0")
    _check(not s.search_space or s.n_trials >= 1, "study.n_trials", s.n_trials,
           "an integer ≥ 1 when study.search_space is given")
    _check(bool(s.search_space) or s.n_trials == 0, "study.n_trials", s.n_trials,
           "0 without study.search_space: it counts search trials, and every grid variant is trained anyway")
    if s.storage:
        _check(s.storage.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql"),
               "study.storage", s.storage,
               "a URL sqlite:///FILE, postgresql://USER@HOST/DB or mysql://USER@HOST/DB")
    defaults = flatten(to_dict(Config()))
    for key, dim in s.search_space.items():
        _check(dim.kind in SEARCH_KINDS, f"study.search_space.{key}.kind", dim.kind,
               f"one of {', '.join(SEARCH_KINDS)}")
        _check(dim.kind == "categorical" or not isinstance(defaults.get(key), list), f"study.search_space.{key}.kind",
               dim.kind, f"categorical: {key} holds a list, e.g. {{kind: categorical, choices: [[400], [400, 150]]}}")
        if dim.kind == "categorical":
            _check(bool(dim.choices), f"study.search_space.{key}.choices", dim.choices, "a non-empty list")
        else:
            _check(dim.low is not None and dim.high is not None and math.isfinite(dim.low)
                   and math.isfinite(dim.high) and dim.low < dim.high,
                   f"study.search_space.{key}", f"low={dim.low}, high={dim.high}", "finite numbers, low < high")
            _check(not dim.log or dim.low > 0, f"study.search_space.{key}.low", dim.low,
                   "a number > 0 with log: true")
            _check(dim.kind != "int" or (float(dim.low).is_integer() and float(dim.high).is_integer()),
                   f"study.search_space.{key}", f"low={dim.low}, high={dim.high}", "whole numbers with kind: int")
    varied_by = [*((f"study.grids[{i}]", grid) for i, grid in enumerate(s.grids)), ("study.search_space", s.search_space)]
    for where, keys in varied_by:
        _check("train.seed" not in keys, f"{where} key", "train.seed",
               f"another key: every variant runs once per seed of study.seeds ({s.seeds})")
        _check("train.device" not in keys, f"{where} key", "train.device",
               "another key: the device is where a study runs, not part of a variant (the report would pool "
               "both devices' runs in one row); compare devices with the speed benchmarks, or run the study "
               "once per device, each with its own tracking.uri")
    gridded = sorted({key for grid in s.grids for key in grid})
    _check(bool(s.grids) or not s.search_space or len(s.seeds) == 1, "study.seeds", s.seeds,
           "one seed in a study without grids: each search trial trains once, with the first seed (seeds "
           "repeat grid variants, not search trials)")
    for key in s.search_space:  # trials are ranked by their val ELBO: all must see the same data
        _check(key not in gridded, "study.search_space key", key,
               f"a key no grid varies (study.grids vary {', '.join(gridded)}): search trials take it from the "
               "base config, and Optuna refuses a parameter that is sampled in some trials and set in others")
        _check(not key.startswith("data."), "study.search_space key", key,
               "a key that leaves the data as it is (vary data.* with study.grids)")
        _check(not key.startswith(NOT_VARIED), "study.search_space key", key,
               "a key of the model, likelihood, training or evaluation (not of the study itself, nor where "
               "results go)")
    points = grid_points(cfg) if s.grids or not s.search_space else []  # as bench.study.variants
    validate_run(cfg, combination=False)  # values the grids or the search replace must still be valid
    resolved: dict[str, dict[str, Any]] = {}  # each variant's whole config -> the grid point that gives it
    grid_scales: dict[str, dict[str, Any]] = {}  # the scale of each grid variant's ELBO -> a point on it
    for point in points:
        try:
            variant = apply(cfg, point)
            validate_run(variant)
        except ConfigError as err:
            where = f" (in the variant {point})" if point else ""
            raise ConfigError(f"{err}{where}") from None
        grid_scales.setdefault(_elbo_scale(variant), point)
        family = likelihoods.FAMILIES[variant.likelihood.name]
        unread = unread_likelihood_keys(variant.likelihood.name)
        if not reads_dequantize(variant.data, family):
            unread.append("data.dequantize")
        same = resolved.setdefault(repr(apply(variant, {key: UNREAD_DEFAULTS[key] for key in unread})), point)
        named = [key for key in unread if key in point]  # the unread keys this grid sets
        _check(same is point, "study.grids", f"{same} and {point}",
               "distinct variants: these give the same config, which would be trained twice" +
               (f" ({family.name} on this data does not read {' or '.join(named)}: give "
                f"{'it' if len(named) == 1 else 'them'} only in a grid of variants that do)" if named else ""))
    scales: dict[str, dict[str, Any]] = {}  # the scale of each search corner's ELBO -> a corner on it
    corners = search_corners(s.search_space)
    for corner in corners:  # search trials: the base config with sampled values
        try:
            variant = apply(cfg, corner)
            validate_run(variant)
        except ConfigError as err:
            raise ConfigError(f"{err} (in study.search_space, at {corner})") from None
        scales.setdefault(_elbo_scale(variant), corner)
    trained = {apply(cfg, point).likelihood.name for point in [*points, *corners]}
    for key, default in LIKELIHOOD_DEFAULTS.items():  # set, and read by no family the study trains
        value = getattr(cfg.likelihood, key.split(".")[1])
        readers = [f.name for f in likelihoods.FAMILIES.values() if key.split(".")[1] in f.reads]
        _check(value == default or bool(trained & set(readers)), key, value,
               f"its default {default}: none of the study's families ({', '.join(sorted(trained))}) reads it "
               f"(those that do: {', '.join(readers)})")
    _check(len(scales) <= 1, "study.search_space", "; ".join(f"{c} gives {k!r}" for k, c in scales.items()),
           "choices whose ELBOs share one measure: the search maximises the validation ELBO and prunes on "
           "it, comparing trials with each other (compare families on different measures with study.grids)")
    if s.pruner == "median":  # it compares each trial's validation ELBO with the others', grid variants' too
        data = {repr(apply(cfg, point).data): point for point in points}
        compares = "auto or none: median pruning compares every trial's validation ELBO with the others', and these "
        _check(len(data) <= 1, "study.pruner", s.pruner,
               f"{compares}grid points train on different data ({' and '.join(str(p) for p in data.values())})")
        both = {**grid_scales, **scales}
        _check(len(both) <= 1, "study.pruner", s.pruner,
               f"{compares}are on different measures ({'; '.join(f'{p} gives {k!r}' for k, p in both.items())})")


def likelihood_of(cfg: Config) -> likelihoods.Likelihood:
    return likelihoods.get(cfg.likelihood.name, cfg.likelihood.scale, cfg.likelihood.min_scale)


def binarized(data: DataConfig) -> bool:
    return data.binarize != "none"


def reads_dequantize(data: DataConfig, family: likelihoods.Family) -> bool:
    """Whether data.dequantize applies to `family`'s pixels: a density's on 8-bit data (binarized pixels are
    0/1 for every family; an 8-bit pmf sees k/255)."""
    return not binarized(data) and family.support != likelihoods.EIGHT_BIT


def measure_of(data: DataConfig, lik: likelihoods.Likelihood) -> likelihoods.Measure:
    """What lik's log p(x|z) on this data protocol is a measure of: the one rule that bench.data's runs and
    the study checks below share."""
    return lik.measure(binarized(data), reads_dequantize(data, lik.family) and data.dequantize)


def _elbo_scale(cfg: Config) -> str:
    """What a variant's ELBO may be compared on (`likelihoods.Measure.scale`); a training objective only
    with its own family's on the same measure."""
    lik = likelihood_of(cfg)
    measure = measure_of(cfg.data, lik)
    return measure.scale or f"{measure.name}, {lik.name}"


def search_corners(space: dict[str, SearchDim], most: int = 256) -> list[dict[str, Any]]:
    """Points that every sampled value lies between: each categorical choice, each bound of a range; all
    their combinations (so that a likelihood meets each data protocol it can be sampled with), or each
    key's values alone when there would be more than `most`. No point for an empty space."""
    if not space:
        return []
    values = {key: dim.choices if dim.kind == "categorical" else
              [int(dim.low), int(dim.high)] if dim.kind == "int" else [dim.low, dim.high]
              for key, dim in space.items()}
    if math.prod(len(v) for v in values.values()) > most:
        return [{key: v} for key, vs in values.items() for v in vs]
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def grid_points(cfg: Config) -> list[dict[str, Any]]:
    """The product of each grid's factor lists, concatenated; [{}] when the study has no grid."""
    points: list[dict[str, Any]] = []
    valid = [k for k in flatten(to_dict(Config())) if not k.startswith(NOT_VARIED)]
    for i, grid in enumerate(cfg.study.grids):
        for key, values in grid.items():
            _check(key in valid, f"study.grids[{i}] key", key, f"a dotted config key: one of {', '.join(valid)}")
            _check(isinstance(values, list) and len(values) >= 1, f"study.grids[{i}].{key}", values,
                   "a non-empty list of values")
        keys = list(grid)
        points += [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    return points or [{}]


def apply(cfg: Config, params: dict[str, Any]) -> Config:
    """A copy of cfg with dotted params set (type-checked)."""
    node = OmegaConf.structured(cfg)
    for key, value in params.items():
        try:
            OmegaConf.update(node, key, value, merge=False)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}={value!r}: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_object(node)


def unread_likelihood_keys(name: str) -> list[str]:
    """The likelihood keys that the family `name` does not read (e.g. likelihood.scale for the Bernoulli);
    none for a name the registry lacks, which validation names."""
    family = likelihoods.FAMILIES.get(name)
    return [key for key in LIKELIHOOD_DEFAULTS if family is not None and key.split(".")[1] not in family.reads]


def one_variant(cfg: Config) -> Config:
    """A trial's config as a study of just that variant (the run's config.yaml): `python -m bench.run
    study=config.yaml` trains that run again, in a study of its own. With the study's grids and seeds
    left in, it named another study of every variant, the grids overriding the trial's values. A study-wide
    value that its family does not read goes back to its default (a study of that family alone refuses
    it; the model is the same), and it is a study's own command, whichever process trained the run."""
    return apply(cfg, {"study.grids": [], "study.seeds": [cfg.train.seed], "study.search_space": {},
                       "study.n_trials": 0, "study.worker": False, "study.n_workers": 1,
                       **{key: LIKELIHOOD_DEFAULTS[key] for key in unread_likelihood_keys(cfg.likelihood.name)}})


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Keys (prefixes) that change where a run is computed and its results go, not what they are
PLACEMENT = ("tracking.", "report", "train.device")  # "report": the report and its folder
# Keys no variant may vary: the study's own, and where results go or run (not what they are)
NOT_VARIED = ("study.", *PLACEMENT)
# Keys that change how a run computes, not what: how the IWAE is batched in memory (a smaller eval.chunk
# after running out of memory: the same estimator, its draws taken in another order) and whether missing
# data may be downloaded (the same files either way)
HOW = ("eval.chunk", "data.download")
# left out of the study's hash: these, how its trials are shared out, its description (words about it),
# and how many search trials it runs (raising study.n_trials continues the same search)
_NOT_HASHED = ("study.n_workers", "study.storage", "study.worker", "study.description", "study.n_trials", *PLACEMENT,
               *HOW)


def config_hash(cfg: Config) -> str:
    flat = {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith(_NOT_HASHED)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def tracking_key(cfg: Config) -> str:
    """Where tracking_uri(cfg) comes from, as an error names it."""
    return "$MLFLOW_TRACKING_URI" if not cfg.tracking.uri and os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"


# the password of a URL's user (postgresql://USER:PASSWORD@HOST/DB, https://USER:PASSWORD@HOST): all up
# to the @, since SQLAlchemy takes a password with / ' or + in it as given (generated ones often hold /);
# the scheme's length bounded, else a long run of word characters costs quadratic time
_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]{0,30}://[^\s:/@'\"]*):[^\s@]*@")
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd)=)[^&\s'\"]*", re.IGNORECASE)  # ...?password=...


def redact(text: str) -> str:
    """text with every URL password replaced by ***: a store's address is printed, logged to MLflow and
    written into reports, and none of these may hold a secret (pass one through PGPASSWORD, ~/.pgpass or
    MLFLOW_TRACKING_PASSWORD instead)."""
    return _QUERY_PASSWORD.sub(r"\1***", _PASSWORD.sub(r"\1:***@", text))


def first_line(error: BaseException) -> str:
    """An error's first line (SQLAlchemy's go on with the statement and a link), redacted."""
    return redact(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)


def counted(n: int, noun: str) -> str:
    """"1 variant", "2 variants"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def to_yaml(cfg: Config) -> str:
    """The resolved config, as printed and logged (passwords redacted)."""
    return redact(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def _comments(cls: type, prefix: str = "") -> dict[str, str]:
    """Each dotted key of a config dataclass -> the comment beside its field (or, failing that, the lines
    above it): the defaults' documentation, read from this file so that it is written once."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
        elif match := re.match(r"(\w+): .*?(?:  # (.*))?$", text):
            out[prefix + match[1]] = match[2] or " ".join(above)
            above = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            out.update(_comments(f.default_factory, f"{prefix}{f.name}."))
    return out


def help_text() -> str:
    comments = _comments(Config)
    keys = "\n".join(f"  {k} = {v!r}" + (f"  # {comments[k]}" if comments.get(k) else "")
                     for k, v in flatten(to_dict(Config())).items())
    families = "\n".join(f"  {name}: {family.summary}" for name, family in likelihoods.FAMILIES.items())
    return (
        "usage: python -m bench.run study=NAME [key=value ...]\n\n"
        f"studies: {', '.join(available_studies())} (or study=path/to/file.yaml)\n"
        f"likelihood.name:\n{families}\n\nkeys and defaults:\n{keys}\n"
    )
