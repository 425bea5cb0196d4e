import pytest
import torch

import ampkit


@pytest.fixture(autouse=True)
def _clean_tables():
    """Each test starts and ends with torch's default tables and no open region."""
    ampkit.reset_policies()
    yield
    ampkit.reset_policies()
    assert ampkit._C.autocast_nesting_depth() == 0, "a test left an ampkit.autocast region open"


def devices():
    out = ["cpu"]
    out.append(pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")))
    return out
