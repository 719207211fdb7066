"""The embedded tiny Stable Diffusion demo model: procedural data, tokenizer, classifier, training.

Where it lives: ``deepcache train-demo-model --out DIR`` writes the pipeline to ``DIR/demo-model``
(:data:`PIPELINE_DIR`, marked by a :data:`MARKER` file) and the classifier to ``DIR/demo-classifier``
(:data:`CLASSIFIER_DIR`); the shipped ones are in :data:`ASSETS`.

Example::

    >>> from DeepCache.tools.demo_model.data import make_dataset
    >>> make_dataset(2, seed=0).captions[0]
    'a small black square on a blue background, top right'
    >>> from DeepCache.tools.demo_model import EMBEDDED_MODEL, is_demo_pipeline_dir
    >>> is_demo_pipeline_dir(EMBEDDED_MODEL)
    True
"""

from __future__ import annotations

from pathlib import Path

#: Folder (under ``--out``) that receives the pipeline.
PIPELINE_DIR = "demo-model"
#: Folder (beside the pipeline) that receives the attribute classifier.
CLASSIFIER_DIR = "demo-classifier"
#: File in a pipeline folder that marks it as a demo pipeline (its captions can be checked).
MARKER = "deepcache-demo.json"
#: The shipped model and classifier.
ASSETS = Path(__file__).resolve().parents[2] / "assets"
EMBEDDED_MODEL = ASSETS / PIPELINE_DIR
EMBEDDED_CLASSIFIER = ASSETS / CLASSIFIER_DIR


def is_demo_pipeline_dir(path: str | Path) -> bool:
    """Whether ``path`` is a pipeline folder written by ``deepcache train-demo-model``."""
    return (Path(path) / MARKER).is_file()
