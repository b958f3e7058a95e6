"""gradclip inside the trainers people already run.

- :mod:`gradclip.integrations.huggingface`: ``patch()`` makes ``accelerate.Accelerator``'s
  ``clip_grad_norm_`` and ``clip_grad_value_`` (and so the ``transformers.Trainer``'s
  ``max_grad_norm``) clip with gradclip; ``unpatch()`` restores Accelerate's own.
- :mod:`gradclip.integrations.lightning`: the ``FusedGradientClipping`` callback makes a
  Lightning ``Trainer``'s ``gradient_clip_val`` clip with gradclip, for that trainer only.
- :mod:`gradclip.integrations.fabric`: the ``FabricGradientClipping`` callback makes a
  Lightning ``Fabric``'s ``clip_gradients`` clip with gradclip, for that Fabric only.
- :mod:`gradclip.integrations.torchtitan`: ``patch()`` makes torchtitan's
  ``torchtitan.distributed.utils.clip_grad_norm_`` (what its trainers call) clip with gradclip.

None of the frameworks is a dependency of gradclip: install them with the extras
``gradclip[hf]``, ``gradclip[lightning]`` or ``gradclip[torchtitan]``. Importing this
package imports none of them; each submodule imports its framework when it is used.

Every integration logs one INFO line on the ``gradclip`` logger at its first clip, and
warns once per reason (:class:`FrameworkClipsWarning`) where it leaves a clip to the
framework's own code. See ``docs/integrations.md``.
"""

from ._common import FrameworkClipsWarning

__all__ = ["FrameworkClipsWarning"]
