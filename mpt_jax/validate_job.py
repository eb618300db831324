"""`python -m mpt_jax.validate_job FLAGS...`: a job's `mpt_jax.main` flags through main's own checks, here.

`bash launch.sh tpu start|watch` (and `slurm`) run it before their first gcloud or sbatch call, so that a
typo (`--config.upstream.lrr=1`), a value out of range or an unknown flag is refused in seconds on the
laptop, not after a VM was provisioned and set up. The checks are main's: the config file loads, every
`--config.x` key exists (with "did you mean"), absl parses every flag, and `config.validate` accepts the
values. Not checked here: what lives behind a URL (gs://: the machine that runs the job checks it), and
how the batches split over devices (the devices are the job's).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

from absl import flags


@contextlib.contextmanager
def _urls_unchecked() -> Iterator[None]:
  """URLs count as present while validating: this machine may have neither gcsfs nor the credentials."""
  from mpt_jax import paths

  isfile, isdir = paths.isfile, paths.isdir
  paths.isfile = lambda path: paths.is_url(path) or isfile(path)
  paths.isdir = lambda path: paths.is_url(path) or isdir(path)
  try:
    yield
  finally:
    paths.isfile, paths.isdir = isfile, isdir


def problems(args: Sequence[str]) -> list[str]:
  """What mpt_jax.main would refuse in `args` (its flags, without the program name); [] when none."""
  from mpt_jax import config as config_lib, main

  argv = main.with_shipped_configs(["mpt_jax.main", *args])
  mistakes = main.config_mistakes(argv)
  if mistakes:
    return mistakes
  try:
    flags.FLAGS(argv)
  except flags.Error as error:
    return [str(error)]
  config, workdir = main._CONFIG.value, main._WORKDIR.value
  if config is None or not workdir:
    return ["both --config and --workdir are required"]
  try:
    with _urls_unchecked():
      config_lib.validate(config)
  except config_lib.ConfigError as error:
    return [str(error)]
  return []


def main(args: Sequence[str] | None = None) -> int:
  args = sys.argv[1:] if args is None else list(args)
  found = problems(args)
  if found:
    sys.stderr.write("refused: " + "\n  ".join(found) + "\n")
    return 1
  sys.stderr.write("job flags: valid (mpt_jax.main's checks, run locally)\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
