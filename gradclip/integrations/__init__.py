"""gradclip inside the trainers people already run.

- :mod:`gradclip.integrations.huggingface`: ``patch()`` makes ``accelerate.Accelerator``'s
  ``clip_grad_norm_`` and ``clip_grad_value_`` (and so the ``transformers.Trainer``'s
  ``max_grad_norm``) clip with gradclip; ``unpatch()`` restores Accelerate's own.
- :mod:`gradclip.integrations.lightning`: the ``FusedGradientClipping`` callback makes a
  Lightning ``Trainer``'s ``gradient_clip_val`` clip with gradclip, for that trainer only.

Neither framework is a dependency of gradclip: install them with the extras
``gradclip[hf]`` or ``gradclip[lightning]``. Importing this package imports neither;
each submodule imports its framework when it is used. See ``docs/integrations.md``.
"""
