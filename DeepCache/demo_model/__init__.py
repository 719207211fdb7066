"""The embedded tiny Stable Diffusion demo model: procedural data, tokenizer, classifier, training.

Example::

    >>> from DeepCache.demo_model.data import make_dataset
    >>> make_dataset(2, seed=0).captions[0]
    'a small black square on a blue background, top right'
"""
