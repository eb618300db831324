"""The adaptation settings (source tasks -> target tasks) and the metric of every known task.

Tasks and settings come from "gyms": `crossfit` (the 160 CrossFit tasks and the 11 settings of the study,
from the shipped `settings.json` and `crossfit_task_metrics.json`), `synthetic` (the offline gym of
`mpt_jax.data.synthetic`), and any gym a user registers with `register_gym` / `register_gym_files`.
Every lookup (`get_setting`, `metric_for_task`, `load_setting`) sees all of them, so a task name is
checked and its metric found the same way whichever gym it comes from.

The study's `nonli2nli` has `sick` on both sides (a leak in the original split file). It is kept, to
reproduce the study, and reported with a warning whenever the setting is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

_HERE = Path(__file__).parent
CROSSFIT_SETTINGS_FILE = _HERE / "settings.json"
CROSSFIT_METRICS_FILE = _HERE / "crossfit_task_metrics.json"

METRICS = ("ACC", "Classification-F1", "EM", "QA-F1", "Rouge-L", "Matthew-Correlation", "Pearson-Correlation")
STUDY_SETTINGS = (
  "random",
  "cls2cls",
  "nocls2cls",
  "both2cls",
  "cls2nocls",
  "nocls2nocls",
  "both2nocls",
  "qa2qa",
  "noqa2qa",
  "nonli2nli",
  "nopara2para",
)


class SettingError(ValueError):
  """A setting or task name that is not known, or a malformed setting file."""


@dataclasses.dataclass(frozen=True)
class Setting:
  name: str
  source: tuple[str, ...]  # meta-training (upstream) tasks
  target: tuple[str, ...]  # few-shot adaptation (downstream) tasks
  gym: str = "user"
  note: str = ""

  @property
  def overlap(self) -> tuple[str, ...]:
    """Tasks on both sides: a leak of target data into the initialization."""
    target = set(self.target)
    return tuple(t for t in self.source if t in target)


@dataclasses.dataclass(frozen=True)
class Gym:
  name: str
  metrics: Mapping[str, str]  # task -> CrossFit metric name
  settings: Mapping[str, Setting]
  classification: frozenset[str] | None = None  # classification tasks, where the gym knows them


_GYMS: dict[str, Gym] = {}
# Built-in gyms are loaded on first use.
_BUILTIN: dict[str, Callable[[], Gym]] = {}


def _load_crossfit() -> Gym:
  metrics = _read_json(CROSSFIT_METRICS_FILE)
  raw = _read_json(CROSSFIT_SETTINGS_FILE)
  settings = {
    name: _setting_from_mapping(name, spec, "crossfit", where=str(CROSSFIT_SETTINGS_FILE))
    for name, spec in raw.items()
  }
  return _checked_gym("crossfit", metrics, settings)


def _load_synthetic() -> Gym:
  from mpt_jax.data import synthetic  # plain data: its task table and settings (it imports nothing of ours)

  return make_gym(
    synthetic.GYM_NAME,
    synthetic.TASK_METRICS,
    synthetic.SETTINGS,
    classification=synthetic.CLASSIFICATION_TASKS,
  )


_BUILTIN["crossfit"] = _load_crossfit
_BUILTIN["synthetic"] = _load_synthetic


def _ensure_builtin() -> None:
  for name, load in list(_BUILTIN.items()):
    if name not in _GYMS:
      _install(load())


def _read_json(path: str | os.PathLike):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise SettingError(f"{path}: file not found") from None
  except json.JSONDecodeError as e:
    raise SettingError(f"{path}: not valid JSON ({e})") from None


def _name_list(value, key: str, where: str, *, may_be_empty: bool = False) -> tuple[str, ...]:
  if may_be_empty and value in (None, [], ()):
    return ()
  if isinstance(value, str) or not isinstance(value, Iterable):
    raise SettingError(f"{where}: {key!r} must be a list of task names, got {value!r}")
  names = tuple(value)
  bad = [n for n in names if not isinstance(n, str) or not n.strip()]
  if bad:
    raise SettingError(f"{where}: {key!r} holds entries that are not task names: {bad}")
  if not names:
    raise SettingError(
      f"{where}: {key!r} is empty; a setting needs target tasks (and, to learn an initialization, source tasks)"
    )
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise SettingError(f"{where}: {key!r} lists {duplicates} more than once")
  return names


def _plain(spec):
  """A config (ml_collections.ConfigDict) as a plain dict; anything else unchanged."""
  return spec.to_dict() if hasattr(spec, "to_dict") else spec


def _setting_from_mapping(
  name: str, spec, gym: str, where: str, *, sources_optional: bool = False
) -> Setting:
  """A setting from {"source": [...], "target": [...]}; `sources_optional` (a user's file or config):
  "source" may be empty or absent (PT, or a method started from a given init_prompt, needs none)."""
  if not isinstance(spec, Mapping) or "target" not in spec or ("source" not in spec and not sources_optional):
    optional = " ('source' may be empty or left out: PT needs none)" if sources_optional else ""
    raise SettingError(
      f"{where}: setting {name!r} must be an object with 'source' and 'target' lists{optional}"
    )
  return Setting(
    name=name,
    source=_name_list(spec.get("source"), "source", f"{where} [{name}]", may_be_empty=sources_optional),
    target=_name_list(spec["target"], "target", f"{where} [{name}]"),
    gym=gym,
    note=str(spec.get("note", "")),
  )


def _checked_gym(
  name: str,
  metrics: Mapping[str, str],
  settings: Mapping[str, Setting],
  classification: Iterable[str] | None = None,
) -> Gym:
  bad_metrics = {t: m for t, m in metrics.items() if m not in METRICS}
  if bad_metrics:
    raise SettingError(f"gym {name!r}: unknown metric(s) {bad_metrics}; known metrics: {list(METRICS)}")
  for setting in settings.values():
    unknown = [t for t in setting.source + setting.target if t not in metrics]
    if unknown:
      raise SettingError(
        f"gym {name!r}, setting {setting.name!r}: task(s) without a metric in the gym's table: {unknown}"
      )
  if classification is not None:
    classification = frozenset(classification)
    unknown = sorted(classification - set(metrics))
    if unknown:
      raise SettingError(f"gym {name!r}: classification task(s) not in its metric table: {unknown}")
  return Gym(name, dict(metrics), dict(settings), classification)


def _install(gym: Gym) -> None:
  for other in _GYMS.values():
    if other.name == gym.name:
      continue
    clashes = [t for t in gym.metrics if t in other.metrics and other.metrics[t] != gym.metrics[t]]
    if clashes:
      raise SettingError(
        f"gym {gym.name!r}: task(s) {clashes[:5]} already known to gym {other.name!r} "
        f"with another metric; rename the tasks"
      )
    same = sorted(set(gym.settings) & set(other.settings))
    if same:
      raise SettingError(
        f"gym {gym.name!r}: setting name(s) {same} already defined by gym "
        f"{other.name!r}; give them other names"
      )
  _GYMS[gym.name] = gym


def make_gym(
  name: str,
  metrics: Mapping[str, str],
  settings: Mapping[str, Mapping | Setting] | None = None,
  classification: Iterable[str] | None = None,
) -> Gym:
  """A checked gym (every setting's tasks have a known metric), not yet registered."""
  built = {}
  for setting_name, spec in (settings or {}).items():
    if isinstance(spec, Setting):
      spec = dataclasses.replace(spec, name=setting_name, gym=name)
    else:
      spec = _setting_from_mapping(setting_name, _plain(spec), name, where=f"gym {name!r}")
    built[setting_name] = spec
  return _checked_gym(name, metrics, built, classification)


def register_gym(
  name: str,
  metrics: Mapping[str, str],
  settings: Mapping[str, Mapping | Setting] | None = None,
  classification: Iterable[str] | None = None,
) -> Gym:
  """Makes a gym's tasks and settings known to every lookup; registering a name again replaces it."""
  _ensure_builtin()
  gym = make_gym(name, metrics, settings, classification)
  _install(gym)
  return gym


def unregister_gym(name: str) -> None:
  """Forgets a registered gym (a built-in one comes back on the next lookup)."""
  _GYMS.pop(name, None)


def register_gym_files(
  name: str, metrics_file: str | os.PathLike, settings_file: str | os.PathLike | None = None
) -> Gym:
  """A gym from its metric table (`{task: metric}`) and settings (`{name: {source, target}}`) files."""
  metrics = _read_json(metrics_file)
  if not isinstance(metrics, Mapping):
    raise SettingError(f"{metrics_file}: expected an object {{task: metric name}}")
  settings = _read_json(settings_file) if settings_file is not None else {}
  if not isinstance(settings, Mapping):
    raise SettingError(f"{settings_file}: expected an object {{setting name: {{source, target}}}}")
  return register_gym(name, metrics, settings)


TASK_TABLE_FILE = "tasks.json"  # in a data_dir: the metric and kind of its own tasks
# metrics.CLASSIFICATION_METRICS, by value: metrics reads this module (task -> metric), not the reverse
_CLASSIFICATION_METRICS = ("ACC", "Classification-F1", "Matthew-Correlation")


def register_task_table(table, where: str) -> Gym:
  """Makes the tasks of a data directory's `tasks.json` known: `{task: {"metric": M, "classification":
  bool}}` (or `{task: M}`; "classification" defaults to whether M is a classification metric: ACC,
  Classification-F1, Matthew-Correlation). `where` (the file) names the gym and every error."""
  if not isinstance(table, Mapping) or not table:
    raise SettingError(f'{where}: expected an object {{task: {{"metric": ..., "classification": ...}}}}')
  metrics, classification, problems = {}, [], []
  for task, spec in table.items():
    spec = {"metric": spec} if isinstance(spec, str) else spec
    if not isinstance(spec, Mapping) or set(spec) - {"metric", "classification"} or "metric" not in spec:
      problems.append(
        f'{task!r}: expected {{"metric": one of {list(METRICS)}, "classification": true/false}}'
      )
      continue
    if spec["metric"] not in METRICS:
      problems.append(f"{task!r}: unknown metric {spec['metric']!r}; known metrics: {list(METRICS)}")
      continue
    is_classification = spec.get("classification", spec["metric"] in _CLASSIFICATION_METRICS)
    if not isinstance(is_classification, bool):
      problems.append(f"{task!r}: 'classification' must be true or false, got {is_classification!r}")
      continue
    metrics[task] = spec["metric"]
    if is_classification:
      classification.append(task)
  if problems:
    raise SettingError(f"{where}: " + "; ".join(problems))
  try:
    return register_gym(f"tasks of {where}", metrics, {}, classification)
  except SettingError as error:
    raise SettingError(f"{where}: {error}") from None


def gyms() -> dict[str, Gym]:
  _ensure_builtin()
  return dict(_GYMS)


def known_tasks() -> dict[str, str]:
  """Every task of every gym, with its metric."""
  _ensure_builtin()
  return {task: metric for gym in _GYMS.values() for task, metric in gym.metrics.items()}


def all_settings() -> dict[str, Setting]:
  _ensure_builtin()
  return {name: s for gym in _GYMS.values() for name, s in gym.settings.items()}


def _suggest(name: str, candidates: Iterable[str]) -> str:
  close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
  return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def check_task_names(names: Iterable[str], where: str = "") -> None:
  """Raises one error naming every unknown task, each with the closest known names."""
  known = known_tasks()
  unknown = [n for n in dict.fromkeys(names) if n not in known]
  if unknown:
    lines = "\n".join(f"  {n!r}{_suggest(n, known)}" for n in unknown)
    prefix = f"{where}: " if where else ""
    raise SettingError(
      f"{prefix}{len(unknown)} unknown task name(s):\n{lines}\nKnown tasks are those of the gyms "
      f"{sorted(_GYMS)} (CrossFit's are in {CROSSFIT_METRICS_FILE.name}); a new task needs a metric: "
      f'list it in DATA_DIR/{TASK_TABLE_FILE} ({{"my-task": {{"metric": "ACC", "classification": true}}}}, '
      f'README: "Add your own task"), or register its gym with mpt_jax.data.settings.register_gym.'
    )


def metric_for_task(task: str) -> str:
  """The CrossFit metric name of a task of any registered gym."""
  known = known_tasks()
  if task not in known:
    check_task_names([task])
  return known[task]


def is_classification(task: str) -> bool | None:
  """True/False where the task's gym says; None where it does not (CrossFit: read k from disk)."""
  _ensure_builtin()
  for gym in _GYMS.values():
    if task in gym.metrics and gym.classification is not None:
      return task in gym.classification
  check_task_names([task])
  return None


def _warn_overlap(setting: Setting) -> None:
  if setting.overlap:
    warnings.warn(
      f"setting {setting.name!r}: task(s) {list(setting.overlap)} are both source and target, so the "
      f"learned initialization has seen target-task data"
      + (
        " (a leak in the original split file, kept to reproduce the study)"
        if setting.gym == "crossfit"
        else ""
      ),
      UserWarning,
      stacklevel=3,
    )


def get_setting(name: str) -> Setting:
  """A registered setting by name (the 11 of the study, the synthetic gym's, and registered ones)."""
  settings = all_settings()
  if name not in settings:
    raise SettingError(
      f"unknown setting {name!r}{_suggest(name, settings)}; known settings: "
      f"{sorted(settings)}, or pass a JSON file with 'source' and 'target' lists"
    )
  setting = settings[name]
  _warn_overlap(setting)
  return setting


def load_setting(spec: str | os.PathLike | Mapping | Setting, name: str | None = None) -> Setting:
  """A setting from its registered name, a JSON file, or a mapping (e.g. a config) with source/target.

  A JSON file holds `{"source": [...], "target": [...]}`, or several settings `{name: {source, target}}`
  from which `name` picks one. Every task name is checked against the known tasks.
  """
  spec = _plain(spec)
  if isinstance(spec, Setting):
    check_task_names(spec.source + spec.target, where=f"setting {spec.name!r}")
    _warn_overlap(spec)
    return spec
  if isinstance(spec, Mapping):
    where = "setting from config"
    setting = _setting_from_mapping(name or "custom", dict(spec), "user", where, sources_optional=True)
  else:
    text = str(spec)
    is_file = text.endswith(".json") or os.sep in text or Path(text).is_file()
    if not is_file:
      return get_setting(text)
    where = text
    raw = _read_json(text)
    if not isinstance(raw, Mapping):
      raise SettingError(f"{where}: expected an object with 'source' and 'target' lists")
    if "source" in raw or "target" in raw:
      setting = _setting_from_mapping(name or Path(text).stem, raw, "user", where, sources_optional=True)
    else:
      if name is None:
        if len(raw) != 1:
          raise SettingError(f"{where}: holds settings {sorted(raw)}; pick one with name=...")
        name = next(iter(raw))
      if name not in raw:
        raise SettingError(f"{where}: no setting {name!r}{_suggest(name, raw)}; it holds {sorted(raw)}")
      setting = _setting_from_mapping(name, raw[name], "user", where, sources_optional=True)
  check_task_names(setting.source + setting.target, where=where)
  _warn_overlap(setting)
  return setting
