"""A teacher eta cannot cut into blocks: one opaque module with no stem/blocks/head structure."""
from torch import nn


class Opaque(nn.Module):
    def __init__(self, num_classes=10, in_chans=1):
        super().__init__()
        self.w = nn.Parameter(nn.init.normal_(nn.Parameter(__import__("torch").empty(num_classes, in_chans))))

    def forward(self, x):
        return x.mean((2, 3)) @ self.w.t()


def make(num_classes=10, in_chans=1, **kw):
    return Opaque(num_classes, in_chans)
