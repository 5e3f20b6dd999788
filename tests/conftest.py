import pytest

from tests.scripts import run_script


@pytest.fixture(scope="session")
def synthetic_resnet18(tmp_path_factory):
    """ResNet-18 trained on the synthetic classification set, ~370 steps (~80 s here): the classification
    convergence test checks it, and the detection convergence test starts its backbone from it, as real detection
    training starts from ImageNet weights."""
    out = tmp_path_factory.mktemp("synthetic_resnet18")
    run_script("train_cls.py", "--arch", "resnet18", "--device", "cpu", "--epochs", "6", "--synthetic-size", "2000",
               "--batch-size", "32", "--blr", "0.4", "--lr-scheduler", "cosine", "--warmup-epochs", "1",
               "--workers", "1", "--print-freq", "50", "--output-dir", str(out))
    return out
