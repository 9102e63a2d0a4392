"""The test sessions keep CPU and GPU apart (tests/conftest.py): the CPU session interprets the
Triton kernels and hides every GPU; `pytest -m gpu` compiles them for the GPU."""

import os

import pytest
import torch
from conftest import gpu_session


@pytest.mark.parametrize("expr,gpu", [("", False), ("gpu", True), ("gpu and not slow", True), ("not gpu", False),
                                      ("slow", False), ("gpu or slow", False), ("slow and gpu", True)])
def test_which_session(expr, gpu):
    assert gpu_session(expr) is gpu


def test_the_cpu_session_keeps_to_the_cpu(request):
    assert not request.config.gpu_session
    assert os.environ["TRITON_INTERPRET"] == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()  # a 2-rank test on a 1-GPU machine gets gloo on the CPU, not cuda:1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_session_compiles_the_kernels(request):
    assert request.config.gpu_session and os.environ.get("TRITON_INTERPRET") != "1"
