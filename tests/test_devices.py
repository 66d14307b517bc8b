"""Device parameters (`train.device`, `verify.device`, `sample.device`, `bench.device`): one rule, errors that
name the key."""

import pytest
import torch

from gptcore.devices import resolve_device
from gptcore.params import ParamsError

NO_GPU = not torch.cuda.is_available()


def test_auto_takes_cuda_when_present_else_cpu():
    assert resolve_device("auto", "train.device").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cpu_stays_cpu_even_under_torchrun():
    assert resolve_device("cpu", "train.device", local_rank=3) == torch.device("cpu")


def test_unknown_name_names_the_key():
    with pytest.raises(ParamsError, match=r"verify\.device: 'gpu0' is not a device"):
        resolve_device("gpu0", "verify.device")


@pytest.mark.skipif(not NO_GPU, reason="checks the error on a machine without a CUDA GPU")
def test_cuda_without_a_gpu_names_the_key():
    with pytest.raises(ParamsError, match=r"sample\.device: 'cuda:1' asked for, but this machine has no CUDA GPU"):
        resolve_device("cuda:1", "sample.device")


@pytest.mark.gpu
def test_each_torchrun_process_takes_its_local_gpu():
    assert resolve_device("cuda", "train.device", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("auto", "train.device") == torch.device("cuda")
