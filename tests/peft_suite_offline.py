"""pytest plugin of `make test-peft-suite`, loaded in both of its runs: no network.

peft's tests that load a model from the Hub try to reach it despite HF_HUB_OFFLINE (its
`hub_online_once` switches offline mode off for a model's first use), and
huggingface_hub retries a failed request five times with back-off: about a minute per
test. Here every name lookup fails at once, huggingface_hub does not retry, and a test
that fails or errors because it reached for the network is reported as skipped ("needs
the Hub"), so it is neither a pass nor a failure of either run. Not a test module.
"""

from __future__ import annotations

import socket

import pytest

NO_NETWORK = "lora_kernels peft suite: no network here"


def _refuse(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, NO_NETWORK)


def pytest_configure(config):
    socket.getaddrinfo = _refuse
    try:
        from huggingface_hub.utils import _http
    except ImportError:
        return
    backoff = getattr(_http, "_http_backoff_base", None)
    if backoff is None:  # another huggingface_hub: it retries, which is only slower
        return

    def without_retries(*args, **kwargs):
        kwargs["max_retries"] = 0
        return backoff(*args, **kwargs)

    _http._http_backoff_base = without_retries


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and NO_NETWORK in str(report.longrepr):
        path, line, _ = item.location
        report.outcome = "skipped"
        report.longrepr = (path, (line or 0) + 1, "Skipped: needs the Hub (no network here)")
