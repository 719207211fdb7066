"""The tools wing: every ``deepcache`` command and what only the commands use.

The library (``DeepCache.helper``, ``schedule``, ``layout``, ``calibration`` and the patch) sits above this
package and never imports it. Here, each command is one module (``bench`` a subpackage) that registers itself with
:mod:`DeepCache.tools.cli`; a command imports the shared modules beside it, never another command.

Example::

    >>> from DeepCache.tools.cli import build_parser
    >>> build_parser().prog
    'deepcache'
"""
