"""Hatch build hook: an editable install gets pieval's lm-eval hook but no copy of ``tasks/``.

hatchling copies ``force-include`` files into editable wheels too. A copy of ``tasks/`` in
site-packages would go stale on the first edit, and an editable install finds the
checkout's ``tasks/`` beside the package anyway (``pieval.paths.tasks_dir``).
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

HOOK_PTH = "pieval_lm_eval.pth"


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if version == "editable":
            build_data["force_include_editable"] = {HOOK_PTH: HOOK_PTH}
