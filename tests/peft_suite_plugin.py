"""pytest plugin of `make test-peft-suite`: peft's own tests, with every LoRA model they
build patched by `lora_kernels.patch_peft`.

Loaded with `-p peft_suite_plugin` (this directory on PYTHONPATH); not a test module.
`LoraModel.inject_adapter` is wrapped so that each model is patched right after peft
injects an adapter (a second adapter re-patches: `patch_peft` is idempotent). At the end
of the session it writes what reached the fused op to $PEFT_SUITE_COUNTS (JSON): how
many models were patched, how many modules, and the fused calls and fallbacks by
reason, summed over every report.
"""

from __future__ import annotations

import collections
import json
import os
import weakref

_reports: list = []
_models = weakref.WeakSet()


def pytest_configure(config):
    from peft.tuners.lora import model as lora_model

    import lora_kernels

    inject_adapter = lora_model.LoraModel.inject_adapter

    def inject_and_patch(self, *args, **kwargs):
        result = inject_adapter(self, *args, **kwargs)
        _reports.append(lora_kernels.patch_peft(self.model))
        _models.add(self.model)
        return result

    lora_model.LoraModel.inject_adapter = inject_and_patch


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("PEFT_SUITE_COUNTS")
    if not path:
        return
    by_peft = collections.Counter()
    for report in _reports:
        by_peft.update(report.calls.by_peft)
    counts = {
        "patch_calls": len(_reports),
        "modules_patched": sum(len(report.patched) for report in _reports),
        "fused_calls": sum(report.calls.fused for report in _reports),
        "fallback_calls": dict(by_peft.most_common()),
    }
    with open(path, "w") as f:
        json.dump(counts, f, indent=2)
