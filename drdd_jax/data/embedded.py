"""The offline default: an All-in-One set made from photos inside packages.

scikit-image, scikit-learn and matplotlib ship a few real photographs; each
task degrades them with its synthetic degradation (degrade.py). The split is
by photo, so no test photo (in any variant) is ever trained on. Every train
photo appears `data.embedded_variants` times per task, degraded with different
seeds; test photos once. The examples, seeds and bytes are fixed: `data.seed`
only drives the pipeline.
"""
import importlib.util
import os

from drdd_jax.data import degrade
from drdd_jax.data.layouts import Example
from drdd_jax.data.layouts import Plan
from drdd_jax.data.options import DataError
from drdd_jax.data.options import TASKS

# name: (package, file inside it). Only real photographs: the packages'
# synthetic graphics (colorwheel, logo, ...) and grayscale scans stay out.
PHOTOS = {
    'astronaut': ('skimage', 'data/astronaut.png'),
    'chelsea': ('skimage', 'data/chelsea.png'),
    'coffee': ('skimage', 'data/coffee.png'),
    'rocket': ('skimage', 'data/rocket.jpg'),
    'immunohistochemistry': ('skimage', 'data/ihc.png'),
    'hubble_deep_field': ('skimage', 'data/hubble_deep_field.jpg'),
    'retina': ('skimage', 'data/retina.jpg'),
    # The stereo pair's right view is nearly the same photo: left only.
    'motorcycle': ('skimage', 'data/motorcycle_left.png'),
    'china': ('sklearn', 'datasets/images/china.jpg'),
    'flower': ('sklearn', 'datasets/images/flower.jpg'),
    'grace_hopper': ('matplotlib', 'mpl-data/sample_data/grace_hopper.jpg'),
}
TEST_PHOTOS = ('chelsea', 'china', 'coffee')


def photo_path(name: str) -> str:
  """The file of a bundled photo, found without importing its package."""
  package, relative = PHOTOS[name]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f"data.source='embedded': package {package} (photo "
                    f'{name!r}) is not installed')
  path = os.path.join(spec.submodule_search_locations[0], relative)
  if not os.path.isfile(path):
    raise DataError(f"{path}: missing; data.source='embedded' needs it "
                    f'(photo {name!r} of {package})')
  return path


def embedded_plan(task: str, max_size: int, variants: int) -> Plan:
  """The plan of one task of the embedded dataset."""
  train = [Example(f'{photo}-{v}', photo_path(photo), synth=task,
                   seed=degrade.seed_of('embedded', task, photo, v))
           for photo in PHOTOS if photo not in TEST_PHOTOS
           for v in range(variants)]
  test = [Example(photo, photo_path(photo), synth=task,
                  seed=degrade.seed_of('embedded-test', task, photo))
          for photo in TEST_PHOTOS]
  return Plan(f'embedded-{task}', TASKS.index(task),
              {'train': train, 'test': test}, max_size=max_size)
