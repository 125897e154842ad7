"""Two threads running forward+backward on separate layers at once give the results of
running them one after the other, on every backend, also as the first calls of a process
(when the backend is loaded)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from hypothesis_profiles import backend_device_params
from torch import nn

from lora_kernels import LoRALinear

BACKENDS = backend_device_params()


def sizes(backend, device_type):
    """(M, K, N, R): big enough for the two threads' ops to overlap; small interpreted."""
    if backend == "triton" and device_type == "cpu":
        return 24, 40, 36, 8
    return 256, 192, 160, 16


def make_layers(backend, device_type, dropout):
    M, K, N, R = sizes(backend, device_type)
    layers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        layer = LoRALinear(
            nn.Linear(K, N, device=device_type),
            rank=R,
            dropout=dropout,
            learnable_scaling=True,
            backend=backend,
        )
        nn.init.normal_(layer.lora_B)
        layers.append(layer)
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(M, K, generator=g).to(device_type) for _ in layers]
    return layers, inputs


def forward_backward(layer, x):
    """Output and the gradients of x, A, B and the scaling, for loss = sum(y^2)."""
    x = x.clone().requires_grad_()
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), (x, layer.lora_A, layer.lora_B, layer.scaling))
    return [y.detach(), *grads]


def run_together(layers, inputs, rounds):
    """Each round, both threads start at a barrier; returns results[round][thread]."""
    results = [[None, None] for _ in range(rounds)]
    errors = []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            for r in range(rounds):
                barrier.wait()
                results[r][i] = forward_backward(layers[i], inputs[i])
                barrier.wait()
        except Exception as error:  # re-raised in the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise errors[0]
    return results


def equal(a, b):
    return all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


@pytest.mark.parametrize("device_type, backend", BACKENDS)
def test_two_threads_without_dropout_give_the_sequential_results(device_type, backend):
    layers, inputs = make_layers(backend, device_type, dropout=0.0)
    expected = [forward_backward(layer, x) for layer, x in zip(layers, inputs, strict=True)]
    rounds = 2 if backend == "triton" and device_type == "cpu" else 8
    for r, pair in enumerate(run_together(layers, inputs, rounds)):
        for i in (0, 1):
            assert equal(pair[i], expected[i]), f"round {r}, thread {i}"


@pytest.mark.parametrize("device_type, backend", BACKENDS)
def test_two_threads_with_dropout_give_the_sequential_results_of_one_draw_order(
    device_type, backend
):
    # Both threads draw a seed from the one default generator: which draws first is up
    # to the scheduler, so the results are those of one of the two sequential orders.
    layers, inputs = make_layers(backend, device_type, dropout=0.3)
    by_order = {}
    for order in ((0, 1), (1, 0)):
        torch.manual_seed(7)
        by_order[order] = {i: forward_backward(layers[i], inputs[i]) for i in order}
    assert not equal(by_order[(0, 1)][0], by_order[(1, 0)][0]), "the orders must differ"
    torch.manual_seed(7)
    (pair,) = run_together(layers, inputs, rounds=1)
    matching = [
        o for o, res in by_order.items() if equal(pair[0], res[0]) and equal(pair[1], res[1])
    ]
    assert matching, "the threaded results match neither sequential order"


COLD_START = """
import sys, threading, torch
from torch import nn
from lora_kernels import LoRALinear

backend, device = sys.argv[1], sys.argv[2]
layers, inputs = [], []
for seed in (0, 1):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(32, 24, device=device), rank=4, backend=backend)
    nn.init.normal_(layer.lora_B)
    layers.append(layer)
    inputs.append(torch.randn(16, 32, device=device))

def step(i):
    x = inputs[i].clone().requires_grad_()
    y = layers[i](x)
    return [y.detach(), *torch.autograd.grad(y.square().sum(), (x, layers[i].lora_A))]

results, errors = [None, None], []
barrier = threading.Barrier(2)
def work(i):
    try:
        barrier.wait()
        results[i] = step(i)  # the first calls of the process: the backend loads now
    except Exception as error:
        errors.append(repr(error))
threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
[t.start() for t in threads]
[t.join() for t in threads]
assert not errors, errors
for i in (0, 1):
    assert all(torch.equal(a, b) for a, b in zip(results[i], step(i))), i
print("ok")
"""


@pytest.mark.parametrize("device_type, backend", BACKENDS)
def test_two_threads_making_the_first_calls_of_a_process_load_the_backend_once(
    device_type, backend
):
    result = subprocess.run(
        [sys.executable, "-c", COLD_START, backend, device_type],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
