"""The embedded tiny Stable Diffusion demo model: procedural data, tokenizer, classifier, training.

Where it lives: ``deepcache train-demo-model --out DIR`` writes the pipeline to ``DIR/demo-model``
(:data:`PIPELINE_DIR`, marked by a :data:`MARKER` file) and the classifier to ``DIR/demo-classifier``
(:data:`CLASSIFIER_DIR`); ``deepcache train-demo-dit --out DIR`` writes the tiny Flux DiT, trained on the same
shapes, to ``DIR/demo-flux`` (:data:`DIT_DIR`, marked by its :data:`DIT_MARKER` summary); the shipped ones are in
:data:`ASSETS`. The tools load the shipped DiT by the name :data:`EMBEDDED_DIT_NAME` (``--model embedded-dit``).

Example::

    >>> from DeepCache.tools.demo_model.data import make_dataset
    >>> make_dataset(2, seed=0).captions[0]
    'a small black square on a blue background, top right'
    >>> from DeepCache.tools.demo_model import EMBEDDED_MODEL, is_demo_pipeline_dir
    >>> is_demo_pipeline_dir(EMBEDDED_MODEL)
    True
    >>> is_demo_dit_dir(EMBEDDED_DIT)
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
#: Folder (under ``--out``) that receives the tiny Flux DiT pipeline.
DIT_DIR = "demo-flux"
#: Summary of the run that produced a DiT folder (config, losses, wall time); it marks the folder as a demo DiT.
DIT_MARKER = "deepcache-demo-dit.json"
EMBEDDED_DIT = ASSETS / DIT_DIR
#: The ``--model`` name of the shipped DiT (a folder of that name in the working directory is not shadowed: it wins).
EMBEDDED_DIT_NAME = "embedded-dit"
#: What a ``FluxPipeline`` call needs for the demo DiT (its defaults are Flux's 1024 px and T5's 512 tokens).
DIT_CALL_KWARGS: dict[str, int] = {"height": 32, "width": 32, "max_sequence_length": 16}


def is_demo_pipeline_dir(path: str | Path) -> bool:
    """Whether ``path`` is a pipeline folder written by ``deepcache train-demo-model``."""
    return (Path(path) / MARKER).is_file()


def is_demo_dit_dir(path: str | Path) -> bool:
    """Whether ``path`` is a DiT pipeline folder written by ``deepcache train-demo-dit``."""
    return (Path(path) / DIT_MARKER).is_file()

